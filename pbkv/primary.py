"""The primary's replication core (sans-I/O).

Writes are group-committed.  A write is validated against the committed store
plus the writes still in flight (the *overlay*), queued, and sent to the
backup in the next batch; only when the backup acknowledges that batch is it
applied to the store and answered.  Reads see the store alone, so no read
ever returns a value the backup has not acknowledged.  If the backup fails,
every queued and in-flight write is rewound (the overlay is dropped, newest
first) and answered "replication failed".

A logical failure that depends on a write still in flight (insert of a key
whose insert is pending, say) is not answered at once: it waits in the queue
behind that write, so a failure is never reported for a state that is later
rewound.

Who wins a handshake: a primary whose data a backup has confirmed (it has
been in sync since it started) always sends its data.  A primary without
confirmed data (freshly started) fetches the backup's data when the backup
holds a confirmed copy, and otherwise starts empty.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pbkv import auth
from pbkv.actions import Connect, FlushSoon, Respond, StartTimer
from pbkv.commands import REPLICATION_FAILED, Command, Done, Outcome, Refused, Reply
from pbkv.config import Settings
from pbkv.core import (
    BATCH_CHARS,
    BATCH_WRITES,
    MISS,
    RETRY,
    ReplicationCore,
    log,
    next_history,
)
from pbkv.stages import Event, ReadRule, Role, Stage, Step, WriteRule
from pbkv.store import ShardedStore, shard_of
from pbkv.transfer import SnapshotReceiver, TransferError
from pbkv.wire import (
    Ack,
    AuthChallenge,
    AuthProof,
    AuthResponse,
    Fence,
    Fetch,
    FrameType,
    Hello,
    Rollback,
    Skip,
    SnapshotBegin,
    SnapshotEnd,
    SyncAck,
)
from pbkv.wire import (
    Batch as BatchFrame,
)


class Plan(enum.Enum):
    """What the primary decided from the backup's hello."""

    SEND = "sent to"  # our confirmed data wins
    SKIP = "already matched on"  # both hold the same confirmed data
    ROLLBACK = "rolled back on"  # the backup is ahead by batches we never applied: it undoes them
    FETCH = "fetched from"  # the backup's confirmed data wins
    START_EMPTY = "started empty with"  # neither side holds confirmed data


@dataclass(slots=True)
class Batch:
    seq: int = 0
    ops: list[Any] = field(default_factory=list)  # key, value-or-None, key, ...
    entries: list[tuple[Reply, Outcome]] = field(default_factory=list)  # reply, answer
    chars: int = 0  # of the keys and values in ops: a batch's frame stays bounded
    sent_at: float = 0.0
    deadline: float = 0.0

    def full(self) -> bool:
        return len(self.ops) >= 2 * BATCH_WRITES or self.chars >= BATCH_CHARS


