"""The framing every persistence file shares, and the file operations around it.

A file starts with an 8-byte magic naming its kind and format, then holds frames:

    length (u32, big endian) | crc32 of those 4 bytes (u32) | xxh3_64 of payload (u64) | payload

The length has a check of its own so that a damaged length is told from a
record the file ends inside: once a header verifies, the length is the one the
writer wrote, and a file that ends before it is a write cut short.  CRC-32
detects every single-bit error in the 4 bytes outright; the payload's xxh3_64
is the wire's hash.  The length is bounded by the reader's maximum before a
byte of the payload is read, so a hostile or damaged length allocates nothing.

A frame is **torn** when the file ends inside it (fewer bytes than a header, or
fewer than the header's length declares), or when every byte from its start to
the end of the file is zero (a file extended by the filesystem whose data never
reached the disk).  Anything else that fails to verify is **damage**.  A torn
frame is what a crash in the middle of a write leaves; damage is not, and
nothing may be cut to hide it.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, ClassVar

import xxhash

MAGIC_SIZE = 8
FRAME_HEADER = struct.Struct(">IIQ")  # length, crc32 of the length, xxh3_64 of the payload
FRAME_HEADER_SIZE = FRAME_HEADER.size
_LENGTH = struct.Struct(">I")
_ZERO_PROBE = 64 * 1024  # bytes read at a time when checking a tail for zeros

_digest: Callable[[bytes], int] = xxhash.xxh3_64_intdigest


class PersistError(Exception):
    """A persistence file cannot be used as it is; the message says which and why."""


class FileProblem(PersistError):
    """Something wrong at a byte offset of a file."""

    kind: ClassVar[str] = "problem"

    def __init__(self, path: Path | str, offset: int, reason: str) -> None:
        self.path = Path(path)
        self.offset = offset
        self.reason = reason
        super().__init__(f"{self.path}: {self.kind} at offset {offset}: {reason}")


class TornTail(FileProblem):
    """The file ends inside its last frame: a write cut short by a crash."""

    kind: ClassVar[str] = "torn tail"


class Damage(FileProblem):
    """A frame that does not verify, not at the file's end: not a write cut short."""

    kind: ClassVar[str] = "damage"


def _length_check(length: int) -> int:
    return zlib.crc32(_LENGTH.pack(length))


def encode_frame(payload: bytes) -> bytes:
    length = len(payload)
    return FRAME_HEADER.pack(length, _length_check(length), _digest(payload)) + payload


def _zeros_to_end(file: BinaryIO, offset: int, size: int) -> bool:
    file.seek(offset)
    left = size - offset
    while left > 0:
        piece = file.read(min(left, _ZERO_PROBE))
        if not piece or piece.count(0) != len(piece):
            return False
        left -= len(piece)
    return True


def read_frame(file: BinaryIO, path: Path, offset: int, size: int, max_length: int) -> bytes:
    """The payload of the frame at ``offset`` of a file of ``size`` bytes.

    Raises ``TornTail`` or ``Damage`` (both at ``offset``) as the module says.
    The file's position is left after the frame.
    """
    left = size - offset
    if left < FRAME_HEADER_SIZE:
        raise TornTail(path, offset, f"{left} bytes, less than a record header")
    file.seek(offset)
    length, length_check, digest = FRAME_HEADER.unpack(file.read(FRAME_HEADER_SIZE))
    if length_check != _length_check(length):
        if _zeros_to_end(file, offset, size):
            raise TornTail(path, offset, f"{left} zero bytes (written space never filled)")
        raise Damage(path, offset, "record header checksum mismatch")
    if length == 0:
        raise Damage(path, offset, "empty record")
    if length > max_length:
        raise Damage(path, offset, f"record of {length} bytes, over the maximum {max_length}")
    if left - FRAME_HEADER_SIZE < length:
        raise TornTail(
            path, offset, f"record of {length} bytes, {left - FRAME_HEADER_SIZE} of them present"
        )
    payload = file.read(length)
    if _digest(payload) != digest:
        raise Damage(path, offset, "record checksum mismatch")
    return payload


def check_magic(file: BinaryIO, path: Path, magic: bytes, what: str) -> None:
    file.seek(0)
    found = file.read(MAGIC_SIZE)
    if found != magic:
        raise Damage(path, 0, f"not a {what} (its first bytes are {found[:MAGIC_SIZE]!r})")


# -- durable file operations --------------------------------------------------------
def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until done (a regular file takes it all at once unless the disk is full)."""
    written = os.write(fd, data)
    if written == len(data):
        return
    view = memoryview(data)[written:]
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_atomically(path: Path, data: bytes, temp_prefix: str) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over
    ``path`` and fsync the folder: after a crash, ``path`` holds the old or the new
    content, whole."""
    temp = path.with_name(temp_prefix + path.name)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(temp, path)
    fsync_dir(path.parent)
