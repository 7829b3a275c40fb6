"""Bounds shared by every client connection of one server: memory held for
unfinished requests, the number of clients, the coarse clock the timeouts
use, and the pump that streams dumps a bounded amount per turn of the loop.

``pbkv/http`` keeps per-connection state; this module keeps the totals.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

log = logging.getLogger(__name__)

SMALL_BODY = 64 * 1024  # bodies up to this size are never refused for lack of room
PUMP_BUDGET = 0.002  # seconds of dump encoding per turn of the event loop, all dumps together
# A turn that took more CPU than this is counted (status: dump_turns_slow): the loop's
# stall bound for dumps.
SLOW_TURN = 0.020
DUMP_PAIRS = 512  # pairs per dump chunk (about 64 KiB)
LIMIT_LOG_INTERVAL = 10.0  # a limit being hit is logged at most this often
FREED_BEFORE_TRIM = 64 * 1024 * 1024  # bytes of request bodies freed before malloc_trim
CLOCK_STEP = 1.0  # seconds between the sweeps that advance Guard.clock
RESERVED_CLIENTS = 32  # connections beyond max_clients kept for the replication upgrade


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The per-connection and global bounds of the HTTP layer (from ``Settings``)."""

    max_reply_buffer: int = 1024 * 1024
    max_pipeline: int = 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    send_timeout: float = 60.0
    idle_timeout: float = 300.0
    max_pending_bytes: int = 256 * 1024 * 1024
    max_clients: int = 10_000
    reserved_clients: int = RESERVED_CLIENTS


class LogThrottle:
    """At most ``per_window`` log lines every ``window`` seconds for an event that may
    happen thousands of times (a flood of bad requests, a limit being hit): the events
    left out are counted, so the next line can say how many there were."""

    def __init__(
        self, message: str = "", per_window: int = 1, window: float = LIMIT_LOG_INTERVAL
    ) -> None:
        self.message = message  # what ``hit`` logs
        self.per_window = per_window
        self.window = window
        self.count = 0  # events so far
        self._skipped = 0  # events left out since the last line
        self._start = float("-inf")  # when the current window began
        self._used = 0  # lines logged in it

    def allow(self, now: float) -> int | None:
        """Count an event: None, leave its line out; else how many were left out before it."""
        self.count += 1
        if now - self._start >= self.window:
            self._start, self._used = now, 0
        if self._used >= self.per_window:
            self._skipped += 1
            return None
        self._used += 1
        skipped, self._skipped = self._skipped, 0
        return skipped

    def hit(self, now: float) -> None:
        """Count an event and log ``message`` with the count so far, when allowed."""
        if self.allow(now) is not None:
            log.warning("%s (%d times so far)", self.message, self.count)


class Guard:
    """The totals every connection of one server counts against."""

    def __init__(self, limits: ConnectionLimits | None = None) -> None:
        self.limits = limits or ConnectionLimits()
        self.clock = time.monotonic()  # advanced by the node's sweep every CLOCK_STEP
        self.pending_bytes = 0  # request heads and bodies not yet complete
        self.freed_bytes = 0  # released since the last malloc_trim
        self.clients = 0  # ordinary client connections
        self.probation = collections.deque[Any]()  # connections over max_clients
        self.pump = StreamPump()
        self.refused_bodies = LogThrottle(
            f"max_pending_bytes ({self.limits.max_pending_bytes}) reached: refusing large bodies"
        )
        self.refused_clients = LogThrottle(
            f"max_clients ({self.limits.max_clients}) reached: refusing connections"
        )
        self.timeouts = 0  # connections closed by a header, body or send timeout

    def room_for(self, size: int) -> bool:
        """Whether ``size`` more bytes of request fit under ``max_pending_bytes``."""
        return size <= SMALL_BODY or self.pending_bytes + size <= self.limits.max_pending_bytes

    def hold(self, size: int) -> None:
        self.pending_bytes += size

    def release(self, size: int) -> None:
        self.pending_bytes -= size
        self.freed_bytes += size

    def tick(self, now: float) -> None:
        """Called by the sweep: advance the clock, give freed memory back."""
        self.clock = now
        if self.freed_bytes >= FREED_BEFORE_TRIM:
            self.freed_bytes = 0
            trim_malloc()


