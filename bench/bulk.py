"""Fast loading of a data set: pipelined HTTP inserts into pbkv, pipelined RESP SETs into
Redis, and the data set the transfer and memory benchmarks share.

pbkv has no bulk path, so loading is ordinary `POST /kv/insert` requests, written
`depth` at a time on each of many keep-alive connections (HTTP pipelining; pbkv answers
in request order). The primary batches them into group commits to the backup.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httptools
import uvloop

from bench import resp_load
from bench.loadgen import host_header
from bench.pipeline import PipelinedFiller, run_fillers

KEY_BYTES = 16
VALUE_BYTES = 100


def key_of(i: int) -> str:
    """16 bytes: `key-` and 12 digits."""
    return f"key-{i:012d}"


def value_of(i: int) -> str:
    """100 bytes, different for every key and not compressible by repetition (hex digits)."""
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=VALUE_BYTES // 2).hexdigest()


def pbkv_insert_requests(host: str, port: int, start: int, stop: int) -> Iterator[bytes]:
    """`POST /kv/insert` for pairs start..stop-1 (keys and values need no escaping)."""
    hh = host_header(host, port)
    length = len("key=&value=") + KEY_BYTES + VALUE_BYTES
    head = (
        b"POST /kv/insert HTTP/1.1\r\nHost: %b\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n"
        % (hh, length)
    )
    for i in range(start, stop):
        yield b"%bkey=%b&value=%b" % (head, key_of(i).encode(), value_of(i).encode())


def redis_set_commands(start: int, stop: int) -> Iterator[bytes]:
    for i in range(start, stop):
        yield resp_load.command("SET", key_of(i), value_of(i))


@dataclass
class FillResult:
    sent: int
    ok: int  # 200 with "success": "true"
    refused: int  # anything else


class _HttpFiller(PipelinedFiller):
    """One connection writing requests with up to `depth` unanswered (pipelining)."""

    server = "pbkv"

    def __init__(self, requests: Iterator[bytes], depth: int) -> None:
        super().__init__(requests, depth)
        self._body: list[bytes] = []
        self.ok = self.refused = 0
        self._parser = httptools.HttpResponseParser(self)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad HTTP reply: {exc}"))
            return
        self._refill()

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._answered()
        body = b"".join(self._body)
        self._body.clear()
        if self._parser.get_status_code() == 200 and b'"success":"true"' in body:
            self.ok += 1
        else:
            self.refused += 1


async def http_fill(
    host: str,
    port: int,
    requests: Iterable[bytes],
    connections: int = 64,
    depth: int = 16,
    timeout: float = 3600.0,
) -> FillResult:
    """Send every request, pipelined over `connections`; raises ConnectionError if a
    connection drops."""
    shared = iter(requests)  # one iterator shared by the connections: a work queue
    fillers = [_HttpFiller(shared, depth) for _ in range(connections)]
    await run_fillers(host, port, fillers, timeout)
    return FillResult(
        sent=sum(f.sent for f in fillers),
        ok=sum(f.ok for f in fillers),
        refused=sum(f.refused for f in fillers),
    )


def load_pbkv(host: str, port: int, keys: int, context: str = "") -> float:
    """Insert pairs 0..keys-1 into a pbkv primary (64 connections, depth 16); returns the
    seconds it took. Raises RuntimeError, `context` appended, if any insert is refused."""
    started = time.monotonic()
    done = uvloop.run(http_fill(host, port, pbkv_insert_requests(host, port, 0, keys), 64, 16))
    seconds = time.monotonic() - started
    if done.ok != keys:
        raise RuntimeError(f"pbkv refused {done.refused} of {keys} inserts{context}")
    return seconds


def load_redis(primary: Any, keys: int) -> float:
    """SET pairs 0..keys-1 into a Redis primary (a ``servers.Redis``) and check its
    DBSIZE; returns the seconds it took. Raises RuntimeError when any is missing."""
    started = time.monotonic()
    errors = uvloop.run(redis_fill(primary.host, primary.port, 0, keys))
    with primary.client() as r:
        size = r.call("DBSIZE")
    if errors or size != keys:
        raise RuntimeError(f"redis holds {size} of {keys} keys ({errors} errors)")
    return time.monotonic() - started


async def redis_fill(host: str, port: int, start: int, stop: int) -> int:
    """SET pairs start..stop-1, pipelined; returns the number of error replies."""
    replies, errors = await resp_load.fill(host, port, redis_set_commands(start, stop))
    if replies != stop - start:
        raise RuntimeError(f"redis answered {replies} of {stop - start} SETs")
    return errors
