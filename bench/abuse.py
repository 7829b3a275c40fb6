"""Hostile clients against a loaded pair while a steady writer runs.

    python -m bench.abuse [--keys 200000] [--hold 40] [--after 10]

Starts a pair (real processes), loads it, starts a writer (one connection,
one insert at a time), then attacks the primary for ``--hold`` seconds with:
four connections that each pipeline ten ``GET /kvman/dump`` and never read,
300 connections that each declare a 3 MB body, send 1 MiB of it and stall,
and 50 connections that send a request head one byte a second.  Then every
attacker closes and the primary is watched ``--after`` seconds more.

Prints the primary's RSS over its baseline (peak, and ``--after`` seconds
after the attackers closed), the writer's longest gap between acknowledged
writes and its failures, and how many slow heads the server closed, and when.
Targets: peak <= 400 MiB, after <= 100 MiB, no failed write, no gap over 1 s,
every slow head closed within 40 s.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time

import uvloop

from bench.bulk import load_pbkv
from pbkv.client import Client
from pbkv.testing.cluster import LocalPair

DUMPERS, DUMPS_EACH = 4, 10
BODIES, DECLARED, SENT = 300, 3_000_000, 1024 * 1024
SLOW_HEADS = 50


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Writer(threading.Thread):
    """Inserts one key at a time; notes the longest gap between acknowledgements."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(daemon=True)
        self.client = Client(host, port, timeout=10)
        self.stop = threading.Event()
        self.writes = 0
        self.failures: list[str] = []
        self.longest_gap = 0.0

    def run(self) -> None:
        last = time.monotonic()
        while not self.stop.is_set():
            try:
                ok = self.client.insert(f"writer-{self.writes}", "x" * 100)
                if not ok:
                    self.failures.append("insert answered false")
            except Exception as exc:  # every failure is counted and printed
                self.failures.append(repr(exc))
            now = time.monotonic()
            self.longest_gap = max(self.longest_gap, now - last)
            last = now
            self.writes += 1
        self.client.close()


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, rss_mib(self.pid))


async def attack(host: str, port: int, hold: float) -> dict[str, object]:
    started = time.monotonic()
    writers: list[asyncio.StreamWriter] = []
    dump = b"GET /kvman/dump HTTP/1.1\r\nHost: x\r\n\r\n"
    for _ in range(DUMPERS):
        _reader, writer = await asyncio.open_connection(host, port)
        writer.write(dump * DUMPS_EACH)  # and never read
        writers.append(writer)

    async def body() -> None:
        try:
            _reader, writer = await asyncio.open_connection(host, port)
            writers.append(writer)
            writer.write(
                b"POST /kv/insert HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                b"Content-Length: %d\r\n\r\nkey=a&value=" % DECLARED
            )
            writer.write(b"v" * SENT)
            await writer.drain()
        except OSError:
            pass  # refused and closed by the server: that is the point

    await asyncio.gather(*(body() for _ in range(BODIES)))
    closed_after: list[float] = []

    async def slow_head() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        writers.append(writer)
        head = b"GET /kv/get?key=a HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 10_000
        opened = time.monotonic()

        async def trickle() -> None:
            for byte in head:
                writer.write(bytes([byte]))
                await asyncio.sleep(1.0)

        sender = asyncio.create_task(trickle())
        try:
            while await reader.read(65536):
                pass
            closed_after.append(time.monotonic() - opened)
        except OSError:
            closed_after.append(time.monotonic() - opened)
        finally:
            sender.cancel()

    slow = [asyncio.create_task(slow_head()) for _ in range(SLOW_HEADS)]
    await asyncio.sleep(max(0.0, hold - (time.monotonic() - started)))
    for task in slow:
        task.cancel()
    for writer in writers:
        writer.transport.abort()
    return {"slow_closed": sorted(closed_after)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--hold", type=float, default=40.0, help="seconds of attack")
    parser.add_argument("--after", type=float, default=10.0, help="seconds watched after")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory, LocalPair(directory) as pair:
        pair.start_both()
        host, port = pair.address["primary"]
        load_pbkv(host, port, args.keys)
        pid = pair.pid("primary")
        assert pid is not None
        time.sleep(1.0)  # let the load's buffers settle before the baseline
        baseline = rss_mib(pid)
        sampler = Sampler(pid)
        sampler.start()
        writer = Writer(host, port)
        writer.start()
        attacked = uvloop.run(attack(host, port, args.hold))
        closed_at = time.monotonic()
        time.sleep(args.after)
        after = rss_mib(pid)
        writer.stop.set()
        writer.join(15)
        sampler.stop.set()
        sampler.join()
        status = pair.status("primary") or {}
        slow: list[float] = attacked["slow_closed"]  # type: ignore[assignment]
        print(f"pairs loaded: {args.keys}; attack held {args.hold:.0f} s")
        print(f"primary RSS baseline: {baseline:.1f} MiB")
        print(f"peak RSS over baseline: {sampler.peak - baseline:.1f} MiB (target <= 400)")
        print(
            f"RSS over baseline {time.monotonic() - closed_at:.0f} s after the attackers "
            f"closed: {after - baseline:.1f} MiB (target <= 100)"
        )
        print(
            f"writer: {writer.writes} writes, {len(writer.failures)} failed, longest gap "
            f"{writer.longest_gap * 1000:.0f} ms (target: none failed, gap <= 1000 ms)"
        )
        for failure in writer.failures[:5]:
            print(f"  failure: {failure}")
        latest = f", the last after {slow[-1]:.1f} s" if slow else ""
        print(
            f"slow heads closed by the server: {len(slow)} of {SLOW_HEADS}{latest} "
            "(target: all within 40 s)"
        )
        print(
            f"primary: bodies refused {status.get('bodies_refused')}, "
            f"connections timed out {status.get('connections_timed_out')}, "
            f"loop lag max {status.get('loop_lag_max_ms')} ms, stage {status.get('stage')}"
        )
        ok = (
            sampler.peak - baseline <= 400
            and after - baseline <= 100
            and not writer.failures
            and writer.longest_gap <= 1.0
            and len(slow) == SLOW_HEADS
            and slow[-1] <= 40
        )
        print("targets met" if ok else "TARGETS MISSED")
        return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
