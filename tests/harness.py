"""Real server processes for integration tests.

A ``Pair`` writes its own settings file (primary on 127.0.0.1, backup on
127.0.0.2, one free port, as in the course layout), starts and stops the
servers with the real ``bin/start_server`` / ``bin/stop_server``, and polls
conditions instead of sleeping.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pbkv.client import Client

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / "bin"

# Short timeouts keep failure tests quick; generous enough for a busy machine.
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
            port = sock.getsockname()[1]
        if all(_bindable(host, port) for host in hosts):
            return port
    raise RuntimeError("no free port")


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.02)


class Pair:
    def __init__(self, tmp: Path, **settings: str) -> None:
        self.dir = tmp
        self.port = free_port()
        values = {"primary": "127.0.0.1", "backup": "127.0.0.2", "port": str(self.port)}
        values.update(FAST_SETTINGS)
        values.update(settings)
        self.settings = values
        self.config = tmp / "settings.conf"
        self.config.write_text(json.dumps(values))
        self.address = {
            "primary": (values["primary"], int(values["port"])),
            "backup": (values["backup"], int(values.get("backup_port", values["port"]))),
        }
        if values["primary"] == values["backup"] and "backup_port" not in values:
            self.address["backup"] = (values["backup"], self.port + 1)
        self._clients: list[Client] = []

    # -- scripts ---------------------------------------------------------------
    def _script(self, name: str, role: str, *extra: str, check: bool = True):
        flag = "-p" if role == "primary" else "-b"
        result = subprocess.run(
            [str(BIN / name), flag, "--config", str(self.config), "--run-dir", str(self.dir),
             *extra],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{name} {flag} failed: {result.stdout}{result.stderr}")
        return result

    def start(self, role: str, *extra: str, check: bool = True):
        return self._script("start_server", role, *extra, check=check)

    def stop(self, role: str):
        return self._script("stop_server", role)

    def start_both(self) -> None:
        self.start("backup")
        self.start("primary")
        self.wait_stage("primary", "in_sync")
        self.wait_stage("backup", "in_sync")

    # -- processes ---------------------------------------------------------------
    def pid_file(self, role: str) -> Path:
        host, port = self.address[role]
        return self.dir / "run" / f"{role}-{host}-{port}.pid"

    def log_file(self, role: str) -> Path:
        host, port = self.address[role]
        return self.dir / "logs" / f"{role}-{host}-{port}.log"

    def log(self, role: str) -> str:
        path = self.log_file(role)
        return path.read_text(errors="replace") if path.exists() else ""

    def pid(self, role: str) -> int | None:
        try:
            return int(self.pid_file(role).read_text())
        except (OSError, ValueError):
            return None

    def signal(self, role: str, signum: int) -> None:
        pid = self.pid(role)
        assert pid is not None, f"{role} has no pid file"
        os.kill(pid, signum)

    def kill(self, role: str) -> None:
        """kill -9, then wait until the process is gone and its port is free."""
        pid = self.pid(role)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not _alive(pid), what=f"{role} to die")
        self.pid_file(role).unlink(missing_ok=True)

    def cleanup(self) -> None:
        for client in self._clients:
            client.close()
        for role in ("primary", "backup"):
            pid = self.pid(role)
            if pid is not None and _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                    if _alive(pid):
                        os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass

    # -- talking to the servers -----------------------------------------------------
    def client(self, role: str = "primary", timeout: float = 10.0) -> Client:
        host, port = self.address[role]
        client = Client(host, port, timeout=timeout)
        self._clients.append(client)
        return client

    def status(self, role: str) -> dict | None:
        host, port = self.address[role]
        try:
            with Client(host, port, timeout=2.0) as client:
                return client.status()
        except Exception:
            return None

    def stage(self, role: str) -> str | None:
        status = self.status(role)
        return status["stage"] if status else None

    def wait_stage(self, role: str, stage: str, timeout: float = 20.0) -> dict:
        return wait_for(
            lambda: (s := self.status(role)) is not None and s["stage"] == stage and s,
            timeout,
            what=f"{role} to reach {stage}",
        )

    def dump(self, role: str) -> dict[str, str]:
        host, port = self.address[role]
        with Client(host, port, timeout=10.0) as client:
            return dict(client.dump())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
