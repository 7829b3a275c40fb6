"""Pipelined bulk loading, shared by the HTTP (bench/bulk.py) and RESP (bench/resp_load.py)
fillers: each connection writes requests with up to `depth` unanswered, and the
connections share one iterator of requests as a work queue.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator, Sequence
from typing import cast


class PipelinedFiller(asyncio.Protocol):
    """One connection writing requests with up to `depth` unanswered.

    A subclass parses replies in `data_received`, calls `_answered()` per reply and then
    `_refill()`. `server` names the server in the error raised when the link drops.
    """

    server = "the server"

    def __init__(self, requests: Iterator[bytes], depth: int) -> None:
        self._requests = requests
        self._depth = depth
        self._in_flight = 0
        self._exhausted = False
        self.sent = 0
        self._transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._refill()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"{self.server} closed a bulk connection: {exc}"))

    def _fail(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def _answered(self) -> None:
        self._in_flight -= 1

    def _refill(self) -> None:
        room = self._depth - self._in_flight
        if room >= self._depth // 2 or not self._in_flight:
            batch = list(itertools.islice(self._requests, room))
            if batch:
                self._in_flight += len(batch)
                self.sent += len(batch)
                assert self._transport is not None
                self._transport.write(b"".join(batch))
            else:
                self._exhausted = True
        if self._exhausted and not self._in_flight and not self.done.done():
            self.done.set_result(None)


async def run_fillers(
    host: str, port: int, fillers: Sequence[PipelinedFiller], timeout: float
) -> None:
    """Connect every filler and wait until all of them are done (or one fails)."""
    loop = asyncio.get_running_loop()
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
