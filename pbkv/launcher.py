"""``bin/start_server`` and ``bin/stop_server``.

``start -p|-b`` runs ``pbkv serve`` in the background (its own session, log
in ``logs/``, pid in ``run/``) and returns once the server listens and has
left its start-up stages: in sync when the other server runs, otherwise
serving on its own.  ``stop -p|-b`` sends SIGTERM and waits for the process
to go; without a pid file it asks the server to shut down over HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pbkv import config

REPO_ROOT = Path(__file__).resolve().parent.parent
START_UP_STAGES = ("cold_start", "warm_start")


def _open(
    settings: config.Settings | None,
    host: str,
    port: int,
    path: str,
    timeout: float,
    credential: str | None = None,
) -> Any:
    """GET ``path`` over HTTP or HTTPS, with the client token (or ``credential``)."""
    tls = settings is not None and settings.tls
    request = urllib.request.Request(f"{'https' if tls else 'http'}://{host}:{port}{path}")
    if credential is None and settings is not None:
        credential = settings.client_token
    if credential is not None:
        request.add_header("Authorization", f"Bearer {credential}")
    context = ssl.create_default_context(cafile=settings.tls_ca) if settings and tls else None
    return urllib.request.urlopen(request, timeout=timeout, context=context)


def _status(
    host: str, port: int, timeout: float = 1.0, settings: config.Settings | None = None
) -> dict | None:
    try:
        with _open(settings, host, port, "/kvman/status", timeout) as r:
            return json.loads(r.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None


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


def _read_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if process_alive(pid) else None


def _ready(
    status: dict, peer_host: str, peer_port: int, settings: config.Settings | None = None
) -> bool:
    """In sync, or past start-up with no peer to sync with."""
    if status.get("stage") in START_UP_STAGES:
        return False
    return status["stage"] == "in_sync" or _status(peer_host, peer_port, 0.5, settings) is None


def start(
    role: str,
    settings: config.Settings,
    config_path: str,
    extra: list[str],
    run_dir: Path,
    wait: float,
) -> int:
    host, port = settings.address_of(role)
    peer_host, peer_port = settings.address_of("backup" if role == "primary" else "primary")
    pid_file, log_file = _paths(run_dir, role, host, port)
    running = _read_pid(pid_file)
    if running is not None and _status(host, port, settings=settings) is None:
        # Probably still exiting after /kvman/shutdown: give it a moment.
        deadline = time.monotonic() + 3.0
        while process_alive(running) and time.monotonic() < deadline:
            time.sleep(0.02)
        running = _read_pid(pid_file)
    if running is not None:
        print(f"{role} is already running (pid {running}) on {host}:{port}", file=sys.stderr)
        return 1
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pbkv", "serve", "--role", role, "--config", config_path]
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            command + extra,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd=os.getcwd(),
        )
    pid_file.write_text(f"{process.pid}\n")
    deadline = time.monotonic() + wait
    status = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pid_file.unlink(missing_ok=True)
            print(
                f"{role} failed to start on {host}:{port}; last lines of {log_file}:",
                file=sys.stderr,
            )
            lines = log_file.read_text(errors="replace").splitlines()[-5:]
            print("\n".join("  " + line for line in lines), file=sys.stderr)
            return 1
        status = _status(host, port, timeout=0.5, settings=settings)
        if status is not None and _ready(status, peer_host, peer_port, settings):
            break
        time.sleep(0.05)
    if status is None:
        print(
            f"{role} (pid {process.pid}) did not answer on {host}:{port} within {wait}s",
            file=sys.stderr,
        )
        return 1
    print(
        f"{role} running on {host}:{port} (pid {process.pid}, stage {status['stage']}, "
        f"log {log_file})"
    )
    return 0


def stop(role: str, settings: config.Settings, run_dir: Path, wait: float) -> int:
    host, port = settings.address_of(role)
    pid_file, _ = _paths(run_dir, role, host, port)
    pid = _read_pid(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        # Started some other way: ask it over HTTP.
        try:
            with _open(settings, host, port, "/kvman/shutdown", 2, settings.secret) as reply:
                reply.read()
        except urllib.error.HTTPError as exc:
            print(f"{role} on {host}:{port} refused to shut down: {exc.reason}", file=sys.stderr)
            return 1
        except (OSError, urllib.error.URLError):
            print(f"no {role} is running on {host}:{port}", file=sys.stderr)
            return 1
        print(f"{role} on {host}:{port} asked to shut down")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if process_alive(pid):
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    print(f"{role} on {host}:{port} stopped (pid {pid})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="start_server/stop_server")
    parser.add_argument("action", choices=("start", "stop"))
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("-p", "--primary", dest="role", action="store_const", const="primary")
    which.add_argument("-b", "--backup", dest="role", action="store_const", const="backup")
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
        help="seconds to wait for the server to be ready / to stop",
    )
    args, extra = parser.parse_known_args(argv)
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
    if args.action == "start":
        return start(args.role, settings, args.config, extra, run_dir, args.wait)
    return stop(args.role, settings, run_dir, min(args.wait, 10.0))


if __name__ == "__main__":
    sys.exit(main())
