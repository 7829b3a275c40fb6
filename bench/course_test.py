"""Course-style test against a running primary/backup pair.

Inserts N unique pairs over a few keep-alive connections, then reads every key back
and checks its value. Prints exactly four lines on stdout:

    Result: success
    Insertion: 1000/1000
    Average latency: 0.52 ms/0.31 ms
    Percentile latency: 0.40/0.20, 0.45/0.25, 0.55/0.33, 0.80/0.50

Exit status: 0 success, 1 fail, 2 server unreachable (reason on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import uvloop

from bench.loadgen import (
    GET,
    INSERT,
    Op,
    get_request,
    host_header,
    insert_request,
    percentile,
    read_settings,
    run_ops,
    unique_prefix,
)

PERCENTILES = (20, 50, 70, 90)


@dataclass
class CourseResult:
    total: int
    inserted: int  # inserts answered "success": "true"
    verified: int  # gets that returned exactly the inserted value
    insert_ms: list[float] = field(default_factory=list)  # sorted
    get_ms: list[float] = field(default_factory=list)  # sorted

    @property
    def success(self) -> bool:
        return self.inserted == self.total and self.verified == self.total


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def format_report(result: CourseResult) -> str:
    """The four report lines, without a trailing newline."""
    pairs = ", ".join(
        f"{percentile(result.insert_ms, p):.2f}/{percentile(result.get_ms, p):.2f}"
        for p in PERCENTILES
    )
    return "\n".join(
        [
            f"Result: {'success' if result.success else 'fail'}",
            f"Insertion: {result.inserted}/{result.total}",
            f"Average latency: {_mean(result.insert_ms):.2f} ms/{_mean(result.get_ms):.2f} ms",
            f"Percentile latency: {pairs}",
        ]
    )


def _split(ops: list[Op], connections: int) -> list[list[Op]]:
    return [ops[c::connections] for c in range(connections)]


async def run_course_test(
    host: str,
    port: int,
    count: int = 1000,
    connections: int = 8,
    *,
    timeout: float = 10.0,
    key_prefix: str | None = None,
) -> CourseResult:
    """Insert `count` fresh pairs, then get each one back; raises OSError if unreachable."""
    prefix = key_prefix if key_prefix is not None else unique_prefix()
    hh = host_header(host, port)
    conns = max(1, min(connections, count))
    token = os.urandom(4).hex()  # values differ between runs too
    pairs = [(f"{prefix}{i:06d}", f"value-{i}-{token}") for i in range(count)]

    inserts: list[Op] = [(INSERT, insert_request(hh, k, v), None) for k, v in pairs]
    put = await run_ops(host, port, _split(inserts, conns), timeout=timeout, workload="insert")
    # Only after every insert was answered: each get must see its value.
    gets: list[Op] = [(GET, get_request(hh, k), v) for k, v in pairs]
    got = await run_ops(host, port, _split(gets, conns), timeout=timeout, workload="get")
    return CourseResult(
        total=count,
        inserted=put.ok,
        verified=got.ok - got.mismatches,
        insert_ms=put.insert_ms,
        get_ms=got.get_ms,
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bin/test", description="Course-style test against a running pbkv pair."
    )
    ap.add_argument("--config", help="settings file (default conf/settings.conf)")
    ap.add_argument("--host", help="default: the primary from the settings file")
    ap.add_argument("--port", type=int, help="default: the port from the settings file")
    ap.add_argument("--count", type=int, default=1000, help="pairs to insert")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a reply")
    args = ap.parse_args(argv)

    host, port = args.host, args.port
    if host is None or port is None:
        try:
            conf_host, conf_port = read_settings(args.config)
        except (OSError, ValueError, KeyError) as e:
            print(f"test: cannot read settings: {e}", file=sys.stderr)
            return 2
        host = host if host is not None else conf_host
        port = port if port is not None else conf_port
    try:
        result = uvloop.run(
            run_course_test(host, port, args.count, args.connections, timeout=args.timeout)
        )
    except (OSError, TimeoutError) as e:
        print(f"test: cannot reach the primary at {host}:{port}: {e}", file=sys.stderr)
        return 2
    print(format_report(result))
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
