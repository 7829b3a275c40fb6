"""Replication frames: what the primary and the backup say to each other.

A frame on the wire is ``length (u32, big endian) | epoch (u64) | xxh3_64 of
payload, seeded with the epoch (u64) | payload``, the payload a msgpack array
whose first item is the frame type.  The per-frame hash catches a corrupted byte
anywhere on the channel, the epoch included; the per-shard and whole-database
checksums of a transfer then catch a wrong store.  Once both servers proved they
hold the shared secret (``auth.py``), the channel switches to keyed frames,
``length | epoch | 16-byte MAC | payload``: the MAC covers a per-direction
sequence number that never travels, the epoch and the payload, so a frame
injected, altered, replayed or reordered on the wire fails like a corrupted one.

Every frame carries the **epoch** its sender acts under (the leadership epoch of
a coordinated cluster, 0 without a coordinator: see ``Frame.epoch``).  It travels
in the header rather than among the fields: one place for every frame type, a
fixed 8 bytes, and a frame's fields keep their meaning.

Each frame type is a small class.  ``FrameCodec`` (sans-I/O: give it bytes,
take frames out one at a time) builds them from the decoded array and checks
the arity and the type of every field there, so a malformed or hostile frame
is refused in one place, as a ``FrameError``, before any handler sees it.
Every frame is also bounded before it is decoded: its length, and msgpack's
string, array and binary lengths, by a ``FrameLimit`` that the receiver sets
for the frames it accepts next (small ones only, until the handshake is done).
"""

from __future__ import annotations

import enum
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import msgpack
import xxhash

# The most shards a transfer may declare (the ``shards`` setting's bound): the receiver
# keeps a few numbers per sender shard, allocated at SNAPSHOT_BEGIN.
from pbkv.config import MAX_SHARDS
from pbkv.idempotency import BATCH_ITEMS, MAX_KEY_CHARS, TRANSFER_ITEMS

_HEADER = struct.Struct(">IQQ")  # length, epoch, hash
HEADER_SIZE = _HEADER.size
_KEYED_HEADER = struct.Struct(">IQ16s")  # length, epoch, MAC
KEYED_HEADER_SIZE = _KEYED_HEADER.size
_LENGTH = struct.Struct(">I")  # the first field of both
_SEQ_EPOCH = struct.Struct(">QQ")
MAX_EPOCH = (1 << 64) - 1
MAX_FRAME = 256 * 1024 * 1024  # no limit is ever larger than this
MAX_REASON = 1000  # characters of a reason that travels (SYNC_NACK, FENCE, AUTH_FAILED)

UPGRADE_TOKEN = b"pbkv-repl/1"
UPGRADE_PATH = b"/kvrepl"


class FrameType(enum.IntEnum):
    HELLO = 1
    BATCH = 2
    ACK = 3
    HEARTBEAT = 4
    FETCH = 5  # the primary asks for the backup's data
    SNAPSHOT_BEGIN = 6
    SHARD_CHUNK = 7
    SHARD_END = 8
    SNAPSHOT_END = 9
    SKIP = 10  # "we already hold the same data"
    SYNC_ACK = 11
    SYNC_NACK = 12
    FENCE = 13  # the primary tells the backup to drop out
    # Authentication (with a secret set), before the HELLO.
    AUTH_CHALLENGE = 14  # primary: its nonce
    AUTH_RESPONSE = 15  # backup: its nonce and its proof
    AUTH_PROOF = 16  # primary: its proof
    AUTH_FAILED = 17  # either: the proof did not verify (a courtesy: the log says why)
    ROLLBACK = 18  # partial resync: the backup undoes the batches the primary never applied
    IDEMPOTENCY_CHUNK = 19  # a transfer's idempotency table (after the shards)
    CATCHUP = 20  # partial resync: the backup is behind; the batches it lacks follow


class FrameError(ValueError):
    """The byte stream is not a valid frame sequence; the channel must close.

    ``frames`` holds the good frames that came before the bad one in the same
    feed: they are real and are still handled before the channel closes.
    """

    def __init__(self, message: str, frames: list[Frame] | None = None) -> None:
        super().__init__(message)
        self.frames = frames or []


# -- field kinds: how a field travels and what is accepted for it ---------------------
def _count(raw: Any) -> int:
    if type(raw) is not int or raw < 0:
        raise FrameError("must be a non-negative integer")
    return raw


