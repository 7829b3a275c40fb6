"""One simulated server's data folder, in memory: what the simulation
(``pbkv.testing.sim``) keeps of the cores' ``Persist`` and ``PersistAll`` actions,
and when it becomes durable, as ``pbkv/persist/driver.py`` does with files.

The folder is a list of items in the order they were written: bases (the whole
store at a state, its idempotency table with it) and the log's records after
each.  ``Durability`` numbers them as the real driver numbers its records; an
fsync covers what was written before it started and finishes after a drawn
delay, as an event of the process (a crash drops it):

* ``always``: an fsync starts at the next turn of the process's loop after a
  write, the next one as soon as it ends if more was written meanwhile; until
  one covers them, the primary's client replies and every frame the backup
  sends are held (``durable``, ``hold``), and go out in order, as the driver
  holds them.
* ``everysec``: an fsync once a simulated second (none while one runs); a new
  base is put in place at once by its own fsync, as the driver's base thread
  does.  Nothing is held.

A process crash loses nothing written (the page cache outlives the process:
the model writes it back at once); a power loss keeps only what an fsync
covered.  A restarted process rebuilds its store from the last durable base
and the records after it, through the real loading code: ``Replay`` checks
that each record follows the last, ``replay_onto`` applies them (a backup's
undoable batches go to its undo record), and ``recovered_from`` gives the core
the state reached.

A simplification: a base is the store as it is when ``PersistAll`` is carried
out (the real one is copied a shard at a time while batches go on, so it may
hold some of theirs), and it takes one fsync to put in place.  As the driver
does, a rollback to before the newest base (or the state recovered at start) of
the same history is written as a new base of the rolled-back store.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pbkv.commands import Outcome, Reply
from pbkv.persist.datadir import Replay, replay_onto
from pbkv.persist.durability import Durability
from pbkv.persist.log import Record, RecordKind, State
from pbkv.persist.table import base_extra
from pbkv.store import ShardedStore

EVERYSEC = 1.0  # simulated seconds between fsyncs with ``everysec`` (the driver's)
FSYNC_SECONDS = (0.0005, 0.005)  # how long an fsync takes


@dataclass(frozen=True, slots=True)
class Base:
    """A base snapshot: every pair at ``state``, and the idempotency table."""

    state: State
    pairs: tuple[tuple[str, str], ...]
    extra: bytes


Item = Base | Record


class SimDisk:
    """The items one server wrote, and how many of them are durable.

    ``run(delay, event)`` runs ``event`` on the server's process after ``delay``
    in its current life only (``Process.deliver``)."""

    def __init__(self, mode: str, name: str, rng: random.Random) -> None:
        self.always = mode == "always"
        self.name = name
        self.rng = rng
        self.items: list[Item] = []  # from the newest durable base on
        self.first = 1  # the number of ``items[0]``
        self.durability = Durability()
        self.held: deque[tuple[int, Callable[[], None]]] = deque()
        self.run: Callable[[float, Callable[[], None]], None] = lambda delay, event: None
        self.on_write: Callable[[], None] = lambda: None  # the nemesis aims its power cuts
        self.store: ShardedStore | None = None
        self.state = State(0, 0)  # after the last item written
        self.fuzzy_until = 0  # see the module: a rollback before it is a new base
        self.sync_scheduled = False
        self.fsync_running = False
        self.records_lost = 0  # by power losses
        self.recoveries = 0  # starts that loaded data
        self.rollbacks_as_bases = 0

    # -- a life of the process -------------------------------------------------------
    def recover(
        self,
        store: ShardedStore,
        fresh: State,
        undoable: Callable[[Record], None] | None,
        run: Callable[[float, Callable[[], None]], None],
    ) -> State | None:
        """Load what is on disk into ``store`` (empty), as ``Persistence.recover`` does:
        its state, or None on a first start (an empty base at ``fresh`` is written)."""
        self.run = run
        self.store = store
        self.held.clear()
        self.sync_scheduled = self.fsync_running = False
        if not self.always:
            run(EVERYSEC, self._every_second)
        if not self.items:
            self._write(Base(fresh, (), b""))
            self.durability.all_durable(0.0)
            self.state = fresh
            return None
        self.recoveries += 1
        newest = max(i for i, item in enumerate(self.items) if isinstance(item, Base))
        base = self.items[newest]
        assert isinstance(base, Base)
        replay = Replay(base.state)
        for offset, item in enumerate(self.items[newest + 1 :], newest + 1):
            assert isinstance(item, Record), "after the newest base: records"
            replay.feed(item, Path(f"{self.name} log"), offset)
        flat: list[str | None] = []
        for key, value in base.pairs:
            flat += (key, value)
        store.apply(flat)
        replay_onto(store, base.extra, replay.batches, replay.since_floor, undoable)
        self.state = replay.state
        self.fuzzy_until = replay.state.seq
        return replay.state

    def crash(self) -> None:
        """The process died: what it wrote is in the page cache, written back."""
        self.durability.all_durable(0.0)
        self._forget_process()

    def power_loss(self) -> None:
        """The machine lost power: only what an fsync covered is left."""
        durable = self.durability.synced - self.first + 1
        self.records_lost += len(self.items) - durable
        del self.items[durable:]
        self.durability = Durability()
        self.durability.appended = self.durability.synced = self.first + len(self.items) - 1
        self._forget_process()

    def _forget_process(self) -> None:
        self.held.clear()
        self.store = None
        self.run = lambda delay, event: None
        self.sync_scheduled = self.fsync_running = False

    # -- the cores' actions ----------------------------------------------------------
    def persist(self, record: Record) -> None:
        rollback = record.kind is RecordKind.ROLLBACK and self.store is not None
        if rollback and record.history == self.state.history and record.seq < self.fuzzy_until:
            assert self.store is not None
            self.rollbacks_as_bases += 1
            self.persist_all(record.state, self.store)
            return
        self.state = record.state
        self._write(record)

    def persist_all(self, state: State, store: ShardedStore) -> None:
        pairs = tuple(store.items())
        self.state = state
        self.fuzzy_until = state.seq
        self._write(Base(state, pairs, base_extra(store.idempotency)))
        if not self.always:
            self._sync_soon()  # the base is put in place by its own fsync

    def _write(self, item: Item) -> None:
        self.items.append(item)
        self.durability.append(0.0)
        self.on_write()
        if self.always:
            self._sync_soon()

    # -- what waits for the disk (``always``) ----------------------------------------
    @property
    def holding(self) -> bool:
        return self.always and (self.durability.pending or bool(self.held))

    def hold(self, deliver: Callable[[], None]) -> None:
        """Run ``deliver`` once everything written so far is durable (now if it is)."""
        if self.holding:
            self.held.append((self.durability.appended, deliver))
        else:
            deliver()

    def durable(self, reply: Reply) -> Reply:
        """``reply``, delivered only once the records before it are durable."""

        def answer(outcome: Outcome) -> None:
            self.hold(lambda: reply(outcome))

        return answer

    def _release(self) -> None:
        held = self.held
        while held and self.durability.covers(held[0][0]):
            held.popleft()[1]()

    # -- fsyncs ------------------------------------------------------------------------
    def _sync_soon(self) -> None:
        if not self.sync_scheduled:
            self.sync_scheduled = True
            self.run(0.0, self._sync_now)

    def _sync_now(self) -> None:
        self.sync_scheduled = False
        if not self.fsync_running and self.durability.pending:
            self._start_fsync()

    def _every_second(self) -> None:
        self.run(EVERYSEC, self._every_second)
        self._sync_now()

    def _start_fsync(self) -> None:
        covered = self.durability.started()
        self.fsync_running = True
        self.run(self.rng.uniform(*FSYNC_SECONDS), lambda: self._fsync_done(covered))

    def _fsync_done(self, covered: int) -> None:
        self.fsync_running = False
        self.durability.finished(covered, 0.0)
        self._drop_before_newest_durable_base()
        self._release()
        if self.always and self.durability.pending:
            self._start_fsync()  # what was written while this one ran

    def _drop_before_newest_durable_base(self) -> None:
        durable = self.durability.synced - self.first + 1
        for index in range(durable - 1, 0, -1):
            if isinstance(self.items[index], Base):
                del self.items[:index]
                self.first += index
                return
