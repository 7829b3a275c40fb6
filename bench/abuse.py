"""Hostile clients against real pairs while a steady writer runs.

    python -m bench.abuse [--only NAME,...] [--quick] [--keys 200000] [--hold 40] [--after 10]

Each attack starts its own pair (real processes on loopback), runs a bounded
time and stops; ``--only`` picks some, ``--quick`` shrinks each to a smoke run.

``resources``: loads the pair, starts a writer (one connection, one insert at a
time), then attacks the primary for ``--hold`` seconds with four connections that
each pipeline ten ``GET /kvman/dump`` and never read, 300 connections that each
declare a 3 MB body, send 1 MiB of it and stall, and 50 connections that send a
request head one byte a second; then every attacker closes and the primary is
watched ``--after`` seconds more.  Prints the primary's RSS over its baseline
(peak, and after), the writer's longest gap and failures, and how many slow
heads the server closed, and when.  Targets: peak <= 400 MiB, after <= 100 MiB,
no failed write, no gap over 1 s, every slow head closed within 40 s.

``upgrade``: with a secret set, ``GET /kvrepl`` Upgrades from the primary's own
address against the backup, as fast as they are answered.  Prints the writer's
longest gap (target < 1 s).

``memory``: with ``max_memory`` 50 MB, four connections each pipeline 100
inserts of 400 KB, and the backup is stopped (SIGSTOP) for 0.6 s during the
burst.  Prints the peak ``memory_bytes`` (and with the writes in flight) over
``max_memory`` (target: at most one request over).

``params``: six form bodies of 3.3 MB, each ~427k empty parameters.  Prints the
writer's longest gap and the primary's loop lag (target: gap < 1 s).

``handshakes``: against a TLS pair, connections that open TCP and never start
TLS.  Prints the backup's descriptors at the peak and past the handshake
deadline (``header_timeout``), and the connections still open then (target:
none past the deadline).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

from bench.bulk import load_pbkv
from pbkv.client import Client
from pbkv.store import PAIR_OVERHEAD
from pbkv.testing.cluster import LocalPair, wait_for
from pbkv.wire import UPGRADE_PATH, UPGRADE_TOKEN

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
    """Inserts one key at a time; notes the longest gap between acknowledged writes."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(daemon=True)
        self.client = Client(host, port, timeout=10, idempotency_keys=False)
        self.stop = threading.Event()
        self.writes = 0
        self.failures: list[str] = []
        self.longest_gap = 0.0

    def run(self) -> None:
        last = time.monotonic()
        while not self.stop.is_set():
            ok = False
            try:
                ok = self.client.insert(f"writer-{self.writes}", "x" * 100)
                if not ok:
                    self.failures.append("insert answered false")
            except Exception as exc:  # every failure is counted and printed
                self.failures.append(repr(exc))
            now = time.monotonic()
            self.longest_gap = max(self.longest_gap, now - last)
            if ok:
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


def resources(args: argparse.Namespace, directory: str) -> bool:
    """Dumps never read, stalled bodies and slow heads against a loaded primary."""
    with LocalPair(directory) as pair:
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
        print_writer(writer, failures_allowed=False)
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
        return (
            sampler.peak - baseline <= 400
            and after - baseline <= 100
            and not writer.failures
            and writer.longest_gap <= 1.0
            and len(slow) == SLOW_HEADS
            and slow[-1] <= 40
        )


def print_writer(writer: Writer, failures_allowed: bool = True) -> None:
    target = "gap < 1000 ms" if failures_allowed else "none failed, gap <= 1000 ms"
    print(
        f"writer: {writer.writes - len(writer.failures)} writes acknowledged, "
        f"{len(writer.failures)} failed, longest gap between acknowledged writes "
        f"{writer.longest_gap * 1000:.0f} ms (target: {target})"
    )
    for failure in writer.failures[:3]:
        print(f"  failure: {failure}")


def with_writer(pair: LocalPair, run: Callable[[], Any]) -> tuple[Writer, Any]:
    """Run ``run()`` while a writer inserts on the primary; the writer, and what it returned."""
    host, port = pair.address["primary"]
    writer = Writer(host, port)
    writer.start()
    time.sleep(0.5)  # a few writes before the attack: its gap is measured from a running writer
    try:
        result = run()
    finally:
        time.sleep(0.5)
        writer.stop.set()
        writer.join(15)
    return writer, result


# -- 1. Upgrades from the primary's address ------------------------------------------------------
UPGRADE = b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: %s\r\nConnection: Upgrade\r\n\r\n" % (
    UPGRADE_PATH,
    UPGRADE_TOKEN,
)


async def upgrade_flood(backup: tuple[str, int], source: str, seconds: float) -> int:
    """Upgrades from ``source`` for ``seconds``, eight at a time; how many were answered 101."""
    end = time.monotonic() + seconds
    switched = 0

    async def one_after_another() -> None:
        nonlocal switched
        while time.monotonic() < end:
            try:
                reader, writer = await asyncio.open_connection(*backup, local_addr=(source, 0))
                writer.write(UPGRADE)
                reply = await asyncio.wait_for(reader.read(64), 2.0)
                switched += reply.startswith(b"HTTP/1.1 101")
                writer.transport.abort()
            except (TimeoutError, OSError):
                await asyncio.sleep(0.01)

    await asyncio.gather(*(one_after_another() for _ in range(8)))
    return switched


