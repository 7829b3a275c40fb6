"""A server's data folder: a base snapshot and the increment logs after it, named in
a manifest (Redis 7's multi-part append-only file).

Files in the folder (one per server address, ``address_folder``)::

    manifest.json      {"format": 1, "base": "base.3.snap",
                        "increments": ["incr.3.log", "incr.4.log"], "next": 5,
                        "snapshot": {"time": ..., "size": ...}}
    base.<n>.snap      a snapshot (snapshot.py)
    incr.<n>.log       a record log (log.py); records are appended to the last one
    temp-*             a file being written; a crash's leftover, removed at open
    lock               held (flock) by the one process using the folder
    member             with a coordinator: the run id of the member the data is
                       the copy of (``member_run_id``)

The manifest is replaced whole by a rename.  Loading reads the base, then every
increment in order, checking that each record follows the state before it
(``Replay``); only the last increment may end in a torn record, which is cut.

A rewrite (``begin_rewrite``) first opens a new increment and names it in the
manifest, so the records appended meanwhile go there and the new snapshot never
copies a log; the snapshot is of the state at ``begin_rewrite``.  When it is in
place (``finish_rewrite``), the manifest names it and the increments from that
new one on, and the older files are deleted.  A crash at any point leaves a
manifest whose files are all there: the old base and every increment, or the
new base and the increments after it.  ``start`` is the same for data that
replaces everything (a first start, a full transfer): no appends until it is
finished, and then it is the only history the folder holds.

``DataDir`` does file operations only; the caller decides when (a thread for
``sync_job``, chunks between turns for a snapshot).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pbkv.persist.framing import Damage, PersistError, TornTail, write_atomically
from pbkv.persist.log import (
    DEFAULT_MAX_RECORD,
    LogWriter,
    Record,
    RecordKind,
    State,
    SyncJob,
    read_records,
    truncate_torn_tail,
)
from pbkv.persist.snapshot import (
    DEFAULT_CHUNK_CHARS,
    DEFAULT_CHUNK_PAIRS,
    SnapshotInfo,
    SnapshotReader,
    SnapshotWriter,
)
from pbkv.persist.table import load_base, replay_batch
from pbkv.store import ShardedStore

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
TEMP_PREFIX = "temp-"
LOCK = "lock"
# With a coordinator: the member's run id, kept so that a member restarted from its
# data is the member it was (the one etcd may name as holding every write).
MEMBER = "member"
BASE_NAME = re.compile(r"base\.(\d+)\.snap")
INCREMENT_NAME = re.compile(r"incr\.(\d+)\.log")


def address_folder(host: str, port: int) -> str:
    """The subfolder of one server's files: its address, in characters safe in a name."""
    safe = re.sub(r"[^A-Za-z0-9.-]", "_", host) or "_"
    return f"{safe}-{port}"


@dataclass(frozen=True, slots=True)
class Manifest:
    base: str
    increments: tuple[str, ...]
    next: int  # the number of the next rewrite's files
    snapshot_time: float = 0.0
    snapshot_size: int = 0

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "base": self.base,
                "increments": list(self.increments),
                "next": self.next,
                "snapshot": {"time": self.snapshot_time, "size": self.snapshot_size},
            },
            indent=1,
        ).encode()

    @property
    def files(self) -> tuple[str, ...]:
        return (self.base, *self.increments)


