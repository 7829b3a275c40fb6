"""Replication frames: what the primary and the backup say to each other.

A frame on the wire is ``length (u32, big endian) | xxh3_64 of payload (u64) |
payload``, the payload a msgpack array whose first item is the frame type.
The per-frame hash catches a corrupted byte anywhere on the channel; the
per-shard and whole-database checksums of a transfer then catch a wrong
store.

Each frame type is a small class.  ``FrameDecoder`` (sans-I/O: feed it bytes,
get frames back) builds them from the decoded array and checks the arity and
the type of every field there, so a malformed or hostile frame is refused in
one place, as a ``FrameError``, before any handler sees it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack
import xxhash

_HEADER = struct.Struct(">IQ")
HEADER_SIZE = _HEADER.size
MAX_FRAME = 256 * 1024 * 1024  # a guard against garbage lengths, not a real limit

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


def _flag(raw: Any) -> bool:
    if type(raw) is not bool:
        raise FrameError("must be true or false")
    return raw


def _text(raw: Any) -> str:
    if type(raw) is not str:
        raise FrameError("must be a string")
    return raw


def _checksum(raw: Any) -> int:
    if type(raw) is not bytes or len(raw) != 16:
        raise FrameError("must be a 16-byte checksum")
    return int.from_bytes(raw, "big")


def _operations(raw: Any) -> list[str | None]:
    """A batch: key, value-or-None, key, ... -- checked whole before any is applied."""
    if type(raw) is not list or len(raw) % 2:
        raise FrameError("must be a flat list of key, value-or-null pairs")
    keys, values = raw[0::2], raw[1::2]
    if not all(type(key) is str for key in keys):
        raise FrameError("keys must be strings")
    if not all(value is None or type(value) is str for value in values):
        raise FrameError("values must be strings or null")
    return raw


def _pairs(raw: Any) -> list[str]:
    """A transfer chunk: key, value, key, value, ..."""
    if type(raw) is not list or len(raw) % 2:
        raise FrameError("must be a flat list of key, value pairs")
    if not all(type(item) is str for item in raw):
        raise FrameError("keys and values must be strings")
    return raw


def checksum_to_bytes(value: int) -> bytes:
    return value.to_bytes(16, "big")


_ENCODERS = {_checksum: checksum_to_bytes}


# -- the frames ------------------------------------------------------------------------
class Frame:
    """Base of every frame class: ``kind`` and the kinds of its fields, in order."""

    __slots__ = ()
    kind: ClassVar[FrameType]
    field_kinds: ClassVar[tuple[Any, ...]]

    def to_wire(self) -> list[Any]:
        values = [getattr(self, name) for name in self.__slots__]
        return [
            self.kind,
            *(
                _ENCODERS.get(kind, _same)(value)
                for kind, value in zip(self.field_kinds, values, strict=True)
            ),
        ]


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True, slots=True)
class Hello(Frame):
    """Who we are and what we hold; the primary decides from both hellos."""

    kind = FrameType.HELLO
    field_kinds = (_text, _flag, _checksum, _count, _count)
    role: str
    confirmed: bool  # a peer verified our data (see the README)
    checksum: int
    count: int
    seq: int  # last replicated batch applied


@dataclass(frozen=True, slots=True)
class Batch(Frame):
    kind = FrameType.BATCH
    field_kinds = (_count, _operations)
    seq: int
    ops: list[str | None]  # key, value-or-None (a delete), key, ...

    def to_wire(self) -> list[Any]:  # the hot path: no generic conversion
        return [FrameType.BATCH, self.seq, self.ops]


@dataclass(frozen=True, slots=True)
class Ack(Frame):
    kind = FrameType.ACK
    field_kinds = (_count,)
    seq: int

    def to_wire(self) -> list[Any]:
        return [FrameType.ACK, self.seq]


@dataclass(frozen=True, slots=True)
class Heartbeat(Frame):
    kind = FrameType.HEARTBEAT
    field_kinds = (_count,)
    seq: int


@dataclass(frozen=True, slots=True)
class Fetch(Frame):
    kind = FrameType.FETCH
    field_kinds = ()


@dataclass(frozen=True, slots=True)
class SnapshotBegin(Frame):
    kind = FrameType.SNAPSHOT_BEGIN
    field_kinds = (_count, _count)
    shards: int
    count: int


@dataclass(frozen=True, slots=True)
class ShardChunk(Frame):
    kind = FrameType.SHARD_CHUNK
    field_kinds = (_count, _pairs)
    shard: int
    pairs: list[str]  # key, value, key, value, ...


@dataclass(frozen=True, slots=True)
class ShardEnd(Frame):
    kind = FrameType.SHARD_END
    field_kinds = (_count, _checksum, _count)
    shard: int
    checksum: int
    count: int


@dataclass(frozen=True, slots=True)
class SnapshotEnd(Frame):
    kind = FrameType.SNAPSHOT_END
    field_kinds = (_checksum, _count, _count)
    checksum: int
    count: int
    seq: int


@dataclass(frozen=True, slots=True)
class Skip(Frame):
    kind = FrameType.SKIP
    field_kinds = (_checksum, _count, _count)
    checksum: int
    count: int
    seq: int


@dataclass(frozen=True, slots=True)
class SyncAck(Frame):
    kind = FrameType.SYNC_ACK
    field_kinds = (_checksum,)
    checksum: int


@dataclass(frozen=True, slots=True)
class SyncNack(Frame):
    kind = FrameType.SYNC_NACK
    field_kinds = (_text,)
    reason: str


@dataclass(frozen=True, slots=True)
class Fence(Frame):
    kind = FrameType.FENCE
    field_kinds = (_text,)
    reason: str


FRAME_CLASSES: dict[FrameType, type[Frame]] = {
    cls.kind: cls
    for cls in (
        Hello,
        Batch,
        Ack,
        Heartbeat,
        Fetch,
        SnapshotBegin,
        ShardChunk,
        ShardEnd,
        SnapshotEnd,
        Skip,
        SyncAck,
        SyncNack,
        Fence,
    )
}
assert set(FRAME_CLASSES) == set(FrameType), "every frame type needs its class"


def frame_from_wire(items: Any) -> Frame:
    """The typed frame of a decoded msgpack array; ``FrameError`` when it is not one."""
    if type(items) is not list or not items or not isinstance(items[0], int):
        raise FrameError("a frame must be a non-empty array starting with its type")
    try:
        kind = FrameType(items[0])
    except ValueError:
        raise FrameError(f"unknown frame type {items[0]}") from None
    cls = FRAME_CLASSES[kind]
    kinds = cls.field_kinds
    if len(items) != len(kinds) + 1:
        raise FrameError(f"{kind.name} has {len(items) - 1} fields, expected {len(kinds)}")
    values = []
    for index, (field_kind, raw) in enumerate(zip(kinds, items[1:], strict=True), 1):
        try:
            values.append(field_kind(raw))
        except FrameError as exc:
            raise FrameError(f"{kind.name} field {index}: {exc}") from None
    return cls(*values)


_packb = msgpack.Packer(use_bin_type=True).pack
_digest = xxhash.xxh3_64_intdigest


def encode(frame: Frame | list[Any]) -> bytes:
    """The bytes of one frame (a raw list is sent as it is: tests forge frames so)."""
    payload = _packb(frame.to_wire() if isinstance(frame, Frame) else frame)
    return _HEADER.pack(len(payload), _digest(payload)) + payload


class FrameDecoder:
    """Accumulates bytes and returns complete, verified, typed frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        try:
            self._decode(frames)
        except FrameError as exc:
            raise FrameError(str(exc), frames) from None
        return frames

    def _decode(self, frames: list[Frame]) -> None:
        buffer = self._buffer
        offset = 0
        while len(buffer) - offset >= HEADER_SIZE:
            length, digest = _HEADER.unpack_from(buffer, offset)
            if length > MAX_FRAME:
                raise FrameError(f"frame length {length} exceeds {MAX_FRAME}")
            end = offset + HEADER_SIZE + length
            if len(buffer) < end:
                break
            payload = bytes(buffer[offset + HEADER_SIZE : end])
            if _digest(payload) != digest:
                raise FrameError("frame hash mismatch (corrupted on the wire)")
            try:
                items = msgpack.unpackb(payload, raw=False, use_list=True)
            except Exception as exc:  # msgpack raises several unrelated types
                raise FrameError(f"undecodable frame: {exc}") from None
            frames.append(frame_from_wire(items))
            offset = end
        if offset:
            del buffer[:offset]