def _shard_count(raw: Any) -> int:
    """How many shards a transfer declares: checked before the receiver allocates for them."""
    if type(raw) is not int or not 1 <= raw <= MAX_SHARDS:
        raise FrameError(f"a shard count must be 1 to {MAX_SHARDS}, not {_number(raw)}")
    return raw


def _shard(raw: Any) -> int:
    if type(raw) is not int or not 0 <= raw < MAX_SHARDS:
        raise FrameError(
            f"a shard number must be a non-negative integer below {MAX_SHARDS}, not {_number(raw)}"
        )
    return raw


def _number(raw: Any) -> str:
    """A number the peer sent, for a reason (anything else by its type only)."""
    return str(raw) if type(raw) is int else f"a {type(raw).__name__}"


def _flag(raw: Any) -> bool:
    if type(raw) is not bool:
        raise FrameError("must be true or false")
    return raw


def _text(raw: Any) -> str:
    if type(raw) is not str:
        raise FrameError("must be a string")
    return raw


MAX_MEMBER = 320  # characters of a member's name (``host:port#run``)


def _member(raw: Any) -> str:
    if type(raw) is not str or len(raw) > MAX_MEMBER:
        raise FrameError(f"must be a string of at most {MAX_MEMBER} characters")
    return raw


def _bytes32(raw: Any) -> bytes:
    if type(raw) is not bytes or len(raw) != 32:
        raise FrameError("must be 32 bytes")
    return raw


def _checksum(raw: Any) -> int:
    if type(raw) is not bytes or len(raw) != 16:
        raise FrameError("must be a 16-byte checksum")
    return int.from_bytes(raw, "big")


def _operations(raw: Any) -> list[str | None]:
    """A batch: key, value-or-None, key, ... -- checked whole before any is applied."""
    if type(raw) is not list or len(raw) % 2:
        raise FrameError("must be a flat list of key, value-or-null pairs")
    # Type sets in C loops: a bulk load's batches hold thousands of pairs.
    if raw and set(map(type, raw[0::2])) != {str}:
        raise FrameError("keys must be strings")
    if not set(map(type, raw[1::2])) <= _VALUE_TYPES:
        raise FrameError("values must be strings or null")
    return raw


_VALUE_TYPES = frozenset({str, type(None)})


_U64 = 1 << 64


def _keyed_entries(raw: Any, items: int) -> list[Any]:
    """Idempotency entries, flat: key, fingerprint, ok, value-or-None (+ time made)."""
    if type(raw) is not list or len(raw) % items:
        raise FrameError(f"must be a flat list of {items}-item idempotency entries")
    fault = _first_fault(raw, items)
    if fault is not None:
        raise FrameError(fault)
    return raw


def _first_fault(raw: list[Any], items: int) -> str | None:
    """What is wrong with the first entry at fault (None: nothing).  A plain loop:
    compiled, about a tenth of a microsecond an entry, less than checking each
    column in C passes (``map``, ``set``, ``min``) that build lists and sets."""
    for i in range(0, len(raw), items):
        key = raw[i]
        if type(key) is not str or not 0 < len(key) <= MAX_KEY_CHARS:
            return f"an idempotency key must be 1 to {MAX_KEY_CHARS} characters"
        print_ = raw[i + 1]
        if type(print_) is not int or not 0 <= print_ < _U64:
            return "a fingerprint must be a 64-bit non-negative integer"
        value = raw[i + 3]
        if type(raw[i + 2]) is not bool or not (value is None or type(value) is str):
            return "a remembered reply is a flag and a string or null"
        if items == TRANSFER_ITEMS and (type(raw[i + 4]) is not int or raw[i + 4] < 0):
            return "an entry's time must be a non-negative integer"
    return None


def _batch_entries(raw: Any) -> list[Any]:
    if type(raw) is list and not raw:  # the hot path: a batch without keyed writes
        return raw
    return _keyed_entries(raw, BATCH_ITEMS)


def _transfer_entries(raw: Any) -> list[Any]:
    return _keyed_entries(raw, TRANSFER_ITEMS)