def upgrade(args: argparse.Namespace, directory: str) -> bool:
    seconds = 2.0 if args.quick else 10.0
    with LocalPair(directory, secret="abuse-bench-secret") as pair:
        pair.start_both()
        source = pair.address["primary"][0]
        writer, switched = with_writer(
            pair, lambda: uvloop.run(upgrade_flood(pair.address["backup"], source, seconds))
        )
        status = pair.status("primary") or {}
        print(f"{seconds:.0f} s of Upgrades from {source}: {switched} answered 101")
        print_writer(writer)
        print(
            f"primary: stage {status.get('stage')}, writes rewound {status.get('writes_rewound')}"
        )
        return writer.longest_gap < 1.0


# -- 3. pipelined large inserts, the backup paused -------------------------------------------
MAX_MEMORY = 50_000_000
LARGE_VALUE = 400_000


def insert_request(key: str, value_bytes: int) -> bytes:
    body = b"key=%s&value=%s" % (key.encode(), b"v" * value_bytes)
    return (
        b"POST /kv/insert HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )


async def read_replies(reader: asyncio.StreamReader, count: int) -> list[int]:
    """The status codes of ``count`` replies (each with a Content-Length)."""
    codes: list[int] = []
    while len(codes) < count:
        head = await reader.readuntil(b"\r\n\r\n")
        codes.append(int(head.split()[1]))
        length = next(
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        await reader.readexactly(length)
    return codes


async def pipelined_inserts(
    pair: LocalPair, connections: int, each: int, value_bytes: int = LARGE_VALUE
) -> list[int]:
    """``connections`` connections each pipeline ``each`` large inserts; the backup is
    stopped for 0.6 s once the primary holds writes of the burst unacknowledged.
    The status code of every reply."""
    primary = pair.address["primary"]
    backup_pid = pair.pid("backup")
    assert backup_pid is not None

    async def one(connection: int) -> list[int]:
        reader, writer = await asyncio.open_connection(*primary)
        writer.write(
            b"".join(insert_request(f"c{connection}-{i}", value_bytes) for i in range(each))
        )
        codes = await read_replies(reader, each)
        writer.close()
        return codes

    def under_way() -> bool:
        status = pair.status("primary", timeout=5.0)
        return status is not None and status.get("pending_write_bytes", 0) > 0

    burst = [asyncio.create_task(one(c)) for c in range(connections)]
    await asyncio.to_thread(wait_for, under_way, 10, "the burst to reach the primary", 0.002)
    os.kill(backup_pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(0.6)  # the pause is the attack, not a wait
    finally:
        os.kill(backup_pid, signal.SIGCONT)
    return [code for codes in await asyncio.gather(*burst) for code in codes]


class StatusPeaks(threading.Thread):
    """The highest ``memory_bytes``, and with ``pending_write_bytes``, seen in status."""

    def __init__(self, pair: LocalPair) -> None:
        super().__init__(daemon=True)
        self.pair = pair
        self.stop = threading.Event()
        self.memory = 0
        self.with_pending = 0

    def note(self, status: dict[str, Any]) -> None:
        memory = status.get("memory_bytes", 0)
        self.memory = max(self.memory, memory)
        self.with_pending = max(self.with_pending, memory + status.get("pending_write_bytes", 0))

    def run(self) -> None:
        while not self.stop.is_set():
            status = self.pair.status("primary", timeout=5.0)
            if status is not None:
                self.note(status)


def memory(args: argparse.Namespace, directory: str) -> bool:
    connections, each = (2, 80) if args.quick else (4, 100)
    one_request = LARGE_VALUE + PAIR_OVERHEAD + 16
    with LocalPair(directory, max_memory=str(MAX_MEMORY)) as pair:
        pair.start_both()
        peaks = StatusPeaks(pair)
        peaks.start()
        codes = uvloop.run(pipelined_inserts(pair, connections, each))
        peaks.stop.set()
        peaks.join(10)
        peaks.note(pair.status("primary") or {})
        print(
            f"{connections} connections x {each} pipelined inserts of {LARGE_VALUE // 1000} KB, "
            f"backup stopped 0.6 s: {len(codes)} answered"
        )
        print(
            f"peak memory_bytes {peaks.memory / 1e6:.1f} MB, with writes in flight "
            f"{peaks.with_pending / 1e6:.1f} MB, max_memory {MAX_MEMORY / 1e6:.0f} MB: "
            f"{peaks.memory / MAX_MEMORY:.2f}x (target: at most one request over, "
            f"{(MAX_MEMORY + one_request) / 1e6:.1f} MB)"
        )
        return max(peaks.memory, peaks.with_pending) <= MAX_MEMORY + one_request


# -- 4. form bodies of many empty parameters -----------------------------------------------
def many_params_body(size: int) -> bytes:
    parts: list[bytes] = []
    total = i = 0
    while total < size:
        part = b"n%d=&" % i
        parts.append(part)
        total += len(part)
        i += 1
    return b"".join(parts)


async def post_bodies(primary: tuple[str, int], body: bytes, count: int) -> list[int]:
    request = (
        b"POST /kv/insert HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body

    async def one() -> int:
        reader, writer = await asyncio.open_connection(*primary)
        writer.write(request)
        try:
            (code,) = await asyncio.wait_for(read_replies(reader, 1), 60)
        except (OSError, asyncio.IncompleteReadError):
            code = 0  # closed without a reply
        writer.transport.abort()
        return code

    return await asyncio.gather(*(one() for _ in range(count)))


def params(args: argparse.Namespace, directory: str) -> bool:
    body = many_params_body(3_300_000)
    count = 2 if args.quick else 6
    with LocalPair(directory) as pair:
        pair.start_both()
        writer, codes = with_writer(
            pair, lambda: uvloop.run(post_bodies(pair.address["primary"], body, count))
        )
        status = pair.status("primary") or {}
        print(
            f"{count} form bodies of {len(body) / 1e6:.1f} MB, {body.count(b'&')} parameters "
            f"each: answered {sorted(codes)}"
        )
        print_writer(writer)
        print(f"primary: loop lag max {status.get('loop_lag_max_ms')} ms")
        return writer.longest_gap < 1.0


# -- 5. TCP connections that never start TLS -------------------------------------------------
def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def silent_socket_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def handshakes(args: argparse.Namespace, directory: str) -> bool:
    from tests.support.certs import Authority  # the ``cryptography`` package (test dependency)

    count, max_clients, deadline = (300, 100, 2.0) if args.quick else (3000, 1000, 5.0)
    authority = Authority(Path(directory) / "certs")
    primary_cert, primary_key = authority.issue("primary", "127.0.0.1")
    backup_cert, backup_key = authority.issue("backup", "127.0.0.2")
    with LocalPair(
        directory,
        tls_ca=str(authority.ca_file),
        tls_cert=primary_cert,
        tls_key=primary_key,
        max_clients=str(max_clients),
        header_timeout=str(deadline),
    ) as pair:
        pair.start("backup", "--tls-cert", backup_cert, "--tls-key", backup_key)
        pair.start("primary")
        wait_for(lambda: pair.stage("primary") == "in_sync", 20, "the pair in sync")
        pid = pair.pid("backup")
        assert pid is not None
        baseline = descriptors(pid)
        socks: list[socket.socket] = []
        for _ in range(count):
            sock = socket.create_connection(pair.address["backup"])
            sock.setblocking(False)
            socks.append(sock)
        opened = time.monotonic()  # the last one
        peak = 0
        while time.monotonic() - opened < deadline + 1.0:  # a second past the deadline
            peak = max(peak, descriptors(pid) - baseline)
            time.sleep(0.05)
        held = descriptors(pid) - baseline
        still_open = sum(not silent_socket_closed(sock) for sock in socks)
        for sock in socks:
            sock.close()
        status = pair.status("backup") or {}
        print(
            f"{count} TCP connections that never start TLS, max_clients {max_clients}, "
            f"handshake deadline {deadline:g} s"
        )
        print(
            f"backup descriptors over baseline: peak {peak}, {deadline + 1:g} s after the last "
            "opened: "
            f"{held}; connections still open then: {still_open} (target: none past the deadline)"
        )
        print(
            f"backup: clients refused {status.get('clients_refused')}, TLS handshakes failed "
            f"{status.get('tls_handshakes_failed')}"
        )
        return still_open == 0 and held <= 2


ATTACKS: dict[str, Callable[[argparse.Namespace, str], bool]] = {
    "resources": resources,
    "upgrade": upgrade,
    "memory": memory,
    "params": params,
    "handshakes": handshakes,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(ATTACKS), help="attacks, comma-separated")
    parser.add_argument("--quick", action="store_true", help="a smoke run of each attack")
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--hold", type=float, default=40.0, help="seconds of attack")
    parser.add_argument("--after", type=float, default=10.0, help="seconds watched after")
    args = parser.parse_args(argv)
    if args.quick:
        args.keys, args.hold, args.after = min(args.keys, 2000), min(args.hold, 3.0), 1.0
    names = [name for name in args.only.split(",") if name]
    unknown = [name for name in names if name not in ATTACKS]
    if unknown:
        parser.error(f"unknown attacks {unknown}; known: {', '.join(ATTACKS)}")
    missed: list[str] = []
    for name in names:
        print(f"== {name}")
        with tempfile.TemporaryDirectory() as directory:
            ok = ATTACKS[name](args, directory)
        print("targets met" if ok else "TARGETS MISSED")
        if not ok:
            missed.append(name)
    print(f"targets missed in: {', '.join(missed)}" if missed else "all targets met")
    if args.quick:
        print("(a quick run: its figures are a smoke test; the targets hold for a full run)")
        return 0
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
