"""The idempotency table on disk (``pbkv/persist/table.py``): a server restarted from
its folder holds the same table as it held in memory (entries, order, clock,
checksum), so it answers a retry as before and expires the same entries later."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from pbkv.config import Settings
from pbkv.idempotency import IdempotencyTable, fingerprint
from pbkv.persist import DataDir, PersistError, Record, State
from pbkv.persist.driver import Persistence
from pbkv.persist.table import TableDamage, base_extra, batch_extra, load_base, replay_batch
from pbkv.store import ShardedStore, make_store

ADDRESS = ("127.0.0.1", 8080)
HISTORY = 7


def keyed(*idents: str) -> list[Any]:
    """A batch's table entries: an insert of key ``k-<ident>`` per Idempotency-Key."""
    flat: list[Any] = []
    for ident in idents:
        flat += (ident, fingerprint("insert", f"k-{ident}", "v"), True, None)
    return flat


def table_of(store: ShardedStore) -> tuple[int, list[tuple[str, Any]], int, int]:
    table = store.idempotency
    return table.clock, list(table.entries.items()), table.checksum, table.memory


def bounded(store: ShardedStore) -> ShardedStore:
    store.idempotency.capacity = 5
    store.idempotency.ttl_ms = 10_000
    return store


def reloaded(tmp_path: Path) -> ShardedStore:
    store = bounded(make_store("sharded", 4))
    with DataDir.for_address(tmp_path, *ADDRESS) as datadir:
        datadir.load().fill(store)
    return store


def test_a_base_and_batches_give_the_table_back() -> None:
    live = IdempotencyTable(capacity=3, ttl=10)
    live.apply(1000, keyed("a", "b"))
    extra = base_extra(live)
    batches = [(5000, keyed("c")), (9000, keyed("d", "e")), (15_000, [])]
    for time, entries in batches:
        live.apply(time, entries)
    again = IdempotencyTable(capacity=3, ttl=10)
    load_base(again, extra)
    for time, entries in batches:
        replay_batch(again, batch_extra(time, entries))
    # "a" and "b" evicted by capacity, "c" expired (made at 5000, ttl 10 s, now 15000).
    assert list(again.entries) == list(live.entries) == ["d", "e"]
    assert (again.clock, again.checksum, again.memory) == (live.clock, live.checksum, live.memory)


def test_replaying_a_batch_the_base_already_holds_changes_nothing() -> None:
    live = IdempotencyTable()
    live.apply(1000, keyed("a"))
    live.apply(2000, keyed("b"))
    extra = base_extra(live)  # taken after batch 2, for a base of the state before it
    again = IdempotencyTable()
    load_base(again, extra)
    replay_batch(again, batch_extra(2000, keyed("b")))
    assert list(again.entries.items()) == list(live.entries.items())
    assert again.checksum == live.checksum


@pytest.mark.parametrize(
    "extra",
    [b"\xc1", b"\x90", b"\x92\x01\x91\x01", b"\x92\xff\x90", b"\x92\x01\x94\x01\x02\xc3\xc0"],
)
def test_a_malformed_extra_is_damage(extra: bytes) -> None:
    with pytest.raises(TableDamage):
        replay_batch(IdempotencyTable(), extra)
    assert issubclass(TableDamage, PersistError)  # stops the start like other damage


def test_an_empty_extra_is_a_record_without_a_table() -> None:
    table = IdempotencyTable()
    load_base(table, b"")
    replay_batch(table, b"")
    assert (len(table), table.clock) == (0, 0)


def test_the_driver_keeps_the_table_through_bases_rewrites_and_records(tmp_path: Path) -> None:
    async def run() -> None:
        settings = Settings(persistence="always", data_dir=str(tmp_path))
        persistence = Persistence(settings, ADDRESS, asyncio.get_running_loop(), print)
        store = bounded(make_store("sharded", 4))
        persistence.recover(store, State(HISTORY, 0))
        persistence.datadir.chunk_pairs = 2
        seq = 0

        def batch(time: int, *idents: str) -> None:
            nonlocal seq
            seq += 1
            ops: list[str | None] = [item for ident in idents for item in (f"k-{ident}", "v")]
            store.apply(ops)
            store.idempotency.apply(time, keyed(*idents))
            record = Record.batch(HISTORY, seq, 0, ops, batch_extra(time, keyed(*idents)))
            persistence.persist(record)

        batch(1000, "a", "b")
        batch(2000, "c")
        # A base of the store (a transfer replaced it): the table goes with it...
        persistence.persist_all(State(HISTORY, seq), store)
        batch(3000, "d")  # ...and a batch applied while it is written follows it
        while persistence.base is not None:
            await asyncio.sleep(0.001)
        batch(4000, "e", "f")  # past the capacity: "a" goes
        # A rewrite: a new base taken from the table as it is, records go on meanwhile.
        persistence.rewrite_min_bytes, persistence.rewrite_percentage = 1, 1
        persistence._rewrite_if_grown()
        while not persistence.rewrites:  # started in the base thread (maybe done already)
            await asyncio.sleep(0.001)
        batch(13_500, "g")  # past the ttl: what was made at 3000 or before goes
        while persistence.base is not None:
            await asyncio.sleep(0.001)
        for _ in range(3):
            await asyncio.sleep(0)
        persistence.close()

        again = reloaded(tmp_path)
        assert table_of(again) == table_of(store)
        assert list(store.idempotency.entries) == ["e", "f", "g"]
        # Both go on alike: the next batch expires the same entries on each.
        for copy in (store, again):
            copy.idempotency.apply(14_500, keyed("h"))
        assert table_of(again) == table_of(store)

    asyncio.run(run())
