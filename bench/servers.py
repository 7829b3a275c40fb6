"""Servers for the benchmarks: pbkv pairs and standalone primaries (through the real
bin/start_server and bin/stop_server), Redis primaries and replicas (child processes),
free ports, RSS, and a background prober that records how long a server went without
answering.
"""

from __future__ import annotations

import argparse
import compileall
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.resp_load import RespError, SyncRedis
from pbkv import compiled
from pbkv.launcher import process_alive
from pbkv.testing import cluster

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / "bin"
LOOPBACK = ("127.0.0.1", "127.0.0.2")


# ---------------------------------------------------------------- ports and processes


_handed_out: set[int] = set()


def free_port(hosts: Sequence[str] = LOOPBACK) -> int:
    """A free port (on every host), never the same one twice in this process."""
    while True:
        port = cluster.free_port(tuple(hosts))
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def rss_bytes(pid: int) -> int:
    """Resident set size from /proc/PID/status (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_for(condition: Callable[[], Any], timeout: float, what: str, step: float = 0.01) -> Any:
    return cluster.wait_for(condition, timeout, what, step)


# ---------------------------------------------------------------- pbkv


def pbkv_revision(root: Path = REPO) -> str:
    """The commit measured, marked when pbkv/ has uncommitted changes."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "pbkv"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (rev or "unknown") + (" with uncommitted changes" if dirty else "")


def http_get_json(host: str, port: int, path: str, timeout: float = 2.0) -> Any:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def byte_compile(root: Path = REPO) -> None:
    """Compile the checkout's package to bytecode, as an installation does (compile.sh):
    otherwise, with PYTHONDONTWRITEBYTECODE set, each start compiles every module again."""
    if not compileall.compile_dir(root / "pbkv", quiet=1):
        raise RuntimeError(f"cannot byte-compile {root / 'pbkv'}")


