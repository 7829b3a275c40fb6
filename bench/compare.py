"""pbkv replicated vs pbkv standalone vs Redis with a replica, in one run on one machine.

Three systems run side by side on loopback for the whole run:

- pbkv replicated: a primary on 127.0.0.1 and its backup on 127.0.0.2;
- pbkv standalone: a primary with `"standalone": "true"` and no backup;
- Redis: a primary and one replica (persistence off, diskless replication), where an
  insert is `SET` followed by `WAIT 1 0` and a get is a plain `GET`.

pbkv is driven by bench/loadgen.py, Redis by bench/resp_load.py: the same closed-loop
design (one request in flight per connection), key sizes and 100-byte values. Inserts
write unique keys; gets read random keys of a preloaded set. Every cell (workload,
connections) is measured round by round with the systems interleaved (A B C A B C ...),
so slow phases of a noisy machine hit all of them; a cell reports its best round
(`--stat median` for the median) and ratios compare figures from the same run.

    python -m bench.compare            # 1, 8 and 64 connections, 2 rounds of 3 s
    python -m bench.compare --quick    # smoke run: 8 connections, tiny durations

``--keyed`` also drives the replicated pair with inserts that each carry an
``Idempotency-Key`` ("pbkv keyed", measured back to back with the plain inserts on
the same servers; target: at least 0.9x). ``--variant`` adds more replicated
pairs to the same run, each compared with the plain one:
``--variant secret,secret=s3cret`` (other settings), or
``--variant before@../old-checkout`` (another checkout's code, e.g. the previous
commit in a ``git worktree``; it needs a ``.venv`` of its own or a link to one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from bench import bulk, resp_load, servers
from bench.loadgen import InsertTemplate, LoadResult, host_header, run_load, unique_prefix

REPLICATED = "pbkv replicated"
KEYED = "pbkv keyed"  # the replicated pair, every insert with an Idempotency-Key
STANDALONE = "pbkv standalone"
REDIS = "redis"
WORKLOADS = ("insert", "get")
LABELS = {
    (REPLICATED, "insert"): "insert",
    (KEYED, "insert"): "insert+key",
    (STANDALONE, "insert"): "insert",
    (REDIS, "insert"): "SET+WAIT 1 0",
    (REPLICATED, "get"): "get",
    (STANDALONE, "get"): "get",
    (REDIS, "get"): "GET",
}

# Targets, checked at the highest connection count measured (64).
TARGETS = (
    ("replicated inserts / Redis SET+WAIT", "insert_vs_redis", ">=", 0.9),
    ("replicated inserts / pbkv standalone", "insert_vs_standalone", ">=", 0.6),
    ("pbkv gets / Redis GET", "get_vs_redis", ">=", 0.8),
    ("replicated insert p99 / Redis SET+WAIT p99", "insert_p99_vs_redis", "<=", 2.0),
)
# And at one connection, where every write waits for its own round trip.
TARGETS_AT_ONE = (("replicated inserts / Redis SET+WAIT", "insert_vs_redis", ">=", 0.6),)
# With --keyed: inserts with an Idempotency-Key / inserts without, on the same pair.
KEYED_TARGET = ("keyed replicated inserts / replicated inserts", ">=", 0.9)


@dataclass
class Cell:
    system: str
    workload: str
    connections: int
    rounds: list[LoadResult] = field(default_factory=list)
    cpu: list[dict[str, float]] = field(default_factory=list)  # cores busy, per round

    def pick(self, stat: str) -> tuple[LoadResult, dict[str, float]]:
        order = sorted(range(len(self.rounds)), key=lambda i: self.rounds[i].throughput)
        i = order[-1] if stat == "best" else order[(len(order) - 1) // 2]
        return self.rounds[i], self.cpu[i]


def cpu_per_request(result: LoadResult, cores: dict[str, float]) -> dict[str, float]:
    """Microseconds of CPU each process spent per request served: its cores busy over
    the round (warm-up included, under the same load) divided by the requests per
    second measured. The load generator and "other" are left out: not the servers."""
    if not result.throughput:
        return {}
    return {
        name: round(busy / result.throughput * 1e6, 1)
        for name, busy in cores.items()
        if name not in ("loadgen", "other")
    }


# ---------------------------------------------------------------- CPU accounting


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    """CPU time spent by everything on the machine (from /proc/stat), in seconds."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Cores used by the load generator (this process), by each server, and by everything
    else on the machine ("other": noise from outside the benchmark) meanwhile."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def __enter__(self) -> CpuMeter:
        self._wall = time.monotonic()
        self._own = time.process_time()
        self._servers = {name: _cpu_seconds(pid) for name, pid in self.pids.items()}
        self._machine = _machine_busy_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(time.monotonic() - self._wall, 1e-9)
        self.cores = {"loadgen": (time.process_time() - self._own) / wall}
        for name, pid in self.pids.items():
            self.cores[name] = (_cpu_seconds(pid) - self._servers[name]) / wall
        machine = (_machine_busy_seconds() - self._machine) / wall
        self.cores["other"] = max(machine - sum(self.cores.values()), 0.0)


