"""How long pbkv takes to copy a whole database to a peer, against Redis's full resync.

With N pairs (16-byte keys, 100-byte values; 1,000,000 by default) in a running pair:

1. bootstrap: kill -9 the backup and start a new, empty one; time until it is in sync.
   The primary serves the transfer.
2. warm start: kill -9 the primary and start it again; time until the fresh primary
   has fetched the backup's data and is in sync. The backup serves the transfer.
3. Redis: a primary holding the same pairs and an empty replica (persistence off,
   diskless sync, no delay); time from `REPLICAOF` to `master_link_status:up`.

Meanwhile a prober reads one key in a loop from the server serving the transfer
(`GET /kv/get` on pbkv, `GET` on Redis) and records the longest time without a reply:
the longest stall a reader saw. Another polls the new pbkv server's /kvman/status; its
longest wait is shown as the receiver's gap. pbkv's times are given from the start of
`bin/start_server` and from the moment the new server accepted a connection (the
counterpart of Redis's running, empty replica; this includes the primary's reconnect
back-off after losing its backup); "stream" is the part after the new server first
reported pairs (n/a when it answered no status in between).

Loading is not measured: pipelined inserts over 64 connections (pbkv has no bulk path)
and pipelined SETs (Redis).

    python -m bench.transfer --keys 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import bulk, servers
from pbkv.stages import Role

STALL_LIMIT_MS = 100.0


def _load_pbkv(pair: servers.Pbkv, keys: int, say: Callable[[str], None]) -> float:
    host, port = pair.address["primary"]
    seconds = bulk.load_pbkv(host, port, keys, " while loading")
    say(f"pbkv: loaded {keys} pairs in {seconds:.1f} s ({keys / seconds:.0f}/s, pipelined)")
    return seconds


def _timeline(prober: servers.Prober, keys: int) -> dict[str, float | None]:
    """When the new server accepted a connection, first held pairs, and was in sync."""
    listening = prober.connected[0] if prober.connected else None
    first_pairs = in_sync = None
    for t, status in prober.statuses():
        if first_pairs is None and status.get("keys", 0) > 0:
            first_pairs = t
        if status.get("stage") == "in_sync" and status.get("keys") == keys:
            in_sync = t
            break
    return {"listening": listening, "first_pairs": first_pairs, "in_sync": in_sync}


def _pbkv_transfer(pair: servers.Pbkv, keys: int, restart: str, timeout: float) -> dict[str, Any]:
    """kill -9 `restart`, start it again, time it back to in sync; probe the other side."""
    server = Role(restart).peer
    stage_alone = "bootstrapping_primary" if server == "backup" else "bootstrapping_secondary"
    pair.kill(restart)
    pair.wait_stage(server, stage_alone, timeout=30)
    before = pair.status(server)
    assert before is not None and before["keys"] == keys, before

    host, port = pair.address[server]
    reader = servers.HttpProber(host, port, f"/kv/get?key={bulk.key_of(keys // 2)}")
    new_host, new_port = pair.address[restart]
    watcher = servers.HttpProber(new_host, new_port, "/kvman/status", interval=0.005)
    reader.start()
    servers.wait_for(lambda: reader.replies(0, 1e18), 10, f"the {server} to answer")
    watcher.start()
    start = time.monotonic()
    launcher = pair.spawn(restart)
    try:
        servers.wait_for(
            lambda: _timeline(watcher, keys)["in_sync"] is not None,
            timeout,
            f"the {restart} to be in sync with {keys} pairs",
            step=0.01,
        )
        pair.wait_stage(server, "in_sync", timeout=30)
    finally:
        reader.stop()
        watcher.stop()
        launcher.wait(60)
    times = _timeline(watcher, keys)
    end = times["in_sync"]
    assert end is not None
    a, b = pair.status("primary"), pair.status("backup")
    assert a is not None and b is not None
    # The new process's own measure of its event loop's longest delay, since it started.
    receiver_lag = (a if restart == "primary" else b).get("loop_lag_max_ms")
    if a["checksum"] != b["checksum"] or a["keys"] != keys:
        raise RuntimeError(f"after the transfer: primary {a}, backup {b}")
    answers = reader.replies(start, end)
    first = times["first_pairs"]
    return {
        "served_by": server,
        "seconds_from_start": end - start,
        "seconds_from_listening": end - (times["listening"] or start),
        # None when the new server answered no status between its first pairs and the end.
        "seconds_from_first_pairs": None if first is None or first >= end else end - first,
        "max_read_gap_ms": reader.max_gap(start, end) * 1000,
        # The longest the receiving server left its status unanswered once it listened.
        "receiver_max_gap_ms": watcher.max_gap(times["listening"] or start, end) * 1000,
        "receiver_loop_lag_ms": receiver_lag,
        "reads_answered": len(answers),
        "reads_refused": sum(1 for _, status, _ in answers if status != 200),
    }


def _redis_resync(
    binary: str, workdir: Path, keys: int, diskless_load: str, say: Callable[[str], None]
):
    primary = servers.Redis(binary, workdir, "redis-primary")
    replica = servers.Redis(binary, workdir, "redis-replica")
    try:
        primary.start()
        seconds = bulk.load_redis(primary, keys)
        say(f"redis: loaded {keys} pairs in {seconds:.1f} s (pipelined)")
        replica.start(extra=["--repl-diskless-load", diskless_load])
        reader = servers.RedisProber(primary.host, primary.port, bulk.key_of(keys // 2))
        reader.start()
        servers.wait_for(lambda: reader.replies(0, 1e18), 10, "redis to answer")
        with replica.client() as r:
            start = time.monotonic()
            r.call("REPLICAOF", primary.host, str(primary.port))
            while r.info("replication").get("master_link_status") != "up":
                time.sleep(0.002)
            end = time.monotonic()
            replica_keys = r.call("DBSIZE")
        reader.stop()
        if replica_keys != keys:
            raise RuntimeError(f"the redis replica holds {replica_keys} of {keys} keys")
        return {
            "seconds": end - start,
            "max_read_gap_ms": reader.max_gap(start, end) * 1000,
            "reads_answered": len(reader.replies(start, end)),
        }
    finally:
        replica.stop()
        primary.stop()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.transfer",
        description="pbkv bootstrap and warm start vs Redis full resync.",
    )
    ap.add_argument("--keys", type=int, default=1_000_000, help="pairs (default 1000000)")
    ap.add_argument("--pbkv-flags", default="", help="extra `pbkv serve` flags")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per transfer")
    servers.add_redis_arguments(ap)
    ap.add_argument(
        "--redis-diskless-load",
        choices=("disabled", "on-empty-db", "swapdb"),
        default="disabled",
        help="the replica's repl-diskless-load (default: Redis's default, disabled: the "
        "replica stores the RDB in its directory and loads it from there)",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object instead")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (logs)")
    return ap


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    say = servers.progress_printer(args.json)
    found = servers.redis_for_run(args, "transfer", say)
    if found is None:
        return 2
    redis_binary, reason = found

    workdir = Path(tempfile.mkdtemp(prefix="pbkv-transfer-"))
    pair = servers.Pbkv(workdir, "pair", serve_flags=shlex.split(args.pbkv_flags))
    report: dict[str, Any] = {"keys": args.keys, "key_bytes": 16, "value_bytes": 100}
    report["pbkv_revision"] = servers.pbkv_revision()
    try:
        pair.start_all()
        report["load_seconds"] = _load_pbkv(pair, args.keys, say)
        say("pbkv: bootstrap (kill -9 the backup, start an empty one)")
        report["bootstrap"] = _pbkv_transfer(pair, args.keys, "backup", args.timeout)
        say("pbkv: warm start (kill -9 the primary, start it again)")
        report["warm_start"] = _pbkv_transfer(pair, args.keys, "primary", args.timeout)
    finally:
        with contextlib.suppress(Exception):
            pair.cleanup()
    try:
        if redis_binary is not None:
            say("redis: full resync of an empty replica (REPLICAOF)")
            report["redis"] = _redis_resync(
                redis_binary, workdir, args.keys, args.redis_diskless_load, say
            )
            report["redis_diskless_load"] = args.redis_diskless_load
            report["redis_version"] = servers.redis_version(redis_binary)
        else:
            report["redis"] = None
            report["redis_skipped"] = reason
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    redis = report["redis"]
    checks = []
    for name in ("bootstrap", "warm_start"):
        ours = report[name]
        ratio = ours["seconds_from_listening"] / redis["seconds"] if redis else None
        ours["vs_redis"] = ratio
        checks.append(
            (f"{name} <= redis full resync", ratio, None if ratio is None else ratio <= 1)
        )
        gap = ours["max_read_gap_ms"]
        checks.append((f"{name}: longest read stall <= 100 ms", gap, gap <= STALL_LIMIT_MS))
        lag = ours["receiver_loop_lag_ms"]
        checks.append(
            (f"{name}: receiver's loop lag <= 100 ms", lag, lag is not None and lag <= 100),
        )
    report["targets"] = [{"target": t, "value": v, "met": ok} for t, v, ok in checks]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0

    print()
    print(f"full transfer of {args.keys} pairs (16-byte keys, 100-byte values)")
    head = (
        f"{'':<40} {'from start s':>12} {'from listen s':>13} {'stream s':>9} "
        f"{'read stall ms':>13} {'receiver gap ms':>15} {'receiver loop lag ms':>20}"
    )
    print(head)
    print("-" * len(head))
    for name, label in (
        ("bootstrap", "pbkv new backup -> in_sync"),
        ("warm_start", "pbkv restarted primary -> in_sync"),
    ):
        r = report[name]
        print(
            f"{label:<40} {r['seconds_from_start']:>12.2f} {r['seconds_from_listening']:>13.2f} "
            f"{_fmt(r['seconds_from_first_pairs']):>9} {r['max_read_gap_ms']:>13.1f} "
            f"{r['receiver_max_gap_ms']:>15.1f} {_fmt(r['receiver_loop_lag_ms'], 1):>20}"
            f"  (reads on the {r['served_by']})"
        )
    if redis:
        print(
            f"{'redis REPLICAOF -> master_link_status:up':<40} {'':>12} {redis['seconds']:>13.2f} "
            f"{'':>9} {redis['max_read_gap_ms']:>13.1f} {'':>15}  (reads on the primary; "
            f"repl-diskless-load {args.redis_diskless_load})"
        )
    else:
        print(f"redis: skipped ({reason})")
    print()
    for target, value, ok in checks:
        shown = _fmt(value) + ("x" if "resync" in target and value is not None else "")
        shown = shown if "resync" in target else f"{_fmt(value, 1)} ms"
        state = "met" if ok else ("n/a" if value is None else "MISSED")
        print(f"  {target:<40} {shown:>9}: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
