"""The asyncio driver: real sockets and timers in, core events out.

One event loop owns the store and the replication core; every store
operation runs on it, so none needs a lock.  The driver carries out the
actions the core queues (see ``core.py``) and never decides anything itself.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import httptools

from pbkv import config
from pbkv.backup import BackupCore
from pbkv.commands import Command, Outcome
from pbkv.core import CloseChannel, Connect, Probe, PumpTransfer, Respond, Send, StartTimer
from pbkv.http import HttpProtocol, Limits, RequestError
from pbkv.limits import (
    CLOCK_STEP,
    RESERVED_CLIENTS,
    ConnectionLimits,
    Guard,
    raise_file_limit,
)
from pbkv.metrics import Metrics
from pbkv.primary import PrimaryCore
from pbkv.store import PAIR_OVERHEAD, make_store
from pbkv.wire import UPGRADE_PATH, UPGRADE_TOKEN, FrameDecoder, FrameError, encode

log = logging.getLogger("pbkv")

WRITE_BUFFER_HIGH = 4 * 1024 * 1024
LAG_PROBE_INTERVAL = 0.02  # how often the event loop's responsiveness is sampled
READ_BUDGET = 0.005  # seconds of frame handling before the channel yields the loop
PUMP_FRAMES = 4  # transfer frames queued per turn of the event loop
SWEEP_INTERVAL = CLOCK_STEP  # seconds between checks of every client connection's timeouts
SPARE_DESCRIPTORS = 256  # beyond the client connections: channel, listener, files


class ChannelProtocol(asyncio.Protocol):
    """The replication channel: frames both ways after an HTTP upgrade.

    On the primary it first sends the upgrade request and waits for ``101``
    (parsed by httptools); on the backup the HTTP layer hands it an already
    upgraded transport.
    """

    def __init__(self, node: Node, upgraded: bool) -> None:
        self.node = node
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder()
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._response_parser = None if upgraded else httptools.HttpResponseParser(self)
        if upgraded:
            self.upgraded.set_result(None)
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = False
        self._busy = 0.0  # seconds spent on frames since reading last paused
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        if self._response_parser is not None:
            host, port = self.node.settings.address_of("backup")
            self.transport.write(
                b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: %s\r\nConnection: Upgrade\r\n\r\n"
                % (UPGRADE_PATH, host.encode(), port, UPGRADE_TOKEN)
            )

    def data_received(self, data: bytes) -> None:
        if self._response_parser is not None:
            try:
                self._response_parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                self._response_parser = None
                if not self.upgraded.done():
                    self.upgraded.set_result(None)
                data = data[exc.args[0] :]
            except httptools.HttpParserError as exc:
                self._refused(f"bad upgrade response: {exc}")
                return
            else:
                return
        try:
            frames = self.decoder.feed(data)
        except FrameError as exc:
            if exc.frames:  # the good frames before the bad one still count
                self.node.frames_received(self, exc.frames)
            self.node.channel_broken(self, f"bad frame: {exc}")
            return
        if frames:
            started = time.perf_counter()
            self.node.frames_received(self, frames)
            self._busy += time.perf_counter() - started
            if self._busy > READ_BUDGET and self.transport is not None and not self._paused:
                # A full transfer arrives faster than we load it: let the other
                # sockets of this loop turn be served before reading on.
                self._paused = True
                self.transport.pause_reading()
                asyncio.get_running_loop().call_soon(self._read_on)

    def _read_on(self) -> None:
        self._busy = 0.0
        self._paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def on_message_complete(self) -> None:
        # A complete response without an upgrade: the peer refused the channel.
        parser = self._response_parser
        if parser is not None and parser.get_status_code() != 101:
            self._refused("the peer refused the replication channel")

    def _refused(self, reason: str) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionRefusedError(reason))
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._writable.set()
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError("connection closed during upgrade"))
        self.node.channel_broken(self, f"connection closed ({exc or 'EOF'})")

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def wait_writable(self) -> None:
        await self._writable.wait()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class LoopLag:
    """The event loop's longest delay: over the last ``window`` seconds and ever."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self.worst = 0.0
        self._buckets: collections.deque[tuple[float, float]] = collections.deque()

    def record(self, now: float, lag: float) -> None:
        self.worst = max(self.worst, lag)
        buckets = self._buckets
        if buckets and now - buckets[-1][0] < 1.0:  # one bucket per second
            start, worst = buckets[-1]
            buckets[-1] = (start, max(worst, lag))
        else:
            buckets.append((now, lag))
        while buckets and now - buckets[0][0] > self.window:
            buckets.popleft()

    def recent_max(self, now: float) -> float:
        return max((lag for start, lag in self._buckets if now - start <= self.window), default=0)


