"""Resident memory of pbkv and of Redis holding the same N pairs (16-byte keys,
100-byte values; 1,000,000 by default).

pbkv: a replicated pair (primary and backup both hold the data), loaded with pipelined
inserts. Redis: a primary and a replica (persistence off), loaded with pipelined SETs.
RSS is VmRSS from /proc/PID/status, read empty and again once the data is in and the
servers are idle; Redis's own `used_memory_rss` and `used_memory` are shown too.

    python -m bench.memory --keys 1000000
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

import uvloop

from bench import bulk, servers

MIB = 1024 * 1024
TARGET = 1.5  # pbkv RSS <= 1.5x Redis RSS


def _settle() -> None:
    time.sleep(1.0)  # let the servers finish replies and free their buffers


def _measure_pbkv(workdir: Path, keys: int, flags: list[str], say: Callable[[str], None]):
    pair = servers.Pbkv(workdir, "pair", serve_flags=flags)
    try:
        pair.start_all()
        pids = {role: pair.pid(role) for role in ("primary", "backup")}
        assert all(pids.values()), pids
        empty = {role: servers.rss_bytes(pid) for role, pid in pids.items() if pid}
        host, port = pair.address["primary"]
        seconds = bulk.load_pbkv(host, port, keys)
        say(f"pbkv: loaded {keys} pairs in {seconds:.1f} s")
        _settle()
        for role in ("primary", "backup"):
            status = pair.status(role)
            if status is None or status["keys"] != keys:
                raise RuntimeError(f"the pbkv {role} holds {status and status['keys']} pairs")
        full = {role: servers.rss_bytes(pid) for role, pid in pids.items() if pid}
        return {role: {"empty": empty[role], "full": full[role]} for role in pids}
    finally:
        with contextlib.suppress(Exception):
            pair.cleanup()


def _measure_redis(binary: str, workdir: Path, keys: int, say: Callable[[str], None]):
    primary = servers.Redis(binary, workdir, "redis-primary")
    replica = servers.Redis(binary, workdir, "redis-replica")
    try:
        primary.start()
        replica.start(replicaof=primary)
        replica.wait_link_up()
        empty = {
            "primary": servers.rss_bytes(primary.pid),
            "replica": servers.rss_bytes(replica.pid),
        }
        started = time.monotonic()
        errors = uvloop.run(bulk.redis_fill(primary.host, primary.port, 0, keys))
        if errors:
            raise RuntimeError(f"redis answered {errors} SETs with an error")
        say(f"redis: loaded {keys} pairs in {time.monotonic() - started:.1f} s")

        def replica_has_all() -> bool:
            with replica.client() as r:
                return r.call("DBSIZE") == keys

        servers.wait_for(replica_has_all, 60, "the redis replica to hold every key", 0.05)
        _settle()
        out: dict[str, dict[str, int]] = {}
        for role, server in (("primary", primary), ("replica", replica)):
            info = server.info("memory")
            out[role] = {
                "empty": empty[role],
                "full": servers.rss_bytes(server.pid),
                "used_memory_rss": int(info["used_memory_rss"]),
                "used_memory": int(info["used_memory"]),
            }
        return out
    finally:
        replica.stop()
        primary.stop()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.memory", description="RSS of pbkv vs Redis holding N pairs."
    )
    ap.add_argument("--keys", type=int, default=1_000_000, help="pairs (default 1000000)")
    ap.add_argument("--pbkv-flags", default="", help="extra `pbkv serve` flags")
    servers.add_redis_arguments(ap)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    say = servers.progress_printer(args.json)
    found = servers.redis_for_run(args, "memory", say)
    if found is None:
        return 2
    redis_binary, reason = found

    workdir = Path(tempfile.mkdtemp(prefix="pbkv-memory-"))
    try:
        pbkv = _measure_pbkv(workdir, args.keys, shlex.split(args.pbkv_flags), say)
        redis = _measure_redis(redis_binary, workdir, args.keys, say) if redis_binary else None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    pairs = max(args.keys, 1)
    rows: list[tuple[str, dict[str, Any]]] = [
        ("pbkv primary", pbkv["primary"]),
        ("pbkv backup", pbkv["backup"]),
    ]
    if redis:
        rows += [("redis primary", redis["primary"]), ("redis replica", redis["replica"])]
    ratio = redis and pbkv["primary"]["full"] / redis["primary"]["full"]
    ratio_backup = redis and pbkv["backup"]["full"] / redis["replica"]["full"]
    report: dict[str, Any] = {
        "keys": args.keys,
        "pbkv_revision": servers.pbkv_revision(),
        "key_bytes": 16,
        "value_bytes": 100,
        "pbkv": pbkv,
        "redis": redis,
        "rss_ratio_primary": ratio,
        "rss_ratio_backup": ratio_backup,
        "target": f"<= {TARGET}",
        "met": None if not redis else max(ratio or 0, ratio_backup or 0) <= TARGET,
    }
    if redis_binary:
        report["redis_version"] = servers.redis_version(redis_binary)
    else:
        report["redis_skipped"] = reason
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print()
    print(f"memory holding {args.keys} pairs (16-byte keys, 100-byte values)")
    head = f"{'server':<14} {'RSS empty MiB':>13} {'RSS full MiB':>12} {'bytes/pair':>10}"
    print(head + "  redis used_memory_rss / used_memory MiB")
    print("-" * (len(head) + 41))
    for name, row in rows:
        extra = ""
        if "used_memory" in row:
            extra = f"  {row['used_memory_rss'] / MIB:.1f} / {row['used_memory'] / MIB:.1f}"
        print(
            f"{name:<14} {row['empty'] / MIB:>13.1f} {row['full'] / MIB:>12.1f} "
            f"{(row['full'] - row['empty']) / pairs:>10.0f}{extra}"
        )
    print()
    if redis:
        state = "met" if report["met"] else "MISSED"
        print(
            f"  RSS pbkv / redis: primary {ratio:.2f}x, backup/replica {ratio_backup:.2f}x "
            f"(target <= {TARGET}x): {state}"
        )
    else:
        print(f"redis: skipped ({reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
