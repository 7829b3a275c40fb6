"""Closed-loop HTTP load generator for pbkv.

Each of N keep-alive connections keeps exactly one request in flight: the next request is
written from the reply's parser callback, so the hot path has no futures, tasks or
coroutine switches. Requests are prebuilt bytes (only a key's digits change per insert)
and replies are parsed by httptools. Latencies go into preallocated arrays.

    python -m bench.loadgen --workload insert --connections 64 --requests 100000
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import sys
import time
from array import array
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from time import perf_counter_ns
from typing import Any, TypeVar, cast
from urllib.parse import quote

import httptools
import orjson
import uvloop

INSERT = 0
GET = 1
KIND_NAMES = {INSERT: "insert", GET: "get"}
WORKLOADS = ("insert", "get", "mix")

T = TypeVar("T")

# One request: (kind, raw HTTP bytes, value a get must return or None to not check).
Op = tuple[int, bytes, str | None]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "settings.conf"
DEFAULT_REQUESTS = 10_000
RECONNECT_DELAY = 0.05  # seconds between reconnect attempts after a dropped connection
MAX_RECONNECTS = 5  # consecutive failed reconnects before a connection gives up
_FORM = b"application/x-www-form-urlencoded"


# ---------------------------------------------------------------- settings


def read_settings(path: str | os.PathLike[str] | None = None) -> tuple[str, int]:
    """The primary's (host, port) from a course-style settings file."""
    with open(path or DEFAULT_CONFIG, encoding="utf-8") as f:
        settings = json.load(f)
    return str(settings["primary"]), int(settings["port"])


# ---------------------------------------------------------------- requests


def _enc(text: str) -> bytes:
    # quote() with no safe characters is valid form encoding for any UTF-8 text,
    # including '&', '=', '+', spaces and emoji.
    return quote(text, safe="").encode("ascii")


def host_header(host: str, port: int) -> bytes:
    return f"{host}:{port}".encode()


def _post_head(path: bytes, host_header: bytes, length: int, extra: bytes = b"") -> bytes:
    return b"POST %b HTTP/1.1\r\nHost: %b\r\nContent-Type: %b\r\nContent-Length: %d\r\n%b\r\n" % (
        path,
        host_header,
        _FORM,
        length,
        extra,
    )


def _write_request(path: bytes, host_header: bytes, key: str, value: str) -> bytes:
    body = b"key=%b&value=%b" % (_enc(key), _enc(value))
    return _post_head(path, host_header, len(body)) + body


def insert_request(host_header: bytes, key: str, value: str) -> bytes:
    return _write_request(b"/kv/insert", host_header, key, value)


def update_request(host_header: bytes, key: str, value: str) -> bytes:
    return _write_request(b"/kv/update", host_header, key, value)


def get_request(host_header: bytes, key: str) -> bytes:
    return b"GET /kv/get?key=%b HTTP/1.1\r\nHost: %b\r\n\r\n" % (_enc(key), host_header)


class InsertTemplate:
    """Insert requests for keys `<prefix><9 digits>`, all with one value.

    The key width is fixed, so Content-Length is too, and a request is
    head + digits + tail: one formatting operation per request.  With
    ``idempotency``, each also carries an ``Idempotency-Key`` of 36 characters (a
    UUID's length: 27 of a per-run, per-connection prefix, then the digits).
    """

    def __init__(
        self, host_header: bytes, prefix: str, value: str, idempotency: bool = False
    ) -> None:
        body_head = b"key=" + _enc(prefix)
        self._tail = b"&value=" + _enc(value)
        length = len(body_head) + 9 + len(self._tail)
        self._prefix = prefix
        self._keyed = idempotency
        if not idempotency:
            self._head = _post_head(b"/kv/insert", host_header, length) + body_head
            return
        ident = os.urandom(16).hex()[:27].encode()
        head = _post_head(b"/kv/insert", host_header, length, b"Idempotency-Key: %b\r\n" % ident)
        marker = head.index(ident) + len(ident)
        self._head, self._middle = head[:marker], head[marker:] + body_head

    def key(self, i: int) -> str:
        return f"{self._prefix}{i:09d}"

    def request(self, i: int) -> bytes:
        if self._keyed:
            return b"%b%09d%b%09d%b" % (self._head, i, self._middle, i, self._tail)
        return b"%b%09d%b" % (self._head, i, self._tail)