def _pairs(raw: Any) -> list[str]:
    """A transfer chunk: key, value, key, value, ..."""
    if type(raw) is not list or len(raw) % 2:
        raise FrameError("must be a flat list of key, value pairs")
    if not all(type(item) is str for item in raw):
        raise FrameError("keys and values must be strings")
    return raw


MAX_UNDO_POINTS = 64  # states a backup offers to roll back to, in its HELLO


def _history(raw: Any) -> int:
    if type(raw) is not int or not 0 <= raw < 1 << 64:
        raise FrameError("must be a 64-bit history id")
    return raw


def _epoch(raw: Any) -> int:
    if type(raw) is not int or not 0 <= raw <= MAX_EPOCH:
        raise FrameError(f"an epoch must be a 64-bit non-negative integer, not {_number(raw)}")
    return raw


def _undo_points(raw: Any) -> tuple[tuple[int, int, int], ...]:
    """(seq, checksum, count) of each state the sender can roll back to."""
    if type(raw) is not list or len(raw) > MAX_UNDO_POINTS:
        raise FrameError(f"must be a list of at most {MAX_UNDO_POINTS} points")
    points = []
    for point in raw:
        if type(point) is not list or len(point) != 3:
            raise FrameError("a point is [seq, checksum, count]")
        points.append((_count(point[0]), _checksum(point[1]), _count(point[2])))
    return tuple(points)


def checksum_to_bytes(value: int) -> bytes:
    return value.to_bytes(16, "big")


def _points_to_wire(points: tuple[tuple[int, int, int], ...]) -> list[list[Any]]:
    return [[seq, checksum_to_bytes(checksum), count] for seq, checksum, count in points]


# How a field of each kind travels, where that is not as it is held.
_ENCODERS: dict[Callable[[Any], Any], Callable[[Any], Any]] = {
    _checksum: checksum_to_bytes,
    _undo_points: _points_to_wire,
}


# -- the frames ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, init=False)
class Frame:
    """Base of every frame class; ``FRAMES`` gives each its type and the kinds of its
    fields, in order.

    ``epoch``: the epoch the sender acts under (a primary's own, a backup's highest
    seen; 0 without a coordinator).  Every frame has it, keyword-only and after the
    fields; it travels in the header, so ``to_wire`` leaves it out.

    Each class writes its ``__init__`` out (``dataclasses`` generates the rest), and
    the frame types and field kinds live in a table rather than in class attributes:
    compiled, a frame is then built natively, and ``dataclasses`` would take a class
    attribute for a field there (see ``pbkv/compiled.py``).
    """

    epoch: int

    def __init__(self, *, epoch: int = 0) -> None:
        object.__setattr__(self, "epoch", epoch)

    @property
    def kind(self) -> FrameType:
        return _KIND_OF[type(self)]

    def __reduce__(self) -> tuple[Any, ...]:
        # A copy (or a pickle) is built through ``__init__``: compiled, ``__new__`` alone
        # would call it without the fields.
        return _frame_of, (type(self), tuple(getattr(self, f.name) for f in fields(self)))

    def to_wire(self) -> list[Any]:
        values = [getattr(self, f.name) for f in fields(self)[1:]]  # after the epoch
        return [
            self.kind,
            *(
                _ENCODERS.get(kind, _same)(value)
                for kind, value in zip(_FIELD_KINDS[type(self)], values, strict=True)
            ),
        ]


def _same(value: Any) -> Any:
    return value


def _frame_of(cls: type[Frame], values: tuple[Any, ...]) -> Frame:
    """The frame of class ``cls`` whose fields (the epoch first) are ``values``."""
    epoch, *rest = values
    return cls(*rest, epoch=epoch)


