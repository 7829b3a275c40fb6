"""A primary and a backup as real processes on loopback.

:class:`LocalPair` writes its own course-style settings file (primary on
127.0.0.1, backup on 127.0.0.2, one free port), starts and stops the servers
with the real ``bin/start_server`` / ``bin/stop_server`` (or the launcher module
behind them when the package runs without its repository), and polls
conditions instead of sleeping::

    with LocalPair(tmp_dir) as pair:
        pair.start_both()
        pair.kill("primary")          # kill -9, returns once the process is gone
        pair.start("primary")
        pair.wait_stage("primary", "in_sync")
        pair.dump("backup")

Server logs go to ``<dir>/logs``, pid files to ``<dir>/run``. Every method is
blocking and safe to call from a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from pbkv import config
from pbkv.client import Client, tls_context
from pbkv.launcher import process_alive

__all__ = [
    "FAST_SETTINGS",
    "LocalPair",
    "ServerProcesses",
    "free_port",
    "process_alive",
    "wait_for",
]

REPO = Path(__file__).resolve().parents[2]
Which = TypeVar("Which")
BIN = REPO / "bin"
ROLES = ("primary", "backup")

# Short timeouts keep fault tests quick; generous enough for a busy machine.
FAST_SETTINGS = {
    "ack_timeout": "1.0",
    "heartbeat_interval": "0.1",
    "peer_timeout": "1.0",
    "retry_min": "0.05",
    "retry_max": "0.3",
}


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(hosts: tuple[str, ...] = ("127.0.0.1", "127.0.0.2")) -> int:
    """A port free on every host (the pair uses the same port on two addresses)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind((hosts[0], 0))
            port: int = sock.getsockname()[1]
        if all(_bindable(host, port) for host in hosts):
            return port
    raise RuntimeError("no free port")


