"""The backup's replication core (sans-I/O).

The primary always opens the channel and says what happens next: it sends
its data (we go to warm start and receive it), asks for ours (FETCH, allowed
only while we hold a confirmed copy), or proposes to skip the transfer
because both sides already hold the same data.  In sync we apply each batch
as upserts and deletes, whatever the key's current state, and acknowledge it.
When the primary goes away we keep our data and wait for it.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pbkv.actions import (
    CloseCandidate,
    Discard,
    Probe,
    Promote,
    SendToCandidate,
    StartTimer,
    Timer,
)
from pbkv.candidates import MAX_CANDIDATES, Candidate, Unproven
from pbkv.commands import Command, Outcome, Refused, Reply
from pbkv.config import Settings
from pbkv.core import ReplicationCore
from pbkv.idempotency import TableUndo
from pbkv.limits import LogThrottle
from pbkv.persist.log import Record
from pbkv.persist.table import batch_of
from pbkv.stages import Copy, Directive, Event, Resync, Role, Stage, State, Step, refusal
from pbkv.store import ShardedStore, without_pairs
from pbkv.transfer import SnapshotReceiver, TransferError
from pbkv.wire import (
    MAX_UNDO_POINTS,
    Ack,
    AuthChallenge,
    AuthFailed,
    Batch,
    Catchup,
    Fence,
    Fetch,
    Frame,
    FrameError,
    FrameType,
    Hello,
    Rollback,
    Skip,
    SnapshotBegin,
    SyncAck,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Undo:
    """What undoes one applied batch: its writes and each key's value before them.

    Kept as tuples, untracked by the garbage collector once it has seen them (as the
    primary's record of applied batches, ``catchup.py``): the record holds up to
    ``undo_bytes`` of them, which a full collection would otherwise walk item by item."""

    seq: int
    ops: tuple[str | None, ...]
    olds: tuple[str | None, ...]
    checksum_before: int
    count_before: int
    size: int  # bytes, roughly: what the undo record holds for it
    # The batch's time and idempotency entries, and what undoes them in the table.
    time: int = 0
    keyed: list[Any] | None = None
    table: TableUndo | None = None

    def __init__(  # compiled: see ``compiled.py``
        self,
        seq: int,
        ops: tuple[str | None, ...],
        olds: tuple[str | None, ...],
        checksum_before: int,
        count_before: int,
        size: int,
        time: int = 0,
        keyed: list[Any] | None = None,
        table: TableUndo | None = None,
    ) -> None:
        self.seq = seq
        self.ops = ops
        self.olds = olds
        self.checksum_before = checksum_before
        self.count_before = count_before
        self.size = size
        self.time = time
        self.keyed = keyed
        self.table = table


class BatchTap(Protocol):
    """Who hears of the batches this backup applies (its followers: ``following.py``)."""

    def applied(self, frame: Batch) -> None:
        """Batch ``frame`` was applied (its ACK is queued first: never delay it)."""

    def reset(self, reason: str) -> None:
        """Our data changed otherwise than by a batch: the stream heard so far ends."""


def _undo_size(ops: tuple[str | None, ...], olds: tuple[str | None, ...]) -> int:
    # In C loops (a load's batches hold thousands of pairs): None counts as empty.
    text = sum(map(len, filter(None, ops))) + sum(map(len, filter(None, olds)))
    return text + 100 * len(olds)  # object and list overheads, roughly


class BackupCore(ReplicationCore):
    role = Role.BACKUP

    def __init__(
        self,
        settings: Settings,
        store: ShardedStore,
        now: float,
        rng: random.Random | None = None,
    ) -> None:
        initial = Stage(settings.backup_initial_stage)
        super().__init__(settings, store, initial, now, rng)
        self.primary_address = "%s:%d" % settings.address_of("primary")
        self.batches_applied = 0
        # The last batches applied, oldest first, to undo those the primary never applied
        # (their acknowledgement was lost) instead of copying the whole database again.
        self.undo: deque[Undo] = deque()
        self.undo_size = 0
        # Catching up (the CATCHUP directive): the state the last batch must reach.
        self.catchup_target: State | None = None
        self.catchups = 0  # syncs by catching up (a part of resyncs_partial)
        self.tap: BatchTap | None = None
        self.handlers.update(
            {
                FrameType.HELLO: self._hello,
                FrameType.BATCH: self._apply_batch,
                FrameType.SNAPSHOT_BEGIN: self._begin_receiving,
                FrameType.SHARD_CHUNK: self._transfer_frame,
                FrameType.SHARD_END: self._transfer_frame,
                FrameType.IDEMPOTENCY_CHUNK: self._transfer_frame,
                FrameType.SNAPSHOT_END: self._transfer_frame,
                FrameType.SKIP: self._skip,
                FrameType.ROLLBACK: self._rollback,
                FrameType.CATCHUP: self._catch_up,
                FrameType.FETCH: self._fetch,
                FrameType.SYNC_ACK: self._final_ack,
                FrameType.FENCE: self._fenced,
                FrameType.AUTH_CHALLENGE: self._challenge,
            }
        )
        # With a secret: new channels still proving it, oldest first (``candidates.py``).
        self.candidates: dict[int, Candidate] = {}
        self.candidates_refused = 0
        self._unproven_log = LogThrottle(per_window=5, window=1.0)

    # -- lifecycle ---------------------------------------------------------------
    def start(self, now: float) -> None:
        self.now = now
        if self.settings.backup_initial_stage == Stage.COLD_START.value:
            self.outbox.append(Probe())
        self.start_tick()

    def probe_result(self, now: float, primary_running: bool) -> None:
        self.now = now
        if primary_running:
            self._wait_for_primary()
            self.fire(Event.PRIMARY_RUNNING, f"primary answers at {self.primary_address}")
        else:
            self.fire(Event.PRIMARY_ABSENT, f"no primary at {self.primary_address}")

    def channel_opened(self, now: float, candidate: int = 0) -> None:
        """A channel from the primary's address.  Without a secret it replaces the live
        one at once (the address check is the proof).  With one, it is ``candidate``
        (the driver's number for it) until it proves the secret: the live channel
        serves meanwhile (see ``candidates.py``)."""
        self.now = now
        if self.secret is None:
            self.lose_channel("replaced by a new connection from the primary")
            self.opened(now)
            return
        while len(self.candidates) >= MAX_CANDIDATES:
            oldest = next(iter(self.candidates.values()))
            self._refuse_candidate(
                oldest,
                Unproven(f"over {MAX_CANDIDATES} channels proving the secret: the oldest closes"),
            )
        self.candidates[candidate] = Candidate(candidate, self.secret, now)

    def candidate_bytes(self, now: float, candidate: int, data: bytes) -> None:
        """Bytes from a channel still proving the secret: its own codec and step, and
        only the small frames of the proofs."""
        self.now = now
        newcomer = self.candidates.get(candidate)
        if newcomer is None:
            return
        codec = newcomer.codec
        codec.receive(data)
        while not newcomer.proven:
            try:
                frame = codec.next_frame(self.frame_limits[newcomer.step])
                if frame is None:
                    return
                answer = newcomer.handle(frame)
            except FrameError as exc:
                self._refuse_candidate(newcomer, Unproven(f"bad frame: {exc}", tell_peer=False))
                return
            except Unproven as refused:
                self._refuse_candidate(newcomer, refused)
                return
            if answer is not None:
                answer = self.stamped(answer)
                self.outbox.append(SendToCandidate(candidate, codec.encode(answer), answer))
        self._promote(newcomer)

    def candidate_closed(self, now: float, candidate: int) -> None:
        """The driver saw a candidate channel close: forget it (nothing else changes)."""
        self.now = now
        self.candidates.pop(candidate, None)

    def _refuse_candidate(self, newcomer: Candidate, refused: Unproven) -> None:
        """Close a candidate alone; the live channel is untouched.  Logged at most a few
        times a second: a flood of them must not flood the log."""
        del self.candidates[newcomer.id]
        self.candidates_refused += 1
        if refused.tell_peer:
            answer = AuthFailed(refused.reason, epoch=self.epoch)
            self.outbox.append(SendToCandidate(newcomer.id, newcomer.codec.encode(answer), answer))
        self.outbox.append(CloseCandidate(newcomer.id, refused.reason))
        skipped = self._unproven_log.allow(self.now)
        if skipped is not None:
            log.warning(
                "backup closed a new channel that did not prove the secret: %s%s",
                refused.reason,
                f" (and {skipped} more since the last such line)" if skipped else "",
            )

    def _promote(self, newcomer: Candidate) -> None:
        """A candidate's proof holds: it replaces the live channel, keyed, awaiting the
        primary's HELLO; the bytes that followed the proof are handled on it."""
        del self.candidates[newcomer.id]
        self.lose_channel("replaced by a new connection from the primary, which proved the secret")
        self.channel_up = True
        self.codec = newcomer.codec
        self.handshake = newcomer.handshake
        self.nonces.update(newcomer.nonces)
        self.past_authentication = True
        self.last_received = self.now
        self.outbox.append(Promote(newcomer.id))
        log.info("backup authenticated the primary: the channel is keyed")
        self.read_frames(self.now)

    def tick(self) -> None:
        for newcomer in list(self.candidates.values()):
            if self.now - newcomer.opened_at > self.settings.peer_timeout:
                self._refuse_candidate(
                    newcomer, Unproven(f"no proof within {self.settings.peer_timeout}s")
                )
        super().tick()

    def _channel_lost(self, reason: str, event: Event) -> None:
        if self.receiver is not None:  # a copy received in part, freed a shard per turn
            self.outbox.append(Discard(self.receiver.store.release()))
        super()._channel_lost(reason, event)

    def on_channel_lost(self, reason: str) -> None:
        self._end_catchup()
        self._wait_for_primary()

    # -- epochs ------------------------------------------------------------------
    def channel_epoch(self) -> int | None:
        hello = self.peer_hello
        return None if hello is None else hello.epoch

    def on_epoch_seen(self, epoch: int) -> None:
        self.epoch = epoch  # we follow no primary of an older one

    def refuse_epoch(self, frame: Frame, reason: str) -> None:
        if frame.kind is FrameType.HELLO:  # ours tells the primary the epoch it is behind
            self.send(self.hello_frame())
        super().refuse_epoch(frame, reason)

    def _wait_for_primary(self) -> None:
        # Waiting for a primary that a probe found, or that left mid-handshake.
        self.outbox.append(StartTimer(Timer.WAIT_PRIMARY, self.settings.peer_timeout))

    def timer_fired(self, now: float, timer: Timer) -> None:
        if timer is Timer.WAIT_PRIMARY:
            self.now = now
            if not self.channel_up:
                self.fire(Event.NO_PRIMARY_IN_TIME, f"no primary for {self.settings.peer_timeout}s")
            return
        super().timer_fired(now, timer)

    # -- client requests: reads only -----------------------------------------------
    def submit(
        self,
        command: Command,
        key: str,
        value: str | None,
        reply: Reply,
        idempotency: str | None = None,
    ) -> Outcome:
        # A write past max_memory is refused for that first, on either role.
        if self.max_memory and value is not None:
            full = self.memory_full(command, key, value)
            if full is not None:
                return full
        return Refused(self.stage, self.role, primary=self.primary_address)

    # -- replication frames --------------------------------------------------------
    def _apply_batch(self, frame: Batch) -> Step:
        seq = frame.seq
        if seq != self.seq + 1:
            self.lose_channel(f"batch {seq} out of order (expected {self.seq + 1})")
            return Step.NONE
        fault = frame.absent_fault()
        if fault is not None:
            self.lose_channel(fault)
            return Step.NONE
        written = self._apply(seq, frame.ops, frame.time, frame.keyed, frame.absent)
        self.seq = seq
        # Before the ACK: it waits for the record to be durable.  What is recorded and
        # passed on is what the batch wrote: replayed anywhere, it writes the same.
        self.persist_batch(seq, written, frame.time, frame.keyed)
        self.batches_applied += 1
        store = self.store
        self.send(Ack(seq, store.checksum, len(store), epoch=self.epoch))
        if self.tap is not None:
            if frame.absent:
                frame = Batch(seq, written, frame.time, frame.keyed, epoch=frame.epoch)
            self.tap.applied(frame)
        return Step.STREAMING

    def _apply(
        self, seq: int, ops: list[str | None], time: int, keyed: list[Any], absent: int = 0
    ) -> list[str | None]:
        """Apply batch ``seq`` to the store and the table, keeping what undoes it; its
        first ``absent`` pairs only where their key holds no value.  Returns the pairs
        it wrote (``ops`` but those left)."""
        store = self.store
        checksum, count = store.checksum, len(store)
        recording = bool(self.settings.undo_bytes)
        written, rest = ops, ops
        olds: list[str | None] = []
        if absent:
            keys: list[str] = ops[0 : 2 * absent : 2]  # type: ignore[assignment]  # even: keys
            left = store.add_absent(ops, store.shards_of(keys))
            rest = ops[2 * absent :]
            if left:
                written = without_pairs(ops, left)
            olds = [None] * (absent - len(left))  # each key it wrote held nothing
        if not recording:
            store.apply(rest)
            store.idempotency.apply(time, keyed)
            return written
        olds += store.apply_recording(rest)
        table = store.idempotency.apply(time, keyed, record=True)
        kept, old_values = tuple(written), tuple(olds)
        size = _undo_size(kept, old_values) + (0 if table is None else table.size)
        entry = Undo(seq, kept, old_values, checksum, count, size, time, keyed, table)
        self.undo.append(entry)
        self.undo_size += entry.size
        while self.undo and (
            self.undo_size > self.settings.undo_bytes or len(self.undo) > MAX_UNDO_POINTS
        ):
            self.undo_size -= self.undo.popleft().size
        return written

    def batch_recovered_handler(self) -> Callable[[Record], None] | None:
        return self.recovered_batch

    def recovered_batch(self, record: Record) -> None:
        """A batch of our log that followed the last sync, applied at start as it was
        when it arrived: our undo record is then what it was (within its bounds), so
        a primary whose copy lacks these batches can have us undo them."""
        time, keyed = batch_of(record.extra)
        self._apply(record.seq, record.ops, time, keyed)

    def _undo_batches(self, steps: list[Undo]) -> None:
        store = self.store
        for entry in reversed(steps):  # newest first
            store.undo(entry.ops, entry.olds)
            if entry.table is not None:
                store.idempotency.undo(entry.table)

    def _holds(self, checksum: int, count: int) -> bool:
        return self.store.checksum == checksum and len(self.store) == count

    def undo_points(self) -> tuple[tuple[int, int, int], ...]:
        return tuple((u.seq - 1, u.checksum_before, u.count_before) for u in self.undo)

    def _rollback(self, frame: Rollback) -> Step:
        """Undo, newest first, the batches after ``frame.seq``; then our data must be
        the primary's (an O(1) checksum comparison), or we redo them and refuse."""
        target = frame.seq
        self._data_changes("a rollback")
        refused = self._refusal(Directive.ROLLBACK, State(target, frame.checksum, frame.count))
        if refused is not None:
            self.fail_transfer(refused)
            return Step.NONE
        if self.stage is Stage.COLD_START:  # a recovered copy, before our probe answered
            self.fire(Event.PRIMARY_RUNNING, "the primary rolls back our recovered copy")
        # The record holds every batch after the target: consecutive, ending at our seq.
        steps = [entry for entry in self.undo if entry.seq > target]
        store = self.store
        self._undo_batches(steps)
        if not self._holds(frame.checksum, frame.count):
            for entry in steps:  # our copy as it was: still a confirmed one
                store.apply(entry.ops)
                store.idempotency.apply(entry.time, entry.keyed or [])
            self.undo.clear()  # but this record cannot reach the primary's: a full transfer next
            self.undo_size = 0
            self.fail_transfer(f"rolled back to seq {target}, but the data is not the primary's")
            return Step.NONE
        for _ in steps:
            self.undo_size -= self.undo.pop().size
        log.info(
            "backup resync: partial: rolled back %d batches, seq %d -> %d",
            len(steps),
            self.seq,
            target,
        )
        self.seq = target
        self.persist_rollback(target)
        self._confirm(store.checksum, f"rolled back {len(steps)} batches", Resync.PARTIAL)
        return Step.STREAMING

    def _catch_up(self, frame: Catchup) -> Step:
        """The primary's batches after our seq follow, up to ``frame.to_seq``; then our
        data must be the primary's (``_catchup_batch``)."""
        start = State(frame.seq, frame.checksum, frame.count)
        refused = self._refusal(Directive.CATCHUP, start)
        if refused is None and frame.to_seq < frame.seq:
            refused = f"catch-up to seq {frame.to_seq} from seq {frame.seq}: backwards"
        if refused is not None:
            self.fail_transfer(refused)
            return Step.NONE
        if self.stage is Stage.COLD_START:  # a recovered copy, before our probe answered
            self.fire(Event.PRIMARY_RUNNING, "the primary catches up our recovered copy")
        # Our data moves on from here: no longer what a peer verified, nor what our
        # undo record leads back from, until the last batch matches the primary's.
        self._data_changes("a catch-up")
        self.confirmed = False
        self.undo.clear()
        self.undo_size = 0
        self.catchup_target = State(frame.to_seq, frame.to_checksum, frame.to_count)
        self.transfer_began = self.now
        self.handlers[FrameType.BATCH] = self._catchup_batch
        log.info(
            "backup resync: partial: catching up %d batches, seq %d -> %d",
            frame.to_seq - frame.seq,
            frame.seq,
            frame.to_seq,
        )
        if frame.to_seq == frame.seq:  # we hold the primary's data already
            return self._caught_up()
        return Step.CATCHING_UP

    def _catchup_batch(self, frame: Batch) -> Step:
        """A batch we lack: applied in order, not acknowledged (the SYNC_ACK at the end is)."""
        target = self.catchup_target
        assert target is not None
        seq = frame.seq
        if seq != self.seq + 1 or seq > target.seq:
            self.fail_transfer(f"catch-up batch {seq} out of order (expected {self.seq + 1})")
            return Step.NONE
        if frame.absent:  # a catch-up sends the pairs each batch wrote
            self.fail_transfer(f"catch-up batch {seq} has pairs written where absent")
            return Step.NONE
        self.store.apply(frame.ops)
        self.store.idempotency.apply(frame.time, frame.keyed)
        self.seq = seq
        self.persist_batch(seq, frame.ops, frame.time, frame.keyed)
        if seq < target.seq:
            return Step.CATCHING_UP
        return self._caught_up()

    def _caught_up(self) -> Step:
        target = self.catchup_target
        assert target is not None and target.seq == self.seq
        self._end_catchup()
        if not self._holds(target.checksum, target.count):
            self.fail_transfer(f"caught up to seq {self.seq}, but the data is not the primary's")
            return Step.NONE
        self.catchups += 1
        if self.transfer_began is not None:  # how long it took, as for a transfer
            self.last_transfer_seconds = self.now - self.transfer_began
            self.transfer_began = None
        self._confirm(self.store.checksum, f"caught up to seq {self.seq}", Resync.PARTIAL)
        return Step.STREAMING

    def _data_changes(self, how: str) -> None:
        if self.tap is not None:
            self.tap.reset(f"the backup's data changed by {how}")

    def adopt_followed(self, store: ShardedStore, seq: int, history: int) -> list[dict[str, str]]:
        """Hold a copy that followed a backup's stream (``follower.py``): of that backup's
        history, never confirmed, of no epoch. Returns our old pairs, to drop gradually."""
        old = self.store.take_pairs_of(store)
        self.seq, self.history = seq, history
        self.confirmed = self.recovered = False
        self.copy_epoch = 0
        self.undo.clear()
        self.undo_size = 0
        return old

    def _end_catchup(self) -> None:
        self.catchup_target = None
        self.handlers[FrameType.BATCH] = self._apply_batch

    def _fenced(self, frame: Fence) -> Step:
        self.lose_channel(f"fenced by the primary: {self.peer_text(frame.reason)}")
        return Step.NONE

    def _challenge(self, frame: AuthChallenge) -> Step:
        # Only on a channel without a secret: with one, proofs happen on candidates.
        return self.refuse_authentication(
            "the primary asks for a proof of a secret, but the backup has no secret set"
        )

    def _hello(self, frame: Hello) -> Step:
        if not self.past_authentication:
            return self.refuse_authentication(
                "the backup has a secret set: the primary sent a HELLO without proving it"
            )
        if frame.role != Role.PRIMARY:
            self.lose_channel(
                f"peer says it is the {self.peer_text(frame.role)}, expected the primary"
            )
            return Step.NONE
        self.peer_hello = frame
        self.peer_seq = frame.seq
        self.send(self.hello_frame())
        return Step.AWAIT_DIRECTIVE

    def _begin_receiving(self, frame: SnapshotBegin) -> Step:
        # The primary's data wins, but only once all of it has arrived: until
        # then we keep our copy (and whether it is confirmed), so a primary
        # that dies mid-transfer can still warm-start from it.
        self.fire(Event.TRANSFER_STARTED, f"primary sends {frame.count} pairs")
        self.receiver = SnapshotReceiver(self.store.empty_like())
        self.transfer_began = self.now
        return self._transfer_frame(frame)

    def _transfer_frame(self, frame: Any) -> Step:
        receiver = self.receiver
        assert receiver is not None
        try:
            checksum = self.receive_transfer_frame(frame)
        except TransferError as exc:
            self.fail_transfer(f"transfer from primary failed: {exc}")
            return Step.NONE
        if checksum is None:
            return Step.RECEIVE_SNAPSHOT
        self.seq = receiver.seq
        if self.transfer_began is not None:
            self.last_transfer_seconds = self.now - self.transfer_began
            self.transfer_began = None
        # Same store object, new pairs: the old ones are freed a shard per turn.
        self.outbox.append(Discard(self.store.take_pairs_of(receiver.store)))
        self._confirm(checksum, "received", Resync.FULL, replaced=True)
        return Step.STREAMING

    def _refusal(self, directive: Directive, target: State | None) -> str | None:
        hello = self.peer_hello
        assert hello is not None, "a directive comes only after the hellos"
        return refusal(directive, target, self.own_copy(), Copy.of(hello))

    def _skip(self, frame: Skip) -> Step:
        refused = self._refusal(Directive.SKIP, State(frame.seq, frame.checksum, frame.count))
        if refused is not None:
            self.fail_transfer(refused)
            return Step.NONE
        self.seq = frame.seq
        self._confirm(self.store.checksum, "already matching", Resync.NONE)
        return Step.STREAMING

    def _confirm(self, checksum: int, how: str, resync: Resync, replaced: bool = False) -> None:
        """Seed: the backup enters in sync before the primary."""
        hello = self.peer_hello
        assert hello is not None
        self._data_changes("a sync")
        self.copy_epoch = hello.epoch  # our data is now that primary's epoch's
        self.note_resync(resync, hello)
        self.persist_synced(replaced)  # before the SYNC_ACK, which waits for it
        self.send(SyncAck(checksum))
        self.confirmed = True
        self.receiver = None
        self.transfers_completed += 1
        self.undo.clear()  # the undo record is for batches after this point
        self.undo_size = 0
        self.fire(Event.SYNC_CONFIRMED, f"{len(self.store)} pairs {how}, checksum verified")
        self.note_sync_changed()

    def _fetch(self, frame: Fetch) -> Step:
        refused = self._refusal(Directive.FETCH, None)
        if refused is not None:
            self.fail_transfer(refused)
            return Step.NONE
        if self.stage is Stage.COLD_START:  # a recovered copy, before our probe answered
            self.fire(Event.PRIMARY_RUNNING, "the primary fetches our recovered copy")
        self.start_sending_snapshot()
        return Step.AWAIT_FINAL_ACK

    def _final_ack(self, frame: SyncAck) -> Step:
        if frame.checksum != self.store.checksum:
            self.fail_transfer("primary fetched data with a different checksum")
            return Step.NONE
        self._confirm(self.store.checksum, "fetched by the primary", Resync.FULL)
        return Step.STREAMING

    def status(self, now: float) -> dict[str, Any]:
        status = super().status(now)
        status.update(
            primary=self.primary_address,
            lag=max(0, self.peer_seq - self.seq),
            batches_applied=self.batches_applied,
            catchups=self.catchups,
        )
        return status
