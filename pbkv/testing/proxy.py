"""A userspace TCP proxy that injects network faults, for tests and chaos scripts.

This kernel has no ``tc netem``, so delay, silent partitions, resets and
corrupted bytes between the primary and the backup are made here: put a
``FaultProxy`` in front of the backup, point the primary's ``backup_port`` at
it, and switch faults on and off while traffic flows.

Directions are named from the side that connects: ``up`` carries what the
client (the side that connected to the proxy, e.g. the primary) sends to the
server, ``down`` carries the server's replies.  Each direction is a
:class:`Link` with its own faults and byte counters::

    with FaultProxy("127.0.0.2", 0, "127.0.0.2", backup_port) as proxy:
        proxy.up.delay = 0.05          # 50 ms added to every chunk sent up
        proxy.up.rate = 1_000_000      # a 1 MB/s link
        proxy.down.drop = True         # replies vanish; connections stay open
        proxy.cut()                    # reset every connection, refuse new ones
        proxy.heal()                   # accept again, stop dropping
        proxy.corrupt_next("up", after_bytes=20_000)  # one bit of the next connection

The proxy runs its own asyncio event loop in a daemon thread, so it keeps
forwarding while the test thread blocks.  Every method and attribute may be
used from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

log = logging.getLogger(__name__)

Direction = Literal["up", "down"]
DIRECTIONS: tuple[Direction, ...] = ("up", "down")

READ_SIZE = 64 * 1024
QUEUED_CHUNKS = 64  # per direction; beyond this the proxy stops reading (back-pressure)
CONNECT_TIMEOUT = 5.0  # seconds to reach the target before the client is reset
RATE_SLICE = 0.05  # seconds of traffic written at once under a rate limit

_T = TypeVar("_T")


class Link:
    """One direction of the proxy: its faults and its byte counters.

    ``delay`` (seconds, default 0) is added to every chunk, keeping their order.
    ``rate`` (bytes per second, default None: unlimited) caps the throughput,
    like a slow link; with back-pressure the sender slows down too.
    ``drop`` swallows every byte that arrives while it is set, silently: the
    connection stays open, as in a partition that loses packets.  A connection
    closed by the sender while ``drop`` is set is closed on the other side only
    once ``drop`` is cleared (the FIN was lost too); bytes already on their way
    (held by ``delay``) are still delivered.

    Counters: ``bytes_received`` (read from the sender), ``bytes_forwarded``
    (written to the receiver) and ``bytes_dropped``.
    """

    def __init__(self, name: Direction) -> None:
        self.name = name
        self._delay = 0.0
        self._rate: float | None = None
        self._drop = False
        self.bytes_received = 0
        self.bytes_forwarded = 0
        self.bytes_dropped = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None  # created on the proxy's loop

    def __repr__(self) -> str:
        return (
            f"Link({self.name}, delay={self._delay}, rate={self._rate}, drop={self._drop}, "
            f"forwarded={self.bytes_forwarded}, dropped={self.bytes_dropped})"
        )

    @property
    def delay(self) -> float:
        return self._delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError("delay must be >= 0 seconds")
        self._delay = float(seconds)

    @property
    def rate(self) -> float | None:
        return self._rate

    @rate.setter
    def rate(self, bytes_per_second: float | None) -> None:
        if bytes_per_second is not None and not bytes_per_second > 0:
            raise ValueError("rate must be a positive number of bytes per second, or None")
        self._rate = None if bytes_per_second is None else float(bytes_per_second)

    @property
    def drop(self) -> bool:
        return self._drop

    @drop.setter
    def drop(self, value: bool) -> None:
        self._drop = bool(value)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
                loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _passing(self) -> None:
        """Return once this link does not drop (on the proxy's loop).

        ``drop`` is set from another thread: it is read after each ``clear()``, so a
        change made just before the clear is not missed."""
        while True:
            if self._changed is None:
                self._changed = asyncio.Event()
            self._changed.clear()
            if not self._drop:
                return
            await self._changed.wait()


@dataclass(frozen=True, slots=True)
class _Corruption:
    offset: int
    mask: int


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close a connection with a TCP reset (SO_LINGER 0), not a FIN."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Connection:
    """One proxied connection: the client's side, and the server's once reached."""

    def __init__(self, client: asyncio.StreamWriter, task: asyncio.Task[Any] | None) -> None:
        self.client = client
        self.server: asyncio.StreamWriter | None = None
        self.task = task
        self.aborted = False

    def abort(self) -> None:
        """Reset both sides and stop forwarding."""
        if self.aborted:
            return
        self.aborted = True
        _reset(self.client)
        _reset(self.server)
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    def close(self) -> None:
        for writer in (self.client, self.server):
            if writer is not None:
                writer.close()


class FaultProxy:
    """Forward TCP connections from ``listen_host:listen_port`` to the target.

    ``listen_port`` 0 picks a free port; read it from ``port`` after ``start()``.
    Besides the per-direction faults of ``up`` and ``down`` (see :class:`Link`):

    * ``cut()`` resets every current connection and refuses new ones (the
      listening socket is closed) until ``heal()``;
    * ``heal()`` listens again and clears ``drop`` in both directions
      (delays stay as they are);
    * ``partition()`` sets ``drop`` in both directions (a silent partition);
    * ``corrupt_next(direction, after_bytes=N)`` flips one bit of the byte at
      offset N of that direction's stream on the next connection that reaches
      the target, once.

    A connection whose target cannot be reached is reset.  A reset on one side
    is passed on as a reset to the other; a FIN as a FIN (half-close).
    Counters: ``connections_accepted``, ``connections_proxied`` (reached the
    target), ``connect_failures``, ``active_connections``, ``corruptions``
    (bits flipped so far) and the links' byte counters; ``stats()`` has them all.
    """

    def __init__(
        self,
        listen_host: str,
        listen_port: int,
        target_host: str,
        target_port: int,
        source_host: str | None = None,
    ) -> None:
        self.listen_host = listen_host
        self.port = listen_port
        self.target_host = target_host
        self.target_port = target_port
        # Connect to the target from this address (a backup checks where its primary is).
        self.source_host = source_host
        self.up = Link("up")
        self.down = Link("down")
        self.connections_accepted = 0
        self.connections_proxied = 0
        self.connect_failures = 0
        self.corruptions = 0
        self._armed: dict[Direction, _Corruption] = {}
        self._connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._refusing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return (
            f"FaultProxy({self.listen_host}:{self.port} -> {self.target_host}:{self.target_port})"
        )

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> Self:
        """Listen and forward in a background thread; returns once listening."""
        if self._loop is not None:
            raise RuntimeError("the proxy is already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self.up._loop = self.down._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name=f"fault-proxy-{self.port}", daemon=True
        )
        self._thread.start()
        try:
            self._run(self._listen())
        except BaseException:
            self.close()
            raise
        log.info("proxy %s:%d -> %s:%d", self.listen_host, self.port, *self.target)
        return self

    def close(self) -> None:
        """Stop listening, reset every connection and stop the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            with contextlib.suppress(Exception):
                self._run(self._shutdown())
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None
        self.up._loop = self.down._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- properties ----------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        return self.listen_host, self.port

    @property
    def target(self) -> tuple[str, int]:
        return self.target_host, self.target_port

    @property
    def active_connections(self) -> int:
        return len(self._connections)

    def link(self, direction: Direction) -> Link:
        if direction == "up":
            return self.up
        if direction == "down":
            return self.down
        raise ValueError(f"direction must be 'up' or 'down', not {direction!r}")

    def stats(self) -> dict[str, int]:
        stats = {
            "connections_accepted": self.connections_accepted,
            "connections_proxied": self.connections_proxied,
            "connect_failures": self.connect_failures,
            "active_connections": self.active_connections,
            "corruptions": self.corruptions,
        }
        for link in (self.up, self.down):
            stats[f"{link.name}_bytes_received"] = link.bytes_received
            stats[f"{link.name}_bytes_forwarded"] = link.bytes_forwarded
            stats[f"{link.name}_bytes_dropped"] = link.bytes_dropped
        return stats

    # -- faults --------------------------------------------------------------------------
    def cut(self) -> None:
        """Reset every current connection and refuse new ones until ``heal()``."""
        self._run(self._cut())

    def heal(self) -> None:
        """Accept connections again and stop dropping in both directions."""
        self.up.drop = False
        self.down.drop = False
        self._run(self._heal())

    def partition(self) -> None:
        """Drop everything both ways; connections stay open (a silent partition)."""
        self.up.drop = True
        self.down.drop = True

    def corrupt_next(self, direction: Direction, after_bytes: int = 0, bit: int = 0) -> None:
        """Flip bit ``bit`` of the byte at offset ``after_bytes`` of ``direction``'s
        stream of the next connection that reaches the target, once.

        The offset counts every byte of that direction from the start of that
        connection.  If the stream ends before the offset, nothing is flipped
        (``corruptions`` tells how many flips happened).  Arming again before
        the next connection replaces the earlier request.
        """
        self.link(direction)  # validates the name
        if after_bytes < 0:
            raise ValueError("after_bytes must be >= 0")
        if not 0 <= bit < 8:
            raise ValueError("bit must be between 0 and 7")
        self._armed[direction] = _Corruption(after_bytes, 1 << bit)

    # -- on the proxy's loop -----------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError("the proxy is not started")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=30)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.listen_host, self.port, reuse_address=True, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self) -> list[asyncio.Task[Any]]:
        """Refuse and reset; returns the tasks of the connections reset."""
        self._refusing = True
        if self._server is not None:
            self._server.close()  # refuses new connections at once
            self._server = None
        connections = list(self._connections)
        self._connections.clear()
        for connection in connections:
            connection.abort()
        log.info("proxy %s:%d cut: %d connections reset", *self.address, len(connections))
        return [c.task for c in connections if c.task is not None]

    async def _heal(self) -> None:
        if self._server is None:
            await self._listen()
        self._refusing = False
        log.info("proxy %s:%d healed", *self.address)

    async def _shutdown(self) -> None:
        tasks = await self._cut()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        connection = _Connection(writer, asyncio.current_task())
        if self._refusing:
            connection.abort()
            return
        self._connections.add(connection)
        try:
            try:
                server_reader, server_writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        self.target_host,
                        self.target_port,
                        local_addr=None if self.source_host is None else (self.source_host, 0),
                    ),
                    CONNECT_TIMEOUT,
                )
            except (OSError, TimeoutError) as exc:
                self.connect_failures += 1
                log.debug("proxy cannot reach %s:%d: %s", *self.target, exc)
                connection.abort()
                return
            connection.server = server_writer
            if connection.aborted:  # cut while we were connecting
                _reset(server_writer)
                return
            self.connections_proxied += 1
            up_fault = self._armed.pop("up", None)
            down_fault = self._armed.pop("down", None)
            await asyncio.gather(
                self._pump(connection, self.up, reader, server_writer, up_fault),
                self._pump(connection, self.down, server_reader, writer, down_fault),
            )
        except asyncio.CancelledError:
            connection.abort()
        finally:
            self._connections.discard(connection)
            if not connection.aborted:
                connection.close()

    async def _pump(
        self,
        connection: _Connection,
        link: Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        fault: _Corruption | None,
    ) -> None:
        """Read one direction and queue its chunks for delivery."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUED_CHUNKS)
        delivery = asyncio.ensure_future(self._deliver(connection, link, queue, writer))
        try:
            offset = 0
            while True:
                try:
                    data = await reader.read(READ_SIZE)
                except OSError:
                    connection.abort()  # a reset travels on as a reset
                    return
                if not data:
                    break
                link.bytes_received += len(data)
                if fault is not None and offset <= fault.offset < offset + len(data):
                    flipped = bytearray(data)
                    flipped[fault.offset - offset] ^= fault.mask
                    data = bytes(flipped)
                    self.corruptions += 1
                    log.info("proxy flipped a bit %s at byte %d", link.name, fault.offset)
                    fault = None
                offset += len(data)
                if link.drop:
                    link.bytes_dropped += len(data)
                    continue
                await queue.put((loop.time() + link.delay, data))
            await queue.put(None)  # end of stream
            await delivery
        finally:
            delivery.cancel()

    async def _deliver(
        self,
        connection: _Connection,
        link: Link,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        writer: asyncio.StreamWriter,
    ) -> None:
        loop = asyncio.get_running_loop()
        while (item := await queue.get()) is not None:
            due, data = item
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            while data:
                rate = link.rate
                # Under a rate limit, write about 50 ms worth at a time.
                piece = data if rate is None else data[: max(1, int(rate * RATE_SLICE))]
                data = data[len(piece) :]
                try:
                    writer.write(piece)
                    await writer.drain()
                except OSError:
                    connection.abort()
                    return
                link.bytes_forwarded += len(piece)
                if rate is not None:
                    await asyncio.sleep(len(piece) / rate)
        await link._passing()  # a FIN sent during a drop was lost with the data
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()