# ---------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) of ascending values, interpolating between ranks.

    Empty input gives 0.0 so that reports of an empty phase still print.
    """
    n = len(sorted_values)
    if n == 0:
        return 0.0
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is not in 0..100")
    rank = (n - 1) * p / 100
    lo = int(rank)
    hi = min(lo + 1, n - 1)
    frac = rank - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


@dataclass
class LoadResult:
    workload: str
    connections: int
    requests: int  # measured requests that got a reply or lost their connection
    errors: int  # HTTP status other than 200, unparsable replies, lost connections
    failed: int  # HTTP 200 with "success": "false"
    ok: int  # HTTP 200 with "success": "true"
    mismatches: int  # successful gets whose value differed from the expected one
    seconds: float
    throughput: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    insert_ms: list[float] = field(default_factory=list, repr=False)  # sorted
    get_ms: list[float] = field(default_factory=list, repr=False)  # sorted

    def summary(self) -> dict[str, object]:
        """The JSON report: every field except the raw latency lists."""
        out = asdict(self)
        del out["insert_ms"], out["get_ms"]
        return out

    def human(self) -> str:
        return (
            f"{self.workload}: {self.requests} requests, {self.connections} connections, "
            f"{self.seconds:.2f} s, {self.throughput:.0f} req/s, "
            f"latency ms p50 {self.p50_ms:.2f} p90 {self.p90_ms:.2f} "
            f"p99 {self.p99_ms:.2f} max {self.max_ms:.2f}; "
            f"ok {self.ok}, false {self.failed}, errors {self.errors}"
            + (f", mismatches {self.mismatches}" if self.mismatches else "")
        )


# ---------------------------------------------------------------- engine


class ClosedLoopClient(asyncio.Protocol):
    """One closed-loop connection; survives reconnects (the loop reuses this object).

    The protocol-neutral part: window, quota, sending, latency records and connection
    loss. An op is a tuple `(kind, request bytes, ...)`; a subclass parses the replies,
    calls `_reply_complete` once the reply to the request in flight is in, and judges
    that reply in `_judge` (counting it in `ok`, `failed`, `reply_errors`, `mismatches`).
    """

    def __init__(self, ops: Iterator[tuple], quota: int | None) -> None:
        self._ops = ops
        self._quota = quota  # measured requests still owed; None: run until the deadline
        self._warm_end_ns = 0  # requests sent before this are not measured
        self._deadline_ns = 2**62  # no request is sent after this
        cap = quota if quota is not None else 4096
        self.lat = array("q", bytes(8 * cap))
        self.kinds = bytearray(cap)
        self.n = 0
        self.ok = self.failed = self.mismatches = 0
        self.reply_errors = 0  # replies that are errors or cannot be understood
        self.dropped = 0  # measured requests whose connection was lost before the reply
        self.connect_errors = 0
        self.sent_at = 0  # perf_counter_ns of the request in flight; 0 when idle
        self.last_end = 0
        self._op: tuple = ()  # the request in flight (or the last one)
        self._kind = INSERT
        self._measured = False
        self._transport: asyncio.Transport | None = None
        self._done: asyncio.Future[bool] | None = None

    # -- driving

    def set_window(self, warm_end_ns: int, deadline_ns: int) -> None:
        self._warm_end_ns = warm_end_ns
        self._deadline_ns = deadline_ns

    def begin(self) -> asyncio.Future[bool]:
        """Start sending; the future says True when finished, False when the link dropped."""
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
        self._op = op
        self._kind = op[0]
        self._measured = now >= self._warm_end_ns
        self.sent_at = perf_counter_ns()
        assert self._transport is not None
        self._transport.write(op[1])

    def _finish(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(True)
        if self._transport is not None:
            self._transport.close()

    def _count_done(self) -> None:
        if self._quota is not None:
            self._quota -= 1

    def _reply_complete(self, end: int) -> bool:
        """The reply to the request in flight arrived at `end`: record and judge it.

        False when no request was in flight (a reply nobody asked for).
        """
        if not self.sent_at:
            return False
        start, self.sent_at = self.sent_at, 0
        if self._measured:
            self._record(end - start, end)
        return True

    def _record(self, elapsed_ns: int, end: int) -> None:
        n = self.n
        if n == len(self.kinds):  # only in duration mode: grow by doubling
            self.lat.extend(self.lat)
            self.kinds.extend(self.kinds)
        self.lat[n] = elapsed_ns
        self.kinds[n] = self._kind
        self.n = n + 1
        self.last_end = end
        self._count_done()
        self._judge()

    # -- protocol-specific

    def _reset(self) -> None:
        """A new connection is up: forget any partial reply."""

    def _judge(self) -> None:
        raise NotImplementedError

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport but implement it.
        self._transport = cast(asyncio.Transport, transport)
        self._reset()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self.sent_at:
            self.sent_at = 0
            if self._measured:
                self.dropped += 1
                self._count_done()
        if self._done is not None and not self._done.done():
            self._done.set_result(False)


class _HttpClient(ClosedLoopClient):
    """Requests are `Op`s; replies are parsed by httptools and judged by their JSON."""

    def __init__(self, ops: Iterator[Op], quota: int | None) -> None:
        super().__init__(ops, quota)
        self._chunks: list[bytes] = []
        self._parser: httptools.HttpResponseParser | None = None

    def _reset(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._chunks.clear()

    def data_received(self, data: bytes) -> None:
        assert self._parser is not None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.abort()  # connection_lost counts the request as an error

    # -- httptools callbacks

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        if not self._reply_complete(perf_counter_ns()):
            return  # a reply nobody asked for: ignore it
        self._chunks.clear()
        assert self._parser is not None
        if not self._parser.should_keep_alive():
            assert self._transport is not None
            self._transport.close()  # connection_lost reports the drop; the driver reconnects
            return
        self._send_next()

    def _judge(self) -> None:
        assert self._parser is not None
        if self._parser.get_status_code() != 200:
            self.reply_errors += 1
            return
        chunks = self._chunks
        try:
            reply = orjson.loads(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        except orjson.JSONDecodeError:
            self.reply_errors += 1
            return
        if not isinstance(reply, dict):
            self.reply_errors += 1
        elif reply.get("success") == "true":
            self.ok += 1
            expect = self._op[2]
            if expect is not None and reply.get("value") != expect:
                self.mismatches += 1
        else:
            self.failed += 1


async def _watchdog(clients: list[ClosedLoopClient], timeout: float) -> None:
    """Drop connections whose reply is overdue, so a hung server cannot hang the run."""
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


async def _drive(client: ClosedLoopClient, host: str, port: int, timeout: float) -> None:
    failures = 0
    while True:
        if await client.begin() or client.finished():
            return
        while True:  # the link dropped: reconnect and carry on
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


def _sorted_ms(clients: Iterable[ClosedLoopClient], kind: int) -> list[float]:
    return sorted(c.lat[i] / 1e6 for c in clients for i in range(c.n) if c.kinds[i] == kind)


async def run_ops(
    host: str,
    port: int,
    streams: Sequence[Iterable[Any]],
    *,
    requests: int | None = None,
    duration: float | None = None,
    warmup: float = 0.0,
    timeout: float = 10.0,
    workload: str = "custom",
    make_client: Callable[[Iterator[Any], int | None], ClosedLoopClient] = _HttpClient,
) -> LoadResult:
    """Run one connection per stream until `requests` measured replies in total, the
    end of `duration` seconds (after `warmup`), or every stream is exhausted.

    Streams hold `Op`s and connections speak HTTP unless `make_client(ops, quota)` makes
    clients of another protocol. Raises OSError if the server cannot be reached at the start.
    """
    conns = len(streams)
    quotas: list[int | None]
    if requests is not None:
        quotas = [requests // conns + (1 if i < requests % conns else 0) for i in range(conns)]
    else:
        quotas = [None] * conns
    clients = [make_client(iter(s), q) for s, q in zip(streams, quotas, strict=True)]
    connected = await asyncio.gather(
        *(_connect(c, host, port, timeout) for c in clients), return_exceptions=True
    )
    for outcome in connected:
        if isinstance(outcome, BaseException):
            for c in clients:
                c.abort()
            raise outcome
    # The clock starts once every connection is up, so connecting is not measured.
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
        errors=sum(c.reply_errors + c.dropped + c.connect_errors for c in clients),
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


# ---------------------------------------------------------------- workloads


def unique_prefix() -> str:
    """A key prefix no earlier run used, so reruns never hit existing keys."""
    return f"lg{time.strftime('%Y%m%d%H%M%S')}{os.urandom(3).hex()}-"


def _insert_stream(template: InsertTemplate) -> Iterator[Op]:
    request = template.request
    for i in itertools.count():
        yield INSERT, request(i), None


def choice_stream(ops: Sequence[T], rng: random.Random) -> Iterator[T]:
    """Endless random picks from `ops` (the get streams of both protocols)."""
    choice = rng.choice
    while True:
        yield choice(ops)


def _mix_stream(
    gets: Sequence[Op], template: InsertTemplate, read_ratio: float, rng: random.Random
) -> Iterator[Op]:
    choice, draw, request = rng.choice, rng.random, template.request
    i = 0
    while True:
        if draw() < read_ratio:
            yield choice(gets)
        else:
            yield INSERT, request(i), None
            i += 1


def check_load_args(
    workloads: Sequence[str],
    workload: str,
    connections: int,
    requests: int | None,
    duration: float | None,
) -> int | None:
    """Validate a run's shape; returns `requests`, DEFAULT_REQUESTS if nothing limits it."""
    if workload not in workloads:
        raise ValueError(f"unknown workload {workload!r}; expected one of {tuple(workloads)}")
    if connections < 1:
        raise ValueError("need at least one connection")
    if requests is None and duration is None:
        return DEFAULT_REQUESTS
    return requests


