"""What the replication cores of both roles share: the channel bookkeeping
(handshake dispatch, heartbeats, peer silence, transfers, losing the channel)
and the reads.

The cores are sans-I/O.  A driver calls their methods with the current time
and carries out the actions they queue in ``outbox`` (see ``actions.py``).
The core holds the channel's codec: the driver hands it the bytes that arrive
(:meth:`ReplicationCore.bytes_received`) and writes the bytes of each ``Send``.
Every frame goes through one dispatch, :meth:`ReplicationCore.frame_received`,
which reads the handshake table of ``stages.py``; every loss of the channel
goes through :meth:`ReplicationCore.lose_channel` (we close it) or
:meth:`ReplicationCore.channel_closed` (the driver saw it close), and fires
exactly one stage event.

Epochs (a coordinated cluster's leadership terms; 0 everywhere without a
coordinator): every frame carries the epoch its sender acts under, and a
channel lives in one epoch, the primary's.  Each core keeps ``epoch`` (the one
it acts under: a primary's own, a backup's highest seen), ``epoch_seen`` and
``copy_epoch`` (the epoch its data was last confirmed under).  From the HELLO
on, a frame of a lower epoch than the highest seen loses the channel and
nothing in it is applied; a higher one is adopted as seen, and ends a channel
of a lower epoch (a primary that sees a newer epoch is stale: it steps down).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import xxhash

from pbkv import auth
from pbkv.actions import (
    Action,
    CloseChannel,
    Driver,
    Persist,
    PersistAll,
    PumpTransfer,
    Send,
    StartTimer,
    SyncChanged,
    Timer,
    carry_out,
)
from pbkv.commands import Command, Counted, Done, Dumped, MemoryFull, Outcome, Refused
from pbkv.config import Settings
from pbkv.persist.log import Record
from pbkv.persist.log import State as DiskState
from pbkv.persist.table import batch_extra
from pbkv.stages import (
    HANDSHAKES,
    Copy,
    Event,
    Handshake,
    ReadRule,
    Resync,
    Role,
    Stage,
    StageMachine,
    State,
    Step,
)
from pbkv.store import PAIR_OVERHEAD, ShardedStore, shard_of
from pbkv.text import PEER_TEXT_CHARS, UNPROVEN_PEER_TEXT_CHARS, printable
from pbkv.transfer import SnapshotReceiver, SnapshotSender
from pbkv.wire import (
    CONTROL_LIMIT,
    AuthFailed,
    Frame,
    FrameCodec,
    FrameError,
    FrameLimit,
    FrameType,
    Heartbeat,
    Hello,
    ShardEnd,
    SyncNack,
    frame_limits,
    reason_text,
)

log = logging.getLogger(__name__)

# A batch closes at this many writes, or past this many characters of keys and values;
# a transfer chunk past this many characters (or at ``transfer_chunk`` pairs).
BATCH_WRITES = 4096
BATCH_CHARS = 1 << 20
CHUNK_CHARS = 1 << 20

MISS = Done(False, "")
# The outcome of an insert or update by whether it applies: made once, not per write.
DONE = {True: Done(True), False: Done(False)}


def growth(command: Command, key: str, value: str, current: str | None) -> int:
    """The bytes a write adds to a store that holds ``current`` for ``key`` (0 if none)."""
    if current is None:
        return len(key) + len(value) + PAIR_OVERHEAD if command is Command.INSERT else 0
    return max(0, len(value) - len(current)) if command is Command.UPDATE else 0


def next_history(primary: int, backup: int, kept: bool) -> int:
    """The history id both sides hold after a sync: unchanged when no data was replaced
    (a skip or a rollback within one history), else new, and the same on both sides."""
    if kept and primary == backup:
        return primary
    return xxhash.xxh3_64_intdigest(primary.to_bytes(8, "big") + backup.to_bytes(8, "big"))


class Backoff:
    """Doubling retry delay with jitter, reset by a success."""

    def __init__(self, first: float, ceiling: float, rng: random.Random) -> None:
        self.first, self.ceiling, self._rng = first, ceiling, rng
        self._next = first

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self.ceiling, self._next * 2)
        return delay * (0.5 + self._rng.random() / 2)

    def reset(self) -> None:
        self._next = self.first


class ReplicationCore:
    """Channel bookkeeping common to both roles."""

    role: Role

    def __init__(
        self,
        settings: Settings,
        store: ShardedStore,
        initial: Stage,
        now: float,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        table = store.idempotency  # its bounds are the settings' (one settings file for both)
        table.capacity = settings.idempotency_keys
        table.ttl_ms = int(settings.idempotency_ttl * 1000)
        self.rng = rng or random.Random()
        self.incarnation = self.rng.getrandbits(63)
        # The lineage of our data (Redis's replication id): new on every restart and
        # whenever the data is replaced; a partial resync needs both sides to share it.
        self.history = self.rng.getrandbits(64)
        self.resyncs_partial = 0  # syncs by a rollback of the backup
        self.resyncs_full = 0  # syncs by a full transfer
        self.machine = StageMachine(self.role, initial, self._log_transition)
        self.handshake = Handshake(self.role)
        self.outbox: list[Action] = []
        self._sync_news = False  # a SyncChanged is queued (see ``note_sync_changed``)
        self.started_at = now
        self.now = now
        self.backoff = Backoff(settings.retry_min, settings.retry_max, self.rng)
        # Whether our data is a copy a peer has verified (see the README).
        self.confirmed = False
        # The epoch we act under, the highest one seen, and the one our data was last
        # confirmed under (all 0 without a coordinator).
        self.epoch = 0
        self.epoch_seen = 0
        self.copy_epoch = 0
        # With persistence: our data was loaded from disk at start and no peer has
        # confirmed it yet (a *recovered* copy: see ``stages.plan``).
        self.recovered = False
        self.persistent = settings.persistent
        # With a coordinator: this server's member name, in its HELLO ("" without one).
        self.member = ""
        self.seq = 0  # last replicated batch applied here
        self.peer_seq = 0  # the peer's seq, from its last hello/heartbeat
        self.channel_up = False
        # This channel's codec (None without a channel): plain frames, keyed once
        # both proofs are held.
        self.codec: FrameCodec | None = None
        self.peer_hello: Hello | None = None
        self.last_received = now
        self.last_sent = now
        self.sender: SnapshotSender | None = None
        self.receiver: SnapshotReceiver | None = None
        self.transfers_completed = 0
        self.transfers_failed = 0
        # When the transfer under way began (receiving side), and how long the last took.
        self.transfer_began: float | None = None
        self.last_transfer_seconds = 0.0
        self.last_transfer_error = ""
        # The shards of a copy being received that have fully arrived (warm start reads).
        self.complete_shards: set[int] = set()
        self.max_memory = settings.max_memory
        # What the writes not yet acknowledged will add to the store (the primary's
        # queued and in-flight batches): a running sum, so admission stays O(1).
        self.pending_write_bytes = 0
        # The handler of each frame type; the handshake table says when it may run.
        self.handlers: dict[FrameType, Callable[[Any], Step]] = {
            FrameType.HEARTBEAT: self._heartbeat,
            FrameType.SYNC_NACK: self._refused_by_peer,
            FrameType.AUTH_FAILED: self._authentication_refused,
        }
        # Authentication (with a secret): this channel's nonces, and whether it is done.
        self.secret = settings.secret
        self.nonces: dict[Role, bytes] = {}
        # No secret, or both proofs held: heartbeats may go out, a HELLO may count.
        self.past_authentication = False
        # The largest frame each step accepts (small ones only until the HELLO).
        per_type = frame_limits(
            settings.max_key_bytes,
            settings.max_value_bytes,
            BATCH_WRITES,
            BATCH_CHARS,
            settings.transfer_chunk,
            CHUNK_CHARS,
        )
        self.frame_limits: dict[Step, FrameLimit] = {}
        for step, frames in HANDSHAKES[self.role].items():
            limit = CONTROL_LIMIT
            for kind in frames:
                limit = limit | per_type[kind]
            self.frame_limits[step] = limit

    # -- helpers -------------------------------------------------------------------
    @property
    def stage(self) -> Stage:
        return self.machine.stage

    @property
    def step(self) -> Step:
        return self.handshake.step

    def _log_transition(self, old: Stage, new: Stage, reason: str) -> None:
        log.info(
            "%s stage %s -> %s (%s) peer=%s",
            self.role,
            old.value,
            new.value,
            reason,
            self.role.peer,
        )

    def fire(self, event: Event, reason: str) -> None:
        self.machine.fire(event, reason)

    def stamped(self, frame: Frame) -> Frame:
        """``frame`` under the epoch we act under (every frame we send carries it)."""
        return frame if frame.epoch == self.epoch else replace(frame, epoch=self.epoch)

    def send(self, frame: Frame) -> None:
        """Encode now (frames after the proofs are keyed) and queue the bytes."""
        codec = self.codec
        if codec is None:  # no channel: nothing to say it on
            return
        frame = self.stamped(frame)
        self.last_sent = self.now
        self.outbox.append(Send(codec.encode(frame), frame))

    def hello_frame(self) -> Hello:
        store = self.store
        return Hello(
            self.role,
            self.confirmed,
            store.checksum,
            len(store),
            self.seq,
            self.history,
            self.undo_points(),
            self.copy_epoch,
            self.member,
            self.recovered,
            epoch=self.epoch,
        )

    def own_copy(self) -> Copy:
        """What we hold, as the handshake rules of ``stages.py`` see it."""
        store = self.store
        undo = tuple(State(*point) for point in self.undo_points())
        return Copy(
            self.confirmed,
            self.history,
            self.seq,
            store.checksum,
            len(store),
            undo,
            self.copy_epoch,
            self.epoch,
            self.recovered,
            self.record_states(),
        )

    def record_states(self) -> tuple[State, ...]:
        """The states our recorded batches lead on from (the primary's, ``catchup.py``)."""
        return ()

    def undo_points(self) -> tuple[tuple[int, int, int], ...]:
        """The (seq, checksum, count) states we can roll back to (the backup's)."""
        return ()

    def note_resync(self, resync: Resync, hello: Hello) -> None:
        """A sync is confirmed: the history both sides hold now, and the counters."""
        if self.role is Role.PRIMARY:
            primary, backup = self.history, hello.history
        else:
            primary, backup = hello.history, self.history
        self.history = next_history(primary, backup, resync is not Resync.FULL)
        if resync is Resync.FULL:
            self.resyncs_full += 1
        elif resync is Resync.PARTIAL:
            self.resyncs_partial += 1

    # -- persistence (only with ``persistence`` set) ---------------------------------
    def persist_batch(
        self, seq: int, ops: list[str | None], time: int, keyed: list[Any] | None
    ) -> None:
        """Log a batch just applied, its idempotency entries and time with it (before
        anything that acknowledges it is queued)."""
        if self.persistent:
            extra = batch_extra(time, keyed)
            self.outbox.append(
                Persist(Record.batch(self.history, seq, self.copy_epoch, ops, extra))
            )

    def persist_rollback(self, seq: int) -> None:
        """Log that the batches after ``seq`` were undone."""
        if self.persistent:
            state = DiskState(self.history, seq, self.copy_epoch)
            self.outbox.append(Persist(Record.rollback(state)))

    def persist_synced(self, replaced: bool) -> None:
        """A sync is confirmed: our data's new state (history, seq, epoch) is logged as a
        mark, or with ``replaced`` (a transfer brought it) the whole store becomes the new
        base.  Queued before the frame that confirms the sync."""
        self.recovered = False  # confirmed now, which says more
        if self.persistent:
            state = DiskState(self.history, self.seq, self.copy_epoch)
            self.outbox.append(PersistAll(state) if replaced else Persist(Record.mark(state)))

    def disk_state(self) -> DiskState:
        """Our data's state as the records name it (a first start's empty base is at it)."""
        return DiskState(self.history, self.seq, self.copy_epoch)

    def batch_recovered_handler(self) -> Callable[[Record], None] | None:
        """What takes the batches of our log that a rollback may undo at start (a backup
        keeps what undoes them, as in memory); None: they are applied as they are."""
        return None

    def recovered_from(self, state: DiskState) -> None:
        """Our store was loaded from disk at start, up to ``state``: a *recovered* copy
        (see ``stages.plan``), until a peer confirms it."""
        self.history, self.seq, self.copy_epoch = state.history, state.seq, state.epoch
        self.recovered = True

    def start_tick(self) -> None:
        self.outbox.append(StartTimer(Timer.TICK, self.settings.heartbeat_interval))

    def note_sync_changed(self) -> None:
        """Who is in sync changed: queue ``SyncChanged``, which :meth:`take_actions`
        hands out after the other actions queued with it. With a coordinator the
        driver may change the role on it (``pbkv.roles``: a new core around the
        store), so every action of this core must have been carried out by then."""
        self.outbox.append(SyncChanged())
        self._sync_news = True

    def take_actions(self) -> list[Action]:
        actions, self.outbox = self.outbox, []
        if self._sync_news:
            self._sync_news = False
            actions.sort(key=lambda action: type(action) is SyncChanged)  # stable
        return actions

    def drain(self, driver: Driver) -> None:
        """Carry out every queued action, and those they queue in turn."""
        while self.outbox:
            carry_out(self.take_actions(), driver)

    def tick(self) -> None:
        """Heartbeats and peer silence; subclasses add their own checks."""
        if self.channel_up:
            if self.now - self.last_received > self.settings.peer_timeout:
                self.lose_channel(f"{self.role.peer} silent for {self.settings.peer_timeout}s")
            elif (
                self.past_authentication
                and self.now - self.last_sent >= self.settings.heartbeat_interval * 0.9
            ):
                self.send(Heartbeat(self.seq))
        self.start_tick()

    def frame_limit(self) -> FrameLimit:
        """How large the next frame from the peer may be."""
        return self.frame_limits[self.step]

    # -- authentication (with a secret) ----------------------------------------------
    def proof(self) -> bytes:
        assert self.secret is not None
        nonces = self.nonces
        return auth.proof(self.secret, self.role, nonces[Role.PRIMARY], nonces[Role.BACKUP])

    def peer_proof_holds(self, received: bytes) -> bool:
        assert self.secret is not None
        nonces = self.nonces
        primary, backup = nonces[Role.PRIMARY], nonces[Role.BACKUP]
        return auth.verify_proof(self.secret, self.role.peer, primary, backup, received)

    def authenticated(self) -> None:
        """Both proofs held: every frame from now on is keyed."""
        assert self.secret is not None
        nonces = self.nonces
        keys = auth.channel_keys(self.secret, nonces[Role.PRIMARY], nonces[Role.BACKUP])
        assert self.codec is not None, "authentication happens on a channel"
        self.codec.secure(*keys.for_role(self.role))
        self.past_authentication = True
        log.info("%s authenticated the %s: the channel is keyed", self.role, self.role.peer)

    def peer_text(self, text: str) -> str:
        """A peer's own words as they may reach our log: printable ASCII, bounded (tighter
        before the peer proved who it is), so no forged line or escape sequence gets in."""
        limit = PEER_TEXT_CHARS if self.past_authentication else UNPROVEN_PEER_TEXT_CHARS
        return printable(text, limit)

    def refuse_authentication(self, reason: str) -> Step:
        """Say why (so the peer's log does too), close, and start over."""
        self.send(AuthFailed(reason_text(reason)))
        self.lose_channel(reason)
        return Step.NONE

    def _authentication_refused(self, frame: AuthFailed) -> Step:
        said = self.peer_text(frame.reason)
        self.lose_channel(f"the {self.role.peer} refused authentication: {said}")
        return Step.NONE

    # -- client requests (both roles) ----------------------------------------------
    def may_read(self, command: Command, key: str) -> bool:
        """The one reading of the stage's ``ReadRule``."""
        rule = self.machine.acceptance.reads
        if rule is ReadRule.SERVE:
            return True
        if rule is ReadRule.SERVE_IF_CONFIRMED:
            return self.confirmed
        if rule is ReadRule.SERVE_IF_SHARD_COMPLETE:
            # The answer, a miss included, is certainly right only from a whole shard.
            complete = self.complete_shards
            if len(complete) == self.store.shard_count:
                return True
            return command is Command.GET and shard_of(key, self.store.shard_count) in complete
        return False

    def visible(self, key: str) -> str | None:
        """The value a new write of ``key`` finds (the primary's includes writes in flight)."""
        return self.store.get(key)

    def memory_full(self, command: Command, key: str, value: str) -> MemoryFull | None:
        """Refuse a write that would take the store past ``max_memory`` (like Redis's
        ``maxmemory`` with ``noeviction``): deletes and shrinking updates still pass."""
        return self.over_memory(growth(command, key, value, self.visible(key)))

    def over_memory(self, grow: int) -> MemoryFull | None:
        """The store plus the writes not yet acknowledged (they will be in it, or are in
        the batches meanwhile) plus ``grow`` bytes would pass ``max_memory``."""
        limit = self.max_memory
        if grow > 0 and self.store.memory_bytes + self.pending_write_bytes + grow > limit:
            return MemoryFull(limit)
        return None

    def read(self, command: Command, key: str = "") -> Outcome:
        if not self.may_read(command, key):
            return Refused(self.stage, self.role)
        store = self.store
        if command is Command.GET:
            value = store.get(key)
            return MISS if value is None else Done(True, value)
        if command is Command.COUNT:
            return Counted(len(store))
        return Dumped(store)  # streamed: the HTTP layer copies a shard at a time

    # -- transfers -----------------------------------------------------------------
    def start_sending_snapshot(self) -> None:
        self.sender = SnapshotSender(
            self.store, self.settings.transfer_chunk, self.seq, CHUNK_CHARS
        )
        log.info(
            "%s transfer to %s started: %d pairs", self.role, self.role.peer, self.sender.total
        )
        self.outbox.append(PumpTransfer())

    def pump_transfer(self, now: float, max_frames: int = 8) -> bool:
        """Queue the next few frames of the transfer; False once all are queued."""
        self.now = now
        sender = self.sender
        if sender is None or not self.channel_up:
            return False
        for frame in sender.next_frames(max_frames):
            self.send(frame)
        if sender.done:
            log.info("%s transfer to %s sent: %d pairs", self.role, self.role.peer, sender.total)
            self.sender = None
            return False
        return True

    def receive_transfer_frame(self, frame: Frame) -> int | None:
        """Feed the receiver one frame (raises TransferError); log each verified shard."""
        receiver = self.receiver
        assert receiver is not None
        checksum = receiver.feed(frame)
        if type(frame) is ShardEnd:
            log.info(
                "%s transfer from %s: shard %d/%d verified, %d/%d pairs",
                self.role,
                self.role.peer,
                frame.shard + 1,
                receiver.sender_shards,
                receiver.received,
                receiver.expected_total,
            )
        return checksum

    def fail_transfer(self, reason: str, tell_peer: bool = True) -> None:
        """The one path of a failed transfer: tell the peer, close, count, one event."""
        log.warning("%s transfer failed: %s peer=%s", self.role, reason, self.role.peer)
        if tell_peer and self.channel_up:
            self.send(SyncNack(reason_text(reason)))
        self.lose_channel(reason, Event.TRANSFER_FAILED)

    def _refused_by_peer(self, frame: SyncNack) -> Step:
        said = self.peer_text(frame.reason)
        self.fail_transfer(f"{self.role.peer} refused the transfer: {said}", False)
        return Step.NONE

    def _heartbeat(self, frame: Heartbeat) -> Step:
        self.peer_seq = frame.seq
        return self.step

    # -- epochs --------------------------------------------------------------------
    def channel_epoch(self) -> int | None:
        """The epoch of this channel (its primary's); None while it is not yet known."""
        raise NotImplementedError

    def epoch_observed(self, now: float, epoch: int) -> None:
        """A leadership of ``epoch`` exists: the coordinator named a leader (the driver
        calls this), or a frame past authentication carried it.  The highest seen
        rises, and a channel of a lower epoch is lost at once."""
        self.now = now
        seen = self.epoch_seen
        if epoch <= seen:
            return
        self.epoch_seen = epoch
        log.info("%s saw epoch %d (the highest before: %d)", self.role, epoch, seen)
        self.on_epoch_seen(epoch)
        channel = self.channel_epoch()
        if self.channel_up and channel is not None and channel < epoch:
            self.lose_channel(f"epoch {channel} < {epoch} seen")

    def _epoch_admits(self, frame: Frame) -> bool:
        """Whether a frame's epoch lets it through: a newer one is adopted first (which
        may end this channel); an older one ends it, with nothing in it applied."""
        epoch = frame.epoch
        if epoch > self.epoch_seen:
            self.epoch_observed(self.now, epoch)
            if not self.channel_up:
                return False
        if epoch < self.epoch_seen:
            self.refuse_epoch(frame, f"epoch {epoch} < {self.epoch_seen} seen")
            return False
        return True

    def refuse_epoch(self, frame: Frame, reason: str) -> None:
        """A frame of an older epoch than we have seen: the channel goes."""
        log.warning("%s refused a %s: %s", self.role, frame.kind.name, reason)
        self.lose_channel(reason)

    # -- events every driver delivers ----------------------------------------------
    def bytes_received(self, now: float, data: bytes) -> None:
        """Bytes from the channel: handle every complete frame, each bounded by what
        its step accepts; a bad frame loses the channel (the bytes after it with it)."""
        codec = self.codec
        if codec is None:
            return
        codec.receive(data)
        self.read_frames(now)

    def read_frames(self, now: float) -> None:
        """Handle the complete frames the codec holds, one at a time."""
        codec = self.codec
        while codec is not None and codec is self.codec:  # a handler may lose the channel
            try:
                frame = codec.next_frame(self.frame_limits[self.handshake.step])
            except FrameError as exc:
                self.now = now
                self.lose_channel(f"bad frame: {exc}")
                return
            if frame is None:
                return
            self.frame_received(now, frame)

    def frame_received(self, now: float, frame: Frame) -> None:
        self.now = now
        self.last_received = now
        if not self.channel_up:
            return
        kind = frame.kind
        if not self.handshake.accepts(kind):
            self.lose_channel(f"unexpected {kind.name} in handshake step {self.step.value}")
            return
        # From an authenticated HELLO on (before it: only the proofs and heartbeats, which
        # change nothing).
        if (
            self.past_authentication
            and (self.peer_hello is not None or kind is FrameType.HELLO)
            and not self._epoch_admits(frame)
        ):
            return
        new = self.handlers[kind](frame)
        if self.channel_up:  # a handler that lost the channel has reset the step
            self.handshake.advance(kind, new)

    def timer_fired(self, now: float, timer: Timer) -> None:
        self.now = now
        if timer is Timer.TICK:
            self.tick()
        else:
            raise ValueError(f"the {self.role} starts no {timer.value} timer")

    def channel_closed(self, now: float, reason: str) -> None:
        """The driver saw the channel close (EOF, reset, bad frame)."""
        self.now = now
        if self.channel_up:
            self._channel_lost(reason, Event.PEER_LOST)

    def lose_channel(self, reason: str, event: Event = Event.PEER_LOST) -> None:
        """Close the channel ourselves; ``event`` is the stage event it fires."""
        if self.channel_up:
            self.outbox.append(CloseChannel(reason))
            self._channel_lost(reason, event)

    def _channel_lost(self, reason: str, event: Event) -> None:
        # A channel lost mid-transfer (a corrupted frame, silence) fails the transfer.
        if event is Event.TRANSFER_FAILED or self.sender is not None or self.receiver is not None:
            self.transfers_failed += 1
            self.last_transfer_error = reason
        self.channel_up = False
        self.codec = None
        self.handshake.reset()
        self.nonces.clear()
        self.past_authentication = False
        self.peer_hello = None
        self.sender = None
        self.receiver = None
        self.transfer_began = None
        self.on_channel_lost(reason)
        self.fire(event, reason)

    def opened(self, now: float) -> None:
        self.now = now
        self.channel_up = True
        self.codec = FrameCodec()
        self.last_received = now
        self.handshake.opened(authenticate=self.secret is not None)
        self.past_authentication = self.secret is None

    # -- for subclasses ------------------------------------------------------------
    def on_channel_lost(self, reason: str) -> None:
        """What the role does when the channel goes, before the stage event fires."""

    def on_epoch_seen(self, epoch: int) -> None:
        """What the role does when the highest epoch seen rises (before a channel of a
        lower one is lost)."""

    def status(self, now: float) -> dict[str, Any]:
        self.now = now
        return {
            "role": self.role.value,
            "stage": self.stage.value,
            "handshake": self.step.value,
            "keys": len(self.store),
            "checksum": f"{self.store.checksum:032x}",
            "confirmed": self.confirmed,
            "recovered": self.recovered,
            "epoch": self.epoch,
            "epoch_seen": self.epoch_seen,
            "copy_epoch": self.copy_epoch,
            "seq": self.seq,
            "peer_seq": self.peer_seq,
            "peer_connected": self.channel_up and self.peer_hello is not None,
            "uptime": round(self.now - self.started_at, 3),
            "incarnation": f"{self.incarnation:016x}",
            "history": f"{self.history:016x}",
            "resyncs_partial": self.resyncs_partial,
            "resyncs_full": self.resyncs_full,
            "transfers_completed": self.transfers_completed,
            "transfers_failed": self.transfers_failed,
            "last_transfer_seconds": round(self.last_transfer_seconds, 3),
            "pending_write_bytes": self.pending_write_bytes,
            "idempotency_entries": len(self.store.idempotency),
            "last_transfer_error": self.last_transfer_error,
        }