def read_manifest(path: Path) -> Manifest:
    """The manifest at ``path``; ``PersistError`` saying what is wrong with it."""
    try:
        raw = json.loads(path.read_bytes())
        if raw.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {MANIFEST_FORMAT}")
        base, increments, next_number = raw["base"], raw["increments"], raw["next"]
        snapshot = raw.get("snapshot", {})
        if type(base) is not str or not BASE_NAME.fullmatch(base):
            raise ValueError(f"base {base!r} is not a snapshot's name")
        if type(increments) is not list or not increments:
            raise ValueError("increments must be a non-empty list")
        for name in increments:
            if type(name) is not str or not INCREMENT_NAME.fullmatch(name):
                raise ValueError(f"increment {name!r} is not a log's name")
        if type(next_number) is not int or next_number < 0:
            raise ValueError("next must be a non-negative integer")
        return Manifest(
            base,
            tuple(increments),
            next_number,
            float(snapshot.get("time", 0.0)),
            int(snapshot.get("size", 0)),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PersistError(f"{path}: not a valid manifest: {exc}") from None


class Replay:
    """The records of the increments, in order, against the state they follow.

    ``feed`` checks each record: a batch follows the state (same history, the next
    seq); a mark sets a new state for unchanged data; a rollback undoes batches of
    this history, never before the base or the last mark (``floor``); epochs never
    go down.  ``batches`` is what remains to apply on top of the base.
    """

    def __init__(self, base: State) -> None:
        self.base = base
        self.state = base
        self.floor = base.seq
        self.batches: list[Record] = []
        self.since_floor = 0  # batches at the end of ``batches`` that follow the floor

    def feed(self, record: Record, path: Path, offset: int) -> None:
        state = self.state
        if record.epoch < state.epoch:
            raise Damage(path, offset, f"epoch {record.epoch} after epoch {state.epoch}")
        if record.kind is RecordKind.MARK:
            self.state = record.state
            self.floor = record.seq
            self.since_floor = 0
            return
        if record.history != state.history:
            raise Damage(
                path,
                offset,
                f"{record.kind.name.lower()} of history {record.history:016x} "
                f"follows history {state.history:016x}",
            )
        if record.kind is RecordKind.BATCH:
            if record.seq != state.seq + 1:
                raise Damage(path, offset, f"batch {record.seq} follows batch {state.seq}")
            self.batches.append(record)
            self.since_floor += 1
        else:  # a rollback
            if not self.floor <= record.seq <= state.seq:
                raise Damage(
                    path,
                    offset,
                    f"rollback to {record.seq} outside {self.floor}..{state.seq} "
                    "(the batches before the snapshot or the last mark cannot be undone)",
                )
            undone = state.seq - record.seq
            del self.batches[len(self.batches) - undone :]
            self.since_floor -= undone
        self.state = record.state


@dataclass
class Loaded:
    """What ``DataDir.load`` found: the base (its pairs not read yet), the batches to
    apply on top of it, and the state after them."""

    snapshot: SnapshotReader
    base: State
    state: State
    batches: list[Record]
    cut: list[TornTail] = field(default_factory=list)  # torn tails cut on the way
    # The last batches, after the base or the last mark: those a rollback may undo.
    undoable: int = 0

    @property
    def extra(self) -> bytes:
        return self.snapshot.extra

    def fill(self, store: ShardedStore, undoable: Callable[[Record], None] | None = None) -> State:
        """Load the base into ``store`` (empty), its idempotency table included, apply
        the batches (their pairs and their table entries), close the snapshot.  With
        ``undoable``, the batches a rollback may undo are handed to it to apply instead
        (a backup keeps what undoes them)."""
        try:
            self.snapshot.fill(store)
        finally:
            self.snapshot.close()
        replay_onto(store, self.extra, self.batches, self.undoable, undoable)
        return self.state


def replay_onto(
    store: ShardedStore,
    extra: bytes,
    batches: list[Record],
    undoable_count: int,
    undoable: Callable[[Record], None] | None = None,
) -> None:
    """Rebuild the data from a base and its log, the pure part of loading (the
    simulation's disk model calls it too): ``store`` holds the base's pairs; load the
    base's idempotency table (``extra``), apply the batches (their pairs and their
    table entries), or with ``undoable`` hand it the last ``undoable_count`` of them
    (those a rollback may undo) to apply instead."""
    table = store.idempotency
    load_base(table, extra)
    handed = undoable_count if undoable is not None else 0
    applied = batches[: len(batches) - handed]
    store.apply_all(record.ops for record in applied)
    for record in applied:  # the table is apart from the pairs: its own pass
        replay_batch(table, record.extra)
    if undoable is not None:
        for record in batches[len(batches) - handed :]:
            undoable(record)
    table.replaced = 0  # a fuzzy base's batches add what it holds: not a conflict


@dataclass(frozen=True, slots=True)
class _Rewrite:
    writer: SnapshotWriter
    number: int
    replacing: bool


class DataDir:
    """One server's folder of persistence files (see the module)."""

    def __init__(
        self,
        folder: Path | str,
        *,
        max_record: int = DEFAULT_MAX_RECORD,
        chunk_pairs: int = DEFAULT_CHUNK_PAIRS,
        chunk_chars: int = DEFAULT_CHUNK_CHARS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.folder = Path(folder)
        self.max_record = max_record
        self.chunk_pairs = chunk_pairs
        self.chunk_chars = chunk_chars
        self.clock = clock
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise PersistError(f"{self.folder}: in use by another process") from None
        self.manifest: Manifest | None = None
        self._writer: LogWriter | None = None
        self.bytes_appended = 0  # by ``append``, over this object's life
        self._rewrite: _Rewrite | None = None
        self.removed: list[str] = []  # leftovers removed at open
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_address(cls, data_dir: Path | str, host: str, port: int, **options: Any) -> DataDir:
        return cls(Path(data_dir) / address_folder(host, port), **options)

    def _open(self) -> None:
        path = self.folder / MANIFEST
        if path.exists():
            self.manifest = read_manifest(path)
        named = set(self.manifest.files) if self.manifest else set()
        leftovers = []
        orphans = []
        for entry in sorted(os.listdir(self.folder)):
            if entry.startswith(TEMP_PREFIX):
                leftovers.append(entry)
            elif (BASE_NAME.fullmatch(entry) or INCREMENT_NAME.fullmatch(entry)) and (
                entry not in named
            ):
                orphans.append(entry)
        if orphans and self.manifest is None:
            raise PersistError(
                f"{self.folder}: {', '.join(orphans)} but no {MANIFEST}: restore the manifest "
                "or move those files away"
            )
        # A temporary file is a write a crash interrupted; a file the manifest does not
        # name is one a rewrite replaced (or installed just before the crash).
        for entry in leftovers + orphans:
            (self.folder / entry).unlink()
            self.removed.append(entry)

    def member_run_id(self, fresh: str, loaded: bool) -> str:
        """The run id of the member whose data this folder holds: the one kept here
        if the data was ``loaded`` from it at start, else ``fresh``, kept from now on."""
        path = self.folder / MEMBER
        if loaded and path.exists():
            kept = path.read_text().strip()
            if kept:
                return kept
        write_atomically(path, fresh.encode(), TEMP_PREFIX)
        return fresh

    # -- loading --------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        """The folder holds data (a manifest): ``load`` it; otherwise ``start``."""
        return self.manifest is not None

    def load(self, cut_torn_tail: bool = True) -> Loaded:
        """Read the manifest's files (the base's pairs are read by the caller, through
        ``Loaded``) and open the last increment for appends.

        A torn record at the end of the last increment is cut (and listed in
        ``Loaded.cut``), or with ``cut_torn_tail`` false raised as ``TornTail``;
        anything else raises ``FileProblem`` naming the file and offset.
        """
        manifest = self._manifest()
        if self._writer is not None:
            raise PersistError(f"{self.folder}: already loaded")
        base_path = self.folder / manifest.base
        if not base_path.exists():
            raise PersistError(f"{base_path}: named by the manifest, missing")
        snapshot = SnapshotReader(base_path, self.max_record)
        try:
            replay = Replay(snapshot.state)
            cut: list[TornTail] = []
            last = len(manifest.increments) - 1
            for index, name in enumerate(manifest.increments):
                path = self.folder / name
                if not path.exists():
                    raise PersistError(f"{path}: named by the manifest, missing")
                try:
                    for offset, _, record in read_records(path, self.max_record):
                        replay.feed(record, path, offset)
                except TornTail as torn:
                    if index != last:
                        raise Damage(
                            path, torn.offset, f"{torn.reason}, in an increment not the last"
                        ) from None
                    if not cut_torn_tail:
                        raise
                    truncate_torn_tail(path, self.max_record)
                    cut.append(torn)
            self._writer = LogWriter.open(self.folder / manifest.increments[-1])
        except BaseException:
            snapshot.close()
            raise
        return Loaded(
            snapshot, snapshot.state, replay.state, replay.batches, cut, replay.since_floor
        )

    def _manifest(self) -> Manifest:
        if self.manifest is None:
            raise PersistError(f"{self.folder}: no data yet (no {MANIFEST}); start() first")
        return self.manifest

    # -- appending ------------------------------------------------------------------
    def append(self, record: Record) -> int:
        """Append one record to the current increment; returns the increment's size.
        Durable only after ``sync``."""
        writer = self._writer
        if writer is None or (self._rewrite is not None and self._rewrite.replacing):
            raise PersistError(f"{self.folder}: not open for appends (load or start first)")
        before = writer.size
        size = writer.append(record)
        self.bytes_appended += size - before
        return size

    def sync(self) -> None:
        """fsync the records appended since the last ``sync``."""
        if self._writer is not None:
            self._writer.sync()

    def sync_job(self) -> SyncJob | None:
        """The fsync of the records appended so far, to run in a thread while appends
        go on (``LogWriter.sync_job``); None when there is nothing to sync."""
        return self._writer.sync_job() if self._writer is not None else None

    @property
    def dirty(self) -> bool:
        return self._writer is not None and self._writer.dirty

    # -- snapshots ------------------------------------------------------------------
    def begin_rewrite(self, state: State, extra: bytes = b"") -> SnapshotWriter:
        """Start a new base for the data as it is now (``state``: every record appended
        so far is in it).  Appends go on, to a new increment; write the pairs through
        the returned writer (``write_pairs``), then ``finish_rewrite``."""
        manifest = self._manifest()
        if self._writer is None:
            raise PersistError(f"{self.folder}: load() before a rewrite")
        if self._rewrite is not None:
            raise PersistError(f"{self.folder}: a rewrite is already under way")
        number = self._next_number(manifest)
        self._writer.sync()  # the increments before the new one are whole on disk
        increment = f"incr.{number}.log"
        writer = LogWriter.create(self.folder / increment, TEMP_PREFIX)
        self.manifest = Manifest(
            manifest.base,
            (*manifest.increments, increment),
            number + 1,
            manifest.snapshot_time,
            manifest.snapshot_size,
        )
        try:
            self._write_manifest(self.manifest)
        except BaseException:
            writer.close()
            raise
        self._writer.close()
        self._writer = writer
        return self._begin(state, extra, number, replacing=False)

    def start(self, state: State, extra: bytes = b"") -> SnapshotWriter:
        """Start a base for data that replaces whatever the folder holds (a first start,
        a full transfer).  No appends until ``finish_rewrite``; a crash before it leaves
        the folder as it was."""
        if self._rewrite is not None:
            raise PersistError(f"{self.folder}: a rewrite is already under way")
        number = self._next_number(self.manifest)
        return self._begin(state, extra, number, replacing=True)

    def _next_number(self, manifest: Manifest | None) -> int:
        if manifest is None:
            return 1
        return max(manifest.next, *(_number_of(name) + 1 for name in manifest.files))

    def _begin(self, state: State, extra: bytes, number: int, replacing: bool) -> SnapshotWriter:
        writer = SnapshotWriter(
            self.folder / f"base.{number}.snap",
            state,
            extra,
            chunk_pairs=self.chunk_pairs,
            chunk_chars=self.chunk_chars,
            max_record=self.max_record,
            temp_prefix=TEMP_PREFIX,
            clock=self.clock,
        )
        self._rewrite = _Rewrite(writer, number, replacing)
        return writer

    def finish_rewrite(self) -> SnapshotInfo:
        """Put the new base in place, name it in the manifest, delete what it replaces."""
        rewrite = self._rewrite
        if rewrite is None:
            raise PersistError(f"{self.folder}: no rewrite under way")
        self._rewrite = None
        writer: LogWriter | None = None
        try:
            info = rewrite.writer.finish()
            old = self.manifest
            if rewrite.replacing:
                increment = f"incr.{rewrite.number}.log"
                writer = LogWriter.create(self.folder / increment, TEMP_PREFIX)
                increments: tuple[str, ...] = (increment,)
                next_number = rewrite.number + 1
            else:
                assert old is not None, "a rewrite begins from a manifest"
                first = old.increments.index(f"incr.{rewrite.number}.log")
                increments = old.increments[first:]
                next_number = old.next
            manifest = Manifest(info.path.name, increments, next_number, info.created, info.size)
            self._write_manifest(manifest)
        except BaseException:
            # A base installed but not named by the manifest is removed at the next open.
            rewrite.writer.abort()
            if writer is not None:
                writer.close()
            raise
        self.manifest = manifest
        if writer is not None:
            if self._writer is not None:
                self._writer.close()
            self._writer = writer
        for name in old.files if old else ():
            if name not in manifest.files:
                (self.folder / name).unlink(missing_ok=True)
        return info

    def abort_rewrite(self) -> None:
        """Give up the rewrite under way (its temporary file is removed); the manifest
        keeps naming the old base."""
        if self._rewrite is not None:
            self._rewrite.writer.abort()
            self._rewrite = None

    def write_snapshot(self, writer: SnapshotWriter, pairs: Iterable[tuple[str, str]]) -> None:
        """All of ``pairs`` at once (for a caller that does not need to yield)."""
        for _ in writer.write_pairs(pairs):
            pass

    def _write_manifest(self, manifest: Manifest) -> None:
        write_atomically(self.folder / MANIFEST, manifest.to_json(), TEMP_PREFIX)

    # -- status ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        manifest = self.manifest
        if manifest is None:
            return {"folder": str(self.folder), "snapshot": None, "log_bytes": 0}
        log_bytes = 0
        for name in manifest.increments:
            try:
                log_bytes += (self.folder / name).stat().st_size
            except FileNotFoundError:
                pass  # reported by load; a status is no place to fail
        return {
            "folder": str(self.folder),
            "snapshot": {
                "file": manifest.base,
                "time": manifest.snapshot_time,
                "size": manifest.snapshot_size,
            },
            "increments": len(manifest.increments),
            "log_bytes": log_bytes,
            "unsynced_bytes": (self._writer.size - self._writer.synced_size if self._writer else 0),
            "rewrite": self._rewrite is not None,
        }

    def close(self) -> None:
        if self._rewrite is not None:
            self.abort_rewrite()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = -1

    def __enter__(self) -> DataDir:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _number_of(name: str) -> int:
    match = BASE_NAME.fullmatch(name) or INCREMENT_NAME.fullmatch(name)
    assert match is not None, "names are checked when the manifest is read"
    return int(match.group(1))