def wait_for(
    condition: Callable[[], Any], timeout: float = 15.0, what: str = "", interval: float = 0.02
) -> Any:
    """Poll ``condition`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


class ServerProcesses(Generic[Which]):
    """Server processes a test started, each known by a ``Which`` (a role, an index):
    signalled, killed, and killed (stopped ones too) at ``cleanup`` or at the end of
    a ``with`` block."""

    def pid_file(self, which: Which) -> Path:
        raise NotImplementedError

    def pids(self) -> list[int | None]:
        """The pid of each server, None where it has none."""
        raise NotImplementedError

    def pid(self, which: Which) -> int | None:
        try:
            return int(self.pid_file(which).read_text())
        except (OSError, ValueError):
            return None

    def signal(self, which: Which, signum: int) -> None:
        pid = self.pid(which)
        if pid is None:
            raise RuntimeError(f"{which} has no pid file")
        os.kill(pid, signum)

    def kill(self, which: Which, timeout: float = 15.0) -> None:
        """kill -9, then wait until the process is gone (its port is then free)."""
        pid = self.pid(which)
        if pid is None:
            raise RuntimeError(f"{which} has no pid file")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not process_alive(pid), timeout, what=f"{which} to die")
        self.pid_file(which).unlink(missing_ok=True)

    def cleanup(self) -> None:
        """Kill whatever still runs (stopped processes included)."""
        for pid in self.pids():
            if pid is None or not process_alive(pid):
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


class LocalPair(ServerProcesses[str]):
    """Both servers of one pair, started by the real scripts in ``directory``."""

    def __init__(self, directory: str | os.PathLike[str], **settings: str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        values = {"primary": "127.0.0.1", "backup": "127.0.0.2", "port": str(self.port)}
        values.update(FAST_SETTINGS)
        values.update(settings)
        self.settings = values
        self.config = self.dir / "settings.conf"
        self.config.write_text(json.dumps(values))
        backup_port = int(values.get("backup_port", values["port"]))
        if values["primary"] == values["backup"] and "backup_port" not in values:
            backup_port = int(values["port"]) + 1
        self.address = {
            "primary": (values["primary"], int(values["port"])),
            "backup": (values["backup"], backup_port),
        }
        # What the helpers send: the client token, the secret for shutdown, TLS.
        parsed = config.Settings(**config.parse_mapping(values))
        self.token = parsed.client_token
        self.secret = parsed.secret
        self.cafile = parsed.tls_ca if parsed.tls else None

    def configure(self, **settings: str) -> None:
        """Change settings before the servers start (rewrites the settings file)."""
        self.settings.update(settings)
        self.config.write_text(json.dumps(self.settings))

    # -- scripts -------------------------------------------------------------------
    def command(self, action: str, role: str, *extra: str) -> list[str]:
        """The command line of ``bin/<action>_server`` (start or stop) for ``role``;
        a pair whose servers run elsewhere (another namespace) wraps it."""
        script = BIN / f"{action}_server"
        if script.exists():
            command = [str(script)]
        else:  # installed without its repository: the module behind the script
            command = [sys.executable, "-m", "pbkv.launcher", action]
        flag = "-p" if role == "primary" else "-b"
        return [*command, flag, "--config", str(self.config), "--run-dir", str(self.dir), *extra]

    def _launcher(
        self, action: str, role: str, *extra: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        command = self.command(action, role, *extra)
        flag = "-p" if role == "primary" else "-b"
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{action}_server {flag} failed ({result.returncode}): "
                f"{result.stdout}{result.stderr}"
            )
        return result

    def start(self, role: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``bin/start_server``: returns once the server is ready (see the launcher)."""
        return self._launcher("start", role, *extra, check=check)

    def stop(self, role: str) -> subprocess.CompletedProcess[str]:
        """``bin/stop_server``: SIGTERM, and wait until the process is gone."""
        return self._launcher("stop", role)

    def start_both(self, timeout: float = 20.0) -> None:
        self.start("backup")
        self.start("primary")
        self.wait_stage("primary", "in_sync", timeout)
        self.wait_stage("backup", "in_sync", timeout)

    # -- processes -------------------------------------------------------------------
    def _name(self, role: str) -> str:
        host, port = self.address[role]
        return f"{role}-{host}-{port}"

    def pid_file(self, role: str) -> Path:
        return self.dir / "run" / f"{self._name(role)}.pid"

    def log_file(self, role: str) -> Path:
        return self.dir / "logs" / f"{self._name(role)}.log"

    def log(self, role: str) -> str:
        path = self.log_file(role)
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self, role: str, lines: int = 40) -> list[str]:
        return self.log(role).splitlines()[-lines:]

    def alive(self, role: str) -> bool:
        pid = self.pid(role)
        return pid is not None and process_alive(pid)

    def shutdown(self, role: str, timeout: float = 15.0) -> None:
        """``GET /kvman/shutdown``, then wait until the process has exited."""
        pid = self.pid(role)
        host, port = self.address[role]
        with self._client(host, port, 5.0) as client:
            client.shutdown(secret=self.secret)
        if pid is not None:
            wait_for(lambda: not process_alive(pid), timeout, what=f"{role} to exit")
            self.pid_file(role).unlink(missing_ok=True)

    def pids(self) -> list[int | None]:
        return [self.pid(role) for role in ROLES]

    # -- talking to the servers ---------------------------------------------------------
    def _client(self, host: str, port: int, timeout: float) -> Client:
        context = tls_context(self.cafile) if self.cafile is not None else None
        # Writes without a key, one attempt each (as before safe retries): the tests see
        # every refusal and failure the server gives, and no table beside the pairs.
        return Client(
            host,
            port,
            timeout=timeout,
            token=self.token,
            ssl_context=context,
            idempotency_keys=False,
        )

    def client(self, role: str = "primary", timeout: float = 10.0) -> Client:
        host, port = self.address[role]
        return self._client(host, port, timeout)

    def status(self, role: str, timeout: float = 2.0) -> dict[str, Any] | None:
        """``/kvman/status``, or None when the server does not answer in time."""
        host, port = self.address[role]
        try:
            with self._client(host, port, timeout) as client:
                return client.status()
        except Exception:
            return None

    def stage(self, role: str) -> str | None:
        status = self.status(role)
        return status["stage"] if status else None

    def wait_stage(self, role: str, stage: str, timeout: float = 20.0) -> dict[str, Any]:
        status: dict[str, Any] = wait_for(
            lambda: (s := self.status(role)) is not None and s["stage"] == stage and s,
            timeout,
            what=f"{role} to reach {stage}",
        )
        return status

    def dump(self, role: str) -> dict[str, str]:
        host, port = self.address[role]
        with self._client(host, port, 10.0) as client:
            return dict(client.dump())
