"""Members of a coordinated cluster as real processes on loopback.

:class:`LocalMembers` writes one settings file (the coordinator's URL, a cluster
name, a secret, short timeouts), starts and stops each member with the real
``bin/start_server -m`` / ``bin/stop_server -m``, and polls conditions instead
of sleeping. Member ``i`` listens on ``127.0.0.<i+1>`` at one free port::

    with LocalMembers(tmp_dir, etcd.client_url) as cluster:
        cluster.start(0)              # the first member of a new cluster leads
        cluster.start(1)
        cluster.wait_writable()       # the primary has a backup in sync, recorded
        cluster.kill(cluster.primary())
        cluster.wait_writable()       # the recorded backup was promoted
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pbkv.client import Client, PbkvError
from pbkv.testing.cluster import (
    BIN,
    FAST_SETTINGS,
    ServerProcesses,
    free_port,
    wait_for,
)

__all__ = ["LocalMembers"]

SECRET = "members-test-secret"


class LocalMembers(ServerProcesses[int]):
    """Up to a few members of one cluster, started by the real scripts in ``directory``."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        coordinator: str,
        cluster: str = "pbkv",
        count: int = 3,
        addresses: list[tuple[str, int]] | None = None,
        wrap: Callable[[int, list[str]], list[str]] | None = None,
        **settings: str,
    ) -> None:
        """``addresses`` (default: ``127.0.0.<i+1>`` at a free port) and ``wrap``, which
        turns member ``i``'s script command line into one that runs where it lives
        (another network namespace, say)."""
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        if addresses is None:
            hosts = tuple(f"127.0.0.{i + 1}" for i in range(count))
            port = free_port(hosts)
            addresses = [(host, port) for host in hosts]
        self.addresses = addresses
        self.wrap = wrap
        values = {
            "coordinator": coordinator,
            "cluster": cluster,
            "lease_ttl": "2",
            "secret": SECRET,
            **FAST_SETTINGS,
            **settings,
        }
        self.settings = values
        self.config = self.dir / "settings.conf"
        self.config.write_text(json.dumps(values))

    # -- scripts ---------------------------------------------------------------------------
    def name(self, index: int) -> str:
        host, port = self.addresses[index]
        return f"{host}:{port}"

    def _launcher(self, action: str, index: int, *extra: str) -> subprocess.CompletedProcess[str]:
        command = [
            str(BIN / f"{action}_server"),
            "-m",
            self.name(index),
            "--config",
            str(self.config),
            "--run-dir",
            str(self.dir),
            *extra,
        ]
        if self.wrap is not None:
            command = self.wrap(index, command)
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(
                f"{action}_server -m {self.name(index)} failed ({result.returncode}): "
                f"{result.stdout}{result.stderr}"
            )
        return result

    def start(self, index: int, *extra: str) -> subprocess.CompletedProcess[str]:
        """``bin/start_server -m``: returns once the member leads or follows."""
        return self._launcher("start", index, *extra)

    def stop(self, index: int) -> subprocess.CompletedProcess[str]:
        return self._launcher("stop", index)

    # -- processes -------------------------------------------------------------------------
    def _file(self, index: int, folder: str, suffix: str) -> Path:
        host, port = self.addresses[index]
        return self.dir / folder / f"member-{host}-{port}.{suffix}"

    def log(self, index: int) -> str:
        path = self._file(index, "logs", "log")
        return path.read_text(errors="replace") if path.exists() else ""

    def pid_file(self, index: int) -> Path:
        return self._file(index, "run", "pid")

    def pids(self) -> list[int | None]:
        return [self.pid(index) for index in range(len(self.addresses))]

    # -- talking to the members --------------------------------------------------------------
    def client(self, index: int, timeout: float = 5.0) -> Client:
        host, port = self.addresses[index]
        # Writes without a key, one attempt each: every refusal is seen.
        return Client(host, port, timeout=timeout, idempotency_keys=False)

    def status(self, index: int, timeout: float = 2.0) -> dict[str, Any] | None:
        try:
            with self.client(index, timeout) as client:
                return client.status()
        except (OSError, PbkvError, ValueError):
            return None

    def statuses(self) -> list[dict[str, Any] | None]:
        return [self.status(index) for index in range(len(self.addresses))]

    def primary(self, exclude: tuple[int, ...] = ()) -> int | None:
        """The index of the member that says it is the primary (None: none does)."""
        for index, status in enumerate(self.statuses()):
            if index not in exclude and status is not None and status.get("role") == "primary":
                return index
        return None

    def wait(self, condition: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
        return wait_for(condition, timeout, what=what)

    def writable(self, exclude: tuple[int, ...] = ()) -> int | None:
        """The primary's index once it is in sync with a backup etcd records."""
        for index, status in enumerate(self.statuses()):
            if (
                index not in exclude
                and status is not None
                and status.get("role") == "primary"
                and status.get("stage") == "in_sync"
                and status.get("recorded_backup") is not None
                and status.get("recorded_backup") == status.get("in_sync_backup")
            ):
                return index
        return None

    def wait_writable(self, exclude: tuple[int, ...] = (), timeout: float = 30.0) -> int:
        found: tuple[int] = wait_for(
            lambda: (index,) if (index := self.writable(exclude)) is not None else None,
            timeout,
            what="a primary with a recorded in-sync backup",
        )
        return found[0]