async def run_load(
    host: str,
    port: int,
    workload: str,
    connections: int,
    requests: int | None = None,
    duration: float | None = None,
    value_size: int = 100,
    keys: int = 10_000,
    read_ratio: float = 0.9,
    key_prefix: str | None = None,
    *,
    warmup: float = 0.0,
    preload: bool = True,
    timeout: float = 10.0,
    seed: int | None = None,
    idempotency: bool = False,
) -> LoadResult:
    """Run one workload against a server; see the module docstring.

    `insert` writes unique keys; `get` reads random keys of a set of `keys` keys
    (inserted first unless `preload` is false); `mix` reads that set with probability
    `read_ratio` and otherwise inserts unique keys. Without `requests` or `duration`
    it sends DEFAULT_REQUESTS requests. With `idempotency`, every measured insert
    carries an Idempotency-Key of its own.
    """
    requests = check_load_args(WORKLOADS, workload, connections, requests, duration)
    prefix = key_prefix if key_prefix is not None else unique_prefix()
    hh = host_header(host, port)
    value = "x" * value_size
    rng = random.Random(seed)
    # Unique keys per connection: <prefix><conn>-<index>.
    templates = [
        InsertTemplate(hh, f"{prefix}{c:03d}-", value, idempotency) for c in range(connections)
    ]

    gets: list[Op] = []
    if workload != "insert":
        key_set = InsertTemplate(hh, f"{prefix}key-", value)
        if preload:
            preload_ops = [(INSERT, key_set.request(i), None) for i in range(keys)]
            await run_ops(
                host,
                port,
                [preload_ops[c::connections] for c in range(connections)],
                timeout=timeout,
                workload="preload",
            )
        gets = [(GET, get_request(hh, key_set.key(i)), None) for i in range(keys)]

    streams: list[Iterator[Op]]
    if workload == "insert":
        streams = [_insert_stream(t) for t in templates]
    elif workload == "get":
        streams = [choice_stream(gets, random.Random(rng.random())) for _ in range(connections)]
    else:
        streams = [_mix_stream(gets, t, read_ratio, random.Random(rng.random())) for t in templates]
    return await run_ops(
        host,
        port,
        streams,
        requests=requests,
        duration=duration,
        warmup=warmup,
        timeout=timeout,
        workload=workload,
    )