class StreamPump:
    """Runs every streaming reply a little per turn, within one shared time budget,
    so any number of dumps costs the loop at most a few milliseconds per turn.
    The node also frees a replaced copy of the data through it, a shard a step."""

    def __init__(self, budget: float = PUMP_BUDGET) -> None:
        self.budget = budget
        self._ready: collections.deque[Callable[[], None]] = collections.deque()
        self._scheduled = False
        # The longest turn the steps took, in seconds: on the clock (status:
        # dump_turn_max_ms) and in the loop thread's CPU time (dump_turn_cpu_max_ms).
        # The two differ when another process takes the CPU in the middle of a turn.
        self.longest = 0.0
        self.longest_cpu = 0.0
        # Turns over SLOW_TURN in CPU time. The thread's CPU time also holds kernel
        # work done while it ran (timers and packets of other sockets, on loopback),
        # so a rare turn can pass the bound through no work of its own; a dump that
        # is not streamed, or a slower step, makes every turn slow.
        self.slow_turns = 0

    def want(self, step: Callable[[], None]) -> None:
        self._ready.append(step)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        ready = self._ready
        started = time.perf_counter()
        started_cpu = time.thread_time()
        # Only the steps queued before this turn run now: one that queues itself
        # again waits for the next turn, so sockets and timers get their turn.
        for _ in range(len(ready)):
            ready.popleft()()
            if time.perf_counter() - started > self.budget:
                break
        self.longest = max(self.longest, time.perf_counter() - started)
        cpu = time.thread_time() - started_cpu
        self.longest_cpu = max(self.longest_cpu, cpu)
        if cpu > SLOW_TURN:
            self.slow_turns += 1
        if ready and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)


class DumpStream:
    """``[["k","v"],...]`` of a store, produced a chunk at a time.

    Each shard is copied when the dump reaches it, so the dump holds every
    shard exactly as it was at that moment (a shard the dump has passed may
    change, one it has not reached yet may too).  The copy is a dict: it holds
    only strings, so the garbage collector never walks it (a list of a shard's
    keys would cost every collection a walk over it).
    """

    def __init__(self, store: Any, chunked: bool = True, pairs_per_chunk: int = DUMP_PAIRS) -> None:
        self.store = store
        self.chunked = chunked  # HTTP/1.1 chunked framing, else the bare text
        self.pairs_per_chunk = pairs_per_chunk
        self._shard = -1
        self._pairs: Iterator[tuple[str, str]] | None = None
        self._started = False
        self.done = False

    def next_chunk(self) -> bytes:
        """The next bytes to send (possibly none); ``done`` once the last were given."""
        piece = self._next_piece()
        if not self.chunked:
            return piece
        framed = b"%x\r\n%b\r\n" % (len(piece), piece) if piece else b""
        return framed + b"0\r\n\r\n" if self.done else framed

    def _next_piece(self) -> bytes:
        """The next piece of the JSON text (possibly empty)."""
        if self._pairs is None:
            self._shard += 1
            if self._shard >= self.store.shard_count:
                self.done = True
                return b"]" if self._started else b"[]"
            self._pairs = iter(self.store.shard_copy(self._shard).items())
            return b""  # copying a shard is this turn's work
        pairs = list(itertools.islice(self._pairs, self.pairs_per_chunk))
        if len(pairs) < self.pairs_per_chunk:
            self._pairs = None  # this shard is done
        if not pairs:
            return b""
        encoded = orjson.dumps(pairs)
        if self._started:
            return b"," + encoded[1:-1]
        self._started = True
        return encoded[:-1]


# -- process-wide resources -------------------------------------------------------------
def _libc() -> Any:
    import ctypes  # here, not at start-up: only a server that frees much needs it

    # The process's own symbols, the C library's among them. Not
    # ctypes.util.find_library, which runs ldconfig in a child process: forking a
    # server that holds millions of pairs costs tens of milliseconds of the loop.
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC: list[Any] = []  # the C library once looked up (None in it: not glibc)


def trim_malloc() -> None:
    """Give free heap pages back to the system (after many request bodies were freed)."""
    if not _LIBC:
        _LIBC.append(_libc())
    if _LIBC[0] is not None:
        _LIBC[0].malloc_trim(0)


def raise_file_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE to ``wanted`` (at most the hard limit); returns it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft
