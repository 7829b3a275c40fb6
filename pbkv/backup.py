"""The backup's replication core (sans-I/O).

The primary always opens the channel and says what happens next: it sends
its data (we go to warm start and receive it), asks for ours (FETCH, allowed
only while we hold a confirmed copy), or proposes to skip the transfer
because both sides already hold the same data.  In sync we apply each batch
as upserts and deletes, whatever the key's current state, and acknowledge it.
When the primary goes away we keep our data and wait for it.
"""

from __future__ import annotations

import random
from typing import Any

from pbkv.commands import Command, Counted, Done, Dumped, Outcome, Refused
from pbkv.config import Settings
from pbkv.core import Probe, ReplicationCore, log
from pbkv.stages import Event, ReadRule, Stage
from pbkv.store import ShardedStore
from pbkv.transfer import TRANSFER_FRAMES, SnapshotReceiver, TransferError
from pbkv.wire import FrameType, checksum_from_bytes, checksum_to_bytes


class BackupCore(ReplicationCore):
    role = "backup"

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
        self.awaiting = ""  # "", "directive", "snapshot", "final_ack"
        # Since when we are in warm start without a primary talking to us.
        self.waiting_since = now
        self.batches_applied = 0

    # -- lifecycle ---------------------------------------------------------------
    def start(self, now: float) -> None:
        self.now = now
        if self.stage is Stage.COLD_START:
            self.outbox.append(Probe())
        self.start_tick()

    def probe_result(self, now: float, primary_running: bool) -> None:
        self.now = now
        if self.stage is not Stage.COLD_START:
            return  # the primary reached us first
        if primary_running:
            self.waiting_since = now
            self.fire(Event.PRIMARY_RUNNING, f"primary answers at {self.primary_address}")
        else:
            self.fire(Event.PRIMARY_ABSENT, f"no primary at {self.primary_address}")

    def channel_opened(self, now: float) -> None:
        """The primary connected (a newer connection replaces an older one)."""
        self.now = now
        if self.channel_up:
            self.close_channel("replaced by a new connection from the primary")
            self.channel_lost("the primary reconnected")
        self.channel_up = True
        self.last_received = now
        self.awaiting = "hello"

    def channel_lost(self, reason: str) -> None:
        self.awaiting = ""
        self.waiting_since = self.now
        if self.stage is Stage.WARM_START and not self.confirmed:
            # Keep listening: the primary will reconnect and send again.  The
            # tick gives up on it after peer_timeout.
            log.info("backup lost the primary during warm start: %s", reason)
            return
        self.fire(Event.PEER_LOST, reason)

    def tick(self) -> None:
        if (
            self.stage is Stage.WARM_START
            and not self.channel_up
            and self.now - self.waiting_since > self.settings.peer_timeout
        ):
            self.fire(Event.PEER_LOST, f"no primary for {self.settings.peer_timeout}s")
        super().tick()

    # -- client requests: reads only -----------------------------------------------
    def read(self, command: Command, key: str = "") -> Outcome:
        if self.machine.acceptance.reads is not ReadRule.SERVE:
            return Refused(self.stage, self.role)
        if command is Command.GET:
            value = self.store.get(key)
            return Done(False, "") if value is None else Done(True, value)
        if command is Command.COUNT:
            return Counted(len(self.store))
        return Dumped(self.store)

    def submit(self, command: Command, key: str, value: str | None, token: Any) -> Outcome:
        return Refused(self.stage, self.role, primary=self.primary_address)

    # -- replication frames --------------------------------------------------------
    def handle_frame(self, frame: list[Any]) -> None:
        kind = frame[0]
        try:
            if kind == FrameType.BATCH and self.stage is Stage.IN_SYNC:
                self._apply_batch(frame[1], frame[2])
            elif kind == FrameType.HEARTBEAT:
                self.peer_seq = frame[1]
            elif kind == FrameType.HELLO and self.awaiting == "hello":
                self._hello(frame)
            elif self.awaiting == "snapshot" and kind in TRANSFER_FRAMES:
                self._transfer_frame(frame)
            elif kind == FrameType.SNAPSHOT_BEGIN and self.awaiting == "directive":
                self._begin_receiving(frame)
            elif kind == FrameType.SKIP and self.awaiting == "directive":
                self._skip(frame)
            elif kind == FrameType.FETCH and self.awaiting == "directive":
                self._fetch()
            elif kind == FrameType.SYNC_ACK and self.awaiting == "final_ack":
                self._final_ack(frame)
            elif kind == FrameType.SYNC_NACK:
                self.transfers_failed += 1
                self.last_transfer_error = str(frame[1])
                self._fail_transfer(f"primary refused the transfer: {frame[1]}")
            elif kind == FrameType.FENCE:
                self.drop(f"fenced by the primary: {frame[1]}")
            else:
                self.drop(
                    f"unexpected {kind.name} in stage {self.stage.value} "
                    f"while awaiting {self.awaiting or 'nothing'}"
                )
        except (IndexError, TypeError, ValueError) as exc:
            self.drop(f"malformed {kind.name} frame: {exc}")

    def _apply_batch(self, seq: Any, ops: list[Any]) -> None:
        if seq != self.seq + 1:
            self.drop(f"batch {seq!r} out of order (expected {self.seq + 1})")
            return
        store = self.store
        for i in range(0, len(ops), 2):
            value = ops[i + 1]
            if value is None:
                store.remove(ops[i])
            else:
                store.put(ops[i], value)
        self.seq = seq
        self.batches_applied += 1
        self.send([FrameType.ACK, seq])

    def _hello(self, frame: list[Any]) -> None:
        role, seq = frame[1], frame[7]
        if role != "primary":
            self.drop(f"peer says it is the {role}, expected the primary")
            return
        self.peer_hello = frame
        self.peer_seq = seq
        self.awaiting = "directive"
        self.send(self.hello_frame())

    def _begin_receiving(self, frame: list[Any]) -> None:
        # The primary's data wins, but only once all of it has arrived: until
        # then we keep our copy (and whether it is confirmed), so a primary
        # that dies mid-transfer can still warm-start from it.
        self.fire(Event.TRANSFER_STARTED, f"primary sends {frame[2]} pairs")
        self.receiver = SnapshotReceiver(self.store.empty_like())
        self.awaiting = "snapshot"
        self._transfer_frame(frame)

    def _transfer_frame(self, frame: list[Any]) -> None:
        assert self.receiver is not None
        try:
            checksum = self.receive_transfer_frame(frame)
        except TransferError as exc:
            self.transfer_failed(str(exc))
            self._fail_transfer(f"transfer from primary failed: {exc}")
            return
        if checksum is not None:
            self.seq = self.receiver.seq
            self.store = self.receiver.store
            self._confirm(checksum, "received")

    def _skip(self, frame: list[Any]) -> None:
        _, raw_checksum, count, seq = frame
        if (
            not self.confirmed
            or checksum_from_bytes(raw_checksum) != self.store.checksum
            or count != len(self.store)
        ):
            self.transfer_failed("skip proposed but the data differs")
            self._fail_transfer("cannot skip the transfer")
            return
        self.seq = seq
        self._confirm(self.store.checksum, "already matching")

    def _confirm(self, checksum: int, how: str) -> None:
        """Seed: the backup enters in sync before the primary."""
        self.send([FrameType.SYNC_ACK, checksum_to_bytes(checksum)])
        self.confirmed = True
        self.receiver = None
        self.awaiting = ""
        self.transfers_completed += 1
        self.fire(Event.SYNC_CONFIRMED, f"{len(self.store)} pairs {how}, checksum verified")

    def _fetch(self) -> None:
        if not self.confirmed or self.stage is not Stage.BOOTSTRAPPING_PRIMARY:
            self.transfer_failed("fetch asked of a backup without confirmed data")
            self._fail_transfer("cannot serve a fetch")
            return
        self.awaiting = "final_ack"
        self.start_sending_snapshot()

    def _final_ack(self, frame: list[Any]) -> None:
        if checksum_from_bytes(frame[1]) != self.store.checksum:
            self.transfer_failed("primary fetched data with a different checksum")
            self._fail_transfer("checksum mismatch")
            return
        self._confirm(self.store.checksum, "fetched by the primary")

    def _fail_transfer(self, reason: str) -> None:
        self.drop(reason)
        if self.stage in (Stage.WARM_START, Stage.BOOTSTRAPPING_PRIMARY):
            self.fire(Event.TRANSFER_FAILED, reason)

    def status(self, now: float) -> dict[str, Any]:
        status = super().status(now)
        status.update(
            primary=self.primary_address,
            lag=max(0, self.peer_seq - self.seq),
            batches_applied=self.batches_applied,
        )
        return status
