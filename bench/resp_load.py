"""Closed-loop RESP load generator for Redis, of the same design as bench/loadgen.py.

Each of N connections keeps exactly one request in flight: the next request is written
from the data callback that completes the previous reply, so the hot path has no futures,
tasks or coroutine switches. Requests are prebuilt bytes (only a key's digits change per
insert), keys and values have the sizes loadgen uses, and latencies go into preallocated
arrays. Results are `bench.loadgen.LoadResult`s.

An insert is `SET key value` followed by `WAIT 1 0`, written together (one round trip,
as a pipelining client would send them) and complete when both replies are in; it
succeeds when WAIT reports at least one replica. A get is a plain `GET`.

    python -m bench.resp_load --port 6379 --workload insert --connections 64 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import socket
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from time import perf_counter_ns
from typing import cast

import uvloop

from bench.loadgen import GET, INSERT, LoadResult, percentile, unique_prefix

WORKLOADS = ("insert", "get")
DEFAULT_REQUESTS = 10_000
RECONNECT_DELAY = 0.05
MAX_RECONNECTS = 5

# One request: (kind, raw RESP bytes, replies it produces, expected GET value or None).
RespOp = tuple[int, bytes, int, bytes | None]


# ---------------------------------------------------------------- protocol


def command(*args: bytes | str | int) -> bytes:
    """One RESP command (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, int):
            data = b"%d" % arg
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            data = arg
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


class RespError(Exception):
    """An error reply (`-ERR ...`)."""


# A parsed reply: (type byte, payload). Type is one of + - : $ *; payload is bytes for
# + - and $ (None for a nil bulk), int for :, a list of replies for *.
Reply = tuple[int, object]

_PLUS, _MINUS, _COLON, _DOLLAR, _STAR = b"+-:$*"