# ---------------------------------------------------------------- command line


def add_load_arguments(
    ap: argparse.ArgumentParser, workloads: Sequence[str], keys_help: str
) -> None:
    """The options both load generators share: workload, connections, run length, sizes."""
    ap.add_argument("--workload", choices=workloads, default="insert")
    ap.add_argument("--connections", "-c", type=int, default=64)
    limit = ap.add_mutually_exclusive_group()
    limit.add_argument("--requests", "-n", type=int, help=f"total (default {DEFAULT_REQUESTS})")
    limit.add_argument("--duration", "-d", type=float, help="seconds, after the warmup")
    ap.add_argument("--warmup", type=float, default=0.0, help="seconds not measured")
    ap.add_argument("--value-size", type=int, default=100, help="bytes per value")
    ap.add_argument("--keys", type=int, default=10_000, help=keys_help)


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `run_load` / `run_resp_load` both command lines set alike."""
    return {
        "requests": args.requests,
        "duration": args.duration,
        "value_size": args.value_size,
        "keys": args.keys,
        "key_prefix": args.key_prefix,
        "warmup": args.warmup,
        "preload": not args.no_preload,
        "timeout": args.timeout,
        "seed": args.seed,
    }


def run_and_print(
    prog: str, host: str, port: int, run: Coroutine[Any, Any, LoadResult], as_json: bool
) -> int:
    """Run a load under uvloop and print its result; 2 if the server cannot be reached."""
    try:
        result = uvloop.run(run)
    except (OSError, TimeoutError) as e:
        print(f"{prog}: cannot reach {host}:{port}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.summary()) if as_json else result.human())
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.loadgen", description="Closed-loop HTTP load generator for pbkv."
    )
    add_load_arguments(ap, WORKLOADS, "key set size for get and mix")
    ap.add_argument("--read-ratio", type=float, default=0.9, help="share of gets in mix")
    ap.add_argument("--no-preload", action="store_true", help="the key set already exists")
    ap.add_argument("--key-prefix", help="default: unique per run")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a reply")
    ap.add_argument("--seed", type=int)
    ap.add_argument(
        "--idempotency-keys",
        action="store_true",
        help="every insert carries an Idempotency-Key of its own",
    )
    ap.add_argument("--config", help="settings file (default conf/settings.conf)")
    ap.add_argument("--host", help="default: the primary from the settings file")
    ap.add_argument("--port", type=int, help="default: the port from the settings file")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    host, port = args.host, args.port
    if host is None or port is None:
        conf_host, conf_port = read_settings(args.config)
        host = host if host is not None else conf_host
        port = port if port is not None else conf_port
    options = load_options(args)
    run = run_load(
        host,
        port,
        args.workload,
        args.connections,
        read_ratio=args.read_ratio,
        idempotency=args.idempotency_keys,
        **options,
    )
    return run_and_print("loadgen", host, port, run, args.json)


if __name__ == "__main__":
    sys.exit(main())
