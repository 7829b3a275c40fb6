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

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pbkv.commands import REPLICATION_FAILED, Command, Counted, Done, Dumped, Outcome, Refused
from pbkv.config import Settings
from pbkv.core import RETRY, Connect, ReplicationCore, Respond, StartTimer, log
from pbkv.stages import Event, ReadRule, Stage, WriteRule
from pbkv.store import ShardedStore, shard_of
from pbkv.transfer import TRANSFER_FRAMES, SnapshotReceiver, TransferError
from pbkv.wire import FrameType, checksum_from_bytes, checksum_to_bytes

_MISS_VALUE = ""


@dataclass(slots=True)
class Batch:
    seq: int = 0
    ops: list[Any] = field(default_factory=list)  # key, value-or-None, key, ...
    entries: list[tuple[Any, Outcome]] = field(default_factory=list)  # token, answer
    sent_at: float = 0.0
    deadline: float = 0.0


class PrimaryCore(ReplicationCore):
    role = "primary"

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
        self.queued = Batch()
        # Batches sent and not yet acknowledged, oldest first (acks come in order).
        self.in_flight: deque[Batch] = deque()
        self.window = settings.batches_in_flight
        self.sent_seq = 0
        self.awaiting = ""  # "hello", "snapshot", "sync_ack" or "final_ack"
        self.complete_shards: set[int] = set()
        self.writes_rewound = 0
        self.batches_sent = 0
        # Acknowledged batches: how many, their writes, and the sum of round trips.
        self.batches_acked = 0
        self.writes_replicated = 0
        self.ack_seconds_total = 0.0

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
        self.now = now
        self.channel_up = True
        self.last_received = now
        self.awaiting = "hello"
        self.send(self.hello_frame())

    def channel_failed(self, now: float, reason: str) -> None:
        """Connecting to the backup did not work."""
        self.now = now
        if self.stage is Stage.COLD_START:
            self.fire(Event.BACKUP_UNREACHABLE, f"no backup: {reason}")
        self.schedule_retry()

    def channel_lost(self, reason: str) -> None:
        self.awaiting = ""
        self._rewind(reason)
        if self.stage is Stage.COLD_START:
            self.fire(Event.BACKUP_UNREACHABLE, f"backup left during the handshake: {reason}")
        else:
            self.fire(Event.PEER_LOST, reason)
        self.schedule_retry()

    def _abandon_transfer(self, reason: str) -> None:
        """Close the channel and start over after a back-off (seed: "start over")."""
        if not self.channel_up:
            return
        self.close_channel(reason)
        self.awaiting = ""
        if self.machine.can_fire(Event.TRANSFER_FAILED):
            self.fire(Event.TRANSFER_FAILED, reason)
        else:  # a NACK outside a transfer: the channel simply failed
            self.channel_lost(reason)
            return
        self.schedule_retry()

    def tick(self) -> None:
        if self.in_flight and self.now > self.in_flight[0].deadline:
            # Seed: "try to kill the backup", then bootstrap a new one.
            if self.channel_up:
                self.send([FrameType.FENCE, "acknowledgement timed out"])
            self.drop(f"backup did not acknowledge batch {self.in_flight[0].seq} in time")
        super().tick()

    # -- client requests ---------------------------------------------------------
    def read(self, command: Command, key: str = "") -> Outcome:
        store = self.store
        if not self._may_read(command, key):
            return Refused(self.stage, self.role)
        if command is Command.GET:
            value = store.get(key)
            return Done(False, _MISS_VALUE) if value is None else Done(True, value)
        if command is Command.COUNT:
            return Counted(len(store))
        return Dumped(store)

    def _may_read(self, command: Command, key: str) -> bool:
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

    def submit(self, command: Command, key: str, value: str | None, token: Any) -> Outcome | None:
        """A write: an outcome now, or None when ``Respond(token, ...)`` follows."""
        if self.machine.acceptance.writes is not WriteRule.REPLICATE:
            return Refused(self.stage, self.role)
        pending = self.overlay.get(key)
        current = self.store.get(key) if pending is None else pending[0]
        if command is Command.INSERT:
            ok, new = current is None, value
        elif command is Command.UPDATE:
            ok, new = current is not None, value
        else:
            ok, new = current is not None, None
        if command is Command.DELETE:
            outcome = Done(ok, current if ok else _MISS_VALUE)
        else:
            outcome = Done(ok)
        if self.standalone:
            if ok:
                self._apply(key, new)
            return outcome
        if not ok:
            if pending is None:
                return outcome
            # Depends on a write in flight: answer after it is acknowledged.
            self.queued.entries.append((token, outcome))
            return None
        queued = self.queued
        queued.ops.append(key)
        queued.ops.append(new)
        queued.entries.append((token, outcome))
        self.overlay[key] = (new, self.sent_seq + 1)
        return None

    def flush(self, now: float) -> None:
        """Send the queued writes as one batch if the window has room."""
        self.now = now
        if len(self.in_flight) >= self.window or not self.queued.entries:
            return
        batch, self.queued = self.queued, Batch()
        if not batch.ops:
            # Only answers that wait for earlier batches: answer them with the last.
            if self.in_flight:
                self.in_flight[-1].entries.extend(batch.entries)
            else:
                self._answer(batch)
            return
        self.sent_seq += 1
        batch.seq = self.sent_seq
        batch.sent_at = now
        batch.deadline = now + self.settings.ack_timeout
        self.in_flight.append(batch)
        self.batches_sent += 1
        self.send([FrameType.BATCH, batch.seq, batch.ops])

    def _apply(self, key: str, value: str | None) -> None:
        if value is None:
            self.store.remove(key)
        else:
            self.store.put(key, value)

    def _answer(self, batch: Batch) -> None:
        outbox = self.outbox
        for token, outcome in batch.entries:
            outbox.append(Respond(token, outcome))

    def _batch_acked(self, seq: Any) -> None:
        if not self.in_flight or seq != self.in_flight[0].seq:
            self.drop(f"acknowledgement for unexpected batch {seq!r}")
            return
        batch = self.in_flight.popleft()
        ops, overlay, apply = batch.ops, self.overlay, self._apply
        for i in range(0, len(ops), 2):
            key = ops[i]
            apply(key, ops[i + 1])
            pending = overlay.get(key)
            if pending is not None and pending[1] == seq:
                del overlay[key]
        self.seq = seq
        self.batches_acked += 1
        self.writes_replicated += len(ops) // 2
        self.ack_seconds_total += self.now - batch.sent_at
        self._answer(batch)
        self.flush(self.now)

    def _rewind(self, reason: str) -> None:
        """Fail every write not yet acknowledged; the store never saw them."""
        batches = [*self.in_flight, self.queued]
        failed = sum(len(b.entries) for b in batches)
        if failed:
            self.writes_rewound += failed
            log.warning("primary rewound %d writes (%s) peer=backup", failed, reason)
        for batch in batches:
            for token, _ in batch.entries:
                self.outbox.append(Respond(token, REPLICATION_FAILED))
        self.in_flight.clear()
        self.queued = Batch()
        self.overlay.clear()
        self.sent_seq = self.seq

    # -- replication frames ------------------------------------------------------
    def handle_frame(self, frame: list[Any]) -> None:
        kind = frame[0]
        try:
            if kind == FrameType.ACK:
                self._batch_acked(frame[1])
            elif kind == FrameType.HEARTBEAT:
                self.peer_seq = frame[1]
            elif self.awaiting == "snapshot" and kind in TRANSFER_FRAMES:
                self._transfer_frame(frame)
            elif kind == FrameType.HELLO and self.awaiting == "hello":
                self._hello(frame)
            elif kind == FrameType.SYNC_ACK and self.awaiting in ("sync_ack", "final_ack"):
                self._sync_ack(frame)
            elif kind == FrameType.SYNC_NACK:
                self.transfers_failed += 1
                self.last_transfer_error = str(frame[1])
                self._abandon_transfer(f"backup refused the transfer: {frame[1]}")
            else:
                self.drop(f"unexpected {kind.name} while awaiting {self.awaiting or 'nothing'}")
        except (IndexError, TypeError, ValueError) as exc:
            self.drop(f"malformed {kind.name} frame: {exc}")

    def _hello(self, frame: list[Any]) -> None:
        _, role, _incarnation, peer_confirmed, raw_checksum, count, _shards, seq = frame
        if role != "backup":
            self.drop(f"peer says it is the {role}, expected the backup")
            return
        self.peer_hello = frame
        self.peer_seq = seq
        peer_checksum = checksum_from_bytes(raw_checksum)
        if self.confirmed:
            if peer_confirmed and peer_checksum == self.store.checksum and count == len(self.store):
                log.info("primary and backup already hold the same data: skipping transfer")
                self.send([FrameType.SKIP, raw_checksum, count, self.seq])
            else:
                self.start_sending_snapshot()
            self.awaiting = "sync_ack"
        elif peer_confirmed:
            if self.stage is not Stage.WARM_START:
                self.fire(Event.BACKUP_HOLDS_DATA, f"backup holds {count} confirmed pairs")
            self.receiver = SnapshotReceiver(self.store)
            self.complete_shards = self.receiver.complete_shards
            self.awaiting = "snapshot"
            self.send([FrameType.FETCH])
        else:
            if len(self.store):
                log.warning(
                    "primary discards %d unconfirmed pairs: the backup holds no data",
                    len(self.store),
                )
                self.store.clear()
            self.confirmed = True
            if self.stage is not Stage.BOOTSTRAPPING_SECONDARY:
                self.fire(Event.BACKUP_NEEDS_DATA, "no confirmed data on either side: start empty")
            self.start_sending_snapshot()
            self.awaiting = "sync_ack"

    def _transfer_frame(self, frame: list[Any]) -> None:
        receiver = self.receiver
        assert receiver is not None
        if frame[0] == FrameType.SNAPSHOT_BEGIN:
            log.info("primary warm start: receiving %s pairs from the backup", frame[2])
        try:
            checksum = self.receive_transfer_frame(frame)
        except TransferError as exc:
            self.transfer_failed(str(exc))
            self._abandon_transfer(f"transfer from backup failed: {exc}")
            return
        if frame[0] == FrameType.SHARD_END:
            self.complete_shards = receiver.complete_shards
        if checksum is not None:
            self.seq = self.sent_seq = receiver.seq
            self.awaiting = "final_ack"
            self.send([FrameType.SYNC_ACK, checksum_to_bytes(checksum)])

    def _sync_ack(self, frame: list[Any]) -> None:
        if checksum_from_bytes(frame[1]) != self.store.checksum:
            self.transfer_failed("backup acknowledged a different checksum")
            self._abandon_transfer("checksum mismatch at the end of the transfer")
            return
        self.awaiting = ""
        self.confirmed = True
        self.receiver = None
        self.transfers_completed += 1
        self.backoff.reset()
        how = "fetched from" if self.stage is Stage.WARM_START else "sent to"
        self.fire(
            Event.SYNC_CONFIRMED, f"{len(self.store)} pairs {how} the backup, checksums match"
        )

    def status(self, now: float) -> dict[str, Any]:
        status = super().status(now)
        status.update(
            standalone=self.standalone,
            lag=self.sent_seq - self.seq,
            writes_queued=len(self.queued.entries),
            writes_in_flight=sum(len(b.entries) for b in self.in_flight),
            writes_rewound=self.writes_rewound,
            batches_sent=self.batches_sent,
            batches_acked=self.batches_acked,
            writes_replicated=self.writes_replicated,
            # Group commit at work: writes per batch, and the mean acknowledgement time.
            writes_per_batch=round(self.writes_replicated / max(1, self.batches_acked), 2),
            ack_ms_mean=round(1000 * self.ack_seconds_total / max(1, self.batches_acked), 3),
        )
        return status
