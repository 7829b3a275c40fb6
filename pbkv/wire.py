"""Replication frames: what the primary and the backup say to each other.

A frame on the wire is ``length (u32, big endian) | xxh3_64 of payload (u64) |
payload``, the payload a msgpack array whose first item is the frame type.
The per-frame hash catches a corrupted byte anywhere on the channel; the
per-shard and whole-database checksums of a transfer then catch a wrong
store.  ``FrameDecoder`` is sans-I/O: feed it bytes, get frames back.
"""

from __future__ import annotations

import enum
import struct
from typing import Any

import msgpack
import xxhash

_HEADER = struct.Struct(">IQ")
HEADER_SIZE = _HEADER.size
MAX_FRAME = 256 * 1024 * 1024  # a guard against garbage lengths, not a real limit

UPGRADE_TOKEN = b"pbkv-repl/1"
UPGRADE_PATH = b"/kvrepl"


class FrameType(enum.IntEnum):
    HELLO = 1  # [HELLO, role, incarnation, confirmed, checksum, count, shards, seq]
    BATCH = 2  # [BATCH, seq, ops]: ops a flat list key, value-or-None, ...
    ACK = 3  # [ACK, seq]
    HEARTBEAT = 4  # [HEARTBEAT, seq]
    FETCH = 5  # [FETCH]: primary asks for the backup's data
    SNAPSHOT_BEGIN = 6  # [SNAPSHOT_BEGIN, shards, count]
    SHARD_CHUNK = 7  # [SHARD_CHUNK, shard, flat pairs]
    SHARD_END = 8  # [SHARD_END, shard, checksum, count]
    SNAPSHOT_END = 9  # [SNAPSHOT_END, checksum, count, seq]
    SKIP = 10  # [SKIP, checksum, count, seq]: "we already hold the same data"
    SYNC_ACK = 11  # [SYNC_ACK, checksum]
    SYNC_NACK = 12  # [SYNC_NACK, reason]
    FENCE = 13  # [FENCE, reason]: primary tells the backup to drop out


class FrameError(ValueError):
    """The byte stream is not a valid frame sequence; the channel must close.

    ``frames`` holds the good frames that came before the bad one in the same
    feed: they are real and are still handled before the channel closes.
    """

    def __init__(self, message: str, frames: list[list[Any]] | None = None) -> None:
        super().__init__(message)
        self.frames = frames or []


def checksum_to_bytes(value: int) -> bytes:
    return value.to_bytes(16, "big")


def checksum_from_bytes(raw: Any) -> int:
    if not isinstance(raw, bytes) or len(raw) != 16:
        raise FrameError("checksum must be 16 bytes")
    return int.from_bytes(raw, "big")


_packb = msgpack.Packer(use_bin_type=True).pack
_digest = xxhash.xxh3_64_intdigest


def encode(frame: list[Any] | tuple[Any, ...]) -> bytes:
    payload = _packb(frame)
    return _HEADER.pack(len(payload), _digest(payload)) + payload


class FrameDecoder:
    """Accumulates bytes and returns complete, verified frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[list[Any]]:
        self._buffer += data
        frames: list[list[Any]] = []
        try:
            self._decode(frames)
        except FrameError as exc:
            raise FrameError(str(exc), frames) from None
        return frames

    def _decode(self, frames: list[list[Any]]) -> None:
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
                frame = msgpack.unpackb(payload, raw=False, use_list=True)
            except Exception as exc:  # msgpack raises several unrelated types
                raise FrameError(f"undecodable frame: {exc}") from None
            if not isinstance(frame, list) or not frame or not isinstance(frame[0], int):
                raise FrameError("a frame must be a non-empty array starting with its type")
            try:
                frame[0] = FrameType(frame[0])
            except ValueError:
                raise FrameError(f"unknown frame type {frame[0]}") from None
            frames.append(frame)
            offset = end
        if offset:
            del buffer[:offset]