@dataclass(frozen=True, slots=True, init=False)
class Hello(Frame):
    """Who we are and what we hold; the primary decides from both hellos."""

    role: str
    confirmed: bool  # a peer verified our data (see the README)
    checksum: int
    count: int
    seq: int  # last replicated batch applied
    history: int  # the lineage of our data: new whenever it is replaced
    undo: tuple[tuple[int, int, int], ...]  # backup: (seq, checksum, count) it can reach
    # The epoch under which our data was last confirmed (the frame's own ``epoch`` is the
    # one we act under now: a backup's copy may be of an older one).
    copy_epoch: int
    # With a coordinator: the sender's member name (what the in-sync record names).
    member: str
    # Our data was loaded from disk at start and no peer has confirmed it since.
    recovered: bool

    def __init__(
        self,
        role: str,
        confirmed: bool,
        checksum: int,
        count: int,
        seq: int,
        history: int,
        undo: tuple[tuple[int, int, int], ...] = (),
        copy_epoch: int = 0,
        member: str = "",
        recovered: bool = False,
        *,
        epoch: int = 0,
    ) -> None:
        object.__setattr__(self, "role", role)
        object.__setattr__(self, "confirmed", confirmed)
        object.__setattr__(self, "checksum", checksum)
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "seq", seq)
        object.__setattr__(self, "history", history)
        object.__setattr__(self, "undo", undo)
        object.__setattr__(self, "copy_epoch", copy_epoch)
        object.__setattr__(self, "member", member)
        object.__setattr__(self, "recovered", recovered)
        object.__setattr__(self, "epoch", epoch)


@dataclass(frozen=True, slots=True, init=False)
class Batch(Frame):
    seq: int
    ops: list[str | None]  # key, value-or-None (a delete), key, ...
    # The primary's table time (ms), by which both copies expire idempotency entries.
    time: int
    # The idempotency entries its keyed writes make: key, fingerprint, ok, value, ...
    keyed: list[Any]
    # How many of the first pairs of ops are written only where their key holds no
    # value (a bulk load's chunks in insert mode): the receiver finds out which, as
    # the primary does when the batch is acknowledged.  Only the live stream carries
    # them; what a server records and passes on holds the pairs it wrote.
    absent: int

    def __init__(
        self,
        seq: int,
        ops: list[str | None],
        time: int = 0,
        keyed: list[Any] | None = None,
        absent: int = 0,
        *,
        epoch: int = 0,
    ) -> None:
        object.__setattr__(self, "seq", seq)
        object.__setattr__(self, "ops", ops)
        object.__setattr__(self, "time", time)
        object.__setattr__(self, "keyed", [] if keyed is None else keyed)
        object.__setattr__(self, "absent", absent)
        object.__setattr__(self, "epoch", epoch)

    def to_wire(self) -> list[Any]:  # the hot path: no generic conversion
        return [FrameType.BATCH, self.seq, self.ops, self.time, self.keyed, self.absent]

    def absent_fault(self) -> str | None:
        """Why its ``absent`` pairs cannot be applied (None: they can)."""
        absent = self.absent
        if not absent:
            return None
        if 2 * absent > len(self.ops):
            return f"batch {self.seq}: {absent} pairs written where absent, of {len(self.ops) // 2}"
        if None in self.ops[1 : 2 * absent : 2]:
            return f"batch {self.seq}: a pair written where absent deletes"
        return None


@dataclass(frozen=True, slots=True, init=False)
class Ack(Frame):
    """A backup applied batch ``seq``, after which its copy has this checksum and count:
    the primary compares them with its own after the batch, so a copy that went
    astray is found at the batch where it did, not at the next handshake."""

    seq: int
    checksum: int
    count: int

    def __init__(self, seq: int, checksum: int, count: int, *, epoch: int = 0) -> None:
        object.__setattr__(self, "seq", seq)
        object.__setattr__(self, "checksum", checksum)
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "epoch", epoch)

    def to_wire(self) -> list[Any]:
        return [FrameType.ACK, self.seq, checksum_to_bytes(self.checksum), self.count]


@dataclass(frozen=True, slots=True, init=False)
class Heartbeat(Frame):
    seq: int

    def __init__(self, seq: int, *, epoch: int = 0) -> None:
        object.__setattr__(self, "seq", seq)
        object.__setattr__(self, "epoch", epoch)


@dataclass(frozen=True, slots=True, init=False)
class Fetch(Frame):
    def __init__(self, *, epoch: int = 0) -> None:
        object.__setattr__(self, "epoch", epoch)


@dataclass(frozen=True, slots=True, init=False)
class SnapshotBegin(Frame):
    shards: int
    count: int

    def __init__(self, shards: int, count: int, *, epoch: int = 0) -> None:
        object.__setattr__(self, "shards", shards)
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "epoch", epoch)


@dataclass(frozen=True, slots=True, init=False)
class ShardChunk(Frame):
    shard: int
    pairs: list[str]  # key, value, key, value, ...

    def __init__(self, shard: int, pairs: list[str], *, epoch: int = 0) -> None:
        object.__setattr__(self, "shard", shard)
        object.__setattr__(self, "pairs", pairs)
        object.__setattr__(self, "epoch", epoch)


