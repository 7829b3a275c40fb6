"""Snapshots: every pair of a store, the state it reflects, and an opaque extra
section, written to a temporary file in bounded chunks and renamed into place.

A snapshot file is the magic ``PBKVSNP1`` then frames (``framing.py``):

* ``[HEADER, history, seq, epoch, created]`` (``created``: Unix time, a float);
* ``[EXTRA, bytes]``: opaque, for what is persisted with the data (the
  idempotency table, the undo record);
* ``[CHUNK, [key, value, key, value, ...]]``, as many as it takes;
* ``[END, count, checksum, chunks]``: the number of pairs, the store's
  order-independent checksum of them (``pbkv.store.pair_checksum``, summed)
  as 16 big-endian bytes, and the number of chunks.

Each frame has its own checksum and the end frame sums up the whole, so a
loader verifies each chunk as it reads it and the whole once it has read them
all.  A snapshot is renamed into place only when complete and fsynced, so any
shortfall in one is damage (a torn snapshot never is a crash's leftover: that
is the temporary file, which a loader never opens).

``SnapshotWriter`` takes the pairs as an iterator and writes one chunk per
step (``write_pairs`` yields after each), so the caller can return to its
event loop between chunks; ``finish`` fsyncs, renames and fsyncs the folder.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from pbkv.persist.framing import (
    MAGIC_SIZE,
    Damage,
    PersistError,
    TornTail,
    check_magic,
    encode_frame,
    fsync_dir,
    read_frame,
    write_all,
)
from pbkv.persist.log import DEFAULT_MAX_RECORD, MAX_U64, State
from pbkv.store import CHECKSUM_MODULUS, ShardedStore, pair_checksum

SNAPSHOT_MAGIC = b"PBKVSNP1"
DEFAULT_CHUNK_PAIRS = 4096
DEFAULT_CHUNK_CHARS = 1 << 20
_MASK = CHECKSUM_MODULUS - 1

_packb: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack


class Section(enum.IntEnum):
    HEADER = 1
    EXTRA = 2
    CHUNK = 3
    END = 4


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    path: Path
    state: State
    created: float
    count: int
    checksum: int
    chunks: int
    size: int


class SnapshotWriter:
    """Writes one snapshot to ``temp_prefix + path.name`` beside ``path``; ``finish``
    puts it in place, ``abort`` removes it."""

    def __init__(
        self,
        path: Path,
        state: State,
        extra: bytes = b"",
        *,
        chunk_pairs: int = DEFAULT_CHUNK_PAIRS,
        chunk_chars: int = DEFAULT_CHUNK_CHARS,
        max_record: int = DEFAULT_MAX_RECORD,
        temp_prefix: str = "temp-",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.temp_path = path.with_name(temp_prefix + path.name)
        self.state = state
        self.created = clock()
        self.chunk_pairs = chunk_pairs
        self.chunk_chars = chunk_chars
        self.max_record = max_record
        self.count = 0
        self.chunks = 0
        self.size = 0
        self._checksum = 0
        self._fd = os.open(
            self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644
        )
        try:
            header = [Section.HEADER, state.history, state.seq, state.epoch, self.created]
            self._write(SNAPSHOT_MAGIC)
            self._write_frame(header)
            self._write_frame([Section.EXTRA, extra])
        except BaseException:
            self.abort()
            raise

    def _write(self, data: bytes) -> None:
        write_all(self._fd, data)
        self.size += len(data)

    def _write_frame(self, items: list[Any]) -> None:
        payload = _packb(items)
        if len(payload) > self.max_record:
            raise PersistError(
                f"{self.temp_path}: a snapshot section of {len(payload)} bytes is over the "
                f"record maximum {self.max_record}"
            )
        self._write(encode_frame(payload))

    def write_chunk(self, pairs: Iterable[tuple[str, str]]) -> None:
        """One chunk of exactly these pairs (the caller bounds it)."""
        flat: list[str] = []
        total = self._checksum
        for key, value in pairs:
            flat.append(key)
            flat.append(value)
            total += pair_checksum(key, value)
        if not flat:
            return
        self._write_frame([Section.CHUNK, flat])
        self._checksum = total & _MASK
        self.count += len(flat) // 2
        self.chunks += 1

    def write_pairs(self, pairs: Iterable[tuple[str, str]]) -> Iterator[int]:
        """Write ``pairs`` in chunks of at most ``chunk_pairs`` pairs, each closed once
        its keys and values pass ``chunk_chars`` characters; yields the pairs written
        so far after each chunk (the caller's moment to give the loop its turn)."""
        chunk: list[tuple[str, str]] = []
        chars = 0
        for pair in pairs:
            chunk.append(pair)
            chars += len(pair[0]) + len(pair[1])
            if len(chunk) >= self.chunk_pairs or chars >= self.chunk_chars:
                self.write_chunk(chunk)
                chunk, chars = [], 0
                yield self.count
        if chunk:
            self.write_chunk(chunk)
            yield self.count

    def finish(self) -> SnapshotInfo:
        """The end frame, fsync, rename into place, fsync the folder."""
        try:
            checksum = self._checksum.to_bytes(16, "big")
            self._write_frame([Section.END, self.count, checksum, self.chunks])
            os.fsync(self._fd)
        except BaseException:
            self.abort()
            raise
        os.close(self._fd)
        self._fd = -1
        os.replace(self.temp_path, self.path)
        fsync_dir(self.path.parent)
        return SnapshotInfo(
            self.path, self.state, self.created, self.count, self._checksum, self.chunks, self.size
        )

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.temp_path.unlink(missing_ok=True)


def _u64(raw: Any) -> bool:
    return type(raw) is int and 0 <= raw <= MAX_U64


class SnapshotReader:
    """Reads one snapshot: ``state``, ``extra`` and ``created`` at once, then the
    pairs through ``chunks``, ``pairs`` or ``fill``, each verified as it comes and
    the whole at the end (``Damage`` when anything does not verify)."""

    def __init__(self, path: Path | str, max_record: int = DEFAULT_MAX_RECORD) -> None:
        self.path = Path(path)
        self.max_record = max_record
        self._file: BinaryIO = open(self.path, "rb")  # noqa: SIM115  (closed by close())
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            check_magic(self._file, self.path, SNAPSHOT_MAGIC, "pbkv snapshot")
            self._offset = MAGIC_SIZE
            header = self._section(Section.HEADER, 5)
            if not all(_u64(value) for value in header[1:4]) or type(header[4]) is not float:
                raise Damage(self.path, MAGIC_SIZE, "snapshot header is not valid")
            self.state = State(header[1], header[2], header[3])
            self.created: float = header[4]
            extra_offset = self._offset
            extra = self._section(Section.EXTRA, 2)[1]
            if type(extra) is not bytes:
                raise Damage(self.path, extra_offset, "snapshot extra section is not bytes")
            self.extra: bytes = extra
            # (offset, count, checksum) of the end frame, once the chunks were read
            self.summary: tuple[int, int, int] | None = None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _frame(self) -> tuple[int, list[Any]]:
        offset = self._offset
        try:
            payload = read_frame(self._file, self.path, offset, self.size, self.max_record)
        except TornTail as exc:  # a snapshot is whole by construction: short is damaged
            raise Damage(self.path, offset, f"snapshot cut short: {exc.reason}") from None
        self._offset = self._file.tell()
        try:
            items = msgpack.unpackb(payload, raw=False, use_list=True, max_map_len=0, max_ext_len=0)
        except Exception as exc:  # msgpack raises several unrelated types
            raise Damage(self.path, offset, f"undecodable snapshot section: {exc}") from None
        if type(items) is not list or not items:
            raise Damage(self.path, offset, "a snapshot section is a non-empty array")
        return offset, items

    def _section(self, kind: Section, length: int) -> list[Any]:
        offset, items = self._frame()
        if items[0] != kind or len(items) != length:
            raise Damage(self.path, offset, f"expected the snapshot's {kind.name.lower()}")
        return items

    def _raw_chunks(self, strings_checked: bool = True) -> Iterator[tuple[int, list[str]]]:
        """Each chunk's offset and flat list; then checks the end frame against the
        chunks seen and leaves it in ``self.summary``.  Without ``strings_checked`` the
        caller checks that keys and values are strings (``fill``: as it encodes them)."""
        chunks = 0
        while True:
            offset, items = self._frame()
            if items[0] == Section.CHUNK and len(items) == 2:
                flat = items[1]
                if type(flat) is not list or not flat or len(flat) % 2:
                    raise Damage(self.path, offset, "a chunk is a flat list of key, value")
                if strings_checked and not all(type(item) is str for item in flat):
                    raise _not_strings(self.path, offset)
                chunks += 1
                yield offset, flat
                continue
            if items[0] != Section.END or len(items) != 4:
                raise Damage(self.path, offset, "expected a chunk or the snapshot's end")
            _, count, checksum, declared = items
            if not _u64(count) or type(checksum) is not bytes or len(checksum) != 16:
                raise Damage(self.path, offset, "snapshot end is not valid")
            if declared != chunks:
                raise Damage(self.path, offset, f"{chunks} chunks, the end says {declared}")
            if self._offset != self.size:
                raise Damage(self.path, self._offset, "data after the snapshot's end")
            self.summary = (offset, count, int.from_bytes(checksum, "big"))
            return

    def _verify(self, count: int, checksum: int) -> None:
        assert self.summary is not None, "verified after the end frame only"
        offset, want_count, want_checksum = self.summary
        if count != want_count:
            raise Damage(self.path, offset, f"{count} pairs, the end says {want_count}")
        if checksum != want_checksum:
            raise Damage(self.path, offset, "the pairs do not match the snapshot's checksum")

    def chunks(self) -> Iterator[list[tuple[str, str]]]:
        """The pairs, a chunk at a time; raises ``Damage`` at the end if the whole does
        not verify (so a caller keeps nothing before the iteration completes)."""
        count = 0
        total = 0
        for _, flat in self._raw_chunks():
            pairs = list(zip(flat[0::2], flat[1::2], strict=True))
            for key, value in pairs:
                total += pair_checksum(key, value)
            count += len(pairs)
            yield pairs
        self._verify(count, total & _MASK)

    def pairs(self) -> Iterator[tuple[str, str]]:
        for chunk in self.chunks():
            yield from chunk

    def fill(self, store: ShardedStore) -> None:
        """Load every pair into ``store`` (empty) and verify the whole with the store's
        own checksum and count."""
        if len(store):
            raise ValueError("fill needs an empty store")
        for offset, flat in self._raw_chunks(strings_checked=False):
            try:
                store.load_pairs(flat)
            except TypeError:  # raised before the chunk changed the store
                raise _not_strings(self.path, offset) from None
        self._verify(len(store), store.pairs_checksum)


def _not_strings(path: Path, offset: int) -> Damage:
    return Damage(path, offset, "keys and values must be strings")


def verify_snapshot(path: Path | str, max_record: int = DEFAULT_MAX_RECORD) -> SnapshotInfo:
    """Read a whole snapshot, verifying everything; its summary, or ``Damage``."""
    with SnapshotReader(path, max_record) as reader:
        chunks = 0
        for _ in reader.chunks():
            chunks += 1
        assert reader.summary is not None, "set once the chunks were read"
        _, count, checksum = reader.summary
        return SnapshotInfo(
            reader.path, reader.state, reader.created, count, checksum, chunks, reader.size
        )