class PrimaryCore(ReplicationCore):
    role = Role.PRIMARY

    def __init__(
        self,
        settings: Settings,
        store: ShardedStore,
        now: float,
        rng: random.Random | None = None,
    ) -> None:
        self.standalone = settings.standalone
        initial = Stage.IN_SYNC if self.standalone else Stage.COLD_START
        super().__init__(settings, store, initial, now, rng)
        self.overlay: dict[str, tuple[str | None, int]] = {}
        # Writes not yet sent, oldest batch first; the last one takes new writes.
        self.queued: deque[Batch] = deque([Batch()])
        self.flush_pending = False
        # Batches sent and not yet acknowledged, oldest first (acks come in order).
        self.in_flight: deque[Batch] = deque()
        self.window = settings.batches_in_flight
        self.sent_seq = 0
        self.plan: Plan | None = None
        self.complete_shards: set[int] = set()
        self.writes_rewound = 0
        self.batches_sent = 0
        # Acknowledged batches: how many, their writes, and the sum of round trips.
        self.batches_acked = 0
        self.writes_replicated = 0
        self.ack_seconds_total = 0.0
        self.handlers.update(
            {
                FrameType.HELLO: self._hello,
                FrameType.ACK: self._batch_acked,
                FrameType.SNAPSHOT_BEGIN: self._transfer_frame,
                FrameType.SHARD_CHUNK: self._transfer_frame,
                FrameType.SHARD_END: self._transfer_frame,
                FrameType.SNAPSHOT_END: self._transfer_frame,
                FrameType.SYNC_ACK: self._sync_ack,
                FrameType.AUTH_RESPONSE: self._auth_response,
            }
        )

    # -- lifecycle ---------------------------------------------------------------
    def start(self, now: float) -> None:
        self.now = now
        if self.standalone:
            self.confirmed = True
            log.info("primary standalone: answering writes without a backup")
            return
        self.outbox.append(Connect())
        self.start_tick()

    def retry(self) -> None:
        if not self.channel_up and not self.standalone:
            self.outbox.append(Connect())

    def schedule_retry(self) -> None:
        self.outbox.append(StartTimer(RETRY, self.backoff.next_delay()))

    def channel_opened(self, now: float) -> None:
        self.opened(now)
        if self.secret is None:
            self.send(self.hello_frame())
        else:
            self.nonces[Role.PRIMARY] = auth.new_nonce()
            self.send(AuthChallenge(self.nonces[Role.PRIMARY]))

    def channel_failed(self, now: float, reason: str) -> None:
        """Connecting to the backup did not work."""
        self.now = now
        self.fire(Event.BACKUP_UNREACHABLE, f"no backup: {reason}")
        self.schedule_retry()

    def on_channel_lost(self, reason: str) -> None:
        self.plan = None
        self._rewind(reason)
        self.schedule_retry()

    def tick(self) -> None:
        if self.in_flight and self.now > self.in_flight[0].deadline:
            # Seed: "try to kill the backup", then bootstrap a new one.
            if self.channel_up:
                self.send(Fence("acknowledgement timed out"))
            self.lose_channel(f"backup did not acknowledge batch {self.in_flight[0].seq} in time")
        super().tick()

    # -- client requests ---------------------------------------------------------
    def may_read(self, command: Command, key: str) -> bool:
        rule = self.machine.acceptance.reads
        if rule is ReadRule.SERVE:
            return True
        if rule is ReadRule.SERVE_IF_CONFIRMED:
            return self.confirmed
        if rule is ReadRule.SERVE_IF_SHARD_COMPLETE:
            complete = self.complete_shards
            if len(complete) == self.store.shard_count:
                return True
            return command is Command.GET and shard_of(key, self.store.shard_count) in complete
        return False

    def submit(self, command: Command, key: str, value: str | None, reply: Reply) -> Outcome | None:
        """A write: an outcome now, or None when ``Respond(reply, ...)`` follows."""
        if self.machine.acceptance.writes is not WriteRule.REPLICATE:
            return Refused(self.stage, self.role)
        pending = self.overlay.get(key)
        current = self.store.get(key) if pending is None else pending[0]
        if command is Command.INSERT:
            ok, new, outcome = current is None, value, Done(current is None)
        elif command is Command.UPDATE:
            ok, new, outcome = current is not None, value, Done(current is not None)
        else:
            ok, new = current is not None, None
            outcome = Done(True, current) if ok else MISS
        if self.standalone:
            if ok:
                self.store.write(key, new)
            return outcome
        if not ok and pending is None:
            return outcome
        queued = self.queued[-1]
        if ok:
            if queued.full():
                queued = Batch()
                self.queued.append(queued)
            queued.ops.append(key)
            queued.ops.append(new)
            queued.chars += len(key) + (0 if new is None else len(new))
            self.overlay[key] = (new, self.sent_seq + len(self.queued))
        # else: it depends on a write in flight: answer after that is acknowledged.
        queued.entries.append((reply, outcome))
        if not self.flush_pending:
            # Everything submitted before the driver calls flush shares one batch.
            self.flush_pending = True
            self.outbox.append(FlushSoon())
        return None

    def flush(self, now: float) -> None:
        """Send queued batches while the window has room."""
        self.now = now
        self.flush_pending = False
        queued = self.queued
        while len(self.in_flight) < self.window and queued[0].entries:
            batch = queued.popleft()
            if not queued:
                queued.append(Batch())
            if not batch.ops:
                # Only answers that wait for earlier batches: answer them with the last.
                if self.in_flight:
                    self.in_flight[-1].entries.extend(batch.entries)
                else:
                    self._answer(batch)
                continue
            self.sent_seq += 1
            batch.seq = self.sent_seq
            batch.sent_at = now
            batch.deadline = now + self.settings.ack_timeout
            self.in_flight.append(batch)
            self.batches_sent += 1
            self.send(BatchFrame(batch.seq, batch.ops))

    def _answer(self, batch: Batch) -> None:
        outbox = self.outbox
        for reply, outcome in batch.entries:
            outbox.append(Respond(reply, outcome))

    def _batch_acked(self, frame: Ack) -> Step:
        seq = frame.seq
        if not self.in_flight or seq != self.in_flight[0].seq:
            self.lose_channel(f"acknowledgement for unexpected batch {seq}")
            return Step.NONE
        batch = self.in_flight.popleft()
        ops, overlay = batch.ops, self.overlay
        self.store.apply(ops)
        for key in ops[0::2]:
            pending = overlay.get(key)
            if pending is not None and pending[1] == seq:
                del overlay[key]
        self.seq = seq
        self.batches_acked += 1
        self.writes_replicated += len(ops) // 2
        self.ack_seconds_total += self.now - batch.sent_at
        self._answer(batch)
        self.flush(self.now)
        return Step.STREAMING

    def _rewind(self, reason: str) -> None:
        """Fail every write not yet acknowledged; the store never saw them."""
        batches = [*self.in_flight, *self.queued]
        failed = sum(len(b.entries) for b in batches)
        if failed:
            self.writes_rewound += failed
            log.warning("primary rewound %d writes (%s) peer=backup", failed, reason)
        for batch in batches:
            for reply, _ in batch.entries:
                self.outbox.append(Respond(reply, REPLICATION_FAILED))
        self.in_flight.clear()
        self.queued = deque([Batch()])
        self.overlay.clear()
        self.sent_seq = self.seq

    # -- the handshake -------------------------------------------------------------
    def _auth_response(self, frame: AuthResponse) -> Step:
        self.nonces[Role.BACKUP] = frame.nonce
        if not self.peer_proof_holds(frame.proof):
            return self.refuse_authentication(
                "the backup's proof does not match the primary's secret "
                "(are both secrets the same?)"
            )
        self.send(AuthProof(self.proof()))
        self.authenticated()
        self.send(self.hello_frame())
        return Step.AWAIT_HELLO

    def _hello(self, frame: Hello) -> Step:
        if frame.role != Role.BACKUP:
            self.lose_channel(f"peer says it is the {frame.role}, expected the backup")
            return Step.NONE
        self.peer_hello = frame
        self.peer_seq = frame.seq
        count = frame.count
        if self.confirmed:
            store = self.store
            if frame.confirmed and frame.checksum == store.checksum and count == len(store):
                self.plan = Plan.SKIP
                log.info("primary and backup already hold the same data: skipping transfer")
                self.send(Skip(frame.checksum, count, self.seq))
                return Step.AWAIT_SYNC_ACK
            why_not = self._why_no_rollback(frame)
            if why_not is None:
                self.plan = Plan.ROLLBACK
                log.info(
                    "primary resync: partial: the backup rolls back %d batches, seq %d -> %d",
                    frame.seq - self.seq,
                    frame.seq,
                    self.seq,
                )
                self.send(Rollback(self.seq, store.checksum, len(store)))
            else:
                self.plan = Plan.SEND
                log.info("primary resync: full transfer: %s", why_not)
                self.start_sending_snapshot()
            return Step.AWAIT_SYNC_ACK
        if frame.confirmed:
            self.plan = Plan.FETCH
            self.fire(Event.BACKUP_HOLDS_DATA, f"backup holds {count} confirmed pairs")
            self.receiver = SnapshotReceiver(self.store)
            self.complete_shards = self.receiver.complete_shards
            self.send(Fetch())
            return Step.RECEIVE_SNAPSHOT
        if len(self.store):
            log.warning(
                "primary discards %d unconfirmed pairs: the backup holds no data", len(self.store)
            )
            self.store.clear()
        self.plan = Plan.START_EMPTY
        self.confirmed = True
        self.fire(Event.BACKUP_NEEDS_DATA, "no confirmed data on either side: start empty")
        self.start_sending_snapshot()
        return Step.AWAIT_SYNC_ACK

    def _why_no_rollback(self, frame: Hello) -> str | None:
        """Why the backup cannot reach our data by undoing batches (None: it can).

        Replication is synchronous, so a live backup of our history is never
        behind our acknowledged state: at most ahead, by the batches whose
        acknowledgement we never saw."""
        if not frame.confirmed:
            return "the backup holds no confirmed copy"
        if frame.history != self.history:
            return "the backup's data has another history (a restart or a replaced copy)"
        if frame.seq < self.seq:
            return f"the backup is behind (seq {frame.seq} < {self.seq})"
        state = {seq: (checksum, count) for seq, checksum, count in frame.undo}
        if self.seq not in state:
            return f"the backup cannot undo back to seq {self.seq} (its undo record is too short)"
        if state[self.seq] != (self.store.checksum, len(self.store)):
            return f"the backup's data at seq {self.seq} differs from ours"
        return None

    def _transfer_frame(self, frame: Any) -> Step:
        receiver = self.receiver
        assert receiver is not None
        if type(frame) is SnapshotBegin:
            log.info("primary warm start: receiving %d pairs from the backup", frame.count)
        try:
            checksum = self.receive_transfer_frame(frame)
        except TransferError as exc:
            self.fail_transfer(f"transfer from backup failed: {exc}")
            return Step.NONE
        self.complete_shards = receiver.complete_shards
        if checksum is None:
            return Step.RECEIVE_SNAPSHOT
        assert type(frame) is SnapshotEnd
        hello = self.peer_hello
        assert hello is not None
        if checksum != hello.checksum or len(self.store) != hello.count:
            # A backup takes no writes: what it sends is what its hello announced.
            self.fail_transfer("the backup sent other data than its hello announced")
            return Step.NONE
        self.seq = self.sent_seq = receiver.seq
        self.send(SyncAck(checksum))
        return Step.AWAIT_FINAL_ACK

    def _sync_ack(self, frame: SyncAck) -> Step:
        if frame.checksum != self.store.checksum:
            self.fail_transfer("backup acknowledged a different checksum")
            return Step.NONE
        self.confirmed = True
        self.receiver = None
        self.transfers_completed += 1
        self.backoff.reset()
        plan, hello = self.plan, self.peer_hello
        assert plan is not None and hello is not None, "a SYNC_ACK comes only after the hello"
        kept = plan in (Plan.SKIP, Plan.ROLLBACK)
        self.history = next_history(self.history, hello.history, kept)
        if plan is Plan.ROLLBACK:
            self.resyncs_partial += 1
        elif plan is not Plan.SKIP:
            self.resyncs_full += 1
        how = self.plan.value
        self.fire(
            Event.SYNC_CONFIRMED, f"{len(self.store)} pairs {how} the backup, checksums match"
        )
        return Step.STREAMING

    def status(self, now: float) -> dict[str, Any]:
        status = super().status(now)
        status.update(
            standalone=self.standalone,
            lag=self.sent_seq - self.seq,
            writes_queued=sum(len(b.entries) for b in self.queued),
            writes_in_flight=sum(len(b.entries) for b in self.in_flight),
            writes_rewound=self.writes_rewound,
            batches_sent=self.batches_sent,
            batches_acked=self.batches_acked,
            writes_replicated=self.writes_replicated,
            ack_seconds_total=round(self.ack_seconds_total, 6),
            # Group commit at work: writes per batch, and the mean acknowledgement time.
            writes_per_batch=round(self.writes_replicated / max(1, self.batches_acked), 2),
            ack_ms_mean=round(1000 * self.ack_seconds_total / max(1, self.batches_acked), 3),
        )
        return status