def parse_reply(buf: bytes | bytearray, pos: int = 0) -> tuple[Reply, int] | None:
    """One reply starting at `pos`: (reply, position after it), or None if incomplete."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind = buf[pos]
    line = bytes(buf[pos + 1 : end])
    nxt = end + 2
    if kind in (_PLUS, _MINUS):
        return (kind, line), nxt
    if kind == _COLON:
        return (kind, int(line)), nxt
    if kind == _DOLLAR:
        size = int(line)
        if size < 0:
            return (kind, None), nxt
        if len(buf) < nxt + size + 2:
            return None
        return (kind, bytes(buf[nxt : nxt + size])), nxt + size + 2
    if kind == _STAR:
        count = int(line)
        items: list[Reply] = []
        for _ in range(max(count, 0)):
            parsed = parse_reply(buf, nxt)
            if parsed is None:
                return None
            item, nxt = parsed
            items.append(item)
        return (kind, items if count >= 0 else None), nxt
    raise ValueError(f"not a RESP reply: {bytes(buf[pos : pos + 20])!r}")


class SyncRedis:
    """A tiny blocking RESP client for setup and INFO polling (not for load)."""

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SyncRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, *args: bytes | str | int) -> object:
        self.sock.sendall(command(*args))
        while True:
            parsed = parse_reply(self._buf) if self._buf else None
            if parsed is not None:
                (kind, payload), used = parsed
                del self._buf[:used]
                if kind == _MINUS:
                    raise RespError(cast(bytes, payload).decode(errors="replace"))
                return payload
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("redis closed the connection")
            self._buf += data

    def info(self, section: str = "") -> dict[str, str]:
        raw = self.call("INFO", section) if section else self.call("INFO")
        out: dict[str, str] = {}
        for line in cast(bytes, raw).decode().splitlines():
            if line and not line.startswith("#") and ":" in line:
                name, _, value = line.partition(":")
                out[name] = value
        return out


# ---------------------------------------------------------------- requests

_WAIT = command("WAIT", 1, 0)


class SetTemplate:
    """SET (+ WAIT) requests for keys `<prefix><9 digits>`, all with one value."""

    def __init__(self, prefix: str, value: bytes, wait_replicas: int) -> None:
        key_len = len(prefix.encode()) + 9
        self._head = b"*3\r\n$3\r\nSET\r\n$%d\r\n%b" % (key_len, prefix.encode())
        self._tail = b"\r\n$%d\r\n%b\r\n" % (len(value), value)
        if wait_replicas:
            self._tail += command("WAIT", wait_replicas, 0)
        self.replies = 2 if wait_replicas else 1
        self._prefix = prefix

    def key(self, i: int) -> str:
        return f"{self._prefix}{i:09d}"

    def request(self, i: int) -> bytes:
        return b"%b%09d%b" % (self._head, i, self._tail)


def get_command(key: str) -> bytes:
    return command("GET", key)


# ---------------------------------------------------------------- engine


class _Client(asyncio.Protocol):
    """One closed-loop connection; survives reconnects (the loop reuses this object)."""

    def __init__(self, ops: Iterator[RespOp], quota: int | None, min_replicas: int) -> None:
        self._ops = ops
        self._quota = quota
        self._min_replicas = min_replicas
        self._warm_end_ns = 0
        self._deadline_ns = 2**62
        cap = quota if quota is not None else 4096
        self.lat = array("q", bytes(8 * cap))
        self.kinds = bytearray(cap)
        self.n = 0
        self.ok = self.failed = self.mismatches = 0
        self.resp_errors = 0  # error replies and unparsable data
        self.dropped = 0
        self.connect_errors = 0
        self.sent_at = 0
        self.last_end = 0
        self._kind = INSERT
        self._expect: bytes | None = None
        self._want = 0  # replies still owed for the request in flight
        self._replies: list[Reply] = []
        self._measured = False
        self._buf = b""
        self._transport: asyncio.Transport | None = None
        self._done: asyncio.Future[bool] | None = None

    def set_window(self, warm_end_ns: int, deadline_ns: int) -> None:
        self._warm_end_ns = warm_end_ns
        self._deadline_ns = deadline_ns

    def begin(self) -> asyncio.Future[bool]:
        self._done = asyncio.get_running_loop().create_future()
        self._send_next()
        return self._done

    def finished(self) -> bool:
        return self._quota == 0 or perf_counter_ns() >= self._deadline_ns

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _send_next(self) -> None:
        now = perf_counter_ns()
        if self._quota == 0 or now >= self._deadline_ns:
            self._finish()
            return
        op = next(self._ops, None)
        if op is None:
            self._quota = 0
            self._finish()
            return
        self._kind, request, self._want, self._expect = op
        self._replies = []
        self._measured = now >= self._warm_end_ns
        self.sent_at = perf_counter_ns()
        assert self._transport is not None
        self._transport.write(request)

    def _finish(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(True)
        if self._transport is not None:
            self._transport.close()

    def _count_done(self) -> None:
        if self._quota is not None:
            self._quota -= 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._buf = b""

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self.sent_at:
            self.sent_at = 0
            if self._measured:
                self.dropped += 1
                self._count_done()
        if self._done is not None and not self._done.done():
            self._done.set_result(False)

    def data_received(self, data: bytes) -> None:
        end = perf_counter_ns()
        buf = self._buf + data if self._buf else data
        pos = 0
        try:
            while self._want and pos < len(buf):
                parsed = parse_reply(buf, pos)
                if parsed is None:
                    break
                reply, pos = parsed
                self._replies.append(reply)
                self._want -= 1
        except ValueError:
            self.abort()
            return
        self._buf = buf[pos:]
        if self._want or not self.sent_at:
            return
        start, self.sent_at = self.sent_at, 0
        if self._measured:
            self._record(end - start, end)
        self._send_next()

    def _record(self, elapsed_ns: int, end: int) -> None:
        n = self.n
        if n == len(self.kinds):
            self.lat.extend(self.lat)
            self.kinds.extend(self.kinds)
        self.lat[n] = elapsed_ns
        self.kinds[n] = self._kind
        self.n = n + 1
        self.last_end = end
        self._count_done()
        replies = self._replies
        if any(kind == _MINUS for kind, _ in replies):
            self.resp_errors += 1
            return
        if self._kind == INSERT:
            # SET must say OK; WAIT (if sent) must count enough replicas.
            if replies[0] != (_PLUS, b"OK"):
                self.resp_errors += 1
            elif len(replies) > 1 and cast(int, replies[1][1]) < self._min_replicas:
                self.failed += 1
            else:
                self.ok += 1
            return
        kind, payload = replies[0]
        if kind != _DOLLAR:
            self.resp_errors += 1
        elif payload is None:
            self.failed += 1
        else:
            self.ok += 1
            if self._expect is not None and payload != self._expect:
                self.mismatches += 1


async def _watchdog(clients: list[_Client], timeout: float) -> None:
    limit = int(timeout * 1e9)
    while True:
        await asyncio.sleep(min(timeout / 4, 0.25))
        now = perf_counter_ns()
        for c in clients:
            if c.sent_at and now - c.sent_at > limit:
                c.abort()


async def _connect(client: asyncio.Protocol, host: str, port: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        await loop.create_connection(lambda: client, host, port)


async def _drive(client: _Client, host: str, port: int, timeout: float) -> None:
    failures = 0
    while True:
        if await client.begin() or client.finished():
            return
        while True:
            await asyncio.sleep(RECONNECT_DELAY)
            if client.finished():
                return
            try:
                await _connect(client, host, port, timeout)
                failures = 0
                break
            except (OSError, TimeoutError):
                client.connect_errors += 1
                failures += 1
                if failures >= MAX_RECONNECTS:
                    return


def _sorted_ms(clients: Iterable[_Client], kind: int) -> list[float]:
    return sorted(c.lat[i] / 1e6 for c in clients for i in range(c.n) if c.kinds[i] == kind)


async def run_resp_ops(
    host: str,
    port: int,
    streams: Sequence[Iterable[RespOp]],
    *,
    requests: int | None = None,
    duration: float | None = None,
    warmup: float = 0.0,
    timeout: float = 10.0,
    workload: str = "custom",
    min_replicas: int = 1,
) -> LoadResult:
    """Like `bench.loadgen.run_ops`, over RESP."""
    conns = len(streams)
    quotas: list[int | None]
    if requests is not None:
        quotas = [requests // conns + (1 if i < requests % conns else 0) for i in range(conns)]
    else:
        quotas = [None] * conns
    clients = [_Client(iter(s), q, min_replicas) for s, q in zip(streams, quotas, strict=True)]
    connected = await asyncio.gather(
        *(_connect(c, host, port, timeout) for c in clients), return_exceptions=True
    )
    for outcome in connected:
        if isinstance(outcome, BaseException):
            for c in clients:
                c.abort()
            raise outcome
    start = perf_counter_ns()
    warm_end = start + int(warmup * 1e9)
    deadline = warm_end + int(duration * 1e9) if duration is not None else 2**62
    for c in clients:
        c.set_window(warm_end, deadline)
    watchdog = asyncio.create_task(_watchdog(clients, timeout))
    try:
        await asyncio.gather(*(_drive(c, host, port, timeout) for c in clients))
    finally:
        watchdog.cancel()
        for c in clients:
            c.abort()

    measure_start = max(start, warm_end)
    end = max((c.last_end for c in clients), default=measure_start)
    seconds = max(end - measure_start, 0) / 1e9
    replies = sum(c.n for c in clients)
    everything = sorted(c.lat[i] / 1e6 for c in clients for i in range(c.n))
    return LoadResult(
        workload=workload,
        connections=conns,
        requests=replies + sum(c.dropped for c in clients),
        errors=sum(c.resp_errors + c.dropped + c.connect_errors for c in clients),
        failed=sum(c.failed for c in clients),
        ok=sum(c.ok for c in clients),
        mismatches=sum(c.mismatches for c in clients),
        seconds=seconds,
        throughput=replies / seconds if seconds > 0 else 0.0,
        p50_ms=percentile(everything, 50),
        p90_ms=percentile(everything, 90),
        p99_ms=percentile(everything, 99),
        max_ms=everything[-1] if everything else 0.0,
        insert_ms=_sorted_ms(clients, INSERT),
        get_ms=_sorted_ms(clients, GET),
    )


# ---------------------------------------------------------------- pipelined bulk load


class _Filler(asyncio.Protocol):
    """Writes commands with up to `depth` in flight and counts the replies."""

    def __init__(self, commands: Iterator[bytes], depth: int) -> None:
        self._commands = commands
        self._depth = depth
        self._in_flight = 0
        self._exhausted = False
        self._buf = b""
        self.replies = 0
        self.errors = 0
        self._transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._refill()

    def _refill(self) -> None:
        room = self._depth - self._in_flight
        if room < self._depth // 2 and self._in_flight:
            return
        batch = list(itertools.islice(self._commands, room))
        if not batch:
            self._exhausted = True
        else:
            self._in_flight += len(batch)
            assert self._transport is not None
            self._transport.write(b"".join(batch))
        if self._exhausted and not self._in_flight and not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos = 0
        size = len(buf)
        while pos < size:
            parsed = parse_reply(buf, pos)
            if parsed is None:
                break
            (kind, _), pos = parsed
            self.replies += 1
            self._in_flight -= 1
            if kind == _MINUS:
                self.errors += 1
        self._buf = buf[pos:]
        self._refill()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"redis closed a bulk connection: {exc}"))


async def fill(
    host: str,
    port: int,
    commands: Iterable[bytes],
    connections: int = 8,
    depth: int = 512,
    timeout: float = 600.0,
) -> tuple[int, int]:
    """Send every command, pipelined over `connections`; returns (replies, error replies)."""
    shared = iter(commands)  # the connections share one iterator: a natural work queue
    loop = asyncio.get_running_loop()
    fillers = [_Filler(shared, depth) for _ in range(connections)]
    transports = []
    try:
        for f in fillers:
            transport, _ = await loop.create_connection(lambda f=f: f, host, port)
            transports.append(transport)
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(f.done for f in fillers))
    finally:
        for t in transports:
            t.close()
    return sum(f.replies for f in fillers), sum(f.errors for f in fillers)


# ---------------------------------------------------------------- workloads


def _insert_stream(template: SetTemplate) -> Iterator[RespOp]:
    request, replies = template.request, template.replies
    for i in itertools.count():
        yield INSERT, request(i), replies, None


def _get_stream(gets: Sequence[RespOp], rng: random.Random) -> Iterator[RespOp]:
    choice = rng.choice
    while True:
        yield choice(gets)


async def run_resp_load(
    host: str,
    port: int,
    workload: str,
    connections: int,
    requests: int | None = None,
    duration: float | None = None,
    value_size: int = 100,
    keys: int = 10_000,
    key_prefix: str | None = None,
    *,
    wait_replicas: int = 1,
    warmup: float = 0.0,
    preload: bool = True,
    check_values: bool = False,
    timeout: float = 10.0,
    seed: int | None = None,
) -> LoadResult:
    """Run one workload against Redis, with loadgen's key layout and sizes.

    `insert` writes unique keys `<prefix><conn>-<9 digits>` (SET, then WAIT
    `wait_replicas` 0 unless that is 0); `get` reads random keys of the set
    `<prefix>key-<9 digits>` (written first, pipelined, unless `preload` is false).
    """
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; expected one of {WORKLOADS}")
    if connections < 1:
        raise ValueError("need at least one connection")
    if requests is None and duration is None:
        requests = DEFAULT_REQUESTS
    prefix = key_prefix if key_prefix is not None else unique_prefix()
    value = b"x" * value_size
    rng = random.Random(seed)
    streams: list[Iterator[RespOp]]
    if workload == "insert":
        templates = [
            SetTemplate(f"{prefix}{c:03d}-", value, wait_replicas) for c in range(connections)
        ]
        streams = [_insert_stream(t) for t in templates]
    else:
        key_set = SetTemplate(f"{prefix}key-", value, 0)
        if preload:
            await fill(host, port, (key_set.request(i) for i in range(keys)), timeout=timeout * 60)
        expect = value if check_values else None
        gets: list[RespOp] = [(GET, get_command(key_set.key(i)), 1, expect) for i in range(keys)]
        streams = [_get_stream(gets, random.Random(rng.random())) for _ in range(connections)]
    return await run_resp_ops(
        host,
        port,
        streams,
        requests=requests,
        duration=duration,
        warmup=warmup,
        timeout=timeout,
        workload=workload,
        min_replicas=wait_replicas,
    )


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.resp_load", description="Closed-loop RESP load generator."
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=6379)
    ap.add_argument("--workload", choices=WORKLOADS, default="insert")
    ap.add_argument("--connections", "-c", type=int, default=64)
    limit = ap.add_mutually_exclusive_group()
    limit.add_argument("--requests", "-n", type=int, help=f"total (default {DEFAULT_REQUESTS})")
    limit.add_argument("--duration", "-d", type=float, help="seconds, after the warmup")
    ap.add_argument("--warmup", type=float, default=0.0, help="seconds not measured")
    ap.add_argument("--value-size", type=int, default=100, help="bytes per value")
    ap.add_argument("--keys", type=int, default=10_000, help="key set size for get")
    ap.add_argument("--no-preload", action="store_true", help="the key set already exists")
    ap.add_argument("--key-prefix", help="default: unique per run")
    ap.add_argument(
        "--wait", type=int, default=1, metavar="N", help="WAIT N 0 after each SET (0: no WAIT)"
    )
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a reply")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = uvloop.run(
            run_resp_load(
                args.host,
                args.port,
                args.workload,
                args.connections,
                requests=args.requests,
                duration=args.duration,
                value_size=args.value_size,
                keys=args.keys,
                key_prefix=args.key_prefix,
                wait_replicas=args.wait,
                warmup=args.warmup,
                preload=not args.no_preload,
                check_values=True,
                timeout=args.timeout,
                seed=args.seed,
            )
        )
    except (OSError, TimeoutError) as e:
        print(f"resp_load: cannot reach {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.summary()) if args.json else result.human())
    return 0


if __name__ == "__main__":
    sys.exit(main())
