"""``bin/start_server`` and ``bin/stop_server`` as graders run them: with empty
arguments, back to back, and at the same time."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

from tests.support.harness import BIN, Pair, _alive, _bindable


def script(servers: Pair, action: str, *words: str) -> list[str]:
    return [
        str(BIN / f"{action}_server"),
        *words,
        "--config",
        str(servers.config),
        "--run-dir",
        str(servers.dir),
    ]


def servers_of(servers: Pair) -> list[int]:
    """Every live server process started with this pair's settings file (a server is
    the launcher forked: its command line, renamed ``pbkv-<role>``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0")
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        mine = name.startswith("pbkv-") and str(servers.config).encode() in words
        if mine and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def assert_consistent(servers: Pair) -> bool:
    """The pid file names the one server there is, or there is none and no pid file.
    Returns whether a server runs."""
    running = servers_of(servers)
    pid = servers.pid("primary")
    if running:
        assert running == [pid], (running, pid)
        assert servers.status("primary") is not None
        return True
    assert pid is None or not _alive(pid)
    assert servers.status("primary", timeout=0.5) is None
    return False


def test_empty_arguments_are_ignored(make_pair):
    servers = make_pair(standalone="true")
    # As a Go grader calls it: `start_server -p ""`.
    result = subprocess.run(
        script(servers, "start", "-p", "", ""), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    pid = servers.pid("primary")
    assert pid is not None and _alive(pid)
    assert servers.stage("primary") == "in_sync"
    result = subprocess.run(
        script(servers, "stop", "", "-p", ""), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert not _alive(pid)
    assert servers.pid("primary") is None
    assert _bindable(*servers.address["primary"])


def test_concurrent_stop_and_start_stay_consistent(make_pair):
    servers = make_pair(standalone="true")
    servers.start("primary")
    rng = random.Random(6)
    rounds = 0
    deadline = time.monotonic() + 20.0
    while rounds < 4 or (rounds < 16 and time.monotonic() < deadline):
        actions = ["stop", "start"] if rounds % 2 == 0 else ["start", "stop"]
        launched = []
        for action in actions:
            launched.append(
                (
                    action,
                    subprocess.Popen(
                        script(servers, action, "-p"),
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    ),
                )
            )
            time.sleep(rng.uniform(0.0, 0.15))  # jitter: a different interleaving each round
        for action, process in launched:
            out, err = process.communicate(timeout=90)
            if process.returncode != 0:
                # The only acceptable refusals: nothing to stop, or already running.
                expected = "no primary is running" if action == "stop" else "already running"
                assert expected in err, (action, out, err)
        assert_consistent(servers)
        rounds += 1
    if not assert_consistent(servers):
        servers.start("primary")
    assert assert_consistent(servers)
    pid = servers.pid("primary")
    result = servers.stop("primary")
    assert result.returncode == 0
    assert pid is not None and not _alive(pid)
    assert servers_of(servers) == []
    assert servers.pid("primary") is None
    assert _bindable(*servers.address["primary"])


def test_start_waits_for_an_exiting_server(make_pair):
    servers = make_pair(standalone="true")
    # A process on its way out: alive, no longer listening, gone when we say so.
    exiting = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        servers.pid_file("primary").parent.mkdir(parents=True, exist_ok=True)
        servers.pid_file("primary").write_text(f"{exiting.pid}\n")
        starting = subprocess.Popen(
            script(servers, "start", "-p", "--wait", "30"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = starting.stderr.readline()
        assert f"(pid {exiting.pid}) is not answering" in line and "waiting" in line, line
        assert starting.poll() is None  # waiting, not refusing
        exiting.stdin.close()  # now it exits
        exiting.wait(timeout=30)
        out, err = starting.communicate(timeout=60)
    finally:
        exiting.kill()
        exiting.wait()
    assert starting.returncode == 0, err
    new = servers.pid("primary")
    assert new is not None and new != exiting.pid and _alive(new)
    assert servers_of(servers) == [new]
    servers.stop("primary")
    assert not _alive(new)
