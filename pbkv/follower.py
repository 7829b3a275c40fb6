"""A spare follows the recorded backup's stream (sans-I/O; ``following.py`` drives it).

After a failover the promoted backup must bring a member in sync before it may
acknowledge writes. A spare that holds nothing needs the whole database; a spare
that followed the backup's applied stream lags by a few batches, and the new
primary's CATCHUP directive (``stages.plan``, rule 4) sends only those.

Why the backup, not the primary: the backup applies every batch the primary
acknowledges, and more (those in flight when the primary died), so a follower's
copy is a prefix of the backup's history: exactly what the backup holds when it
is promoted. (The primary's own hot path stays as it was.)

The channel (an HTTP upgrade at ``FOLLOW_PATH`` of the backup):

1. the follower opens and proves the cluster's secret as the replication channel
   does (``auth.py``, roles ``follower`` and ``source``); every later frame is keyed;
   its HELLO (keyed) names it, so a promoted backup knows whom to bring in sync first;
2. the source (the backup) sends a HELLO describing a copy of its store taken at
   one seq (a dict copy per shard, on the loop: consistent with that seq), then
   the copy as a transfer (``SnapshotSender``), then every batch it applies after
   that seq, in order, with heartbeats when idle; the follower sends nothing more.

Safety does not rest on any of this:

- the follower's copy is never *confirmed* and claims no epoch; it never makes the
  spare eligible for promotion (only the recorded backup campaigns), and it wins
  no handshake rule (SKIP, ROLLBACK and FETCH need a confirmed copy). It only
  lets a new primary choose CATCHUP, which starts only from a state equal to the
  primary's own recorded state at that seq, and ends only when the result equals
  the primary's checksum and count;
- the source only reads: what a follower sends after its proof closes the channel;
- every buffer is bounded: batches applied while the copy is still on its way
  wait up to ``FOLLOW_QUEUE_BYTES``, and the driver drops a follower whose unsent
  bytes pass it (it lags too far; it comes back later for a new copy);
- the source drops its followers whenever its data changes otherwise than by a
  batch (a sync, a rollback, a catch-up): their copies would no longer be a prefix;
- the follower applies nothing while the spare's replication channel is up, or
  once the spare's data is not exactly what the follower left it (the primary of
  the day may have replaced it), and it closes then.

Without persistence only: a followed copy written to disk would come back as a
*recovered* copy, which wins a handshake over an empty one (``stages`` rule 6).
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from pbkv import auth
from pbkv.catchup import batch_size
from pbkv.config import Settings
from pbkv.core import BATCH_CHARS, BATCH_WRITES, CHUNK_CHARS
from pbkv.routes import FOLLOW_PATH
from pbkv.stages import State
from pbkv.store import ShardedStore
from pbkv.text import printable
from pbkv.transfer import SnapshotReceiver, SnapshotSender, TransferError
from pbkv.wire import (
    CONTROL_LIMIT,
    AuthChallenge,
    AuthFailed,
    AuthProof,
    AuthResponse,
    Batch,
    Frame,
    FrameCodec,
    FrameError,
    FrameLimit,
    FrameType,
    Heartbeat,
    Hello,
    SnapshotEnd,
    frame_limits,
)

log = logging.getLogger(__name__)

__all__ = ["FOLLOW_PATH", "FOLLOW_QUEUE_BYTES", "Follower", "Source", "SpareCopy"]

# The bytes a follower may be behind by: batches waiting while its copy is sent,
# or bytes its connection has not taken yet. Past it, the follower is dropped.
FOLLOW_QUEUE_BYTES = 64 * 1024 * 1024


class Closed(Exception):
    """The channel must close, for this reason."""


class SourceStep(enum.Enum):
    AWAIT_CHALLENGE = "await_challenge"
    AWAIT_PROOF = "await_proof"
    AWAIT_NAME = "await_name"  # the follower's HELLO names it (its member address)
    SENDING_COPY = "sending_copy"
    FORWARDING = "forwarding"


class FollowStep(enum.Enum):
    AWAIT_RESPONSE = "await_response"
    AWAIT_HELLO = "await_hello"
    RECEIVING_COPY = "receiving_copy"
    FOLLOWING = "following"


@dataclass(frozen=True, slots=True)
class SpareCopy:
    """What a follower installed: the data's lineage and the state it left it in."""

    history: int
    state: State