class Pbkv:
    """A pbkv primary and backup (or a standalone primary) in their own directory."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        *,
        standalone: bool = False,
        settings: dict[str, str] | None = None,
        serve_flags: Sequence[str] = (),
        root: Path = REPO,
        hosts: dict[str, str] | None = None,
        launch: Callable[..., list[str]] | None = None,
    ) -> None:
        """`hosts` replaces the loopback addresses (role -> address) and `launch(role,
        *argv)` wraps each script's command line (e.g. to run it in a network namespace)."""
        self.name = name
        # Another checkout's scripts run that checkout's code, from its folder: ``python
        # -m`` looks in the current folder first, which would be this checkout's.
        self.root = root
        self.bin = root / "bin"
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.standalone = standalone
        # A namespace of its own has every port free; loopback ports are checked.
        self.port = free_port() if hosts is None else cluster.free_port()
        addresses = hosts or {"primary": LOOPBACK[0], "backup": LOOPBACK[1]}
        values = {**addresses, "port": str(self.port)}
        if standalone:
            values["standalone"] = "true"
        values.update(settings or {})
        self.build: str | None = None  # the servers' (their status says), once started
        self.config = self.dir / "settings.conf"
        self.config.write_text(json.dumps(values))
        self.address = {
            "primary": (values["primary"], self.port),
            "backup": (values["backup"], self.port),
        }
        self.serve_flags = list(serve_flags)
        self.launch = launch

    def _command(self, script: str, role: str) -> list[str]:
        flag = "-p" if role == "primary" else "-b"
        command = [
            str(self.bin / script),
            flag,
            "--config",
            str(self.config),
            "--run-dir",
            str(self.dir),
        ]
        if script == "start_server":
            command += self.serve_flags
        return command if self.launch is None else self.launch(role, *command)

    def start(self, role: str, wait: float = 120.0) -> None:
        """bin/start_server: returns once the server is ready (in sync when paired)."""
        result = subprocess.run(
            self._command("start_server", role) + ["--wait", str(wait)],
            capture_output=True,
            text=True,
            timeout=wait + 30,
            cwd=self.root,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{self.name}: cannot start the {role}: {result.stderr.strip()}")

    def spawn(self, role: str, wait: float = 600.0) -> subprocess.Popen[bytes]:
        """bin/start_server in the background, for timing what happens meanwhile."""
        return subprocess.Popen(
            self._command("start_server", role) + ["--wait", str(wait)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.root,
        )

    def start_all(self) -> None:
        if self.standalone:
            self.start("primary")
        else:
            self.start("backup")
            self.start("primary")
            self.wait_stage("primary", "in_sync")
            self.wait_stage("backup", "in_sync")
        self.check_build()

    def check_build(self) -> None:
        """Say so when the servers do not run the build this process runs (a checkout's
        sources edited since it was compiled run as pure Python, slower)."""
        status = self.status("primary", timeout=30)
        self.build = None if status is None else status.get("build")
        if self.build != compiled.BUILD:
            print(
                f"warning: pbkv {self.name} runs {self.build}, this benchmark {compiled.BUILD}",
                file=sys.stderr,
            )

    def stop(self, role: str) -> None:
        subprocess.run(self._command("stop_server", role), capture_output=True, timeout=60)

    def pid_file(self, role: str) -> Path:
        host, port = self.address[role]
        return self.dir / "run" / f"{role}-{host}-{port}.pid"

    def log_path(self, role: str) -> Path:
        host, port = self.address[role]
        return self.dir / "logs" / f"{role}-{host}-{port}.log"

    def pid(self, role: str) -> int | None:
        try:
            pid = int(self.pid_file(role).read_text())
        except (OSError, ValueError):
            return None
        return pid if process_alive(pid) else None

    def kill(self, role: str) -> None:
        """kill -9, then wait until the process is gone."""
        pid = self.pid(role)
        if pid is None:
            raise RuntimeError(f"{self.name}: the {role} is not running")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not process_alive(pid), 10, f"{role} to die")
        self.pid_file(role).unlink(missing_ok=True)

    def status(self, role: str = "primary", timeout: float = 2.0) -> dict[str, Any] | None:
        host, port = self.address[role]
        try:
            return http_get_json(host, port, "/kvman/status", timeout)
        except (OSError, ValueError, http.client.HTTPException):
            return None

    def wait_stage(self, role: str, stage: str, timeout: float = 120.0) -> dict[str, Any]:
        return wait_for(
            lambda: (s := self.status(role)) is not None and s.get("stage") == stage and s,
            timeout,
            f"{self.name} {role} to reach {stage}",
            step=0.02,
        )

    def cleanup(self) -> None:
        roles = ("primary",) if self.standalone else ("primary", "backup")
        for role in roles:
            if self.pid(role) is not None:
                self.stop(role)
            pid = self.pid(role)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- Redis


def add_redis_arguments(ap: argparse.ArgumentParser) -> None:
    """--no-redis, --no-install and --no-redis-if-missing (see `redis_for_run`)."""
    ap.add_argument("--no-redis", action="store_true", help="measure pbkv only")
    ap.add_argument("--no-install", action="store_true", help="never apt-get install Redis")
    ap.add_argument(
        "--no-redis-if-missing",
        action="store_true",
        help="skip Redis (instead of failing) when it is missing and cannot be installed",
    )


def progress_printer(as_json: bool) -> Callable[[str], None]:
    """Prints progress lines: to stderr when stdout carries a JSON report."""
    if as_json:
        return lambda text: print(text, file=sys.stderr, flush=True)
    return lambda text: print(text, flush=True)


def redis_for_run(
    args: argparse.Namespace, prog: str, say: Callable[[str], None]
) -> tuple[str | None, str] | None:
    """The redis-server to compare with, per `add_redis_arguments`' options: (binary, "")
    or (None, why it is skipped); None (after saying why) when the run must stop."""
    redis_binary, reason = None, "--no-redis"
    if not args.no_redis:
        redis_binary, reason = ensure_redis(install=not args.no_install)
        if redis_binary is None and not args.no_redis_if_missing:
            print(f"{prog}: redis is needed: {reason}", file=sys.stderr)
            return None
    if redis_binary is None:
        say(f"redis: skipped ({reason})")
    return redis_binary, reason


def ensure_redis(install: bool = True) -> tuple[str | None, str]:
    """The redis-server binary, installed with apt-get when missing and allowed.

    Returns (path, "") or (None, why not).
    """
    found = shutil.which("redis-server")
    if found:
        return found, ""
    if not install:
        return None, "redis-server is not installed (installation not allowed)"
    if not shutil.which("apt-get"):
        return None, "redis-server is not installed and there is no apt-get"
    if os.geteuid() != 0:
        return None, "redis-server is not installed and installing it needs root"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "redis-server"]):
        try:
            done = subprocess.run(step, capture_output=True, text=True, env=env, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"{' '.join(step[:2])} failed: {exc}"
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
            return None, f"{' '.join(step[:2])} failed: {tail[0]}"
    found = shutil.which("redis-server")
    return (found, "") if found else (None, "apt-get installed no redis-server")


def redis_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return out.strip()


class Redis:
    """One redis-server on 127.0.0.1 (or `host`, with `prefix` before its command line,
    e.g. to run it in a network namespace), persistence off, diskless replication."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        name: str,
        host: str | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.binary = binary
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host or LOOPBACK[0]
        self.port = free_port((self.host,)) if host is None else cluster.free_port()
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(
        self,
        replicaof: Redis | None = None,
        extra: Sequence[str] = (),
        poll: float = 0.02,
        timeout: float = 20.0,
    ) -> None:
        """Launch it; returns once it answers PING (after loading its data, if any, within
        `timeout` s), checked every `poll` s. `extra` flags come last: they override."""
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "no",
            "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0",
            "--dir", str(self.dir),
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        if replicaof is not None:
            args += ["--replicaof", replicaof.host, str(replicaof.port)]
        args = self.prefix + args + list(extra)
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_for(self._pong, timeout, f"redis {self.name} to answer PING", step=poll)
        except TimeoutError:
            self.stop()
            log = (self.dir / "redis.log").read_text(errors="replace").splitlines()[-5:]
            raise RuntimeError(f"redis {self.name} did not start: {' | '.join(log)}") from None

    def _pong(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise TimeoutError("exited")
        try:
            with self.client(1.0) as r:
                return r.call("PING") == b"PONG"
        except (OSError, RespError):  # RespError: -LOADING, still reading its files
            return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def client(self, timeout: float = 10.0) -> SyncRedis:
        return SyncRedis(self.host, self.port, timeout)

    def info(self, section: str) -> dict[str, str]:
        with self.client() as r:
            return r.info(section)

    def link_up(self) -> bool:
        return self.info("replication").get("master_link_status") == "up"

    def wait_link_up(self, timeout: float = 120.0) -> None:
        wait_for(self.link_up, timeout, f"redis {self.name} replication link", step=0.005)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# ---------------------------------------------------------------- stall probe


class Prober(threading.Thread):
    """Asks a server one thing in a loop on one connection, recording when replies came.

    `samples` holds (monotonic time of the reply, status, body): status is the HTTP status
    (Redis: 1), or 0 when the request failed (refused, reset), which is retried after
    `interval`. The longest time between consecutive replies is the longest the server
    left a client waiting.
    """

    def __init__(self, interval: float = 0.002, timeout: float = 30.0) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.timeout = timeout
        self.samples: list[tuple[float, int, bytes]] = []
        self.connected: list[float] = []  # when each connection was accepted
        self._stop_event = threading.Event()

    def _connect(self) -> Any:
        raise NotImplementedError

    def _ask(self, conn: Any) -> tuple[int, bytes]:
        raise NotImplementedError

    def run(self) -> None:
        conn: Any = None
        while not self._stop_event.is_set():
            try:
                if conn is None:
                    conn = self._connect()
                    self.connected.append(time.monotonic())
                status, body = self._ask(conn)
                self.samples.append((time.monotonic(), status, body))
            except (OSError, http.client.HTTPException, ValueError, RespError):
                self.samples.append((time.monotonic(), 0, b""))
                if conn is not None:
                    conn.close()
                conn = None
            self._stop_event.wait(self.interval)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(self.timeout + 5)

    def replies(self, start: float, end: float) -> list[tuple[float, int, bytes]]:
        return [s for s in self.samples if s[1] and start <= s[0] <= end]

    def max_gap(self, start: float, end: float, only_ok: bool = False) -> float:
        """Longest time in [start, end] without a reply (only successful ones if only_ok)."""
        times = [start]
        times += [
            t for t, status, _ in self.replies(start, end) if not only_ok or status in (1, 200)
        ]
        times.append(end)
        return max(b - a for a, b in zip(times, times[1:], strict=False))

    def statuses(self) -> list[tuple[float, dict[str, Any]]]:
        """Parsed JSON bodies of the 200 replies (for a prober of /kvman/status)."""
        out = []
        for t, status, body in list(self.samples):
            if status == 200:
                try:
                    out.append((t, json.loads(body)))
                except ValueError:
                    pass
        return out


class HttpProber(Prober):
    """GET `path` on a keep-alive connection."""

    def __init__(self, host: str, port: int, path: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.host, self.port, self.path = host, port, path

    def _connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        conn.connect()  # now, so that `connected` says when the server began to listen
        return conn

    def _ask(self, conn: http.client.HTTPConnection) -> tuple[int, bytes]:
        conn.request("GET", self.path)
        response = conn.getresponse()
        return response.status, response.read()


class RedisProber(Prober):
    """GET `key` on one connection."""

    def __init__(self, host: str, port: int, key: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.host, self.port, self.key = host, port, key

    def _connect(self) -> SyncRedis:
        return SyncRedis(self.host, self.port, self.timeout)

    def _ask(self, conn: SyncRedis) -> tuple[int, bytes]:
        value = conn.call("GET", self.key)
        return 1, value if isinstance(value, bytes) else b""
