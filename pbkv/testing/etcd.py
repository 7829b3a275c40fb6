"""A throwaway single-member etcd for tests and benchmarks.

:class:`EtcdServer` runs Debian's ``etcd`` (``etcd-server``, 3.4) on two free
loopback ports (client and peer) with its data in a temporary directory, and
returns from :meth:`~EtcdServer.start` once etcd reports itself healthy (it
polls ``/health``; no fixed sleep)::

    with EtcdServer() as etcd:
        etcd.client_url          # "http://127.0.0.1:PORT", for the coordinator setting
        etcd.kill()              # kill -9; the data directory stays
        etcd.start()             # the same member again, same ports and data
        etcd.pause(); etcd.resume()

It is fast because nothing is synced to disk (``--unsafe-no-fsync``): a test
member loses its data with the machine, which no test cares about. etcd's lease
timing is left at its defaults (100 ms heartbeat, 1 s election timeout), so a
lease behaves as in production: etcd grants no TTL under 2 s.

etcd never outlives the process that started it: it is killed by the kernel
when the thread that started it exits (``PR_SET_PDEATHSIG``; so start it from
a thread that lives as long as it should, e.g. the main thread, never from
``asyncio.to_thread``), at interpreter exit, and by :meth:`cleanup`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = ["ETCD_MISSING", "EtcdServer", "etcd_binary"]

ETCD_MISSING = "etcd is not installed (Debian: apt-get install etcd-server)"
NAME = "pbkv-test"
_running: set[EtcdServer] = set()
# Ports are picked below Linux's ephemeral range (32768-60999), where no outgoing
# connection takes them: a machine busy with short connections can have that whole
# range in TIME_WAIT, and a port picked there may be taken before etcd binds it.
_PORTS = range(20000, 32768)


def free_port(host: str, taken: tuple[int, ...] = ()) -> int:
    """A port that ``host`` can listen on now (etcd binds with SO_REUSEADDR)."""
    for _ in range(200):
        port = random.choice(_PORTS)
        if port in taken:
            continue
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port on {host}")


def etcd_binary() -> str | None:
    """The etcd executable on PATH (or in ``PBKV_ETCD``), or None."""
    return os.environ.get("PBKV_ETCD") or shutil.which("etcd")


def _dying_with_parent() -> list[str]:
    """What runs etcd so that it dies with the process that started it: util-linux's
    ``setpriv``. Not a ``preexec_fn``: code between fork and exec is unsafe in a process
    with threads, and the coordinator's tests run gRPC's (a child once died there)."""
    setpriv = shutil.which("setpriv")
    return [] if setpriv is None else [setpriv, "--pdeathsig", "KILL", "--"]


class EtcdServer:
    """One etcd member on loopback. Blocking methods; see the module docstring."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, host: str = "127.0.0.1"):
        binary = etcd_binary()
        if binary is None:
            raise FileNotFoundError(ETCD_MISSING)
        self.binary = binary
        self._own_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="etcd-") if directory is None else directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.client_port = free_port(host)
        self.peer_port = free_port(host, taken=(self.client_port,))
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- addresses ---------------------------------------------------------------------
    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def log_file(self) -> Path:
        return self.dir / "etcd.log"

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def command(self) -> list[str]:
        return [
            self.binary,
            "--name",
            NAME,
            "--data-dir",
            str(self.dir / "data"),
            "--listen-client-urls",
            self.client_url,
            "--advertise-client-urls",
            self.client_url,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            f"{NAME}={self.peer_url}",
            "--initial-cluster-state",
            "new",
            "--unsafe-no-fsync",
            "--logger",
            "zap",
            "--log-level",
            "warn",
        ]

    # -- life cycle --------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> Self:
        """Start etcd (again, with the same ports and data after a stop or kill) and
        return once it answers healthy."""
        if self.running:
            raise RuntimeError("etcd is already running")
        if self._log is None:
            self._log = self.log_file.open("ab")
        self.process = subprocess.Popen(
            [*_dying_with_parent(), *self.command()],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        _running.add(self)
        self.wait_healthy(timeout)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        """etcd's own ``/health``: true once it has a raft leader and no alarm."""
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=1.0) as reply:
                return b'"true"' in reply.read()
        except (OSError, urllib.error.URLError):
            return False

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if not self.running:
                raise RuntimeError(f"etcd exited while starting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd not healthy after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (SIGKILL if it does not go); the data stays."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)  # a paused etcd cannot exit
                process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.process = None
        _running.discard(self)

    def kill(self) -> None:
        """kill -9 and wait until it is gone; the data stays."""
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
        self.process = None
        _running.discard(self)

    def restart(self, timeout: float = 20.0) -> None:
        self.stop()
        self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP: etcd keeps its sockets open and answers nothing. Returns once the
        kernel says it is stopped (the signal is delivered asynchronously: a request
        sent at once could still be answered)."""
        if self.process is None:
            raise RuntimeError("etcd is not running")
        self.process.send_signal(signal.SIGSTOP)
        self._wait_state(stopped=True)

    def resume(self) -> None:
        if self.process is None:
            raise RuntimeError("etcd is not running")
        self.process.send_signal(signal.SIGCONT)
        self._wait_state(stopped=False)

    def _wait_state(self, stopped: bool, timeout: float = 10.0) -> None:
        """Poll /proc until the process is (or is no longer) stopped."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while _stopped(self.process.pid) != stopped:
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd did not {'stop' if stopped else 'resume'} in time")
            time.sleep(0.005)

    def cleanup(self) -> None:
        """Kill etcd and remove its directory when this object created it."""
        self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        if not self.running:
            try:
                self.start()
            except BaseException:
                self.cleanup()
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_running):
        server.kill()


def _stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped by a signal (state T in /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] in ("T", "t")
    except OSError:
        return False