@dataclass(frozen=True, slots=True, init=False)
class ShardEnd(Frame):
    shard: int
    checksum: int
    count: int

    def __init__(self, shard: int, checksum: int, count: int, *, epoch: int = 0) -> None:
        object.__setattr__(self, "shard", shard)
        object.__setattr__(self, "checksum", checksum)
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "epoch", epoch)


@dataclass(frozen=True, slots=True, init=False)
class SnapshotEnd(Frame):
    checksum: int
    count: int
    seq: int

    def __init__(self, checksum: int, count: int, seq: int, *, epoch: int = 0) -> None:
        object.__setattr__(self, "checksum", checksum)
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "seq", seq)
        object.__setattr__(self, "epoch", epoch)


@dataclass(frozen=True, slots=True, init=False)
class Skip(Frame):
    checksum: int
    count: int
    seq: int

    def __init__(self, checksum: int, count: int, seq: int, *, epoch: int = 0) -> None:
        object.__setattr__(self, "checksum", checksum)
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "seq", seq)
        object.__setattr__(self, "epoch", epoch)


@dataclass(frozen=True, slots=True, init=False)
class SyncAck(Frame):
    checksum: int

    def __init__(self, checksum: int, *, epoch: int = 0) -> None:
        object.__setattr__(self, "checksum", checksum)
        object.__setattr__(self, "epoch", epoch)


@dataclass(frozen=True, slots=True, init=False)
class SyncNack(Frame):
    reason: str

    def __init__(self, reason: str, *, epoch: int = 0) -> None:
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "epoch", epoch)


@dataclass(frozen=True, slots=True, init=False)
class Fence(Frame):
    reason: str

    def __init__(self, reason: str, *, epoch: int = 0) -> None:
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "epoch", epoch)


@dataclass(frozen=True, slots=True, init=False)
class Rollback(Frame):
    """The primary to a backup ahead of it in the same history: undo back to ``seq``."""

    seq: int
    checksum: int  # the primary's: what the backup must hold afterwards
    count: int

    def __init__(self, seq: int, checksum: int, count: int, *, epoch: int = 0) -> None:
        object.__setattr__(self, "seq", seq)
        object.__setattr__(self, "checksum", checksum)
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "epoch", epoch)


@dataclass(frozen=True, slots=True, init=False)
class Catchup(Frame):
    """The primary to a backup behind it in the same history: from the state the backup
    holds (``seq``, ``checksum``, ``count``) the batches up to ``to_seq`` follow, after
    which the backup must hold ``to_checksum`` and ``to_count``."""

    seq: int
    checksum: int
    count: int
    to_seq: int
    to_checksum: int
    to_count: int

    def __init__(
        self,
        seq: int,
        checksum: int,
        count: int,
        to_seq: int,
        to_checksum: int,
        to_count: int,
        *,
        epoch: int = 0,
    ) -> None:
        object.__setattr__(self, "seq", seq)
        object.__setattr__(self, "checksum", checksum)
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "to_seq", to_seq)
        object.__setattr__(self, "to_checksum", to_checksum)
        object.__setattr__(self, "to_count", to_count)
        object.__setattr__(self, "epoch", epoch)


@dataclass(frozen=True, slots=True, init=False)
class IdempotencyChunk(Frame):
    """Part of a transfer's idempotency table, oldest entries first, after the shards
    (at least one, so the table's time travels with an empty table too)."""

    clock: int  # the table's time (ms)
    entries: list[Any]  # key, fingerprint, ok, value, time made, ...

    def __init__(self, clock: int, entries: list[Any], *, epoch: int = 0) -> None:
        object.__setattr__(self, "clock", clock)
        object.__setattr__(self, "entries", entries)
        object.__setattr__(self, "epoch", epoch)


@dataclass(frozen=True, slots=True, init=False)
class AuthChallenge(Frame):
    nonce: bytes

    def __init__(self, nonce: bytes, *, epoch: int = 0) -> None:
        object.__setattr__(self, "nonce", nonce)
        object.__setattr__(self, "epoch", epoch)


