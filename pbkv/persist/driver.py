"""Persistence in a running server: the asyncio side of the cores' ``Persist`` and
``PersistAll`` actions (``pbkv/actions.py``), and loading the data at start.

The cores say *what* to log, in order, as they change the data: each batch as it
is applied (the primary's when the backup acknowledged it, the backup's before
it acknowledges), each rollback, and each sync (a mark, or a new base when a
transfer replaced the data).  This module says *when* it reaches the disk:

* ``always``: every record is appended (one ``write``) as the action is carried
  out, and one fsync started at the next turn of the event loop covers every
  record appended until it starts (Redis's group commit under ``appendfsync
  always``).  Until an fsync that covers them is done, what acknowledges those
  records is *held*: the primary's client replies (``durable`` wraps each
  write's reply), the backup's frames (its ACKs, its SYNC_ACK; ``hold``).
  Held things go out in order once their fsync returns, so no acknowledgement
  leaves before its record is durable.
* ``everysec``: records are appended as they come and a timer starts an fsync
  once a second (none if the last one still runs, as Redis postpones); nothing
  is held.  A crash of the machine (not of the process: the page cache survives
  that) loses at most the last second or so: ``unsynced_max_ms`` measures it.

The fsyncs run in a thread of their own, one at a time, while the loop goes on
serving and appending (appends stay on the loop: they are the log's order).  A
record appended while an fsync runs is not covered by it: records are numbered
as they are appended (``Durability``), and a held acknowledgement remembers the
last number appended when it was held; it goes out once an fsync that started
after that record finished.  So under ``always`` the next fsync starts as soon
as the running one ends, with every record appended meanwhile.

A new base (``persist_all``: a full transfer, a fetch, an empty start) is
written while serving: one shard of the store copied at a time, written in
chunks, a few milliseconds per turn of the loop; then a thread flushes it,
fsyncs it and names it in the manifest (tens of milliseconds the loop never
waits).  The records of batches applied meanwhile wait in memory and are
appended once the base is in place (replaying them on a base that already
holds some of their writes is harmless: every operation sets a key's final
value or removes it).  With ``always`` everything that acknowledges is held
until the base is in place.

A log that has grown by ``rewrite_percentage`` of the base's size (and past
``rewrite_min_bytes``) is *rewritten*, as Redis rewrites its append-only file:
a new base of the store as it is, written the same way, while records go on
to a new increment after it; once the base is in place the older files go.
Starting a rewrite (an fsync of the log, the new increment and a manifest that
names it: tens of milliseconds on a busy disk) runs in the base thread too; the
records of the few turns it takes wait in memory, as for a base that replaces
the data, then go to the new increment.

A base written while batches are applied may hold some of their writes; so
a rollback to a state before the last batch such a base may hold cannot be
replayed on it (the base does not record the values it would restore): it is
written as a new base of the rolled-back store instead.

Disk faults.  A primary refuses a write *before* applying it while the folder's
file system has less than ``headroom`` bytes free (``refusal``: a ``statvfs``
while there is room once this server appended a quarter of the headroom since the
last, or 50 ms passed; at every write while there is not), so a disk that fills
up refuses writes cleanly: the records of the writes already admitted fit in the
headroom, and nothing refused is applied anywhere.  Once space is freed the next
write is accepted.

A failed append, fsync or base (a disk that filled up anyway, an I/O error)
*fails* the folder: after a failed fsync what is on disk is unknown (the
kernel may have dropped the pages), so the log is not trusted again.  What was
held is answered as a failure (``on_failure``; a reply gets ``DiskFailed``
with ``applied``), nothing that is not on disk is acknowledged, writes are
refused, reads go on.  Once a second the server tries to write a new base of
its whole store (a new base and a new increment, named by a new manifest);
once it is in place the folder is healthy again (``on_recovery``) and writes
are accepted.  A failed log rewrite fails nothing: the rewrite is given up
(the old base and the log stay valid) and tried again later.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pbkv.commands import DiskFailed, Done, Loaded, Outcome, Reply
from pbkv.config import Settings
from pbkv.metrics import CollectorPaused
from pbkv.persist.datadir import DataDir
from pbkv.persist.durability import Durability
from pbkv.persist.framing import PersistError
from pbkv.persist.log import Record, RecordKind, State, SyncJob
from pbkv.persist.snapshot import SnapshotInfo, SnapshotWriter
from pbkv.persist.table import base_extra
from pbkv.store import ShardedStore

log = logging.getLogger(__name__)

EVERYSEC = 1.0  # seconds between fsyncs with ``everysec``
WRITE_BUDGET = 0.005  # seconds of base writing per turn of the event loop
# While there is room, the free space is looked at again after this many seconds (the
# disk may be filled by others), or sooner once this server's own records took a
# quarter of the headroom: a statvfs costs what several small appends do.
SPACE_CHECK_INTERVAL = 0.05
SPACE_CHECK_SHARE = 4  # the headroom's part appended between two looks, at most
SPACE_CHECK_MIN_BYTES = 64 * 1024  # (with no headroom, still not at every write)
# Pairs per chunk of a base: a chunk is written in one go (about 1 ms per 1,000 pairs).
BASE_CHUNK_PAIRS = 1024


@dataclass
class _Base:
    """A new base being written: the store's shards, one copy at a time."""

    writer: SnapshotWriter
    store: ShardedStore
    state: State
    chunks: Iterator[list[tuple[str, str]]]
    started: float
    replacing: bool  # the data was replaced (records wait) or the log is rewritten