class Source:
    """The backup's side of one follower's channel.

    ``received`` takes the follower's bytes (only its proofs); once the proofs hold,
    ``wants_copy`` turns true and the driver calls ``start`` with a copy of the
    store; ``pump`` queues the copy's frames a few at a time; ``forward`` each batch
    the backup applies. Bytes to write collect in ``outbox``; ``closed`` says why
    the channel must close (the driver closes it)."""

    def __init__(self, secret: str, chunk_pairs: int, now: float) -> None:
        self.secret = secret
        self.chunk_pairs = chunk_pairs
        self.codec = FrameCodec()
        self.step = SourceStep.AWAIT_CHALLENGE
        self.nonce = auth.new_nonce()
        self.peer_nonce = b""
        self.outbox: list[bytes] = []
        self.closed: str | None = None
        self.sender: SnapshotSender | None = None
        self.seq = 0  # the last batch sent or queued
        self.waiting: deque[Batch] = deque()  # applied while the copy is on its way
        self.waiting_bytes = 0
        self.last_sent = now
        self.opened_at = now
        self.epoch = 0
        self.member = ""  # the follower's member name, from its HELLO

    @property
    def proven(self) -> bool:
        """The follower proved the secret and named itself."""
        return self.step in (SourceStep.SENDING_COPY, SourceStep.FORWARDING)

    @property
    def wants_copy(self) -> bool:
        return self.step is SourceStep.SENDING_COPY and self.sender is None and not self.closed

    def close(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason

    def _send(self, frame: Frame, now: float) -> None:
        self.outbox.append(self.codec.encode(frame))
        self.last_sent = now

    def received(self, now: float, data: bytes) -> None:
        if self.closed:
            return
        self.codec.receive(data)
        try:
            while not self.closed:
                frame = self.codec.next_frame(_SOURCE_LIMIT)
                if frame is None:
                    return
                self._handle(frame, now)
        except FrameError as exc:
            self.close(f"bad frame from the follower: {exc}")

    def _handle(self, frame: Frame, now: float) -> None:
        if self.step is SourceStep.AWAIT_CHALLENGE and type(frame) is AuthChallenge:
            self.peer_nonce = frame.nonce
            proof = auth.proof(self.secret, "source", self.peer_nonce, self.nonce)
            self._send(AuthResponse(self.nonce, proof), now)
            self.step = SourceStep.AWAIT_PROOF
        elif self.step is SourceStep.AWAIT_PROOF and type(frame) is AuthProof:
            if not auth.verify_proof(
                self.secret, "follower", self.peer_nonce, self.nonce, frame.proof
            ):
                self._send(AuthFailed("the follower's proof does not match our secret"), now)
                self.close("the follower did not prove the secret")
                return
            keys = auth.follow_keys(self.secret, self.peer_nonce, self.nonce)
            self.codec.secure(keys.backup_to_primary, keys.primary_to_backup)
            self.step = SourceStep.AWAIT_NAME
        elif self.step is SourceStep.AWAIT_NAME and type(frame) is Hello:
            self.member = frame.member
            self.step = SourceStep.SENDING_COPY
        else:
            self.close(f"unexpected {frame.kind.name} from the follower in {self.step.value}")

    def start(self, copy: ShardedStore, seq: int, history: int, epoch: int, now: float) -> None:
        """Send ``copy`` (the store as of batch ``seq``), then the batches after it."""
        self.seq, self.epoch = seq, epoch
        hello = Hello(
            "backup", False, copy.checksum, len(copy), seq, history, (), 0, "", False, epoch=epoch
        )
        self._send(hello, now)
        self.sender = SnapshotSender(copy, self.chunk_pairs, seq, CHUNK_CHARS)

    def pump(self, now: float, max_frames: int) -> bool:
        """Queue the copy's next frames; False once it has all been queued."""
        sender = self.sender
        if sender is None or self.closed or self.step is not SourceStep.SENDING_COPY:
            return False
        for frame in sender.next_frames(max_frames):
            self._send(frame, now)
        if not sender.done:
            return True
        self.sender = None
        self.step = SourceStep.FORWARDING
        while self.waiting:
            self._send(self.waiting.popleft(), now)
        self.waiting_bytes = 0
        return False

    def forward(self, frame: Batch, now: float) -> None:
        """A batch the backup just applied (all of them, in order)."""
        if self.closed or self.step not in (SourceStep.SENDING_COPY, SourceStep.FORWARDING):
            return
        if self.sender is None and self.step is SourceStep.SENDING_COPY:
            return  # no copy taken yet: it will include this batch
        if frame.seq != self.seq + 1:
            self.close(f"batch {frame.seq} after {self.seq}: the stream has a gap")
            return
        self.seq = frame.seq
        if self.step is SourceStep.FORWARDING:
            self._send(frame, now)
            return
        self.waiting.append(frame)
        self.waiting_bytes += batch_size(frame.ops, frame.keyed)
        if self.waiting_bytes > FOLLOW_QUEUE_BYTES:
            self.close(f"the follower lags by over {FOLLOW_QUEUE_BYTES} bytes of batches")

    def tick(self, now: float, interval: float, timeout: float) -> None:
        if not self.proven and now - self.opened_at > timeout:
            self.close(f"no proof within {timeout}s")
        elif self.step is SourceStep.FORWARDING and now - self.last_sent >= interval * 0.9:
            self._send(Heartbeat(self.seq, epoch=self.epoch), now)

    def take(self) -> list[bytes]:
        out, self.outbox = self.outbox, []
        return out


class Follower:
    """The spare's side: it installs the source's copy in ``target``'s store and
    applies the batches that follow. ``target`` is the spare's replication core
    (a ``BackupCore``): its data, seq and history, and whether its channel is up."""

    def __init__(self, settings: Settings, target: FollowTarget, member: str, now: float) -> None:
        assert settings.secret is not None, "a follow channel needs the cluster's secret"
        self.secret = settings.secret
        self.member = member
        self.timeout = settings.peer_timeout
        self.target = target
        self.codec = FrameCodec()
        self.step = FollowStep.AWAIT_RESPONSE
        self.nonce = auth.new_nonce()
        self.outbox: list[bytes] = []
        self.closed: str | None = None
        self.hello: Hello | None = None
        self.receiver: SnapshotReceiver | None = None
        self.installed: SpareCopy | None = None
        self.source_seq = 0  # the source's seq, as its last frame said
        self.last_received = now
        self.batches_applied = 0
        self.discard: list[dict[str, str]] = []  # the spare's old pairs, to drop gradually
        per_type = frame_limits(
            settings.max_key_bytes,
            settings.max_value_bytes,
            BATCH_WRITES,
            BATCH_CHARS,
            settings.transfer_chunk,
            CHUNK_CHARS,
        )

        def limit(*kinds: FrameType) -> FrameLimit:
            result = CONTROL_LIMIT
            for kind in kinds:
                result = result | per_type[kind]
            return result

        copy_kinds = (FrameType.SHARD_CHUNK, FrameType.IDEMPOTENCY_CHUNK, FrameType.HEARTBEAT)
        self.limits = {
            FollowStep.AWAIT_RESPONSE: CONTROL_LIMIT,
            FollowStep.AWAIT_HELLO: limit(FrameType.HELLO),
            FollowStep.RECEIVING_COPY: limit(*copy_kinds),
            FollowStep.FOLLOWING: limit(FrameType.BATCH),
        }
        self._outbox_frame(AuthChallenge(self.nonce))

    @property
    def lag(self) -> int:
        """Batches the spare's copy is behind the source (as its last frame said)."""
        copy = self.installed
        return max(0, self.source_seq - (copy.state.seq if copy else 0))

    def _outbox_frame(self, frame: Frame) -> None:
        self.outbox.append(self.codec.encode(frame))

    def close(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason

    def take(self) -> list[bytes]:
        out, self.outbox = self.outbox, []
        return out

    def tick(self, now: float) -> None:
        if not self.closed and now - self.last_received > self.timeout:
            self.close(f"the source was silent for {self.timeout}s")

    def received(self, now: float, data: bytes) -> None:
        if self.closed:
            return
        self.last_received = now
        self.codec.receive(data)
        try:
            while not self.closed:
                frame = self.codec.next_frame(self.limits[self.step])
                if frame is None:
                    return
                self._handle(frame)
        except FrameError as exc:
            self.close(f"bad frame from the source: {exc}")
        except TransferError as exc:
            self.close(f"the source's copy is wrong: {exc}")
        except Closed as exc:
            self.close(str(exc))

    def _handle(self, frame: Frame) -> None:
        step, kind = self.step, frame.kind
        if kind is FrameType.HEARTBEAT and step is not FollowStep.AWAIT_RESPONSE:
            assert isinstance(frame, Heartbeat)
            self.source_seq = max(self.source_seq, frame.seq)
        elif step is FollowStep.AWAIT_RESPONSE and type(frame) is AuthResponse:
            peer = frame.nonce
            if not auth.verify_proof(self.secret, "source", self.nonce, peer, frame.proof):
                raise Closed("the source did not prove the secret")
            self._outbox_frame(AuthProof(auth.proof(self.secret, "follower", self.nonce, peer)))
            keys = auth.follow_keys(self.secret, self.nonce, peer)
            self.codec.secure(keys.primary_to_backup, keys.backup_to_primary)
            target = self.target
            name = Hello("backup", False, 0, 0, 0, target.history, (), 0, self.member, False)
            self._outbox_frame(name)
            self.step = FollowStep.AWAIT_HELLO
        elif step is FollowStep.AWAIT_RESPONSE and type(frame) is AuthFailed:
            raise Closed(f"the source refused our proof: {printable(frame.reason, 200)}")
        elif step is FollowStep.AWAIT_HELLO and type(frame) is Hello:
            self.hello = frame
            self.source_seq = frame.seq
            self.receiver = SnapshotReceiver(self.target.store.empty_like())
            self.step = FollowStep.RECEIVING_COPY
        elif step is FollowStep.RECEIVING_COPY and kind in _COPY_FRAMES:
            self._copy_frame(frame)
        elif step is FollowStep.FOLLOWING and type(frame) is Batch:
            self._apply(frame)
        else:
            raise Closed(f"unexpected {kind.name} from the source in {step.value}")

    def _copy_frame(self, frame: Frame) -> None:
        receiver, hello = self.receiver, self.hello
        assert receiver is not None and hello is not None
        checksum = receiver.feed(frame)
        if checksum is None:
            return
        assert type(frame) is SnapshotEnd
        store = receiver.store
        if (checksum, len(store), receiver.seq) != (hello.checksum, hello.count, hello.seq):
            raise Closed("the source's copy is not what its HELLO announced")
        target = self.target
        self._check_target()
        if self.installed is None and target.confirmed:
            # Whatever it is, a confirmed copy is not the follower's to replace.
            raise Closed("the spare holds a confirmed copy: not replaced by a followed one")
        self.discard = target.adopt_followed(store, hello.seq, hello.history)
        self.receiver = None
        self.step = FollowStep.FOLLOWING
        self._note_installed()
        log.info(
            "spare installed the followed copy: %d pairs at seq %d; following on",
            len(target.store),
            hello.seq,
        )

    def _apply(self, frame: Batch) -> None:
        self._check_target()
        target = self.target
        if frame.seq != target.seq + 1:
            raise Closed(f"batch {frame.seq} out of order (expected {target.seq + 1})")
        if frame.absent:  # the source passes on the pairs each batch wrote
            raise Closed(f"batch {frame.seq} has pairs written where absent")
        store = target.store
        store.apply(frame.ops)
        store.idempotency.apply(frame.time, frame.keyed)
        target.seq = frame.seq
        self.source_seq = max(self.source_seq, frame.seq)
        self.batches_applied += 1
        self._note_installed()

    def _check_target(self) -> None:
        """The spare's data is ours to change only while its replication channel is
        down and nobody else changed it since we last did."""
        target = self.target
        if target.channel_up:
            raise Closed("the spare's replication channel is up: a primary decides now")
        copy = self.installed
        if copy is not None:
            now = State(target.seq, target.store.checksum, len(target.store))
            if target.history != copy.history or now != copy.state:
                raise Closed("the spare's data changed otherwise (a primary synced it)")

    def _note_installed(self) -> None:
        target = self.target
        state = State(target.seq, target.store.checksum, len(target.store))
        self.installed = SpareCopy(target.history, state)


# The follower's frames: its proofs and its HELLO.
_SOURCE_LIMIT = CONTROL_LIMIT | FrameLimit(8192, 16, CONTROL_LIMIT.max_text)

_COPY_FRAMES = frozenset(
    {
        FrameType.SNAPSHOT_BEGIN,
        FrameType.SHARD_CHUNK,
        FrameType.SHARD_END,
        FrameType.IDEMPOTENCY_CHUNK,
        FrameType.SNAPSHOT_END,
    }
)


class FollowTarget(Protocol):
    """What the follower needs of the spare's core (``BackupCore`` is one)."""

    store: ShardedStore
    seq: int
    history: int
    confirmed: bool
    channel_up: bool

    def adopt_followed(
        self, store: ShardedStore, seq: int, history: int
    ) -> list[dict[str, str]]: ...
