"""``bin/start_server`` and ``bin/stop_server``.

``start -p|-b`` runs the server in the background (its own session, log in
``logs/``, pid in ``run/``) and returns once it listens and has left its
start-up stages: in sync with the other server when that one runs (both say
so, with the same history), otherwise serving on its own.  The server is this
very process, forked: one interpreter start, not two.  The child says on a
pipe when it listens; then both statuses are polled every few milliseconds.
Waiting for the sync is bounded by ``--sync-wait`` (10 s) of time in which no
transfer is under way, so a large transfer is waited for while it runs; past
the bound the script says so and returns (the server keeps trying).  ``stop
-p|-b`` sends SIGTERM and waits for the process to go; without a pid file it
asks the server to shut down over HTTP.

Graders run start and stop back to back, or at the same time: both hold a lock
(``flock`` on a file next to the pid file) while they read and write the pid
file, stop removes the pid file only if it still names the process it stopped,
and start waits for a process that is exiting instead of refusing.  Empty
arguments (``start_server -p ""``) are ignored, as a shell would.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from pbkv import config

REPO_ROOT = Path(__file__).resolve().parent.parent
MEMBER = "member"  # the launcher's name for a member of a coordinated cluster
START_UP_STAGES = ("cold_start", "warm_start")
STOP_WAIT = 10.0  # the longest a stop waits for SIGTERM to work before SIGKILL
SYNC_WAIT = 10.0  # seconds without a transfer under way that start waits for the sync
LISTENING = b"listening\n"  # what the server writes on the launcher's pipe
TRANSFERRING = "receive_snapshot"  # a handshake step: a whole database is arriving
# Polls of the statuses: every 5 ms at first, slowing to every 50 ms after a second.
POLL_FIRST, POLL_LAST = 0.005, 0.05


def _connect(settings: config.Settings | None, host: str, port: int, timeout: float) -> Any:
    """A socket to the server: TCP, or TLS for a TLS pair."""
    sock = socket.create_connection((host, port), timeout)
    if settings is not None and settings.tls:
        import ssl  # only for a TLS pair

        context = ssl.create_default_context(cafile=settings.tls_ca)
        try:
            return context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
    return sock


def _head(host: str, port: int, path: str, credential: str | None, close: bool) -> bytes:
    head = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if close:
        head += "Connection: close\r\n"
    if credential is not None:
        head += f"Authorization: Bearer {credential}\r\n"
    return (head + "\r\n").encode()


def _read_reply(sock: Any) -> tuple[int, bytes, bool]:
    """One reply: its status, its body, and whether the server closes the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    code = int(lines[0].split(None, 2)[1])
    length, close = None, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value.strip().lower() == b"close"
    while length is None or len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            if length is None:  # delimited by the end of the connection
                return code, body, True
            raise ConnectionError("the server closed the connection mid-reply")
        body += chunk
    return code, body[:length], close


def _request(
    settings: config.Settings | None,
    host: str,
    port: int,
    path: str,
    timeout: float,
    credential: str | None = None,
) -> tuple[int, bytes]:
    """GET ``path`` once, with the client token (or ``credential``): the reply's
    status and body.  A bare socket: no HTTP library to import."""
    if credential is None and settings is not None:
        credential = settings.client_token
    sock = _connect(settings, host, port, timeout)
    try:
        sock.sendall(_head(host, port, path, credential, close=True))
        code, body, _ = _read_reply(sock)
    except (IndexError, ValueError):
        raise OSError(f"not an HTTP reply from {host}:{port}") from None
    finally:
        sock.close()
    return code, body


