"""Bulk load, side by side in one run: `pbkv load FILE` into a pbkv pair against
`redis-cli --pipe < FILE` into Redis with a replica, followed by `WAIT 1 0`.

Both load the same pairs (bench/bulk.py's data set: 16-byte keys, 100-byte values),
each from a file written before the clock starts (JSON lines for pbkv, RESP SET
commands for Redis). pbkv's time ends when `pbkv load` exits: every pair applied on
the primary and the backup and acknowledged; Redis's when `WAIT 1 0` answers that the
replica holds every write. Each round loads into fresh, empty servers; the report
gives each round and the median, the ratio pbkv / Redis (target <= 1.2), and the
CPU seconds both servers and the client spent (which a busy machine distorts less).

    python -m bench.bulk_load --keys 1000000 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import resp_load, servers
from bench.bulk import key_of, value_of
from pbkv.bulk import json_line

TARGET = 1.2  # pbkv's time at most this many times Redis's


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Timed:
    """Wall seconds of a load, and the CPU seconds the two servers and the client spent
    on it (on a shared machine the CPU time says what the wall time cannot): ``each``
    is primary, backup (or replica), client."""

    def __init__(self, servers: list[int]) -> None:
        self.servers = servers
        self.wall = self.cpu = 0.0
        self.each: list[float] = []

    def __enter__(self) -> Timed:
        self._cpu = [*map(_cpu_seconds, self.servers), _children_cpu()]
        self._started = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self._started
        after = [*map(_cpu_seconds, self.servers), _children_cpu()]
        self.each = [end - start for end, start in zip(after, self._cpu, strict=True)]
        self.cpu = sum(self.each)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench.bulk_load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=1_000_000, help="pairs to load")
    ap.add_argument("--rounds", type=int, default=1, help="loads of each system (median kept)")
    ap.add_argument("--json", action="store_true", help="print a JSON report")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    servers.add_redis_arguments(ap)
    return ap


def write_files(workdir: Path, keys: int) -> tuple[Path, Path]:
    """The JSON lines file for pbkv and the RESP file for redis-cli --pipe (the SETs,
    then `WAIT 1 0`)."""
    lines, resp = workdir / "pairs.jsonl", workdir / "pairs.resp"
    with lines.open("wb") as jl, resp.open("wb") as rp:
        step = 10_000
        for start in range(0, keys, step):
            stop = min(keys, start + step)
            pairs = [(key_of(i), value_of(i)) for i in range(start, stop)]
            jl.write(b"".join(json_line(k, v) for k, v in pairs))
            rp.write(b"".join(resp_load.command("SET", k, v) for k, v in pairs))
        # On the connection of the SETs: WAIT waits for that client's last write.
        rp.write(resp_load.command("WAIT", 1, 0))
    return lines, resp


def load_pbkv(workdir: Path, name: str, data: Path, keys: int) -> Timed:
    """`pbkv load` into a fresh pair, timed; checks both servers hold every pair."""
    pair = servers.Pbkv(workdir, name)
    try:
        pair.start_all()
        host, port = pair.address["primary"]
        command = [sys.executable, "-m", "pbkv", "--host", host, "--port", str(port)]
        command += ["--timeout", "120", "load", str(data)]
        pids = [pair.pid(role) or 0 for role in ("primary", "backup")]
        with Timed(pids) as timed:
            done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"pbkv load failed: {done.stderr.strip()}")
        for role in ("primary", "backup"):
            status = pair.status(role, timeout=30)
            if status is None or status["keys"] != keys:
                raise RuntimeError(f"pbkv {role} holds {status and status['keys']} of {keys}")
        return timed
    finally:
        with contextlib.suppress(Exception):
            pair.cleanup()


def load_redis(binary: str, workdir: Path, name: str, data: Path, keys: int) -> Timed:
    """`redis-cli --pipe` (the SETs and `WAIT 1 0`) into a fresh primary and replica,
    timed."""
    cli = shutil.which("redis-cli") or str(Path(binary).with_name("redis-cli"))
    primary = servers.Redis(binary, workdir, name + "-primary")
    replica = servers.Redis(binary, workdir, name + "-replica")
    try:
        primary.start()
        replica.start(replicaof=primary)
        replica.wait_link_up()
        where = ["-h", primary.host, "-p", str(primary.port)]
        with Timed([primary.pid, replica.pid]) as timed, data.open("rb") as source:
            done = subprocess.run(
                [cli, *where, "--pipe"], stdin=source, capture_output=True, timeout=3600
            )
        # "errors: 0, replies: N": the SETs and the WAIT all answered without error.
        if done.returncode != 0 or b"errors: 0, replies: %d" % (keys + 1) not in done.stdout:
            raise RuntimeError(f"redis-cli --pipe failed: {done.stdout!r} {done.stderr!r}")
        with replica.client() as r:
            size = r.call("DBSIZE")
        if size != keys:
            raise RuntimeError(f"the redis replica holds {size} of {keys} keys")
        return timed
    finally:
        replica.stop()
        primary.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    say = servers.progress_printer(args.json)
    found = servers.redis_for_run(args, "bulk_load", say)
    if found is None:
        return 2
    redis_binary, reason = found
    workdir = Path(tempfile.mkdtemp(prefix="pbkv-bulk-load-"))
    report: dict[str, Any] = {"keys": args.keys, "key_bytes": 16, "value_bytes": 100}
    report["pbkv_revision"] = servers.pbkv_revision()
    try:
        say(f"writing {args.keys} pairs as JSON lines and as RESP")
        lines, resp = write_files(workdir, args.keys)
        rounds: dict[str, list[Timed]] = {"pbkv": [], "redis": []}
        for n in range(args.rounds):  # interleaved: both see the same machine
            say(f"round {n + 1}: pbkv load")
            rounds["pbkv"].append(load_pbkv(workdir, f"pbkv{n}", lines, args.keys))
            if redis_binary is not None:
                say(f"round {n + 1}: redis-cli --pipe + WAIT 1 0")
                rounds["redis"].append(
                    load_redis(redis_binary, workdir, f"redis{n}", resp, args.keys)
                )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report["rounds"] = {
        name: [{"seconds": t.wall, "cpu_seconds": t.cpu, "cpu_each": t.each} for t in runs]
        for name, runs in rounds.items()
    }
    ours = statistics.median(t.wall for t in rounds["pbkv"])
    ours_cpu = statistics.median(t.cpu for t in rounds["pbkv"])
    theirs = statistics.median(t.wall for t in rounds["redis"]) if rounds["redis"] else None
    theirs_cpu = statistics.median(t.cpu for t in rounds["redis"]) if rounds["redis"] else None
    ratio = ours / theirs if theirs else None
    cpu_ratio = ours_cpu / theirs_cpu if theirs_cpu else None
    report.update(
        pbkv_seconds=ours,
        pbkv_cpu_seconds=ours_cpu,
        redis_seconds=theirs,
        redis_cpu_seconds=theirs_cpu,
        ratio=ratio,
        cpu_ratio=cpu_ratio,
    )
    if redis_binary is not None:
        report["redis_version"] = servers.redis_version(redis_binary)
    else:
        report["redis_skipped"] = reason
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print()
    print(f"bulk load of {args.keys:,} pairs (16-byte keys, 100-byte values), replicated")
    print(f"  {'':<32} {'median s':>9} {'pairs/s':>10} {'CPU s':>6}  rounds (s)")
    systems = [("pbkv load (primary + backup)", rounds["pbkv"], ours, ours_cpu)]
    if theirs is not None and theirs_cpu is not None:
        systems.append(("redis-cli --pipe + WAIT 1 0", rounds["redis"], theirs, theirs_cpu))
    for label, runs, wall, cpu in systems:
        shown = " ".join(f"{t.wall:.2f}" for t in runs)
        print(f"  {label:<32} {wall:>9.2f} {args.keys / wall:>10,.0f} {cpu:>6.2f}  {shown}")
    print("  CPU s of each round: primary + backup (replica) + client")
    for label, runs in (("pbkv", rounds["pbkv"]), ("redis", rounds["redis"])):
        for t in runs:
            print(f"    {label:<6} {t.wall:5.2f} s: " + " + ".join(f"{c:.2f}" for c in t.each))
    if ratio is not None:
        state = "met" if ratio <= TARGET else "MISSED"
        print(f"  pbkv / Redis (seconds) {ratio:.2f}x (target <= {TARGET}): {state}")
        print(f"  pbkv / Redis (CPU seconds, servers and client) {cpu_ratio:.2f}x")
    else:
        print(f"  redis: skipped ({reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
