"""Persistence in the server's driver (``Node.submit``): with ``always``, a retry of a
keyed write answered from the idempotency table waits for the fsync that makes its
write's record durable, like the first reply of that write."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pbkv.commands import Command, DiskFailed, Done, Outcome
from pbkv.config import Settings
from pbkv.idempotency import fingerprint
from pbkv.node import Node
from pbkv.persist import Record
from pbkv.persist.table import batch_extra
from pbkv.primary import PrimaryCore
from pbkv.stages import Event, Role


def test_a_replayed_reply_waits_for_the_fsync_of_its_writes_record(tmp_path: Path) -> None:
    async def run() -> None:
        node = Node(Settings(persistence="always", data_dir=str(tmp_path)), Role.PRIMARY)
        core, persistence = node.core, node.persistence
        assert isinstance(core, PrimaryCore) and persistence is not None
        core.confirmed = True  # a primary that serves reads (the table's replies)
        core.fire(Event.BACKUP_UNREACHABLE, "no backup in this test")
        # The write's batch was acknowledged in this turn of the loop: applied, its
        # reply remembered, its record appended; the fsync comes at the next turn.
        keyed = ["ident-1", fingerprint(Command.INSERT.value, "k", "v"), True, None]
        core.store.write("k", "v")
        core.store.idempotency.apply(1000, keyed)
        persistence.persist(Record.batch(core.history, 1, 0, ["k", "v"], batch_extra(1000, keyed)))
        assert persistence.holding and persistence.datadir.dirty

        delivered: list[tuple[Outcome, bool]] = []

        def reply(outcome: Outcome) -> None:
            delivered.append((outcome, persistence.datadir.dirty))

        # The retry: answered from the table, but not before the record is durable.
        assert node.submit(Command.INSERT, "k", "v", reply, "ident-1") is None
        assert delivered == []
        deadline = asyncio.get_running_loop().time() + 10
        while not delivered:  # the fsync runs in a thread
            assert asyncio.get_running_loop().time() < deadline, "never answered"
            await asyncio.sleep(0.001)
        assert delivered == [(Done(True), False)]  # once fsynced, with the first reply
        assert core.writes_replayed == 1

        # Nothing waits for the disk: the same retry is answered at once.
        assert not persistence.holding
        assert node.submit(Command.INSERT, "k", "v", reply, "ident-1") == Done(True)
        persistence.close()

    asyncio.run(run())


def test_a_full_disk_refuses_new_writes_but_answers_a_retry_from_the_table(
    tmp_path: Path,
) -> None:
    async def run() -> None:
        settings = Settings(persistence="always", data_dir=str(tmp_path), disk_headroom=1 << 62)
        node = Node(settings, Role.PRIMARY)
        core, persistence = node.core, node.persistence
        assert isinstance(core, PrimaryCore) and persistence is not None
        core.confirmed = True
        core.fire(Event.BACKUP_UNREACHABLE, "no backup in this test")
        keyed = ["ident-1", fingerprint(Command.DELETE.value, "k", None), True, "old"]
        core.store.idempotency.apply(1000, keyed)

        def reply(outcome: Outcome) -> None:
            raise AssertionError(f"answered now: {outcome}")

        refused = node.submit(Command.INSERT, "new", "v", reply, "ident-2")
        assert isinstance(refused, DiskFailed) and not refused.applied
        # The retry of a write already applied is no new write: its recorded reply.
        assert node.submit(Command.DELETE, "k", None, reply, "ident-1") == Done(True, "old")
        persistence.close()

    asyncio.run(run())


def test_the_lag_probe_tells_persistence_how_long_the_loop_stalled(tmp_path: Path) -> None:
    async def run() -> None:
        node = Node(Settings(persistence="everysec", data_dir=str(tmp_path)), Role.PRIMARY)
        persistence = node.persistence
        assert persistence is not None
        now = [100.0]
        node.clock = lambda: now[0]
        node._probe_lag()  # the first run: when the next is due
        persistence.persist_all(persistence.state, node.core.store)  # a base under way
        now[0] += node.lag.interval + 0.035  # the loop was busy 35 ms past the probe's time
        node._probe_lag()
        node._lag_timer.cancel()
        assert persistence.status()["base_loop_lag_ms"] == 35.0
        persistence.close()

    asyncio.run(run())
