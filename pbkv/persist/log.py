"""The record log: an append-only file of checksummed records, one per batch.

A log file is the magic ``PBKVLOG1`` then frames (``framing.py``), each payload
a msgpack array ``[kind, history, seq, epoch, ops, extra]``:

* ``BATCH``: a replicated batch, ``ops`` as the wire carries it (key,
  value-or-None, key, ...), applied on top of the state ``seq - 1`` of
  ``history``;
* ``MARK``: the data is unchanged, and from here on its state is (history,
  seq, epoch) (a sync that kept the data under a new history, say);
* ``ROLLBACK``: the batches after ``seq`` of this history are undone.

``extra`` is opaque bytes kept for what later travels with a batch (the
idempotency replies).  A log file is created whole, magic included, by a
rename, so a log shorter than its magic is damage, never a crash's leftover.

``LogWriter.append`` writes one record with one ``write`` and returns the file
size; ``sync`` is a separate call, so a caller may append every batch of an
event-loop turn and fsync once for all of them (group commit).
``read_records`` walks a log from an offset and raises ``TornTail`` or
``Damage`` (``framing.py`` says which is which) with the file and offset;
``truncate_torn_tail`` cuts a torn last record, as Redis's
``aof-load-truncated`` does, and refuses anything else.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from pbkv.persist.framing import (
    MAGIC_SIZE,
    Damage,
    FileProblem,
    PersistError,
    TornTail,
    check_magic,
    encode_frame,
    read_frame,
    write_all,
    write_atomically,
)

LOG_MAGIC = b"PBKVLOG1"
DEFAULT_MAX_RECORD = 64 * 1024 * 1024  # bytes of one record's payload
MAX_U64 = (1 << 64) - 1

_packb: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack
_KEY_TYPES = frozenset({str})
_VALUE_TYPES = frozenset({str, type(None)})


class RecordKind(enum.IntEnum):
    BATCH = 1
    MARK = 2
    ROLLBACK = 3


# A kind from its number: a dict lookup, where calling the enum costs about ten times
# as much (a start from a long log decodes one per record).
_KINDS: dict[int, RecordKind] = {kind.value: kind for kind in RecordKind}


@dataclass(frozen=True, slots=True)
class State:
    """Where a copy of the data stands: its lineage, last batch and epoch."""

    history: int
    seq: int
    epoch: int = 0

    def __init__(self, history: int, seq: int, epoch: int = 0) -> None:  # see compiled.py
        object.__setattr__(self, "history", history)
        object.__setattr__(self, "seq", seq)
        object.__setattr__(self, "epoch", epoch)


@dataclass(frozen=True, slots=True)
class Record:
    kind: RecordKind
    history: int
    seq: int
    epoch: int = 0
    ops: list[str | None] = field(default_factory=list)
    extra: bytes = b""

    def __init__(  # compiled: see ``compiled.py``
        self,
        kind: RecordKind,
        history: int,
        seq: int,
        epoch: int = 0,
        ops: list[str | None] | None = None,
        extra: bytes = b"",
    ) -> None:
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "history", history)
        object.__setattr__(self, "seq", seq)
        object.__setattr__(self, "epoch", epoch)
        object.__setattr__(self, "ops", [] if ops is None else ops)
        object.__setattr__(self, "extra", extra)

    @classmethod
    def batch(
        cls, history: int, seq: int, epoch: int, ops: list[str | None], extra: bytes = b""
    ) -> Record:
        return cls(RecordKind.BATCH, history, seq, epoch, ops, extra)

    @classmethod
    def mark(cls, state: State) -> Record:
        return cls(RecordKind.MARK, state.history, state.seq, state.epoch)

    @classmethod
    def rollback(cls, state: State) -> Record:
        """The batches after ``state.seq`` of ``state.history`` are undone."""
        return cls(RecordKind.ROLLBACK, state.history, state.seq, state.epoch)

    @property
    def state(self) -> State:
        return State(self.history, self.seq, self.epoch)


def encode_record(record: Record) -> bytes:
    """The bytes of one record, frame included."""
    return encode_frame(
        _packb([record.kind, record.history, record.seq, record.epoch, record.ops, record.extra])
    )


class RecordError(ValueError):
    pass


def _u64(raw: Any, name: str) -> int:
    if type(raw) is not int or not 0 <= raw <= MAX_U64:
        raise RecordError(f"{name} is not a 64-bit non-negative integer")
    return raw


def decode_record(payload: bytes) -> Record:
    """The record of a verified payload; ``RecordError`` when it is not one (a writer's
    bug or a file of another format: the checksum matched)."""
    try:
        items = msgpack.unpackb(payload, raw=False, use_list=True, max_map_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types
        raise RecordError(f"undecodable record: {exc}") from None
    if type(items) is not list or len(items) != 6:
        raise RecordError("a record is [kind, history, seq, epoch, ops, extra]")
    raw_kind, history, seq, epoch, ops, extra = items
    kind = _KINDS.get(raw_kind) if type(raw_kind) is int else None
    if kind is None:
        raise RecordError(f"unknown record kind {raw_kind!r}")
    if type(ops) is not list or len(ops) % 2:
        raise RecordError("ops must be a flat list of key, value-or-null pairs")
    # The types as sets: C loops, where a generator costs a Python step per item.
    if not set(map(type, ops[0::2])) <= _KEY_TYPES:
        raise RecordError("keys must be strings")
    if not set(map(type, ops[1::2])) <= _VALUE_TYPES:
        raise RecordError("values must be strings or null")
    if kind is not RecordKind.BATCH and ops:
        raise RecordError(f"a {kind.name} record carries no operations")
    if type(extra) is not bytes:
        raise RecordError("extra must be bytes")
    return Record(
        kind, _u64(history, "history"), _u64(seq, "seq"), _u64(epoch, "epoch"), ops, extra
    )


def read_records(
    path: Path | str, max_record: int = DEFAULT_MAX_RECORD, offset: int = MAGIC_SIZE
) -> Iterator[tuple[int, int, Record]]:
    """Each record of the log from ``offset`` (a record boundary) on, with the offsets
    where it starts and ends.

    Raises ``TornTail`` when the file ends inside the last record, ``Damage`` for
    anything else that does not verify; the records before it were yielded.
    """
    path = Path(path)
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        check_magic(file, path, LOG_MAGIC, "pbkv log")
        while offset < size:
            payload = read_frame(file, path, offset, size, max_record)
            try:
                record = decode_record(payload)
            except RecordError as exc:
                raise Damage(path, offset, str(exc)) from None
            end = file.tell()
            yield offset, end, record
            offset = end


@dataclass(frozen=True, slots=True)
class LogScan:
    """What a log holds, for a report."""

    path: Path
    size: int
    records: int
    first_seq: int | None
    last_seq: int | None
    good_end: int  # the offset after the last good record
    problem: FileProblem | None


def scan_log(path: Path | str, max_record: int = DEFAULT_MAX_RECORD) -> LogScan:
    path = Path(path)
    size = path.stat().st_size
    count = 0
    first: int | None = None
    last: int | None = None
    good_end = MAGIC_SIZE
    problem: FileProblem | None = None
    try:
        for _, end, record in read_records(path, max_record):
            count += 1
            first = record.seq if first is None else first
            last = record.seq
            good_end = end
    except FileProblem as exc:
        problem = exc
        if exc.offset == 0:
            good_end = 0
    return LogScan(path, size, count, first, last, good_end, problem)


def truncate_torn_tail(path: Path | str, max_record: int = DEFAULT_MAX_RECORD) -> TornTail | None:
    """Cut a torn last record off the log (and fsync); returns what was cut, None when
    the log ends cleanly.  Raises ``Damage`` (nothing cut) for any other problem."""
    problem = scan_log(path, max_record).problem
    if problem is None:
        return None
    if not isinstance(problem, TornTail):
        raise problem
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, problem.offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return problem


class LogWriteError(PersistError):
    """An append or an fsync failed; the message says how."""


class LogWriter:
    """Appends records to one log; ``sync`` makes them durable.

    A failed append is cut back off the file, so the log never goes on after a
    partial record; the caller may retry later (a full disk may free up).  A
    failed fsync leaves the writer broken: what the kernel dropped is unknown,
    so nothing more is appended to this file.
    """

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self._fd = fd
        self.size = size
        self.synced_size = size
        self.broken: str | None = None

    @classmethod
    def create(cls, path: Path, temp_prefix: str = "temp-") -> LogWriter:
        """A new, empty log (its magic written and durable, by a rename)."""
        write_atomically(path, LOG_MAGIC, temp_prefix)
        return cls.open(path)

    @classmethod
    def open(cls, path: Path) -> LogWriter:
        """Append to an existing log, at its end (verified by the caller)."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        return cls(path, fd, os.fstat(fd).st_size)

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise LogWriteError(f"{self.path}: unusable after an earlier failure: {self.broken}")

    @property
    def dirty(self) -> bool:
        return self.size != self.synced_size

    def append(self, record: Record) -> int:
        """Write one record (one ``write``); returns the file's size."""
        return self.append_encoded(encode_record(record))

    def append_encoded(self, data: bytes) -> int:
        self._check_usable()
        try:
            write_all(self._fd, data)
        except OSError as exc:
            reason = f"append failed: {exc.strerror or exc}"
            try:
                os.ftruncate(self._fd, self.size)
            except OSError as cut:
                self.broken = f"{reason}; the partial record could not be cut: {cut.strerror}"
            raise LogWriteError(f"{self.path}: {reason}") from exc
        self.size += len(data)
        return self.size

    def sync(self) -> None:
        """fsync what was appended since the last ``sync`` (nothing to do: no call)."""
        job = self.sync_job()
        if job is not None:
            job.run()
            job.done()

    def sync_job(self) -> SyncJob | None:
        """An fsync of what was appended so far, to run in another thread (``run``)
        while appends go on; None when nothing is to be synced."""
        self._check_usable()
        if not self.dirty:
            return None
        # Its own descriptor: the writer may be closed (a new base replaced the log)
        # while the fsync runs, and the number reused.
        return SyncJob(self, os.dup(self._fd), self.size)

    def _synced(self, size: int) -> None:
        self.synced_size = max(self.synced_size, size)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SyncJob:
    """One fsync of a log up to ``size``: ``run`` (any thread), then ``done`` (the
    writer's thread) once it succeeded.  Records appended meanwhile are not covered."""

    def __init__(self, writer: LogWriter, fd: int, size: int) -> None:
        self.writer = writer
        self.fd = fd
        self.size = size

    def run(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            self.writer.broken = f"fsync failed: {exc.strerror or exc}"
            raise LogWriteError(f"{self.writer.path}: {self.writer.broken}") from exc
        finally:
            os.close(self.fd)

    def done(self) -> None:
        self.writer._synced(self.size)
