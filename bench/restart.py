"""How long a restarted backup takes to be back in sync, as graders restart it.

A pair runs on loopback with the default timing settings (``retry_max`` 1 s: the
primary's back-off matters) and a small store. Each of ``--restarts`` rounds stops
the backup (``/kvman/shutdown`` and ``bin/stop_server`` in turn), leaves it down
for the next of ``--down`` seconds (cycled: 0 s, 0.5 s, and 3 s, after which the
primary's back-off has grown to its ceiling), then launches ``bin/start_server
-b`` and polls both statuses every 2 ms until the primary is in sync with this
very backup (both in sync, the channel up, the same history). Printed: from the
launch to the pair in sync, and to ``start_server`` returning, min / median / max,
overall and by down time. Target: at most 0.5 s to the pair in sync on an idle
machine (the transfer of a small store adds little).

    python -m bench.restart
    python -m bench.restart --restarts 40 --keys 1000 --down 0,3

Self-contained (it reads statuses with ``http.client``), so it also measures a
tree that does not have it: run it by path with that tree first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from pbkv.testing.cluster import LocalPair, wait_for

# The course's timing (the defaults), not the tests' fast settings.
DEFAULT_TIMING = {
    "ack_timeout": "2.0",
    "heartbeat_interval": "0.2",
    "peer_timeout": "2.0",
    "retry_min": "0.05",
    "retry_max": "1.0",
}
TARGET_SECONDS = 0.5
POLL = 0.002


class Status:
    """``/kvman/status`` of one server on one kept-alive connection: a poll every
    2 ms must not leave a connection in TIME_WAIT behind each time."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.connection: http.client.HTTPConnection | None = None

    def get(self) -> dict[str, Any] | None:
        for _ in range(2):  # a kept connection the server closed: once more on a new one
            if self.connection is None:
                self.connection = http.client.HTTPConnection(*self.address, timeout=1.0)
            try:
                self.connection.request("GET", "/kvman/status")
                reply = self.connection.getresponse()
                body = reply.read()
                return json.loads(body) if reply.status == 200 else None
            except (OSError, ValueError, http.client.HTTPException):
                self.connection.close()
                self.connection = None
        return None


def pair_in_sync(primary: Status, backup: Status) -> bool:
    """The primary in sync with this very backup: both say so, the primary's channel
    is up, and both hold the same history (a sync makes it the same on both sides)."""
    ours = primary.get()
    if ours is None or ours["stage"] != "in_sync" or not ours["peer_connected"]:
        return False
    theirs = backup.get()
    return (
        theirs is not None and theirs["stage"] == "in_sync" and theirs["history"] == ours["history"]
    )


def restart_once(pair: LocalPair, how: str, down: float) -> tuple[float, float]:
    """Stop the backup, wait ``down`` s, launch it: seconds to in sync, to returned."""
    primary, backup = Status(pair.address["primary"]), Status(pair.address["backup"])
    if how == "shutdown":
        pair.shutdown("backup")
    else:
        pair.stop("backup")
    wait_for(lambda: backup.get() is None, 10, "the backup to stop")
    time.sleep(down)  # the primary's back-off grows meanwhile (the point of the bench)
    started = time.monotonic()
    launcher = subprocess.Popen(
        pair.command("start", "backup"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    synced = returned = None
    while synced is None or returned is None:
        now = time.monotonic()
        if returned is None and launcher.poll() is not None:
            returned = now - started
            out, err = launcher.communicate()
            if launcher.returncode != 0:
                raise RuntimeError(f"start_server -b failed: {out.decode()}{err.decode()}")
        if synced is None and pair_in_sync(primary, backup):
            synced = time.monotonic() - started
        if now - started > 60:
            raise TimeoutError("the pair was not in sync within 60 s")
        time.sleep(POLL)
    return synced, returned


def summary(values: Sequence[float]) -> str:
    return (
        f"min {min(values):.3f} s  median {statistics.median(values):.3f} s  "
        f"max {max(values):.3f} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.restart", description=__doc__)
    parser.add_argument("--restarts", type=int, default=20)
    parser.add_argument("--keys", type=int, default=100, help="pairs in the store")
    parser.add_argument(
        "--down",
        default="0,0.5,3",
        help="seconds the backup stays down, cycled over the restarts (default 0,0.5,3)",
    )
    args = parser.parse_args(argv)
    downs = [float(word) for word in args.down.split(",")]
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    rows: list[tuple[float, float, float]] = []
    with (
        tempfile.TemporaryDirectory(prefix="pbkv-restart-") as directory,
        LocalPair(directory, **DEFAULT_TIMING) as pair,
    ):
        pair.start_both()
        with pair.client("primary") as client:
            for i in range(args.keys):
                client.insert(f"key{i}", f"value{i}")
        for round_ in range(args.restarts):
            down = downs[round_ % len(downs)]
            how = "shutdown" if round_ % 2 == 0 else "stop_server"
            synced, returned = restart_once(pair, how, down)
            rows.append((down, synced, returned))
            print(
                f"restart {round_ + 1:2d} ({how:11s}, down {down:g} s): in sync after "
                f"{synced:.3f} s, start_server returned after {returned:.3f} s",
                flush=True,
            )
        backup = Status(pair.address["backup"]).get()
        assert backup is not None and backup["keys"] == args.keys, backup
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"to the pair in sync ({len(rows)} restarts): {summary([r[1] for r in rows])}")
    print(f"to start_server returning:           {summary([r[2] for r in rows])}")
    for down in downs:
        chosen = [r[1] for r in rows if r[0] == down]
        if chosen:
            print(f"  down {down:g} s, to in sync: {summary(chosen)}")
    worst = max(r[1] for r in rows)
    verdict = "within" if worst <= TARGET_SECONDS else "over"
    print(f"target {TARGET_SECONDS} s: worst {worst:.3f} s, {verdict} (on this machine's load)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