class Node:
    """One pbkv server process: HTTP front, replication core, channel."""

    def __init__(self, settings: config.Settings, role: str) -> None:
        self.settings = settings
        self.role = role
        self.loop = asyncio.get_running_loop()
        store = make_store(settings.store, settings.shards)
        now = self.loop.time()
        core_class = PrimaryCore if role == "primary" else BackupCore
        # The core owns the store (the backup swaps in a new one after a transfer).
        self.core: PrimaryCore | BackupCore = core_class(settings, store, now)
        self.accepts_replication = role == "backup"
        self.address = settings.address_of(role)
        self.peer_address = settings.address_of("backup" if role == "primary" else "primary")
        self.limits = Limits(settings.max_key_bytes, settings.max_value_bytes)
        self.connections: set[HttpProtocol] = set()
        reserved = RESERVED_CLIENTS
        wanted = settings.max_clients + reserved + SPARE_DESCRIPTORS
        files = raise_file_limit(wanted)
        max_clients = settings.max_clients
        if files < wanted:
            # Running out of descriptors would fail accept() for everyone, the
            # replication channel included: fewer clients instead.
            max_clients = max(1, files - reserved - SPARE_DESCRIPTORS)
            log.warning(
                "open-file limit %d is below the %d that max_clients %d needs: "
                "serving at most %d clients",
                files,
                wanted,
                settings.max_clients,
                max_clients,
            )
        self.guard = Guard(
            ConnectionLimits(
                max_reply_buffer=settings.max_reply_buffer,
                max_pipeline=settings.max_pipeline,
                header_timeout=settings.header_timeout,
                body_timeout=settings.body_timeout,
                send_timeout=settings.send_timeout,
                idle_timeout=settings.idle_timeout,
                max_pending_bytes=settings.max_pending_bytes,
                max_clients=max_clients,
            )
        )
        self.channel: ChannelProtocol | None = None
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.stopped = asyncio.Event()
        self.stats = Metrics(self)
        self._flush_scheduled = False
        self._pumping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.lag = LoopLag()

    # -- lifecycle ---------------------------------------------------------------
    async def run(self) -> None:
        host, port = self.address
        server = await self.loop.create_server(
            lambda: HttpProtocol(self, self.limits, self.connections, self.guard),
            host,
            port,
            reuse_address=True,
            backlog=2048,
        )
        log.info("%s listening on %s:%d (store %s)", self.role, host, port, store_kind(self.core))
        self.core.start(self.loop.time())
        self._drain()
        self._sweep = self.loop.call_later(SWEEP_INTERVAL, self._sweep_idle)
        self._probe_lag(self.loop.time() + LAG_PROBE_INTERVAL)
        try:
            await self.stopped.wait()
        finally:
            self._sweep.cancel()
            self._lag_timer.cancel()
            server.close()  # frees the port at once
            for timer in self.timers.values():
                timer.cancel()
            if self.channel is not None:
                self.channel.close()
            for connection in list(self.connections):
                if connection.transport is not None:
                    connection.transport.close()
            for task in list(self._tasks):
                task.cancel()
            log.info("%s stopped", self.role)

    def shutdown(self) -> None:
        log.info("%s shutting down on request", self.role)
        self.stopped.set()

    def _sweep_idle(self) -> None:
        now = time.monotonic()
        self.guard.tick(now)  # the coarse clock HttpProtocol stamps its phases with
        for connection in list(self.connections):
            connection.sweep(now)
        self._sweep = self.loop.call_later(SWEEP_INTERVAL, self._sweep_idle)

    def _probe_lag(self, due: float) -> None:
        """A timer that notes how late it fires: how long the loop was busy."""
        now = self.loop.time()
        self.lag.record(now, max(0.0, now - due))
        due = now + LAG_PROBE_INTERVAL
        self._lag_timer = self.loop.call_at(due, self._probe_lag, due)

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the App interface of http.py --------------------------------------------
    def read(self, command: Command, key: str) -> Outcome:
        self.stats.count(command)
        return self.core.read(command, key)

    def submit(
        self, command: Command, key: str, value: str | None, respond: Callable[[Outcome], None]
    ) -> Outcome | None:
        self.stats.count(command)
        if self.settings.max_memory and value is not None:
            self._check_memory(command, key, value)
        outcome = self.core.submit(command, key, value, respond)
        if outcome is None and not self._flush_scheduled:
            # Everything that arrives in this turn of the loop shares one batch.
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        return outcome

    def _check_memory(self, command: Command, key: str, value: str) -> None:
        """Refuse a write that would take the store past ``max_memory`` (like Redis's
        ``maxmemory`` with ``noeviction``): deletes and shrinking updates still pass."""
        store = self.core.store
        old = store.get(key)
        if old is None:
            grow = len(key) + len(value) + PAIR_OVERHEAD if command is Command.INSERT else 0
        else:
            grow = len(value) - len(old) if command is Command.UPDATE else 0
        limit = self.settings.max_memory
        if grow > 0 and store.memory_bytes + grow > limit:
            raise RequestError(507, f"max_memory reached ({limit} bytes): write refused")

    def _flush(self) -> None:
        self._flush_scheduled = False
        core = self.core
        assert isinstance(core, PrimaryCore)
        core.flush(self.loop.time())
        self._drain()

    def status(self) -> dict[str, Any]:
        status = self.core.status(self.loop.time())
        status["address"] = "%s:%d" % self.address
        status["peer"] = "%s:%d" % self.peer_address
        status["store"] = self.core.store.kind
        status["shards"] = self.core.store.shard_count
        status["clients"] = len(self.connections)
        guard = self.guard
        status["memory_bytes"] = self.core.store.memory_bytes
        status["max_memory"] = self.settings.max_memory
        status["pending_request_bytes"] = guard.pending_bytes
        status["clients_refused"] = guard.refused_clients.count
        status["bodies_refused"] = guard.refused_bodies.count
        status["connections_timed_out"] = guard.timeouts
        status["dump_turn_max_ms"] = round(guard.pump.longest * 1000, 1)
        status["loop_lag_ms"] = round(self.lag.recent_max(self.loop.time()) * 1000, 1)
        status["loop_lag_max_ms"] = round(self.lag.worst * 1000, 1)
        return status

    def metrics(self) -> tuple[bytes, str]:
        return self.stats.render()

    def upgrade(self, transport: asyncio.Transport, leftover: bytes) -> None:
        channel = ChannelProtocol(self, upgraded=True)
        transport.set_protocol(channel)
        channel.connection_made(transport)
        core = self.core
        assert isinstance(core, BackupCore)
        core.channel_opened(self.loop.time())
        self._drain()  # closes a channel this one replaces
        self.channel = channel
        log.info("backup accepted a replication channel from %s", _peername(transport))
        if leftover:
            channel.data_received(leftover)

    # -- channel events ----------------------------------------------------------
    def frames_received(self, channel: ChannelProtocol, frames: list[list[Any]]) -> None:
        if channel is not self.channel:
            return
        core = self.core
        for frame in frames:
            core.frame_received(self.loop.time(), frame)
            if channel is not self.channel:
                break
        self._drain()

    def channel_broken(self, channel: ChannelProtocol, reason: str) -> None:
        if channel is not self.channel:
            return
        self.channel = None
        channel.close()
        self.core.channel_closed(self.loop.time(), reason)
        self._drain()

    # -- carrying out actions ------------------------------------------------------
    def _drain(self) -> None:
        core = self.core
        while core.outbox:
            for action in core.take_actions():
                self._carry_out(action)

    def _carry_out(self, action: Any) -> None:
        if isinstance(action, Respond):
            action.token(action.outcome)
        elif isinstance(action, Send):
            if self.channel is not None:
                self.channel.write(encode(action.frame))
        elif isinstance(action, StartTimer):
            old = self.timers.pop(action.name, None)
            if old is not None:
                old.cancel()
            self.timers[action.name] = self.loop.call_later(
                action.delay, self._timer_fired, action.name
            )
        elif isinstance(action, CloseChannel):
            channel, self.channel = self.channel, None
            if channel is not None:
                log.info("%s closes the replication channel: %s", self.role, action.reason)
                channel.close()
        elif isinstance(action, Connect):
            self._spawn(self._connect())
        elif isinstance(action, Probe):
            self._spawn(self._probe())
        elif isinstance(action, PumpTransfer):
            if not self._pumping:
                self._spawn(self._pump())
        else:
            raise TypeError(f"unknown action {action!r}")

    def _timer_fired(self, name: str) -> None:
        self.timers.pop(name, None)
        self.core.timer_fired(self.loop.time(), name)
        self._drain()

    async def _connect(self) -> None:
        core = self.core
        assert isinstance(core, PrimaryCore)
        host, port = self.peer_address
        timeout = self.settings.peer_timeout
        transport = None
        try:
            transport, channel = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: ChannelProtocol(self, upgraded=False), host, port
                ),
                timeout,
            )
            await asyncio.wait_for(channel.upgraded, timeout)
        except (TimeoutError, OSError) as exc:
            if transport is not None:
                transport.close()
            core.channel_failed(self.loop.time(), f"{host}:{port}: {exc or type(exc).__name__}")
            self._drain()
            return
        if channel.closed:
            core.channel_failed(self.loop.time(), "closed during the upgrade")
            self._drain()
            return
        self.channel = channel
        core.channel_opened(self.loop.time())
        self._drain()

    async def _probe(self) -> None:
        core = self.core
        assert isinstance(core, BackupCore)
        host, port = self.peer_address
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), self.settings.peer_timeout
            )
            writer.close()
            running = True
        except (TimeoutError, OSError):
            running = False
        core.probe_result(self.loop.time(), running)
        self._drain()

    async def _pump(self) -> None:
        """Send a transfer a few frames at a time, yielding between them."""
        self._pumping = True
        try:
            while True:
                channel = self.channel
                if channel is None:
                    return
                more = self.core.pump_transfer(self.loop.time(), PUMP_FRAMES)
                self._drain()
                if not more:
                    return
                await channel.wait_writable()
                await asyncio.sleep(0)
        finally:
            self._pumping = False


def store_kind(core: PrimaryCore | BackupCore) -> str:
    return f"{core.store.kind}, {core.store.shard_count} shards"


def _peername(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return "%s:%d" % peer[:2] if peer else "?"


def setup_logging(level: str, role: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s {role} %(message)s",
        stream=sys.stderr,
    )


def serve_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pbkv serve", description="Run a pbkv server.")
    parser.add_argument("--role", choices=config.ROLES, required=True)
    config.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = config.settings_from_args(args)
    except config.SettingsError as exc:
        print(f"pbkv: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, args.role)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    try:
        runner(_serve(settings, args.role))
    except OSError as exc:
        host, port = settings.address_of(args.role)
        log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


async def _serve(settings: config.Settings, role: str) -> None:
    node = Node(settings, role)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, node.stopped.set)
    await node.run()