@dataclass(frozen=True, slots=True, init=False)
class AuthResponse(Frame):
    nonce: bytes
    proof: bytes

    def __init__(self, nonce: bytes, proof: bytes, *, epoch: int = 0) -> None:
        object.__setattr__(self, "nonce", nonce)
        object.__setattr__(self, "proof", proof)
        object.__setattr__(self, "epoch", epoch)


@dataclass(frozen=True, slots=True, init=False)
class AuthProof(Frame):
    proof: bytes

    def __init__(self, proof: bytes, *, epoch: int = 0) -> None:
        object.__setattr__(self, "proof", proof)
        object.__setattr__(self, "epoch", epoch)


@dataclass(frozen=True, slots=True, init=False)
class AuthFailed(Frame):
    reason: str

    def __init__(self, reason: str, *, epoch: int = 0) -> None:
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "epoch", epoch)


# Each frame type's class and the kinds of its fields, in order: how each field
# travels and what is accepted for it (``frame_from_wire``).
FRAMES: dict[FrameType, tuple[type[Frame], tuple[Callable[[Any], Any], ...]]] = {
    FrameType.HELLO: (
        Hello,
        (_text, _flag, _checksum, _count, _count, _history, _undo_points, _epoch, _member, _flag),
    ),
    FrameType.BATCH: (Batch, (_count, _operations, _count, _batch_entries, _count)),
    FrameType.ACK: (Ack, (_count, _checksum, _count)),
    FrameType.HEARTBEAT: (Heartbeat, (_count,)),
    FrameType.FETCH: (Fetch, ()),
    FrameType.SNAPSHOT_BEGIN: (SnapshotBegin, (_shard_count, _count)),
    FrameType.SHARD_CHUNK: (ShardChunk, (_shard, _pairs)),
    FrameType.SHARD_END: (ShardEnd, (_shard, _checksum, _count)),
    FrameType.SNAPSHOT_END: (SnapshotEnd, (_checksum, _count, _count)),
    FrameType.SKIP: (Skip, (_checksum, _count, _count)),
    FrameType.SYNC_ACK: (SyncAck, (_checksum,)),
    FrameType.SYNC_NACK: (SyncNack, (_text,)),
    FrameType.FENCE: (Fence, (_text,)),
    FrameType.ROLLBACK: (Rollback, (_count, _checksum, _count)),
    FrameType.CATCHUP: (Catchup, (_count, _checksum, _count, _count, _checksum, _count)),
    FrameType.IDEMPOTENCY_CHUNK: (IdempotencyChunk, (_count, _transfer_entries)),
    FrameType.AUTH_CHALLENGE: (AuthChallenge, (_bytes32,)),
    FrameType.AUTH_RESPONSE: (AuthResponse, (_bytes32, _bytes32)),
    FrameType.AUTH_PROOF: (AuthProof, (_bytes32,)),
    FrameType.AUTH_FAILED: (AuthFailed, (_text,)),
}
FRAME_CLASSES: dict[FrameType, type[Frame]] = {kind: cls for kind, (cls, _) in FRAMES.items()}
_KIND_OF: dict[type[Frame], FrameType] = {cls: kind for kind, cls in FRAME_CLASSES.items()}
_FIELD_KINDS: dict[type[Frame], tuple[Callable[[Any], Any], ...]] = dict(FRAMES.values())
assert set(FRAME_CLASSES) == set(FrameType), "every frame type needs its class"
_FRAME_TYPES = {kind.value: kind for kind in FrameType}


def _check(field_kind: Callable[[Any], Any], raw: Any) -> Any:
    return field_kind(raw)


def _fault(kind: FrameType, kinds: tuple[Callable[[Any], Any], ...], items: list[Any]) -> str:
    """What is wrong with a frame whose fields did not all pass: the first that fails."""
    for index, (field_kind, raw) in enumerate(zip(kinds, items[1:], strict=True), 1):
        try:
            field_kind(raw)
        except FrameError as exc:
            return f"{kind.name} field {index}: {exc}"
    return f"{kind.name}: a field is not valid"