def _store_chunks(store: ShardedStore, size: int) -> Iterator[list[tuple[str, str]]]:
    """The store's pairs in chunks, each shard copied when its turn comes (so the
    store may change between chunks: see the module)."""
    for shard in range(store.shard_count):
        pairs = iter(store.shard_copy(shard).items())  # a private copy: read lazily
        while chunk := list(itertools.islice(pairs, size)):
            yield chunk


def _flush_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Persistence:
    """One server's data folder, driven from its event loop."""

    def __init__(
        self,
        settings: Settings,
        address: tuple[str, int],
        loop: asyncio.AbstractEventLoop,
        on_failure: Callable[[str], None],
        on_recovery: Callable[[], None] = lambda: None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        assert settings.data_dir is not None, "checked by Settings"
        self.mode = settings.persistence
        self.always = self.mode == "always"
        self.rewrite_percentage = settings.rewrite_percentage
        self.rewrite_min_bytes = settings.rewrite_min_bytes
        self.loop = loop
        self.clock = clock or loop.time  # monotonic: the waits of records for their fsync
        self.durability = Durability()
        self.on_failure = on_failure
        self.on_recovery = on_recovery
        # Room kept free for the records of writes already admitted: the batches in
        # flight and queued (a batch's record is at most about twice its BATCH_CHARS).
        self.headroom = settings.disk_headroom
        self._next_space_check = float("-inf")  # the clock's time
        self._space_check_bytes = 0  # the datadir's bytes_appended that calls for one
        self._space_check_step = max(self.headroom // SPACE_CHECK_SHARE, SPACE_CHECK_MIN_BYTES)
        self._space_free = 0
        self.short_of_space: str | None = None  # writes refused: the reason
        self.writes_refused = 0
        self.disk_failures = 0
        self.last_disk_error: str | None = None
        self.datadir = DataDir.for_address(
            settings.data_dir, *address, chunk_pairs=BASE_CHUNK_PAIRS
        )
        # What waits for an fsync: (covers, deliver, refuse): the number of the last
        # record it acknowledges (None: whatever follows the base being written),
        # ``refuse`` called instead when the records never reach the disk.
        self.held: collections.deque[
            tuple[int | None, Callable[[], None], Callable[[], None] | None]
        ] = collections.deque()
        self.sync_scheduled = False
        # One thread, so fsyncs never overlap (each covers what the last one left).
        self._fsyncs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pbkv-fsync")
        self.fsync_running = False
        # A base is put in place (flushed, fsynced, renamed, named by the manifest) in
        # a thread of its own too: those fsyncs take tens of milliseconds.
        self._bases = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pbkv-base")
        # What the base thread does with the folder (start a rewrite, put a base in
        # place): the loop leaves the folder to it until it is done.
        self._finishing: concurrent.futures.Future[Any] | None = None
        self._starting: State | None = None  # a rewrite's start under way: its state
        self._closed = False
        self.base: _Base | None = None
        self.waiting: list[Record] = []  # records that follow the base being written
        self.failed: str | None = None
        self.records = 0
        self.syncs = 0
        self.sync_seconds_max = 0.0
        self.bases_written = 0
        self.base_loop_lag = 0.0  # the loop's longest stall while the last base was written
        self.last_base_seconds = 0.0
        self.recovered_pairs = 0
        self.recovery_seconds = 0.0
        self.recovered = False  # the folder held data, loaded at start
        self.rewrites = 0
        self._timer: asyncio.TimerHandle | None = None
        self.store: ShardedStore | None = None  # the server's, from ``recover`` on
        self.state = State(0, 0)  # after the last record
        # The last seq whose writes the newest base may hold (see the module).
        self.fuzzy_until = 0

    # -- start and stop ---------------------------------------------------------------
    def recover(
        self,
        store: ShardedStore,
        fresh: State,
        undoable: Callable[[Record], None] | None = None,
    ) -> State | None:
        """Load the folder's data into ``store`` (empty) and return its state; None when
        the folder held none (a first start: an empty base at ``fresh`` is written, so
        records may follow at once).  ``undoable``: see ``Loaded.fill``.  Raises
        ``PersistError`` naming the file and offset of any damage but a torn last
        record, which is cut and logged."""
        datadir = self.datadir
        self.store = store
        for name in datadir.removed:
            log.info("persistence: removed %s (left by an interrupted write)", name)
        if not datadir.exists:
            datadir.start(fresh)
            datadir.finish_rewrite()
            self.state = fresh
            log.info("persistence %s: %s holds no data yet", self.mode, datadir.folder)
            return None
        started = time.perf_counter()
        with CollectorPaused():  # the records and chunks read are garbage at once
            loaded = datadir.load()
            for torn in loaded.cut:
                log.warning("persistence: cut a torn last record (a crash's leftover): %s", torn)
            state = self.state = loaded.fill(store, undoable)
        self.recovered = True
        # The base may hold writes of the batches after it (it was written while they
        # were applied), and what it held is not known now: a rollback of any batch
        # recovered writes a new base of the rolled-back store (see the module).
        self.fuzzy_until = state.seq
        self.recovery_seconds = time.perf_counter() - started
        self.recovered_pairs = len(store)
        log.info(
            "persistence %s: recovered %d pairs from %s (history %016x, seq %d, epoch %d: "
            "a base and %d batches) in %.3f s",
            self.mode,
            len(store),
            datadir.folder,
            state.history,
            state.seq,
            state.epoch,
            len(loaded.batches),
            self.recovery_seconds,
        )
        return state

    def member_run_id(self, fresh: str) -> str:
        """With a coordinator: the member's run id, the one it had when it wrote the data
        recovered at start (it is the same member: its copy is the one it held), else
        ``fresh``.  Call after ``recover``."""
        try:
            return self.datadir.member_run_id(fresh, self.recovered)
        except OSError as exc:  # a new member then: it may not pass for the one it was
            log.error("persistence: cannot keep the member's run id: %s", exc)
            return fresh

    def start(self) -> None:
        self._timer = self.loop.call_later(EVERYSEC, self._every_second)

    def close(self) -> None:
        """A clean stop: whatever was appended is made durable, the folder released."""
        if self._timer is not None:
            self._timer.cancel()
        self._closed = True
        self._fsyncs.shutdown(wait=True)  # an fsync under way ends first
        self._bases.shutdown(wait=True)  # and a base being put in place, or a rewrite started
        if self._starting is not None:
            self._close_starting()
        if self.failed is None:
            try:
                if self.base is None:
                    self.datadir.sync()
            except PersistError as exc:
                log.error("persistence: the last fsync failed: %s", exc)
        self.datadir.close()

    def _close_starting(self) -> None:
        """Stopped while a rewrite was being started: its base is given up, and the
        records that waited for the new increment are appended to it."""
        self._starting = None
        self.datadir.abort_rewrite()
        waiting, self.waiting = self.waiting, []
        if self.failed is not None:
            return
        try:
            for record in waiting:
                self.datadir.append(record)
        except PersistError as exc:
            log.error("persistence: appending the last records failed: %s", exc)
            self.failed = str(exc)

    # -- acknowledgements wait for their records ----------------------------------------
    @property
    def holding(self) -> bool:
        """Whether what acknowledges data must wait (``always``, records not yet durable)."""
        return self.always and (
            self.replacing_base
            or (self.failed is None and self.durability.pending)
            or bool(self.held)
        )

    def _covers(self) -> int | None:
        """What a thing held now waits for: the records appended so far, or with a
        base that replaces the data, the base and the records after it."""
        return None if self.replacing_base else self.durability.appended

    def hold(self, deliver: Callable[[], None]) -> None:
        """Run ``deliver`` once every record appended so far is durable (now if none)."""
        if self.holding:
            self.held.append((self._covers(), deliver, None))
        else:
            deliver()

    def durable(self, reply: Reply) -> Reply:
        """``reply``, delivered only once the records before it are durable."""

        def answer(outcome: Outcome) -> None:
            if self.failed is not None and isinstance(outcome, Done | Loaded):
                reply(DiskFailed(self.failed, applied=True))
            elif self.holding:
                self.held.append(
                    (
                        self._covers(),
                        lambda: reply(outcome),
                        lambda: reply(DiskFailed(self.failed or "", True)),
                    )
                )
            else:
                reply(outcome)

        return answer

    def _release(self) -> None:
        """Deliver, in order, what the fsyncs finished so far cover."""
        held = self.held
        while held:
            covers, deliver, _ = held[0]
            if covers is None or not self.durability.covers(covers):
                return
            held.popleft()
            deliver()

    # -- disk space -------------------------------------------------------------------
    def refusal(self) -> DiskFailed | None:
        """Whether a new write must be refused before it is applied: the folder failed,
        or its file system has less than ``headroom`` bytes free."""
        if self.failed is not None:
            self.writes_refused += 1
            return DiskFailed(self.failed)
        now = self.clock()
        if (
            now >= self._next_space_check
            or self.datadir.bytes_appended >= self._space_check_bytes
            or self.short_of_space is not None
        ):
            self._check_space()
            self._next_space_check = now + SPACE_CHECK_INTERVAL
            self._space_check_bytes = self.datadir.bytes_appended + self._space_check_step
        if self.short_of_space is not None:
            self.writes_refused += 1
            return DiskFailed(self.short_of_space)
        return None

    def _check_space(self) -> None:
        try:
            stats = os.statvfs(self.datadir.folder)
        except OSError as exc:
            free, reason = 0, f"cannot read the free space: {exc.strerror or exc}"
        else:
            free = stats.f_bavail * stats.f_frsize
            reason = (
                f"disk full: {free} bytes free in {self.datadir.folder}, "
                f"below the {self.headroom} kept for writes under way"
            )
        self._space_free = free
        was = self.short_of_space
        self.short_of_space = reason if free < self.headroom else None
        if was is None and self.short_of_space is not None:
            log.error("persistence: refusing writes: %s", self.short_of_space)
            self.last_disk_error = self.short_of_space
        elif was is not None and self.short_of_space is None:
            log.warning("persistence: %d bytes free again: accepting writes", free)

    @property
    def replacing_base(self) -> bool:
        """Records wait in memory: a base that replaces the data is not in place yet,
        or a rewrite's start has not switched to its new increment yet (once started, a
        rewrite holds nothing back: its records go on to the log meanwhile)."""
        base = self.base
        return (base is not None and base.replacing) or self._starting is not None

    # -- the actions ------------------------------------------------------------------
    def persist(self, record: Record) -> None:
        if self.failed is not None and self.base is None:
            # Not logged: the store holds it, and the base that heals the folder too.
            self.state = record.state
            return
        if record.kind is RecordKind.ROLLBACK and self.store is not None:
            state = self.state
            if (
                self.base is not None
                or self._starting is not None
                or (record.history == state.history and record.seq < self.fuzzy_until)
            ):
                # The base may hold writes this undoes: a base of the rolled-back store.
                self.persist_all(record.state, self.store)
                return
        self.state = record.state
        if self.replacing_base:
            self.waiting.append(record)
            return
        try:
            self.datadir.append(record)
        except PersistError as exc:
            self._fail(f"appending a record failed: {exc}")
            return
        self.records += 1
        self.durability.append(self.clock())
        if self.always and not self.sync_scheduled:
            self.sync_scheduled = True
            self.loop.call_soon(self._sync_now)

    def persist_all(self, state: State, store: ShardedStore) -> None:
        """The store now holds data that replaces everything: a new base at ``state``."""
        if self.failed is not None and self.base is None:
            self.state = state  # the base that heals the folder holds it
            return
        self._wait_for_finishing()
        if self.base is not None or self._starting is not None:
            self.datadir.abort_rewrite()  # replaced again before the last one was in place
            self._starting = None
        # Records waiting for an older base are in the store already: this base has them.
        self.waiting.clear()
        try:
            writer = self.datadir.start(state, base_extra(store.idempotency))
        except PersistError as exc:
            self._fail(f"starting a snapshot failed: {exc}")
            return
        self.state = state
        self._write_base_of(writer, store, state, replacing=True)

    def _write_base_of(
        self, writer: SnapshotWriter, store: ShardedStore, state: State, replacing: bool
    ) -> None:
        chunks = _store_chunks(store, self.datadir.chunk_pairs)
        self.base = _Base(writer, store, state, chunks, time.perf_counter(), replacing)
        if replacing:
            self.base_loop_lag = 0.0  # a rewrite's counts from its start (``_rewrite_if_grown``)
        self.loop.call_soon(self._write_base, self.base)

    def loop_lagged(self, lag: float) -> None:
        """The event loop was busy ``lag`` seconds longer than its lag probe expected
        (``LoopLag``): kept while a base is written, whose slices must stay short."""
        if self.base is not None or self._starting is not None:
            self.base_loop_lag = max(self.base_loop_lag, lag)

    def _rewrite_if_grown(self) -> None:
        """Rewrite the log once it has grown past the settings (Redis's
        auto-aof-rewrite-percentage and auto-aof-rewrite-min-size)."""
        if (
            not self.rewrite_percentage
            or self.base is not None
            or self._starting is not None
            or self.store is None
        ):
            return
        status = self.datadir.status()
        snapshot = status["snapshot"]
        if snapshot is None:
            return
        grown = status["log_bytes"]
        if (
            grown < self.rewrite_min_bytes
            or grown * 100 < snapshot["size"] * self.rewrite_percentage
        ):
            return
        self._check_space()
        if self._space_free < snapshot["size"] + grown + 2 * self.headroom:
            return  # no room for the new base: the log goes on growing meanwhile
        log.info(
            "persistence: rewriting: the log holds %d bytes, the base %d", grown, snapshot["size"]
        )
        state = self._starting = self.state
        self.base_loop_lag = 0.0
        starting = self._finishing = self._bases.submit(
            self.datadir.begin_rewrite, state, base_extra(self.store.idempotency)
        )
        future = asyncio.wrap_future(starting, loop=self.loop)
        future.add_done_callback(lambda done: self._rewrite_started(state, done))

    def _rewrite_started(self, state: State, started: asyncio.Future[SnapshotWriter]) -> None:
        """The base thread started the rewrite at ``state`` (``begin_rewrite``): its
        base is written from now on, and the records that waited go to the new
        increment."""
        if self._closed or started.cancelled() or self._starting is not state:
            return  # given up meanwhile (the data replaced, the folder failed)
        self._finishing = None
        self._starting = None
        try:
            writer = started.result()
        except (PersistError, OSError) as exc:
            self._fail(f"starting a rewrite failed: {exc}")
            return
        self.durability.all_durable(self.clock())  # begin_rewrite synced the log
        self.rewrites += 1
        assert self.store is not None, "a rewrite is of the server's store"
        self._write_base_of(writer, self.store, state, replacing=False)
        self._append_waiting()
        if self.failed is None:
            self._release()

    # -- the disk work ------------------------------------------------------------------
    def _sync_now(self) -> None:
        self.sync_scheduled = False
        if self.replacing_base or self.failed is not None:
            return  # a base that replaces the data: what follows it is synced after it
        if not self.fsync_running:
            self._start_fsync()
        # else the running fsync, once done, starts the next with these records

    def _start_fsync(self) -> None:
        """An fsync of every record appended so far, in the fsync thread."""
        try:
            job = self.datadir.sync_job()
        except PersistError as exc:
            self._fail(f"fsync failed: {exc}")
            return
        covered = self.durability.started()
        if job is None:  # on disk already (starting a rewrite synced the log)
            self.durability.finished(covered, self.clock())
            self._release()
            return
        self.fsync_running = True
        started = time.perf_counter()
        future = self.loop.run_in_executor(self._fsyncs, job.run)
        future.add_done_callback(lambda done: self._fsync_done(done, job, covered, started))

    def _fsync_done(
        self, done: asyncio.Future[None], job: SyncJob, covered: int, started: float
    ) -> None:
        self.fsync_running = False
        if self._closed or done.cancelled():
            return
        try:
            done.result()
        except (PersistError, OSError) as exc:
            self._fail(f"fsync failed: {exc}")
            return
        job.done()
        self.durability.finished(covered, self.clock())
        self.syncs += 1
        self.sync_seconds_max = max(self.sync_seconds_max, time.perf_counter() - started)
        if self.failed is not None:
            return
        self._release()
        if self.always and self.durability.pending and not self.replacing_base:
            self._start_fsync()  # the records appended while this one ran

    def _every_second(self) -> None:
        self._timer = self.loop.call_later(EVERYSEC, self._every_second)
        if self.failed is not None:
            self._heal()
            return
        self._rewrite_if_grown()
        if (
            not self.always
            and not self.replacing_base
            and not self.fsync_running  # still running: Redis too waits for the next second
            and self.datadir.dirty
        ):
            self._start_fsync()

    def _heal(self) -> None:
        """The folder failed: try a new base of the whole store (a new base, a new
        increment, a new manifest), unless one is under way or the disk is still full."""
        if self.base is not None or self.store is None:
            return
        self._check_space()
        if self.short_of_space is not None:
            return
        self.datadir.abort_rewrite()
        try:
            writer = self.datadir.start(self.state, base_extra(self.store.idempotency))
        except PersistError as exc:
            self.last_disk_error = f"starting a new base failed: {exc}"
            return
        log.info("persistence: writing a new base to leave the failure behind")
        self.waiting.clear()
        self._write_base_of(writer, self.store, self.state, replacing=True)

    def _write_base(self, base: _Base) -> None:
        if base is not self.base:
            return  # replaced by a newer one, or given up
        deadline = time.perf_counter() + WRITE_BUDGET
        try:
            for chunk in base.chunks:
                base.writer.write_chunk(chunk)
                if time.perf_counter() > deadline:
                    self.loop.call_soon(self._write_base, base)
                    return
        except (PersistError, OSError) as exc:
            self._fail(f"writing a snapshot failed: {exc}")
            return
        # Flushing tens of megabytes, then the fsyncs of the file, the folder and the
        # manifest take tens of milliseconds: in a thread.  Meanwhile the loop leaves
        # the folder's manifest to it (``_wait_for_finishing``) and appends no record
        # to a log the base replaces (they wait, as while it was written).
        finishing = self._finishing = self._bases.submit(self._put_in_place, base.writer)
        future = asyncio.wrap_future(finishing, loop=self.loop)
        future.add_done_callback(lambda done: self._finish_base(base, done))

    def _put_in_place(self, writer: SnapshotWriter) -> SnapshotInfo:
        """In the base thread: the base on disk, named by the manifest."""
        _flush_file(writer.temp_path)
        return self.datadir.finish_rewrite()

    def _wait_for_finishing(self) -> None:
        """A base being put in place by its thread owns the folder's manifest: let it
        end before the loop touches them (rare: the data replaced again, or a disk
        fault, in those milliseconds).  How it ended is ``_finish_base``'s business."""
        finishing = self._finishing
        if finishing is not None:
            with contextlib.suppress(Exception):
                finishing.result()

    def _finish_base(self, base: _Base, finished: asyncio.Future[SnapshotInfo]) -> None:
        self._finishing = None
        if self._closed or finished.cancelled() or base is not self.base:
            return
        try:
            info = finished.result()
        except (PersistError, OSError) as exc:
            self._fail(f"writing a snapshot failed: {exc}")
            return
        self.base = None
        self.fuzzy_until = self.state.seq
        if self.failed is not None:
            log.warning(
                "persistence: the folder works again (%s): accepting writes", info.path.name
            )
            self.failed = None
            self.on_recovery()
        self.bases_written += 1
        self.last_base_seconds = time.perf_counter() - base.started
        log.info(
            "persistence: new base %s in place: %d pairs, %d bytes, seq %d, in %.3f s",
            info.path.name,
            info.count,
            info.size,
            base.state.seq,
            self.last_base_seconds,
        )
        if base.replacing:
            # The base holds every record appended before it; those that waited for
            # it follow it.
            self.durability.all_durable(self.clock())
            self._append_waiting()
        if self.failed is None:
            self._release()

    def _append_waiting(self) -> None:
        """The records that waited in memory go to the log, in order; what was held
        meanwhile waits for them."""
        waiting, self.waiting = self.waiting, []
        for record in waiting:
            self.persist(record)
        if self.replacing_base:
            return  # a rollback among them started a base of its own: they wait for it
        covers = self.durability.appended
        self.held = collections.deque(
            (covers if waits is None else waits, deliver, refuse)
            for waits, deliver, refuse in self.held
        )

    def _fail(self, reason: str) -> None:
        self._wait_for_finishing()
        if self._starting is not None:  # the rewrite it started is given up below
            self._starting = None
            self.datadir.abort_rewrite()
        base = self.base
        if base is not None and not base.replacing and self.failed is None:
            # A rewrite that failed: the old base and the log are still whole.
            self.base = None
            self.datadir.abort_rewrite()
            self.last_disk_error = reason
            log.error("persistence: gave up a rewrite (tried again later): %s", reason)
            return
        self.base = None
        self.datadir.abort_rewrite()  # its temporary file freed
        self.last_disk_error = reason
        if self.failed is not None:
            log.error("persistence: still failing: %s", reason)
            return
        self.failed = reason
        self.disk_failures += 1
        self.waiting.clear()  # in the store: the healing base holds them
        held, self.held = self.held, collections.deque()
        for _, _, refuse in held:  # never acknowledged: not on disk
            if refuse is not None:
                refuse()
        self.on_failure(reason)

    # -- status -----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        status = self.datadir.status()
        now = self.clock()
        status.update(
            mode=self.mode,
            records=self.records,
            fsyncs=self.syncs,
            fsync_max_ms=round(self.sync_seconds_max * 1000, 3),
            unsynced_ms=round(self.durability.unsynced_age(now) * 1000, 3),
            unsynced_max_ms=round(self.durability.largest_window(now) * 1000, 3),
            bases_written=self.bases_written,
            rewrites=self.rewrites,
            last_base_seconds=round(self.last_base_seconds, 3),
            base_loop_lag_ms=round(self.base_loop_lag * 1000, 1),
            base_under_way=self.base is not None,
            held=len(self.held),
            recovered_pairs=self.recovered_pairs,
            recovery_seconds=round(self.recovery_seconds, 3),
            failed=self.failed,
            short_of_space=self.short_of_space,
            headroom=self.headroom,
            writes_refused=self.writes_refused,
            disk_failures=self.disk_failures,
            last_disk_error=self.last_disk_error,
        )
        return status