class StatusLink:
    """``/kvman/status`` of one server, asked again and again on one kept-alive
    connection: polling every few milliseconds must not leave a closed connection
    behind each time (each would hold a local port for a minute in TIME_WAIT)."""

    def __init__(
        self, settings: config.Settings | None, host: str, port: int, timeout: float = 1.0
    ) -> None:
        self.settings, self.host, self.port, self.timeout = settings, host, port, timeout
        credential = settings.client_token if settings is not None else None
        self.request = _head(host, port, "/kvman/status", credential, close=False)
        self.sock: Any = None

    def status(self) -> dict[str, Any] | None:
        """The server's status, or None when it does not answer."""
        reused = self.sock is not None
        try:
            return self._ask()
        except (OSError, IndexError, ValueError):
            self.close()
            if not reused:
                return None
        try:  # the kept connection had closed (idle_timeout): once more, on a new one
            return self._ask()
        except (OSError, IndexError, ValueError):
            self.close()
            return None

    def _ask(self) -> dict[str, Any] | None:
        if self.sock is None:
            self.sock = _connect(self.settings, self.host, self.port, self.timeout)
        self.sock.sendall(self.request)
        code, body, close = _read_reply(self.sock)
        if close:
            self.close()
        status = json.loads(body) if code == 200 else None
        return status if isinstance(status, dict) else None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _status(
    host: str, port: int, timeout: float = 1.0, settings: config.Settings | None = None
) -> dict[str, Any] | None:
    link = StatusLink(settings, host, port, timeout)
    try:
        return link.status()
    finally:
        link.close()