def frame_from_wire(items: Any, epoch: int = 0) -> Frame:
    """The typed frame of a decoded msgpack array (and the epoch of its header);
    ``FrameError`` when it is not one."""
    if type(items) is not list or not items or not isinstance(items[0], int):
        raise FrameError("a frame must be a non-empty array starting with its type")
    kind = _FRAME_TYPES.get(items[0])  # a dict lookup: calling the enum is slower
    if kind is None:
        raise FrameError(f"unknown frame type {items[0]}")
    cls, kinds = FRAMES[kind]
    if len(items) != len(kinds) + 1:
        raise FrameError(f"{kind.name} has {len(items) - 1} fields, expected {len(kinds)}")
    try:  # every field checked in one C-level pass; ``_fault`` names what failed
        values = list(map(_check, kinds, items[1:]))
    except FrameError:
        raise FrameError(_fault(kind, kinds, items)) from None
    return cls(*values, epoch=epoch)


def reason_text(reason: str) -> str:
    """A reason short enough for the control-frame limit."""
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."


# -- limits ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FrameLimit:
    """How large a frame may be, checked before and while it is decoded."""

    max_bytes: int  # payload length
    max_items: int  # longest msgpack array
    max_text: int  # longest string, in bytes

    def __or__(self, other: FrameLimit) -> FrameLimit:
        """A limit that admits both."""
        return FrameLimit(
            max(self.max_bytes, other.max_bytes),
            max(self.max_items, other.max_items),
            max(self.max_text, other.max_text),
        )


# Every frame but BATCH and SHARD_CHUNK: a few numbers, a checksum, a nonce or a reason.
CONTROL_LIMIT = FrameLimit(max_bytes=4 * MAX_REASON + 256, max_items=8, max_text=4 * MAX_REASON)
# A UTF-8 character is at most 4 bytes, and msgpack adds at most 5 per string.
_PER_CHAR, _PER_ITEM = 4, 5
_U64_ITEM = 9  # a msgpack integer of 64 bits


def frame_limits(
    max_key_bytes: int,
    max_value_bytes: int,
    batch_writes: int,
    batch_chars: int,
    chunk_pairs: int,
    chunk_chars: int,
) -> dict[FrameType, FrameLimit]:
    """The limit of each frame type, from what a sender with the same settings sends:
    a batch closes at ``batch_writes`` writes or past ``batch_chars`` characters (and
    a transfer chunk at ``chunk_pairs`` pairs or past ``chunk_chars``), so it holds at
    most one more write (pair) than that.  A keyed write adds an idempotency entry
    (four items, its key, and a delete's reply holds the old value); a transfer's
    idempotency chunk is bounded as a shard chunk is, five items an entry."""
    one_write = max_key_bytes + max_value_bytes
    one_entry = MAX_KEY_CHARS + max_value_bytes
    text = max(max_key_bytes, max_value_bytes, CONTROL_LIMIT.max_text)

    def bulk(items: int, chars: int, largest: int = one_write, per_item: int = _PER_ITEM) -> int:
        return min(_PER_CHAR * (chars + largest) + per_item * items + 64, MAX_FRAME)

    limits = dict.fromkeys(FrameType, CONTROL_LIMIT)
    # A backup's HELLO lists the states it can roll back to.
    limits[FrameType.HELLO] = FrameLimit(8192, MAX_UNDO_POINTS, CONTROL_LIMIT.max_text)
    # Ops and keyed entries of batch_writes + 1 writes; a fingerprint takes 9 bytes.
    writes = batch_writes + 1
    batch_bytes = bulk(6 * writes, batch_chars, one_write + one_entry, _U64_ITEM)
    limits[FrameType.BATCH] = FrameLimit(batch_bytes, BATCH_ITEMS * writes, text)
    limits[FrameType.SHARD_CHUNK] = FrameLimit(
        bulk(2 * chunk_pairs, chunk_chars), 2 * chunk_pairs, text
    )
    entries = chunk_pairs + 1
    limits[FrameType.IDEMPOTENCY_CHUNK] = FrameLimit(
        bulk(TRANSFER_ITEMS * entries, chunk_chars, one_entry, _U64_ITEM),
        TRANSFER_ITEMS * entries,
        text,
    )
    return limits


# The codec's default: anything a frame may be (for tools and tests).
NO_LIMIT = FrameLimit(MAX_FRAME, MAX_FRAME, MAX_FRAME)


# -- the codec ---------------------------------------------------------------------------
_packb: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack
_digest = xxhash.xxh3_64_intdigest


