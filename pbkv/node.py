"""The asyncio driver: real sockets and timers in, core events out.

One event loop owns the store and the replication core; every store
operation runs on it, so none needs a lock.  The driver carries out the
actions the core queues (see ``core.py``) and never decides anything itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

import httptools

from pbkv import compiled, config, tls
from pbkv.actions import Timer
from pbkv.backup import BackupCore
from pbkv.commands import Command, Outcome, Refused, Reply
from pbkv.core import ReplicationCore
from pbkv.http import HttpProtocol, Limits, access_for
from pbkv.limits import (
    CLOCK_STEP,
    RESERVED_CLIENTS,
    ConnectionLimits,
    Guard,
    LogThrottle,
    raise_file_limit,
)
from pbkv.metrics import GcPauses, LoopLag, Metrics
from pbkv.persist import PersistError, Record, State
from pbkv.persist.driver import Persistence
from pbkv.primary import PrimaryCore
from pbkv.roles import demoted, promoted
from pbkv.routes import LISTENING_PATH
from pbkv.stages import Role, Stage
from pbkv.store import ShardedStore, make_store
from pbkv.wire import UPGRADE_PATH, UPGRADE_TOKEN

log = logging.getLogger(__name__)

WRITE_BUFFER_HIGH = 4 * 1024 * 1024
LAG_PROBE_INTERVAL = 0.02  # how often the event loop's responsiveness is sampled
READ_BUDGET = 0.005  # seconds of frame handling before the channel yields the loop
PUMP_FRAMES = 4  # transfer frames queued per turn of the event loop
CONNECT_ATTEMPTS = 8  # replication connection attempts in flight at once
SWEEP_INTERVAL = CLOCK_STEP  # seconds between checks of every client connection's timeouts
SPARE_DESCRIPTORS = 256  # beyond the client connections: channel, listener, files
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux's number


class ChannelProtocol(asyncio.Protocol):
    """The replication channel: frames both ways after an HTTP upgrade (the
    core encodes and decodes them; this moves bytes).

    On the primary it first sends the upgrade request and waits for ``101``
    (parsed by httptools); on the backup the HTTP layer hands it an already
    upgraded transport.
    """

    def __init__(self, node: Node, upgraded: bool, ident: int = 0) -> None:
        self.node = node
        self.ident = ident  # the backup's number for it, while it is a candidate
        self.transport: asyncio.Transport | None = None
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
        # A stream transport (uvloop's is no asyncio.Transport subclass: no isinstance).
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        if self._response_parser is not None:
            host, port = self.node.peer_address
            transport.write(
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
        started = time.perf_counter()
        self.node.bytes_arrived(self, data)
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


class Node:
    """One pbkv server process: HTTP front, replication core, channel.

    It is the core's driver (``actions.Driver``): it turns sockets and timers
    into core events, and carries out the actions the core queues.  The core
    sees ``time.monotonic()``: uvloop's ``loop.time()`` has millisecond
    resolution, too coarse for acknowledgement times.
    """

    def __init__(
        self,
        settings: config.Settings,
        role: Role,
        member_address: tuple[str, int] | None = None,
    ) -> None:
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        # A member's lease is judged on this clock: one that also counts time the
        # machine spent suspended, so a primary that wakes past its lease knows it.
        self.clock = boot_clock if member_address is not None else time.monotonic
        store = make_store(settings.store, settings.shards)
        # With a coordinator (``member_address`` given) the role is the leadership's
        # to decide (``pbkv.member``): a member starts as a backup that waits, keeping
        # its data, and its core changes with its role (``pbkv.roles``).
        self.member: Member | None = None
        if member_address is not None:
            role = Role.BACKUP
            settings = dataclasses.replace(
                settings, backup_initial_stage=Stage.BOOTSTRAPPING_PRIMARY.value
            )
        self.role = Role(role)
        core_class = PrimaryCore if self.role is Role.PRIMARY else BackupCore
        # The core owns the store (after a transfer the backup refills it in place).
        self.core: PrimaryCore | BackupCore = core_class(settings, store, self.clock())
        if member_address is not None:
            self.address = member_address
            self.peer_address = member_address  # nobody yet: whom the leadership names
        else:
            self.address = settings.address_of(self.role)
            self.peer_address = settings.address_of(self.role.peer)
        self.persistence: Persistence | None = None
        if settings.persistent:
            self.persistence = self._recover(store)
        self.limits = Limits(settings.max_key_bytes, settings.max_value_bytes)
        self.access = access_for(settings, role, member=member_address is not None)
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
        # Backup with a secret: new channels still proving it, by the core's number.
        self.candidates: dict[int, ChannelProtocol] = {}
        self._channel_numbers = itertools.count(1)
        self._accepted_log = LogThrottle(per_window=5, window=1.0)
        self.handshakes: tls.Handshakes | None = None  # with TLS: the handshakes under way
        self.timers: dict[Timer, asyncio.TimerHandle] = {}
        self.stopped = asyncio.Event()
        self.lag = LoopLag(interval=LAG_PROBE_INTERVAL)
        self.gc_pauses = GcPauses()
        self.stats = Metrics(self.status)
        self._pumping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        # With a coordinator: follow channels (a spare follows the recorded backup).
        self.following: Following | None = None
        if member_address is not None:
            from pbkv.following import Following
            from pbkv.member import Member  # only members load etcd's client

            self.member = Member(self, settings, member_address)
            self.following = Following(self)
            self.following.core_switched()

    def _recover(self, store: ShardedStore) -> Persistence:
        """Open this server's data folder and load its data into ``store``, before we
        serve anything: the core then holds a *recovered* copy (``stages.plan``).
        Damage stops the start with the file and offset (a torn last record is cut)."""
        core = self.core
        try:
            persistence = Persistence(
                self.settings, self.address, self.loop, self._disk_failed, self._disk_healed
            )
            state = persistence.recover(store, core.disk_state(), core.batch_recovered_handler())
        except (PersistError, OSError) as exc:
            log.error("%s cannot start: %s", self.role, exc)
            raise SystemExit(1) from None
        if state is not None:
            core.recovered_from(state)
        return persistence

    def _disk_failed(self, reason: str) -> None:
        """A record or a base could not be written: what was held for it was answered as
        a failure, and until a new base is in place writes are refused (a primary) or
        the replication channel is refused (a backup: its ACKs would say the batches
        are on its disk; the primary rewinds what it had in flight)."""
        log.error("%s persistence failed, refusing writes until it heals: %s", self.role, reason)
        if isinstance(self.core, BackupCore):
            if self.channel is not None:
                self.channel_broken(self.channel, f"this server's disk failed: {reason}")
            for candidate in list(self.candidates.values()):
                candidate.close()
                self.channel_broken(candidate, "this server's disk failed")

    def _disk_healed(self) -> None:
        log.warning("%s persistence works again", self.role)

    # -- lifecycle ---------------------------------------------------------------
    async def run(self, listening: Callable[[], None] | None = None) -> None:
        """Serve until ``stopped`` is set; ``listening()`` is called once we listen."""
        host, port = self.address

        def serve() -> HttpProtocol:
            return HttpProtocol(
                self,
                self.limits,
                self.connections,
                self.settings.errors,
                self.access,
                self.guard,
            )

        context = tls.server_context(self.settings)
        factory: Callable[[], asyncio.Protocol] = serve
        if context is not None:
            # Plain TCP accepts, then TLS under a deadline from a protocol that
            # counted the connection at accept (see tls.Handshakes).
            self.handshakes = tls.Handshakes(
                context, self.guard, self.settings.header_timeout, serve
            )
            factory = self.handshakes
        server = await self.loop.create_server(
            factory, host, port, reuse_address=True, backlog=2048
        )
        log.info("%s listening on %s:%d (store %s)", self.role, host, port, store_kind(self.core))
        log_trust(self.settings)
        self.gc_pauses.install()
        if self.persistence is not None:
            self.persistence.start()
        self.core.start(self.clock())
        self.core.drain(self)
        if self.member is not None:
            await self.member.start()
        if self.following is not None:
            self.following.start()
        if listening is not None:
            listening()
        self._sweep = self.loop.call_later(SWEEP_INTERVAL, self._sweep_idle)
        self._probe_lag()
        try:
            await self.stopped.wait()
        finally:
            if self.member is not None:
                await self.member.stop()  # hands leadership over at once, not after the lease
            if self.following is not None:
                self.following.stop()
            self.gc_pauses.uninstall()
            self._sweep.cancel()
            self._lag_timer.cancel()
            server.close()  # frees the port at once
            for timer in self.timers.values():
                timer.cancel()
            if self.channel is not None:
                self.channel.close()
            for candidate in list(self.candidates.values()):
                candidate.close()
            if self.handshakes is not None:
                self.handshakes.close_all()
            for connection in list(self.connections):
                if connection.transport is not None:
                    connection.transport.close()
            for task in list(self._tasks):
                task.cancel()
            if self.persistence is not None:
                self.persistence.close()
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

    def _probe_lag(self) -> None:
        """A timer that notes how late it fires: how long the loop was busy.  The
        lateness is measured, and read back in ``status``, on ``self.clock``."""
        lag = self.lag.fired(self.clock())
        if self.persistence is not None:
            self.persistence.loop_lagged(lag)
        self._lag_timer = self.loop.call_later(self.lag.interval, self._probe_lag)

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def accepts_replication(self) -> bool:
        return isinstance(self.core, BackupCore)

    @property
    def accepts_followers(self) -> bool:
        return self.following is not None and isinstance(self.core, BackupCore)

    def follow_upgrade(self, transport: asyncio.Transport, leftover: bytes) -> None:
        """A follow channel (``following.py``): served only by a member's backup."""
        if self.following is None:
            transport.close()
            return
        self.following.accept(transport, leftover)

    # -- roles (with a coordinator: pbkv.member decides, the node carries out) ------------
    def _switch_core(self, new: PrimaryCore | BackupCore) -> None:
        """Drive ``new`` from now on: the old core's last actions are carried out, its
        timers and channels go (a timer of one role means nothing to the other)."""
        self.core.drain(self)
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        for candidate in list(self.candidates.values()):
            candidate.close()
        self.candidates.clear()
        self.close_channel("the role changed")
        self.core = new
        self.role = new.role
        new.start(self.clock())
        new.drain(self)
        if self.following is not None:
            self.following.core_switched()

    def become_primary(self, epoch: int, authority: Callable[[float, str], bool]) -> None:
        core = self.core
        now = self.clock()
        if isinstance(core, PrimaryCore):
            core.serve_epoch(now, epoch)
            core.drain(self)
            return
        primary = promoted(core, now, epoch)
        primary.authority = authority
        self._switch_core(primary)

    def fence(self, reason: str) -> None:
        """Stop serving as primary now; keep the data for whoever leads next."""
        core = self.core
        if isinstance(core, PrimaryCore):
            self._switch_core(demoted(core, self.clock(), f"fenced: {reason}"))

    def follow(self, primary: tuple[str, int], epoch: int) -> None:
        """Take frames only from ``primary`` at ``epoch`` or later; tell it we listen."""
        core = self.core
        if isinstance(core, PrimaryCore):
            self.fence(f"following {primary[0]}:{primary[1]} at epoch {epoch}")
            core = self.core
        assert isinstance(core, BackupCore)
        core.epoch_observed(self.clock(), epoch)
        core.primary_address = "%s:%d" % primary
        core.drain(self)
        self.peer_address = primary
        if primary != self.address and not core.channel_up:
            self._spawn(self._nudge(primary))

    def stop_following(self, epoch: int) -> None:
        """Apply no frame of ``epoch`` or older any more (before campaigning): every
        later leader's epoch is higher, so ``epoch + 1`` is the floor."""
        self.core.epoch_observed(self.clock(), epoch + 1)
        self.core.drain(self)

    def flush_if_authorised(self) -> None:
        """The leadership may have just allowed acknowledgements: send what waited."""
        core = self.core
        if isinstance(core, PrimaryCore) and core.queued[0].entries:
            core.flush(self.clock())
            core.drain(self)

    def sync_changed(self) -> None:
        if self.member is not None:
            self.member.replication_changed()

    def _not_primary(self) -> Refused:
        member = self.member
        assert member is not None
        return Refused(self.core.stage, member.role_name(), primary=member.primary_address())

    # -- the App interface of pbkv.http -----------------------------------------
    def read(self, command: Command, key: str) -> Outcome:
        self.stats.count(command)
        member = self.member
        if member is not None and not member.may_serve():
            return self._not_primary()
        core: ReplicationCore = self.core  # one class: a direct call when compiled
        return core.read(command, key)

    def submit(
        self,
        command: Command,
        key: str,
        value: str | None,
        reply: Reply,
        idempotency: str | None = None,
    ) -> Outcome | None:
        self.stats.count(command)
        member = self.member
        if member is not None and not member.may_serve():
            return self._not_primary()
        core = self.core
        persistence = self.persistence
        if persistence is not None and isinstance(core, PrimaryCore):
            refused = persistence.refusal()  # before anything is applied
            if refused is not None and not (idempotency and core.remembers(idempotency)):
                return refused  # (a retry of a key seen before gets that write's reply)
            if persistence.always:
                reply = persistence.durable(reply)  # answered once its batch is on disk
        if idempotency is not None:
            core.now = self.clock()  # a standalone primary stamps its table with it
        outcome = core.submit(command, key, value, reply, idempotency)
        if core.outbox:
            core.drain(self)
        replayed = outcome is not None and idempotency is not None
        if replayed and persistence is not None and persistence.always and persistence.holding:
            # A retry answered from the table: its write's record may still wait for
            # this turn's fsync, so its reply (durable, above) waits with the others.
            assert outcome is not None
            reply(outcome)
            return None
        return outcome

    def submit_pairs(self, pairs: list[str], upsert: bool, reply: Reply) -> Outcome | None:
        """A chunk of a bulk load (``PrimaryCore.submit_pairs``), behind the gates a
        write passes: the leadership's, the disk's, and durability's answer."""
        member = self.member
        if member is not None and not member.may_serve():
            return self._not_primary()
        core = self.core
        if not isinstance(core, PrimaryCore):
            return Refused(core.stage, core.role, primary=core.primary_address)
        persistence = self.persistence
        if persistence is not None:
            refused = persistence.refusal()
            if refused is not None:
                return refused
            if persistence.always:
                reply = persistence.durable(reply)
        outcome = core.submit_pairs(pairs, upsert, reply)
        if core.outbox:
            core.drain(self)
        return outcome

    def status(self) -> dict[str, Any]:
        now = self.clock()
        status = self.core.status(now)
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
        handshakes = self.handshakes
        status["tls_handshakes"] = 0 if handshakes is None else len(handshakes.running)
        status["tls_handshakes_failed"] = 0 if handshakes is None else handshakes.failed.count
        status["bodies_refused"] = guard.refused_bodies.count
        status["connections_timed_out"] = guard.timeouts
        status["dump_turn_max_ms"] = round(guard.pump.longest * 1000, 1)
        status["dump_turn_cpu_max_ms"] = round(guard.pump.longest_cpu * 1000, 1)
        status["dump_turns_slow"] = guard.pump.slow_turns
        status["loop_lag_ms"] = round(self.lag.recent_max(now) * 1000, 1)
        status["loop_lag_max_ms"] = round(self.lag.worst * 1000, 1)
        status["gc_pause_max_ms"] = [round(pause * 1000, 1) for pause in self.gc_pauses.longest]
        status["gc_frozen"] = gc.get_freeze_count()
        status["build"] = compiled.BUILD  # "compiled", or why the sources run
        if self.member is not None:
            status.update(self.member.status(now))
        if self.following is not None:
            status.update(self.following.status())
        if self.persistence is not None:
            status["persistence"] = self.persistence.status()
        return status

    def metrics(self) -> tuple[bytes, str]:
        return self.stats.render()

    def backup_listening(self) -> None:
        """A nudge arrived: the primary's core decides whether to connect now."""
        core = self.core
        if isinstance(core, PrimaryCore):
            core.backup_listening(self.clock())
            core.drain(self)

    def upgrade(self, transport: asyncio.Transport, leftover: bytes) -> None:
        core = self.core
        if not isinstance(core, BackupCore):  # a member that leads now takes no channel
            transport.close()
            return
        if self.persistence is not None and self.persistence.failed is not None:
            transport.close()  # its ACKs would claim what its disk does not hold
            return
        ident = next(self._channel_numbers)
        channel = ChannelProtocol(self, upgraded=True, ident=ident)
        transport.set_protocol(channel)
        channel.connection_made(transport)
        core.channel_opened(self.clock(), ident)
        if ident in core.candidates:  # with a secret: it proves it before it counts
            self.candidates[ident] = channel
            core.drain(self)
        else:
            core.drain(self)  # closes a channel this one replaces
            self.channel = channel
        skipped = self._accepted_log.allow(self.clock())
        if skipped is not None:
            log.info(
                "backup accepted a replication channel from %s%s",
                _peername(transport),
                f" (and {skipped} more since the last such line)" if skipped else "",
            )
        if leftover:
            channel.data_received(leftover)

    # -- channel events ----------------------------------------------------------
    def bytes_arrived(self, channel: ChannelProtocol, data: bytes) -> None:
        """The core decodes and handles them (a bad frame: it closes the channel)."""
        core = self.core
        if channel is self.channel:
            core.bytes_received(self.clock(), data)
            core.drain(self)
        elif self.candidates.get(channel.ident) is channel:
            assert isinstance(core, BackupCore)
            core.candidate_bytes(self.clock(), channel.ident, data)
            core.drain(self)

    def channel_broken(self, channel: ChannelProtocol, reason: str) -> None:
        if self.candidates.get(channel.ident) is channel:
            del self.candidates[channel.ident]
            core = self.core
            assert isinstance(core, BackupCore)
            core.candidate_closed(self.clock(), channel.ident)
            return
        if channel is not self.channel:
            return
        self.channel = None
        channel.close()
        self.core.channel_closed(self.clock(), reason)
        self.core.drain(self)

    # -- carrying out actions (actions.Driver) ---------------------------------------
    def send(self, data: bytes) -> None:
        channel = self.channel
        if channel is not None:
            persistence = self.persistence
            if persistence is not None and persistence.holding and self.role is Role.BACKUP:
                # An ACK (or a SYNC_ACK) says the data is here: on disk first.
                persistence.hold(lambda: channel.write(data))
            else:
                channel.write(data)

    def persist(self, record: Record) -> None:
        if self.persistence is not None:
            self.persistence.persist(record)

    def persist_all(self, state: State) -> None:
        if self.persistence is not None:
            self.persistence.persist_all(state, self.core.store)

    def send_to_candidate(self, candidate: int, data: bytes) -> None:
        channel = self.candidates.get(candidate)
        if channel is not None:
            channel.write(data)

    def close_candidate(self, candidate: int, reason: str) -> None:
        channel = self.candidates.pop(candidate, None)
        if channel is not None:
            channel.close()

    def promote(self, candidate: int) -> None:
        """A candidate proved the secret: it is the channel now (the core closed the old)."""
        channel = self.candidates.pop(candidate, None)
        if channel is not None:
            self.channel = channel

    def discard(self, shards: list[dict[str, str]]) -> None:
        """Drop a replaced copy of the data a shard per turn of the loop: at once,
        millions of pairs take a second or more to free."""

        def drop_one() -> None:
            shards.pop()
            if shards:
                self.guard.pump.want(drop_one)

        if shards:
            self.guard.pump.want(drop_one)

    def start_timer(self, timer: Timer, delay: float) -> None:
        old = self.timers.pop(timer, None)
        if old is not None:
            old.cancel()
        self.timers[timer] = self.loop.call_later(delay, self._timer_fired, timer)

    def close_channel(self, reason: str) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            log.info("%s closes the replication channel: %s", self.role, reason)
            channel.close()

    def connect(self) -> None:
        self._spawn(self._connect())

    def probe(self) -> None:
        self._spawn(self._probe())

    def pump_transfer(self) -> None:
        if not self._pumping:
            self._spawn(self._pump())

    def flush_soon(self) -> None:
        core = self.core
        if isinstance(core, PrimaryCore) and not core.in_flight:
            # Nothing in flight: waiting for the rest of this turn would only delay the
            # write (one writer waits alone); the writes behind it share the next batch.
            self._flush()
            return
        # After the other events of this turn of the loop: they share the batch.
        self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        core = self.core
        if not isinstance(core, PrimaryCore):
            return  # the member stepped down meanwhile: its writes were answered then
        core.flush(self.clock())
        core.drain(self)

    def _timer_fired(self, timer: Timer) -> None:
        self.timers.pop(timer, None)
        self.core.timer_fired(self.clock(), timer)
        self.core.drain(self)

    async def _connect(self) -> None:
        core = self.core
        if not isinstance(core, PrimaryCore):
            return  # the member stepped down before the attempt began
        if self.member is not None:
            target = await self.member.next_backup()
            if core is not self.core:
                return
            if target is None:
                core.channel_failed(self.clock(), "no other member is registered yet")
                core.drain(self)
                return
            self.peer_address = target
        host, port = self.peer_address
        timeout = self.settings.peer_timeout
        transport = None
        try:
            transport, channel = await self._open_connection(host, port, timeout)
            await asyncio.wait_for(channel.upgraded, timeout)
        except (TimeoutError, OSError) as exc:
            if transport is not None:
                transport.close()
            if core is not self.core:
                return  # the role changed meanwhile: the attempt is moot
            core.channel_failed(self.clock(), f"{host}:{port}: {exc or type(exc).__name__}")
            core.drain(self)
            return
        if core is not self.core:
            channel.close()
            return
        if channel.closed:
            core.channel_failed(self.clock(), "closed during the upgrade")
            core.drain(self)
            return
        self.channel = channel
        core.channel_opened(self.clock())
        core.drain(self)

    async def _open_connection(
        self, host: str, port: int, timeout: float
    ) -> tuple[asyncio.BaseTransport, ChannelProtocol]:
        """Connect to the backup, with a fresh attempt every ``retry_min`` while none
        has answered (at most ``CONNECT_ATTEMPTS`` at once, for ``timeout`` in all).

        When a path drops packets, a connection attempt whose SYN or SYN-ACK was
        lost is retried by TCP only a second later (then 3, 7 s...): a new attempt
        started after the path heals connects in one round trip instead.  A refused
        attempt (no backup listening) ends the round at once: the core backs off."""
        context = tls.channel_context(self.settings)

        def attempt() -> asyncio.Task[tuple[asyncio.BaseTransport, ChannelProtocol]]:
            return self.loop.create_task(self._connect_from_own_address(host, port, context))

        deadline = self.loop.time() + timeout
        pending: list[asyncio.Task[tuple[asyncio.BaseTransport, ChannelProtocol]]] = []
        try:
            while True:
                pending.append(attempt())
                if len(pending) > CONNECT_ATTEMPTS:
                    pending.pop(0).cancel()
                left = deadline - self.loop.time()
                done, _ = await asyncio.wait(
                    pending,
                    timeout=max(0.0, min(self.settings.retry_min, left)),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in done:
                    pending.remove(task)
                    task.result()  # a refusal raises: the backup is not listening
                    return task.result()
                if self.loop.time() >= deadline:
                    raise TimeoutError(f"no answer within {timeout}s")
        finally:
            for task in pending:
                task.cancel()
                # One that connected meanwhile must not stay open.
                task.add_done_callback(_close_if_connected)

    async def _connect_from_own_address(
        self, host: str, port: int, context: ssl.SSLContext | None
    ) -> tuple[asyncio.BaseTransport, ChannelProtocol]:
        """A connection from our own configured address, which the backup checks.

        Its port is chosen at connect, not at bind (``IP_BIND_ADDRESS_NO_PORT``):
        bind skips every port that a closed connection from this address still
        holds in TIME_WAIT, and a machine busy with short connections (a grading
        script's, say) has them all held: every attempt would fail for a minute."""
        loop = self.loop
        ours = await loop.getaddrinfo(self.address[0], 0, type=socket.SOCK_STREAM)
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        families = {info[0] for info in ours}
        family, kind, proto, _, address = next(
            (info for info in infos if info[0] in families), infos[0]
        )
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.address[0], 0))
            await loop.sock_connect(sock, address)
            return await loop.create_connection(
                lambda: ChannelProtocol(self, upgraded=False),
                sock=sock,
                ssl=context,
                server_hostname=host if context is not None else None,
            )
        except BaseException:
            sock.close()
            raise

    async def _probe(self) -> None:
        """Whether the primary answers; if it does, tell it that we listen (a nudge,
        ``POST /kvrepl/listening``), so that it connects now rather than when its
        back-off says (up to ``retry_max`` later)."""
        core = self.core
        assert isinstance(core, BackupCore)

        def answered() -> None:  # before the stage moves: the nudge travels meanwhile
            core.probe_result(self.clock(), True)
            core.drain(self)

        if not await self._nudge(self.peer_address, answered):
            core.probe_result(self.clock(), False)
            core.drain(self)

    async def _nudge(
        self, primary: tuple[str, int], connected: Callable[[], None] | None = None
    ) -> bool:
        """Send the nudge to ``primary``; False if it could not be reached."""
        host, port = primary
        timeout = self.settings.peer_timeout
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (TimeoutError, OSError):
            return False
        context = tls.channel_context(self.settings)
        if context is None:
            writer.write(self._nudge_request(primary))
        if connected is not None:
            connected()
        try:
            async with asyncio.timeout(timeout):
                if context is not None:
                    await writer.start_tls(context, server_hostname=host)
                    writer.write(self._nudge_request(primary))
                answer = await reader.readline()
            log.debug("the primary answered the nudge: %r", answer[:80])
        except (TimeoutError, OSError) as exc:
            log.debug("no answer to the nudge: %s", exc or type(exc).__name__)
        finally:
            writer.close()
        return True

    def _nudge_request(self, primary: tuple[str, int]) -> bytes:
        host, port = primary
        token = self.settings.client_token
        authorization = b"" if token is None else b"Authorization: Bearer %s\r\n" % token.encode()
        return b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Length: 0\r\n%s\r\n" % (
            LISTENING_PATH,
            host.encode(),
            port,
            authorization,
        )

    async def _pump(self) -> None:
        """Send a transfer a few frames at a time, yielding between them."""
        self._pumping = True
        try:
            while True:
                channel = self.channel
                if channel is None:
                    return
                more = self.core.pump_transfer(self.clock(), PUMP_FRAMES)
                self.core.drain(self)
                if not more:
                    return
                await channel.wait_writable()
                await asyncio.sleep(0)
        finally:
            self._pumping = False


def boot_clock() -> float:
    """Seconds on a monotonic clock that includes suspended time (Linux's BOOTTIME)."""
    return time.clock_gettime(CLOCK_BOOTTIME)


CLOCK_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def _close_if_connected(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result()[0].close()


def store_kind(core: PrimaryCore | BackupCore) -> str:
    return f"{core.store.kind}, {core.store.shard_count} shards"


def log_trust(settings: config.Settings) -> None:
    """One line at start saying how this server tells its peer and its owner apart."""
    transport = "TLS" if settings.tls else "plain TCP (no encryption)"
    if settings.secret is None:
        log.warning(
            "no secret set: protected mode (replication only from %s, shutdown only from "
            "127.0.0.1, ::1 and the configured addresses); channel over %s",
            settings.primary,
            transport,
        )
    else:
        log.info("secret set; channel over %s", transport)


def _peername(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return "%s:%d" % peer[:2] if peer else "?"