# ---------------------------------------------------------------- the systems


class System:
    """One system under test: how to drive it and which processes are its servers."""

    def __init__(
        self,
        name: str,
        run: Callable[..., Any],
        pids: dict[str, int],
    ) -> None:
        self.name = name
        self._run = run
        self.pids = pids

    def measure(self, workload: str, connections: int, args: argparse.Namespace, prefix: str):
        kwargs: dict[str, Any] = {"duration": args.duration, "warmup": args.warmup}
        if workload == "get":
            kwargs.update(keys=args.keys, key_prefix=prefix, preload=False)
        with CpuMeter(self.pids) as meter:
            result = uvloop.run(self._run(workload, connections, **kwargs))
        return result, meter.cores


def _pbkv_system(name: str, pbkv: servers.Pbkv, idempotency: bool = False) -> System:
    host, port = pbkv.address["primary"]

    def run(workload: str, connections: int, **kwargs: Any):
        return run_load(host, port, workload, connections, idempotency=idempotency, **kwargs)

    pids = {"primary": pbkv.pid("primary") or 0}
    if not pbkv.standalone:
        pids["backup"] = pbkv.pid("backup") or 0
    return System(name, run, pids)


def _redis_system(primary: servers.Redis, replica: servers.Redis, name: str = REDIS) -> System:
    def run(workload: str, connections: int, **kwargs: Any):
        return resp_load.run_resp_load(
            primary.host, primary.port, workload, connections, wait_replicas=1, **kwargs
        )

    return System(name, run, {"primary": primary.pid, "replica": replica.pid})


async def _preload_pbkv(pbkv: servers.Pbkv, prefix: str, keys: int) -> None:
    host, port = pbkv.address["primary"]
    template = InsertTemplate(host_header(host, port), f"{prefix}key-", "x" * 100)
    done = await bulk.http_fill(host, port, (template.request(i) for i in range(keys)))
    if done.ok != keys:
        raise RuntimeError(f"{pbkv.name}: preloading {keys} keys, {done.refused} refused")


async def _preload_redis(primary: servers.Redis, prefix: str, keys: int) -> None:
    template = resp_load.SetTemplate(f"{prefix}key-", b"x" * 100, 0)
    replies, errors = await resp_load.fill(
        primary.host, primary.port, (template.request(i) for i in range(keys))
    )
    if errors or replies != keys:
        raise RuntimeError(f"redis: preloading {keys} keys, {errors} errors")


# ---------------------------------------------------------------- report


