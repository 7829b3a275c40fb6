"""What the replication cores of both roles share: the actions they ask of a driver,
and the channel bookkeeping (heartbeats, peer silence, transfers).

The cores are sans-I/O.  A driver (``node.py`` for real sockets, the
simulator in tests) calls their methods with the current time and carries
out the actions they queue in ``outbox``:

* ``Send(frame)``: write a frame on the replication channel.
* ``Connect()`` / ``Probe()``: open the channel to the backup / look whether
  the primary answers; the driver reports back with ``channel_opened`` /
  ``channel_failed`` or ``probe_result``.
* ``CloseChannel(reason)``: close it; the driver reports nothing more for it.
* ``StartTimer(name, delay)``: call ``timer_fired(name)`` after ``delay``
  (restarting a timer of the same name replaces it).
* ``Respond(token, outcome)``: answer a client request queued earlier.
* ``PumpTransfer()``: call ``pump_transfer()`` until it returns False,
  yielding to other work (and socket back-pressure) between calls.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

from pbkv.commands import Outcome
from pbkv.config import Settings
from pbkv.stages import Event, Stage, StageMachine
from pbkv.store import ShardedStore
from pbkv.transfer import SnapshotReceiver, SnapshotSender
from pbkv.wire import FrameType, checksum_to_bytes

log = logging.getLogger("pbkv")


# -- actions for the driver -----------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    frame: list[Any]


@dataclass(frozen=True, slots=True)
class Connect:
    pass


@dataclass(frozen=True, slots=True)
class Probe:
    pass


@dataclass(frozen=True, slots=True)
class CloseChannel:
    reason: str


@dataclass(frozen=True, slots=True)
class StartTimer:
    name: str
    delay: float


@dataclass(frozen=True, slots=True)
class Respond:
    token: Any
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class PumpTransfer:
    pass


Action = Send | Connect | Probe | CloseChannel | StartTimer | Respond | PumpTransfer

TICK = "tick"
RETRY = "retry"


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

    role = ""

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
        self.rng = rng or random.Random()
        self.incarnation = self.rng.getrandbits(63)
        self.machine = StageMachine(self.role, initial, self._log_transition)
        self.outbox: list[Action] = []
        self.started_at = now
        self.now = now
        self.backoff = Backoff(settings.retry_min, settings.retry_max, self.rng)
        # Whether our data is a copy a peer has verified (see the README).
        self.confirmed = False
        self.seq = 0  # last replicated batch applied here
        self.peer_seq = 0  # the peer's seq, from its last hello/heartbeat
        self.channel_up = False
        self.peer_hello: list[Any] | None = None
        self.last_received = now
        self.last_sent = now
        self.sender: SnapshotSender | None = None
        self.receiver: SnapshotReceiver | None = None
        self.transfers_completed = 0
        self.transfers_failed = 0
        self.last_transfer_error = ""

    # -- helpers -------------------------------------------------------------
    @property
    def stage(self) -> Stage:
        return self.machine.stage

    def peer_label(self) -> str:
        return "backup" if self.role == "primary" else "primary"

    def _log_transition(self, old: Stage, new: Stage, reason: str) -> None:
        log.info(
            "%s stage %s -> %s (%s) peer=%s",
            self.role,
            old.value,
            new.value,
            reason,
            self.peer_label(),
        )

    def fire(self, event: Event, reason: str) -> None:
        self.machine.fire(event, reason)

    def send(self, frame: list[Any]) -> None:
        self.last_sent = self.now
        self.outbox.append(Send(frame))

    def close_channel(self, reason: str) -> None:
        if self.channel_up:
            self.channel_up = False
            self.outbox.append(CloseChannel(reason))
        self._reset_session()

    def drop(self, reason: str) -> None:
        """Close the channel ourselves and handle it as lost."""
        if self.channel_up:
            self.close_channel(reason)
            self.channel_lost(reason)

    def _reset_session(self) -> None:
        self.peer_hello = None
        self.sender = None
        self.receiver = None

    def hello_frame(self) -> list[Any]:
        return [
            FrameType.HELLO,
            self.role,
            self.incarnation,
            self.confirmed,
            checksum_to_bytes(self.store.checksum),
            len(self.store),
            self.store.shard_count,
            self.seq,
        ]

    def start_tick(self) -> None:
        self.outbox.append(StartTimer(TICK, self.settings.heartbeat_interval))

    def tick(self) -> None:
        """Heartbeats and peer silence; subclasses add their own checks."""
        if self.channel_up:
            if self.now - self.last_received > self.settings.peer_timeout:
                self._note_interrupted_transfer("peer silent during a transfer")
                self.drop(f"{self.peer_label()} silent for {self.settings.peer_timeout}s")
            elif self.now - self.last_sent >= self.settings.heartbeat_interval * 0.9:
                self.send([FrameType.HEARTBEAT, self.seq])
        self.start_tick()

    def take_actions(self) -> list[Action]:
        actions, self.outbox = self.outbox, []
        return actions

    # -- transfers -------------------------------------------------------------
    def start_sending_snapshot(self) -> None:
        self.sender = SnapshotSender(self.store, self.settings.transfer_chunk, self.seq)
        log.info(
            "%s transfer to %s started: %d pairs", self.role, self.peer_label(), self.sender.total
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
            log.info("%s transfer to %s sent: %d pairs", self.role, self.peer_label(), sender.total)
            self.sender = None
            return False
        return True

    def receive_transfer_frame(self, frame: list[Any]) -> int | None:
        """Feed the receiver one frame (raises TransferError); log each verified shard."""
        receiver = self.receiver
        assert receiver is not None
        checksum = receiver.feed(frame)
        if frame[0] == FrameType.SHARD_END:
            log.info(
                "%s transfer from %s: shard %d/%d verified, %d/%d pairs",
                self.role,
                self.peer_label(),
                frame[1] + 1,
                receiver.sender_shards,
                receiver.received,
                receiver.expected_total,
            )
        return checksum

    def transfer_failed(self, reason: str) -> None:
        self.transfers_failed += 1
        self.last_transfer_error = reason
        log.warning("%s transfer failed: %s peer=%s", self.role, reason, self.peer_label())
        if self.channel_up:
            self.send([FrameType.SYNC_NACK, reason])

    # -- events every driver delivers ------------------------------------------
    def frame_received(self, now: float, frame: list[Any]) -> None:
        self.now = now
        self.last_received = now
        if not self.channel_up:
            return
        self.handle_frame(frame)

    def timer_fired(self, now: float, name: str) -> None:
        self.now = now
        if name == TICK:
            self.tick()
        elif name == RETRY:
            self.retry()

    def channel_closed(self, now: float, reason: str) -> None:
        """The driver saw the channel close (EOF, reset, bad frame)."""
        self.now = now
        if self.channel_up:
            self._note_interrupted_transfer(reason)
            self.channel_up = False
            self._reset_session()
            self.channel_lost(reason)

    def _note_interrupted_transfer(self, reason: str) -> None:
        """A channel that fails mid-transfer (a corrupted frame, say) fails the transfer."""
        if self.sender is not None or self.receiver is not None:
            self.transfers_failed += 1
            self.last_transfer_error = reason

    # -- for subclasses --------------------------------------------------------
    def handle_frame(self, frame: list[Any]) -> None:
        raise NotImplementedError

    def channel_lost(self, reason: str) -> None:
        raise NotImplementedError

    def retry(self) -> None:
        pass

    def status(self, now: float) -> dict[str, Any]:
        self.now = now
        return {
            "role": self.role,
            "stage": self.stage.value,
            "keys": len(self.store),
            "checksum": f"{self.store.checksum:032x}",
            "confirmed": self.confirmed,
            "seq": self.seq,
            "peer_seq": self.peer_seq,
            "peer_connected": self.channel_up and self.peer_hello is not None,
            "uptime": round(self.now - self.started_at, 3),
            "incarnation": f"{self.incarnation:016x}",
            "transfers_completed": self.transfers_completed,
            "transfers_failed": self.transfers_failed,
            "last_transfer_error": self.last_transfer_error,
        }