def _paths(run_dir: Path, role: str, host: str, port: int) -> tuple[Path, Path]:
    name = f"{role}-{host}-{port}"
    return run_dir / "run" / f"{name}.pid", run_dir / "logs" / f"{name}.log"


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (stopped counts as running; a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


@contextlib.contextmanager
def pid_lock(pid_file: Path, timeout: float) -> Iterator[None]:
    """Hold the lock of ``pid_file`` (another start or stop of the same server waits).

    The lock file stays: removing it would let two processes lock two different files.
    """
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with open(pid_file.with_suffix(".lock"), "a") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{pid_file} stayed locked for {timeout:g}s") from None
                time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_pid(pid_file: Path, pid: int) -> None:
    temporary = pid_file.with_suffix(".pid.new")
    temporary.write_text(f"{pid}\n")
    os.replace(temporary, pid_file)  # readers never see a half-written file


def _unlink_if_names(pid_file: Path, pid: int) -> None:
    """Remove ``pid_file`` only if it still names ``pid``."""
    try:
        named = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    if named == pid:
        pid_file.unlink(missing_ok=True)


def _read_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if process_alive(pid) else None


def in_sync_with(status: dict[str, Any], peer: dict[str, Any] | None) -> bool:
    """Whether ``status`` (one server's) is in sync with this very ``peer``: both say
    so, the peer's channel is up, and both hold the same history (a sync makes it
    the same on both sides; a peer still in sync with an earlier server holds another)."""
    return (
        peer is not None
        and status.get("stage") == "in_sync"
        and peer.get("stage") == "in_sync"
        and peer.get("peer_connected") is True
        and status.get("history") == peer.get("history")
    )


def ready(status: dict[str, Any], peer: dict[str, Any] | None) -> bool:
    """Past start-up, and in sync with the peer, or with no peer to sync with: none
    answers, or a standalone primary (it never takes a backup)."""
    if status.get("stage") in START_UP_STAGES:
        return False
    if peer is None or True in (status.get("standalone"), peer.get("standalone")):
        return True
    return in_sync_with(status, peer)


def transferring(status: dict[str, Any], peer: dict[str, Any] | None) -> bool:
    """A whole database is on its way, from one side or the other."""
    return TRANSFERRING in (status.get("handshake"), peer and peer.get("handshake"))


def address_of(role: str, settings: config.Settings, member: str | None) -> tuple[str, int]:
    """Where the server listens: a member's own address, or the pair's from the settings."""
    if role == MEMBER:
        assert member is not None
        host, _, port = member.rpartition(":")
        return host.strip("[]"), int(port)
    return settings.address_of(role)


def start(
    role: str,
    settings: config.Settings,
    config_path: str,
    extra: list[str],
    run_dir: Path,
    wait: float,
    sync_wait: float = SYNC_WAIT,
    member: str | None = None,
) -> int:
    host, port = address_of(role, settings, member)
    pid_file, _ = _paths(run_dir, role, host, port)
    # A stop holds the lock until its process is gone, a start until its server is ready.
    try:
        with pid_lock(pid_file, 2 * wait + STOP_WAIT):
            return _start_locked(
                role, settings, config_path, extra, run_dir, wait, sync_wait, member
            )
    except TimeoutError as exc:
        print(f"{role}: {exc}", file=sys.stderr)
        return 1


def _start_locked(
    role: str,
    settings: config.Settings,
    config_path: str,
    extra: list[str],
    run_dir: Path,
    wait: float,
    sync_wait: float,
    member: str | None = None,
) -> int:
    host, port = address_of(role, settings, member)
    pid_file, log_file = _paths(run_dir, role, host, port)
    running = _read_pid(pid_file)
    if running is not None and _status(host, port, settings=settings) is None:
        # Exiting (after /kvman/shutdown, or signalled by someone else): wait for it to go.
        print(
            f"{role} (pid {running}) is not answering on {host}:{port}; "
            f"waiting up to {wait:g}s for it to exit",
            file=sys.stderr,
            flush=True,
        )
        deadline = time.monotonic() + wait
        while process_alive(running) and time.monotonic() < deadline:
            time.sleep(0.02)
        running = _read_pid(pid_file)
    if running is not None:
        print(f"{role} is already running (pid {running}) on {host}:{port}", file=sys.stderr)
        return 1
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if member is not None:
        extra = ["--member", member, *extra]
    pid, ready_pipe = _fork_server(role, config_path, extra, log_file)
    _write_pid(pid_file, pid)
    try:
        listening = _await_listening(ready_pipe, time.monotonic() + wait)
    finally:
        os.close(ready_pipe)
    if not listening:
        if _exit_status(pid, wait) is None:
            print(
                f"{role} (pid {pid}) did not listen on {host}:{port} within {wait:g}s",
                file=sys.stderr,
            )
            return 1
        _unlink_if_names(pid_file, pid)
        print(
            f"{role} failed to start on {host}:{port}; last lines of {log_file}:",
            file=sys.stderr,
        )
        lines = log_file.read_text(errors="replace").splitlines()[-5:]
        print("\n".join("  " + line for line in lines), file=sys.stderr)
        return 1
    if role == MEMBER:
        status, in_time = _await_role(pid, settings, (host, port), wait, sync_wait)
    else:
        peer_host, peer_port = settings.address_of("backup" if role == "primary" else "primary")
        status, in_time = _await_sync(
            pid, settings, (host, port), (peer_host, peer_port), wait, sync_wait
        )
    if status is None:
        print(f"{role} (pid {pid}) stopped answering on {host}:{port}", file=sys.stderr)
        return 1
    if role == MEMBER:
        if not in_time:
            print(
                f"member on {host}:{port}: the cluster does not accept writes yet after "
                f"{sync_wait:g}s (primary {status.get('primary')}, this member: "
                f"{status.get('why_not_primary')}); it keeps trying: see {log_file}",
                file=sys.stderr,
            )
        print(
            f"member running on {host}:{port} (pid {pid}, role {status.get('role')}, "
            f"primary {status.get('primary')}, log {log_file})"
        )
        return 0
    if not in_time:
        print(
            f"{role}: not in sync with the {'backup' if role == 'primary' else 'primary'} "
            f"at {peer_host}:{peer_port} after {sync_wait:g}s without a transfer under way "
            f"(stage {status.get('stage')}, handshake {status.get('handshake')}); "
            f"it keeps trying: see {log_file}",
            file=sys.stderr,
        )
    print(
        f"{role} running on {host}:{port} (pid {pid}, stage {status.get('stage')}, log {log_file})"
    )
    return 0


def _fork_server(role: str, config_path: str, extra: list[str], log_file: Path) -> tuple[int, int]:
    """Fork the server; returns its pid and the pipe on which it says it listens."""
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _become_server(role, config_path, extra, log_file, write_end)
    os.close(write_end)
    return pid, read_end


def _become_server(
    role: str, config_path: str, extra: list[str], log_file: Path, ready: int
) -> NoReturn:
    """In the forked child: a session of its own, the log as stdout and stderr, no
    descriptor of the launcher's (the pid lock above all), then ``pbkv serve``."""
    code = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        log = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2 and fd != ready:
                with contextlib.suppress(OSError):
                    os.close(fd)
        with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
            comm.write(f"pbkv-{role}")  # what ps and pgrep show
        from pbkv.cli import serve_main

        which = [] if role == MEMBER else ["--role", role]
        code = serve_main([*which, "--config", config_path, *extra], ready_fd=ready)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _await_listening(pipe: int, deadline: float) -> bool:
    """Whether the server said it listens before ``deadline`` (False: it did not,
    or its end of the pipe closed first: it exited)."""
    said = b""
    while LISTENING not in said:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([pipe], [], [], left)[0]:
            return False
        data = os.read(pipe, 64)
        if not data:
            return False
        said += data
    return True


def _exit_status(pid: int, wait: float) -> int | None:
    """The exit status of our child ``pid`` once it is gone (None: still running)."""
    deadline = time.monotonic() + min(wait, 2.0)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def _poll_status(
    pid: int,
    link: StatusLink,
    wait: float,
    done: Callable[[dict[str, Any], float], bool],
    out_of_time: Callable[[float], bool],
) -> tuple[dict[str, Any] | None, bool]:
    """Poll our server's status until ``done(status, now)`` (True: ready in time) or
    ``out_of_time(now)`` (False). None as the status: it stopped answering (it is
    gone, or its loop stayed stuck for ``wait``)."""
    started = time.monotonic()
    status: dict[str, Any] | None = None
    unanswered_since: float | None = None
    while True:
        now = time.monotonic()
        own = link.status()
        if own is None:
            # Listening, so it answers unless it is gone or its loop is stuck.
            if _exit_status(pid, 0.0) is not None:
                return None, False
            unanswered_since = unanswered_since or now
            if now - unanswered_since > wait:
                return None, False
        else:
            unanswered_since = None
            status = own
            if done(own, now):
                return own, True
        if out_of_time(now):
            return status, False
        time.sleep(min(POLL_LAST, POLL_FIRST + (now - started) / 20))


def _await_sync(
    pid: int,
    settings: config.Settings,
    address: tuple[str, int],
    peer_address: tuple[str, int],
    wait: float,
    sync_wait: float,
) -> tuple[dict[str, Any] | None, bool]:
    """Poll both servers until ours is ready (see ``ready``).  Returns the last status
    (None: ours stopped answering) and whether it became ready in time: within
    ``sync_wait`` seconds not spent on a transfer."""
    own_link = StatusLink(settings, *address)
    peer_link = StatusLink(settings, *peer_address)
    budget = sync_wait
    last = time.monotonic()

    def synced(own: dict[str, Any], now: float) -> bool:
        nonlocal budget, last
        peer = peer_link.status()
        if ready(own, peer):
            return True
        if not transferring(own, peer):
            budget -= now - last
        last = now
        return False

    try:
        return _poll_status(pid, own_link, wait, synced, lambda now: budget <= 0)
    finally:
        own_link.close()
        peer_link.close()


def _writable(settings: config.Settings, primary: str) -> bool:
    """Whether the member at ``primary`` leads with a backup in sync and recorded."""
    host, _, port = primary.rpartition(":")
    status = _status(host.strip("[]"), int(port), settings=settings)
    return (
        status is not None
        and status.get("role") == "primary"
        and status.get("stage") == "in_sync"
        and status.get("recorded_backup") is not None
        and status.get("recorded_backup") == status.get("in_sync_backup")
    )


def _await_role(
    pid: int, settings: config.Settings, address: tuple[str, int], wait: float, role_wait: float
) -> tuple[dict[str, Any] | None, bool]:
    """Poll a member until it leads, or follows a primary that accepts writes (in sync
    with a recorded backup): within ``role_wait``. The first member of a new cluster
    leads at once, alone; the next one returns once writes are accepted."""
    link = StatusLink(settings, *address)
    deadline = time.monotonic() + role_wait

    def settled(own: dict[str, Any], now: float) -> bool:
        if own.get("role") == "primary":
            return True  # the first member: nobody to sync with yet
        primary = own.get("primary")
        return primary is not None and _writable(settings, primary)

    try:
        return _poll_status(pid, link, wait, settled, lambda now: now > deadline)
    finally:
        link.close()


def stop(
    role: str, settings: config.Settings, run_dir: Path, wait: float, member: str | None = None
) -> int:
    host, port = address_of(role, settings, member)
    pid_file, _ = _paths(run_dir, role, host, port)
    # Held until the process is gone, so a start never sees it half-stopped.
    try:
        with pid_lock(pid_file, 2 * STOP_WAIT + 60.0):
            return _stop_locked(role, settings, host, port, pid_file, wait)
    except TimeoutError as exc:
        print(f"{role}: {exc}", file=sys.stderr)
        return 1


def _stop_locked(
    role: str, settings: config.Settings, host: str, port: int, pid_file: Path, wait: float
) -> int:
    pid = _read_pid(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)  # names no live process
        # Started some other way: ask it over HTTP.
        try:
            code, body = _request(settings, host, port, "/kvman/shutdown", 2, settings.secret)
        except OSError:
            print(f"no {role} is running on {host}:{port}", file=sys.stderr)
            return 1
        if code != 200 or b'"success":"true"' not in body:  # course mode refuses with 200
            reason = body.decode("utf-8", "replace").strip()
            print(f"{role} on {host}:{port} refused to shut down: {reason}", file=sys.stderr)
            return 1
        print(f"{role} on {host}:{port} asked to shut down")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if process_alive(pid):
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + wait
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    _unlink_if_names(pid_file, pid)
    print(f"{role} on {host}:{port} stopped (pid {pid})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="start_server/stop_server")
    parser.add_argument("action", choices=("start", "stop"))
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("-p", "--primary", dest="role", action="store_const", const="primary")
    which.add_argument("-b", "--backup", dest="role", action="store_const", const="backup")
    which.add_argument(
        "-m",
        "--member",
        metavar="HOST:PORT",
        help="a member of a coordinated cluster (the coordinator setting), listening there",
    )
    parser.add_argument("--config", default=str(REPO_ROOT / config.DEFAULT_CONFIG_PATH))
    parser.add_argument(
        "--run-dir",
        default=os.environ.get("PBKV_RUN_DIR", str(REPO_ROOT)),
        help="where run/ (pid files) and logs/ go",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=30.0,
        help="seconds to wait for the server to listen / to stop",
    )
    parser.add_argument(
        "--sync-wait",
        type=float,
        default=SYNC_WAIT,
        help="seconds without a transfer under way to wait for the sync with the other server",
    )
    words = sys.argv[1:] if argv is None else argv
    # Graders pass empty words (`start_server -p ""`); a shell would drop them too.
    args, extra = parser.parse_known_args([word for word in words if word != ""])
    try:
        file_values = config.load_file(args.config)
        settings = config.with_secrets(config.Settings(**file_values))
        if extra:  # flags for the server may move its address
            serve_parser = argparse.ArgumentParser()
            config.add_arguments(serve_parser)
            flags = serve_parser.parse_args(["--config", args.config, *extra])
            settings = config.settings_from_args(flags)
    except config.SettingsError as exc:
        print(f"pbkv: {exc}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir)
    role = args.role
    if args.member is not None:
        role = MEMBER
        host, _, port = args.member.rpartition(":")
        if not host or not port.isdigit():
            print(f"pbkv: -m takes HOST:PORT, not {args.member!r}", file=sys.stderr)
            return 2
    if args.action == "start":
        return start(
            role, settings, args.config, extra, run_dir, args.wait, args.sync_wait, args.member
        )
    return stop(role, settings, run_dir, min(args.wait, STOP_WAIT), args.member)


if __name__ == "__main__":
    sys.exit(main())