@dataclass(frozen=True)
class Variant:
    """Another replicated pair measured beside the plain one."""

    label: str
    root: Path
    settings: dict[str, str]

    @property
    def system(self) -> str:
        return f"pbkv {self.label}"

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``LABEL[@CHECKOUT][,setting=value...]``."""
        head, *pairs = text.split(",")
        label, _, root = head.partition("@")
        settings = {}
        for pair in pairs:
            name, equals, value = pair.partition("=")
            if not equals:
                raise argparse.ArgumentTypeError(f"{pair!r} is not setting=value")
            settings[name] = value
        return cls(label, Path(root).resolve() if root else servers.REPO, settings)


def label_of(system: str, workload: str) -> str:
    return LABELS.get((system, workload), workload)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def paired_ratios(
    cells: dict[tuple[str, str, int], Cell], system: str, workload: str, conns: int
) -> list[float]:
    """``system``'s throughput over the plain pair's, one ratio per round: the two
    are measured back to back in each round, so a ratio sees one state of a noisy
    machine, where the best or median of each over the whole run may not."""
    ours, plain = cells.get((system, workload, conns)), cells.get((REPLICATED, workload, conns))
    if ours is None or plain is None:
        return []
    return [
        round(a.throughput / b.throughput, 3)
        for a, b in zip(ours.rounds, plain.rounds, strict=True)
        if b.throughput
    ]


def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def ratios(
    chosen: dict[tuple[str, str, int], LoadResult], connections: Sequence[int]
) -> dict[int, dict[str, float | None]]:
    def get(system: str, workload: str, conns: int, what: str) -> float | None:
        result = chosen.get((system, workload, conns))
        return None if result is None else getattr(result, what)

    out: dict[int, dict[str, float | None]] = {}
    for c in connections:
        out[c] = {
            "insert_vs_redis": _ratio(
                get(REPLICATED, "insert", c, "throughput"), get(REDIS, "insert", c, "throughput")
            ),
            "insert_vs_standalone": _ratio(
                get(REPLICATED, "insert", c, "throughput"),
                get(STANDALONE, "insert", c, "throughput"),
            ),
            "get_vs_redis": _ratio(
                get(REPLICATED, "get", c, "throughput"), get(REDIS, "get", c, "throughput")
            ),
            "standalone_get_vs_redis": _ratio(
                get(STANDALONE, "get", c, "throughput"), get(REDIS, "get", c, "throughput")
            ),
            "insert_p99_vs_redis": _ratio(
                get(REPLICATED, "insert", c, "p99_ms"), get(REDIS, "insert", c, "p99_ms")
            ),
            "get_p99_vs_redis": _ratio(
                get(REPLICATED, "get", c, "p99_ms"), get(REDIS, "get", c, "p99_ms")
            ),
        }
    return out


def check_targets(
    table: dict[str, float | None], targets: Sequence[tuple[str, str, str, float]] = TARGETS
) -> list[dict[str, Any]]:
    checks = []
    for label, name, op, bound in targets:
        value = table.get(name)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        checks.append({"target": label, "ratio": value, "bound": f"{op} {bound}", "met": met})
    return checks


def print_table(
    cells: list[Cell],
    stat: str,
    connections: Sequence[int],
    table: dict[int, dict[str, float | None]],
) -> None:
    head = (
        f"{'system':<16} {'workload':<13} {'conns':>5} {'req/s':>9} {'p50 ms':>7} "
        f"{'p90 ms':>7} {'p99 ms':>7} {'errors':>6}  cpu (cores); cpu per request (us)"
    )
    print(head)
    print("-" * len(head))
    for cell in cells:
        result, cpu = cell.pick(stat)
        errors = result.errors + result.failed
        cores = " ".join(f"{k} {v:.2f}" for k, v in cpu.items())
        per_request = " ".join(f"{k} {v:.1f}" for k, v in cpu_per_request(result, cpu).items())
        print(
            f"{cell.system:<16} {label_of(cell.system, cell.workload):<13} {cell.connections:>5} "
            f"{result.throughput:>9.0f} {result.p50_ms:>7.2f} {result.p90_ms:>7.2f} "
            f"{result.p99_ms:>7.2f} {errors:>6}  {cores}; {per_request}"
        )
    print()
    names = (
        ("pbkv replicated / Redis SET+WAIT (inserts/s)", "insert_vs_redis"),
        ("pbkv replicated / pbkv standalone (inserts/s)", "insert_vs_standalone"),
        ("pbkv gets / Redis GET (gets/s, replicated primary)", "get_vs_redis"),
        ("pbkv standalone gets / Redis GET", "standalone_get_vs_redis"),
        ("p99 insert: pbkv replicated / Redis SET+WAIT", "insert_p99_vs_redis"),
        ("p99 get: pbkv / Redis GET", "get_p99_vs_redis"),
    )
    width = max(len(label) for label, _ in names)
    print(f"{'ratio':<{width}} " + " ".join(f"{f'{c} conns':>9}" for c in connections))
    for label, name in names:
        row = " ".join(f"{_fmt_ratio(table[c][name]):>9}" for c in connections)
        print(f"{label:<{width}} {row}")
    # Steadier than throughput on a shared machine: what each request cost the server.
    by_cell = {(c.system, c.workload, c.connections): c.pick(stat) for c in cells}
    for workload in WORKLOADS:
        figures = []
        for c in connections:
            ours, theirs = by_cell.get((REPLICATED, workload, c)), by_cell.get((REDIS, workload, c))
            value = None
            if ours is not None and theirs is not None:
                value = _ratio(
                    cpu_per_request(*ours).get("primary"), cpu_per_request(*theirs).get("primary")
                )
            figures.append(f"{_fmt_ratio(value):>9}")
        label = f"primary CPU per {workload}: pbkv / Redis (us/us)"
        print(f"{label:<{width}} {' '.join(figures)}")


# ---------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description="pbkv replicated vs standalone vs Redis SET+WAIT, in one run.",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 connections, tiny cells")
    ap.add_argument("--connections", type=int, nargs="+", help="default: 1 8 64")
    ap.add_argument("--rounds", type=int, help="rounds per cell (default 2)")
    ap.add_argument("--duration", type=float, help="seconds measured per round (default 3)")
    ap.add_argument("--warmup", type=float, help="seconds not measured per round (default 0.5)")
    ap.add_argument("--keys", type=int, help="preloaded key set for gets (default 100000)")
    ap.add_argument("--stat", choices=("best", "median"), default="best", help="per cell")
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--pbkv-flags", default="", help="extra `pbkv serve` flags, e.g. '--shards 64'")
    ap.add_argument("--no-redis", action="store_true", help="measure pbkv only")
    ap.add_argument("--no-standalone", action="store_true", help="skip the standalone primary")
    ap.add_argument(
        "--keyed",
        action="store_true",
        help="also insert with an Idempotency-Key per request on the replicated pair",
    )
    ap.add_argument(
        "--variant",
        type=Variant.parse,
        action="append",
        default=[],
        metavar="LABEL[@CHECKOUT][,setting=value...]",
        help="another replicated pair in the same run, compared with the plain one",
    )
    ap.add_argument("--no-install", action="store_true", help="never apt-get install Redis")
    ap.add_argument(
        "--no-redis-if-missing",
        action="store_true",
        help="skip Redis (instead of failing) when it is missing and cannot be installed; "
        "implied by --quick",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object instead")
    ap.add_argument("--json-file", help="also write the JSON report to this file")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (logs)")
    return ap


def _defaults(args: argparse.Namespace) -> None:
    quick = args.quick
    if args.connections is None:
        args.connections = [8] if quick else [1, 8, 64]
    if args.rounds is None:
        args.rounds = 1 if quick else 2
    if args.duration is None:
        args.duration = 0.3 if quick else 3.0
    if args.warmup is None:
        args.warmup = 0.1 if quick else 0.5
    if args.keys is None:
        args.keys = 1000 if quick else 100_000


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _defaults(args)
    say: Callable[[str], None] = (
        (lambda text: print(text, file=sys.stderr, flush=True))
        if args.json
        else (lambda text: print(text, flush=True))
    )
    redis_binary: str | None = None
    redis_reason = "--no-redis"
    if not args.no_redis:
        redis_binary, redis_reason = servers.ensure_redis(install=not args.no_install)
        if redis_binary is None and not (args.quick or args.no_redis_if_missing):
            print(f"compare: redis is needed: {redis_reason}", file=sys.stderr)
            return 2
    if redis_binary is None:
        say(f"redis: skipped ({redis_reason})")

    workdir = Path(tempfile.mkdtemp(prefix="pbkv-compare-"))
    flags = shlex.split(args.pbkv_flags)
    pair = servers.Pbkv(workdir, "replicated", serve_flags=flags)
    pbkvs = {REPLICATED: pair}
    if not args.no_standalone:
        pbkvs[STANDALONE] = servers.Pbkv(workdir, "standalone", standalone=True, serve_flags=flags)
    for variant in args.variant:
        pbkvs[variant.system] = servers.Pbkv(
            workdir,
            variant.label,
            standalone=variant.settings.get("standalone") == "true",
            settings=variant.settings,
            serve_flags=flags,
            root=variant.root,
        )
    started: list[Any] = list(pbkvs.values())
    redis_pair: tuple[servers.Redis, servers.Redis] | None = None
    try:
        for pbkv in pbkvs.values():
            pbkv.start_all()
        systems = [_pbkv_system(name, pbkv) for name, pbkv in pbkvs.items()]
        if args.keyed:  # right after the plain pair's: measured back to back with it
            systems.insert(1, _pbkv_system(KEYED, pair, idempotency=True))
        if redis_binary is not None:
            primary = servers.Redis(redis_binary, workdir, "redis-primary")
            replica = servers.Redis(redis_binary, workdir, "redis-replica")
            started += [primary, replica]
            primary.start()
            replica.start(replicaof=primary)
            replica.wait_link_up()
            redis_pair = (primary, replica)
            systems.append(_redis_system(primary, replica))
            say(f"redis: {servers.redis_version(redis_binary)} primary + replica on loopback")

        prefix = unique_prefix()
        if "get" in args.workloads:
            say(f"preloading {args.keys} keys into each system for gets")
            for pbkv in pbkvs.values():
                uvloop.run(_preload_pbkv(pbkv, prefix, args.keys))
            if redis_pair is not None:
                uvloop.run(_preload_redis(redis_pair[0], prefix, args.keys))

        cells: list[Cell] = []
        started_at = time.monotonic()
        for workload in args.workloads:
            active = [s for s in systems if s.name != KEYED or workload == "insert"]
            for conns in args.connections:
                row = [Cell(s.name, workload, conns) for s in active]
                cells += row
                for r in range(args.rounds):
                    # Every other round in reverse order: no system always runs first.
                    order = list(zip(active, row, strict=True))
                    for system, cell in order if r % 2 == 0 else reversed(order):
                        result, cpu = system.measure(workload, conns, args, prefix)
                        cell.rounds.append(result)
                        cell.cpu.append(cpu)
                        per_request = " ".join(
                            f"{k} {v:.1f}" for k, v in cpu_per_request(result, cpu).items()
                        )
                        say(
                            f"  round {r + 1} {system.name:<16} {workload:<6} {conns:>3} conns: "
                            f"{result.throughput:>8.0f}/s p99 {result.p99_ms:.2f} ms"
                            + (f" errors {result.errors}" if result.errors else "")
                            + f" cpu/req (us) {per_request}"
                        )
        elapsed = time.monotonic() - started_at
    finally:
        for server in started:
            with contextlib.suppress(Exception):
                if isinstance(server, servers.Redis):
                    server.stop()
                else:
                    server.cleanup()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    chosen = {(c.system, c.workload, c.connections): c.pick(args.stat)[0] for c in cells}
    by_cell = {(c.system, c.workload, c.connections): c for c in cells}
    table = ratios(chosen, args.connections)
    compared = [variant.system for variant in args.variant] + ([KEYED] if args.keyed else [])
    variants = {
        system: {
            f"{workload}_{c}": _ratio(
                getattr(chosen.get((system, workload, c)), "throughput", None),
                getattr(chosen.get((REPLICATED, workload, c)), "throughput", None),
            )
            for workload in args.workloads
            for c in args.connections
            if system != KEYED or workload == "insert"
        }
        for system in compared
    }
    paired = {
        system: {
            f"{workload}_{c}": paired_ratios(by_cell, system, workload, c)
            for workload in args.workloads
            for c in args.connections
            if system != KEYED or workload == "insert"
        }
        for system in compared
    }
    top = max(args.connections)
    checks = check_targets(table[top])
    if 1 in table and top != 1:
        for check in check_targets(table[1], TARGETS_AT_ONE):
            checks.append({**check, "target": f"{check['target']} at 1 connection"})
    if args.keyed and "insert" in args.workloads:
        label, op, bound = KEYED_TARGET
        value = variants[KEYED].get(f"insert_{top}")
        met = None if value is None else value >= bound
        checks.append({"target": label, "ratio": value, "bound": f"{op} {bound}", "met": met})
    report = {
        "stat": args.stat,
        "rounds": args.rounds,
        "duration": args.duration,
        "warmup": args.warmup,
        "keys": args.keys,
        "cpus": os.cpu_count(),
        "pbkv_revision": servers.pbkv_revision(),
        "redis": servers.redis_version(redis_binary)
        if redis_binary
        else f"skipped ({redis_reason})",
        "seconds": round(elapsed, 1),
        "cells": [
            {
                "system": c.system,
                "workload": c.workload,
                "operation": label_of(c.system, c.workload),
                "connections": c.connections,
                "chosen": c.pick(args.stat)[0].summary(),
                "cpu_cores": c.pick(args.stat)[1],
                "cpu_us_per_request": cpu_per_request(*c.pick(args.stat)),
                "rounds": [r.summary() for r in c.rounds],
            }
            for c in cells
        ],
        "ratios": {str(c): v for c, v in table.items()},
        "variants_vs_replicated": variants,
        "variants_vs_replicated_by_round": paired,
        "targets_at": top,
        "targets": checks,
    }
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print()
    print(
        f"{args.stat} of {args.rounds} round(s) of {args.duration:g} s per cell "
        f"(+{args.warmup:g} s warm-up), {os.cpu_count()} CPUs shared by servers and load "
        f"generator; measuring took {elapsed:.0f} s"
    )
    print_table(cells, args.stat, args.connections, table)
    if redis_binary is None:
        print(f"redis: skipped ({redis_reason})")
    for system, figures in variants.items():
        text = ", ".join(
            f"{name.replace('_', ' @ ')} {_fmt_ratio(v)}" for name, v in figures.items()
        )
        print(f"{system} / {REPLICATED} (req/s): {text}")
        for name, rounds in paired[system].items():
            if rounds:
                print(
                    f"  {name.replace('_', ' @ ')} round by round (each pair measured "
                    f"back to back): median {_fmt_ratio(statistics.median(rounds))}, "
                    f"{_fmt_ratio(min(rounds))} to {_fmt_ratio(max(rounds))}"
                )
    print()
    where = f"at {top} connections" if top == 64 else f"(set for 64 connections) at {top}"
    print(f"targets {where}:")
    for check in checks:
        state = {True: "met", False: "MISSED", None: "n/a"}[check["met"]]
        print(
            f"  {check['target']:<45} {_fmt_ratio(check['ratio']):>7} "
            f"(target {check['bound']}): {state}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