def _payload(frame: Frame | list[Any], epoch: int) -> tuple[bytes, int]:
    """A frame's payload and its epoch (a raw list, as tests forge frames, travels as
    it is, under ``epoch``)."""
    if isinstance(frame, Frame):
        return _packb(frame.to_wire()), frame.epoch
    return _packb(frame), epoch


def encode(frame: Frame | list[Any], epoch: int = 0) -> bytes:
    """The bytes of one plain frame; ``epoch`` only for a raw list (a frame has its own)."""
    payload, epoch = _payload(frame, epoch)
    return _HEADER.pack(len(payload), epoch, _digest(payload, epoch)) + payload


def _mac(key: bytes, seq: int, epoch: int, payload: bytes) -> bytes:
    return hmac.digest(key, _SEQ_EPOCH.pack(seq, epoch) + payload, "sha256")[:16]


def decode_payload(payload: bytes, limit: FrameLimit = NO_LIMIT, epoch: int = 0) -> Frame:
    try:
        items = msgpack.unpackb(
            payload,
            raw=False,
            use_list=True,
            max_str_len=limit.max_text,
            max_bin_len=64,
            max_array_len=limit.max_items,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameError(f"undecodable frame: {exc}") from None
    return frame_from_wire(items, epoch)


class FrameCodec:
    """One end of a channel: encodes what it sends, decodes what it receives.

    Plain frames until ``secure(send_key, receive_key)``, keyed frames after.
    ``receive`` buffers bytes; ``next_frame(limit)`` takes the next verified
    frame out, or None until more bytes arrive.  A driver takes frames one at a
    time and carries out what each caused before taking the next: the frame that
    completes the authentication is followed, in the same read, by keyed ones.
    After a ``FrameError`` the codec is spent: the channel must close.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._send_key: bytes | None = None
        self._receive_key: bytes | None = None
        self._sent = 0
        self._received = 0
        self._broken = False

    @property
    def secured(self) -> bool:
        return self._send_key is not None

    def secure(self, send_key: bytes, receive_key: bytes) -> None:
        if self._send_key is not None:
            raise FrameError("the channel is already secured")
        self._send_key, self._receive_key = send_key, receive_key

    def encode(self, frame: Frame | list[Any], epoch: int = 0) -> bytes:
        """The bytes of ``frame``; ``epoch`` only for a raw list (a frame has its own)."""
        key = self._send_key
        if key is None:
            return encode(frame, epoch)
        payload, epoch = _payload(frame, epoch)
        tag = _mac(key, self._sent, epoch, payload)
        self._sent += 1
        return _KEYED_HEADER.pack(len(payload), epoch, tag) + payload

    def receive(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self, limit: FrameLimit = NO_LIMIT) -> Frame | None:
        if self._broken:
            raise FrameError("the channel already failed")
        try:
            return self._next(limit)
        except FrameError:
            self._broken = True
            raise

    def _next(self, limit: FrameLimit) -> Frame | None:
        buffer = self._buffer
        key = self._receive_key
        header = _HEADER if key is None else _KEYED_HEADER
        size = header.size
        if len(buffer) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(buffer)
        if length > limit.max_bytes:  # refused as soon as its length is known
            raise FrameError(f"frame length {length} exceeds {limit.max_bytes}")
        if len(buffer) < size:
            return None
        length, epoch, check = header.unpack_from(buffer)
        end = size + length
        if len(buffer) < end:
            return None
        with memoryview(buffer) as view:
            payload = bytes(view[size:end])
        del buffer[:end]
        if key is None:
            if _digest(payload, epoch) != check:
                raise FrameError("frame hash mismatch (corrupted on the wire)")
        else:
            if not hmac.compare_digest(_mac(key, self._received, epoch, payload), check):
                raise FrameError("frame authentication failed (altered, injected or replayed)")
            self._received += 1
        return decode_payload(payload, limit, epoch)

    def feed(self, data: bytes, limit: FrameLimit = NO_LIMIT) -> list[Frame]:
        """Every complete frame; a bad one raises ``FrameError`` carrying the good ones
        before it (for tools and tests: a driver takes frames one at a time)."""
        self.receive(data)
        frames: list[Frame] = []
        try:
            while (frame := self.next_frame(limit)) is not None:
                frames.append(frame)
        except FrameError as exc:
            raise FrameError(str(exc), frames) from None
        return frames
