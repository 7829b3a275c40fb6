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
import functools
import itertools
import random
import socket
import sys
from collections.abc import Iterable, Iterator, Sequence
from time import perf_counter_ns
from typing import Any, cast

from bench.loadgen import (
    GET,
    INSERT,
    ClosedLoopClient,
    LoadResult,
    add_load_arguments,
    check_load_args,
    choice_stream,
    load_options,
    run_and_print,
    run_ops,
    unique_prefix,
)
from bench.pipeline import PipelinedFiller, run_fillers

WORKLOADS = ("insert", "get")

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


class _RespClient(ClosedLoopClient):
    """Requests are `RespOp`s; replies are parsed by `parse_reply` and judged here."""

    def __init__(self, ops: Iterator[RespOp], quota: int | None, min_replicas: int) -> None:
        super().__init__(ops, quota)
        self._min_replicas = min_replicas
        self._replies: list[Reply] = []  # replies so far to the request in flight
        self._buf = b""

    def _reset(self) -> None:
        self._buf = b""
        self._replies.clear()

    def data_received(self, data: bytes) -> None:
        end = perf_counter_ns()
        buf = self._buf + data if self._buf else data
        pos = 0
        replies = self._replies
        want = self._op[2] if self.sent_at else 0  # replies the request in flight produces
        try:
            while len(replies) < want and pos < len(buf):
                parsed = parse_reply(buf, pos)
                if parsed is None:
                    break
                reply, pos = parsed
                replies.append(reply)
        except ValueError:
            self.abort()
            return
        self._buf = buf[pos:]
        if len(replies) < want or not self._reply_complete(end):
            return
        replies.clear()
        self._send_next()

    def _judge(self) -> None:
        replies = self._replies
        if any(kind == _MINUS for kind, _ in replies):
            self.reply_errors += 1
            return
        if self._kind == INSERT:
            # SET must say OK; WAIT (if sent) must count enough replicas.
            if replies[0] != (_PLUS, b"OK"):
                self.reply_errors += 1
            elif len(replies) > 1 and cast(int, replies[1][1]) < self._min_replicas:
                self.failed += 1
            else:
                self.ok += 1
            return
        kind, payload = replies[0]
        if kind != _DOLLAR:
            self.reply_errors += 1
        elif payload is None:
            self.failed += 1
        else:
            self.ok += 1
            expect = self._op[3]
            if expect is not None and payload != expect:
                self.mismatches += 1


async def run_resp_ops(
    host: str,
    port: int,
    streams: Sequence[Iterable[RespOp]],
    *,
    min_replicas: int = 1,
    **options: Any,
) -> LoadResult:
    """`bench.loadgen.run_ops` (same options: requests, duration, warmup, timeout,
    workload), over RESP."""
    make_client = functools.partial(_RespClient, min_replicas=min_replicas)
    return await run_ops(host, port, streams, make_client=make_client, **options)


# ---------------------------------------------------------------- pipelined bulk load


class _Filler(PipelinedFiller):
    """Writes commands with up to `depth` in flight and counts the (error) replies."""

    server = "redis"

    def __init__(self, commands: Iterator[bytes], depth: int) -> None:
        super().__init__(commands, depth)
        self._buf = b""
        self.replies = 0
        self.errors = 0

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
            self._answered()
            if kind == _MINUS:
                self.errors += 1
        self._buf = buf[pos:]
        self._refill()


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
    fillers = [_Filler(shared, depth) for _ in range(connections)]
    await run_fillers(host, port, fillers, timeout)
    return sum(f.replies for f in fillers), sum(f.errors for f in fillers)


# ---------------------------------------------------------------- workloads


def _insert_stream(template: SetTemplate) -> Iterator[RespOp]:
    request, replies = template.request, template.replies
    for i in itertools.count():
        yield INSERT, request(i), replies, None


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
    requests = check_load_args(WORKLOADS, workload, connections, requests, duration)
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
        streams = [choice_stream(gets, random.Random(rng.random())) for _ in range(connections)]
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
    add_load_arguments(ap, WORKLOADS, "key set size for get")
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
    options = load_options(args)
    run = run_resp_load(
        args.host,
        args.port,
        args.workload,
        args.connections,
        wait_replicas=args.wait,
        check_values=True,
        **options,
    )
    return run_and_print("resp_load", args.host, args.port, run, args.json)


if __name__ == "__main__":
    sys.exit(main())
