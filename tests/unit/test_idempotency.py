"""The idempotency table on its own: deterministic expiry on the batches' time, its
bound, its checksum and memory as parts of the store's, undo, transfer chunks."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pbkv.idempotency import (
    ENTRY_OVERHEAD,
    MAX_KEY_CHARS,
    IdempotencyTable,
    TableClock,
    entry_size,
    fingerprint,
    valid_key,
)
from pbkv.store import ShardedStore


def keyed(*idents: str, value: str | None = None) -> list[object]:
    flat: list[object] = []
    for ident in idents:
        flat += [ident, fingerprint("insert", ident, "v"), True, value]
    return flat


def state(table: IdempotencyTable) -> list[tuple[str, int, bool, str | None, int]]:
    return [(k, *e[:4]) for k, e in table.entries.items()]


def test_entries_expire_on_the_batch_time_only() -> None:
    table = IdempotencyTable(capacity=100, ttl=10.0)
    table.apply(1_000, keyed("a", "b"))
    table.apply(5_000, keyed("c"))
    assert list(table.entries) == ["a", "b", "c"]
    # No batch, no expiry: the table has no clock of its own.
    assert table.get("a") is not None
    table.apply(10_999, [])
    assert list(table.entries) == ["a", "b", "c"]
    table.apply(11_000, [])  # made at 1000, ttl 10 s: gone at 11000
    assert list(table.entries) == ["c"]
    table.apply(15_000, keyed("d"))
    assert list(table.entries) == ["d"]
    assert table.clock == 15_000


def test_two_tables_fed_the_same_batches_hold_the_same_entries() -> None:
    rng = random.Random(3)
    a, b = IdempotencyTable(capacity=50, ttl=2.0), IdempotencyTable(capacity=50, ttl=2.0)
    time = 0
    for batch in range(300):
        time += rng.randrange(0, 400)
        flat = keyed(*(f"k{batch}.{i}" for i in range(rng.randrange(0, 5))), value="x")
        a.apply(time, flat)
        b.apply(time, list(flat), record=True)
        assert a.checksum == b.checksum and state(a) == state(b)
        assert len(a) <= 50


def test_the_oldest_go_past_capacity() -> None:
    table = IdempotencyTable(capacity=3, ttl=100.0)
    table.apply(1, keyed("a", "b"))
    table.apply(2, keyed("c", "d"))
    assert list(table.entries) == ["b", "c", "d"]


def test_checksum_and_memory_follow_every_change_and_are_the_stores() -> None:
    store = ShardedStore(4)
    store.put("k", "v")
    pairs_only = store.checksum
    assert store.pairs_checksum == pairs_only
    memory = store.memory_bytes
    table = store.idempotency
    table.apply(1, ["id-1", 7, True, "old value"])
    assert store.checksum != pairs_only
    assert store.pairs_checksum == pairs_only
    assert store.memory_bytes == memory + entry_size("id-1", "old value")
    assert entry_size("id-1", "old value") == 4 + 9 + ENTRY_OVERHEAD
    # The same entries in another table built another way: the same checksum.
    other = IdempotencyTable()
    other.load(1, ["id-1", 7, True, "old value", 1])
    assert other.checksum == table.checksum
    # Any field differs: another checksum.
    for changed in (
        ["id-2", 7, True, "old value", 1],
        ["id-1", 8, True, "old value", 1],
        ["id-1", 7, False, "old value", 1],
        ["id-1", 7, True, None, 1],
        ["id-1", 7, True, "old value", 2],
    ):
        third = IdempotencyTable()
        third.load(1, changed)
        assert third.checksum != table.checksum, changed
    store.clear()
    assert (store.checksum, store.memory_bytes, len(table)) == (0, 0, 0)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_undo_restores_entries_order_checksum_memory_and_clock(data: st.DataObject) -> None:
    capacity = data.draw(st.integers(1, 20))
    table = IdempotencyTable(capacity=capacity, ttl=1.0)
    time = 0
    for i in range(data.draw(st.integers(0, 10))):
        time += data.draw(st.integers(0, 700))
        table.apply(time, keyed(*(f"a{i}.{j}" for j in range(data.draw(st.integers(0, 3))))))
    before = (state(table), table.checksum, table.memory, table.clock)
    undos = []
    for i in range(data.draw(st.integers(1, 5))):
        time += data.draw(st.integers(0, 700))
        new = keyed(*(f"b{i}.{j}" for j in range(data.draw(st.integers(0, 12)))))
        undos.append(table.apply(time, new, record=True))
    for undo in reversed(undos):
        if undo is not None:
            table.undo(undo)
    assert (state(table), table.checksum, table.memory, table.clock) == before


def test_chunks_carry_every_entry_and_the_clock_even_when_empty() -> None:
    table = IdempotencyTable()
    assert list(table.chunks(2, 1000)) == [[]]
    table.apply(5, keyed("a", "b", "c", value="vvvv"))
    chunks = list(table.chunks(2, 1 << 20))
    assert [len(chunk) // 5 for chunk in chunks] == [2, 1]
    copy = IdempotencyTable()
    for chunk in chunks:
        copy.load(table.clock, chunk)
    assert state(copy) == state(table) and copy.checksum == table.checksum
    assert copy.clock == 5


def test_the_table_moves_with_the_store_on_a_full_transfer_swap() -> None:
    live, received = ShardedStore(2), ShardedStore(2)
    live.idempotency.apply(1, keyed("old"))
    received.idempotency.apply(9, keyed("new"))
    checksum = received.checksum
    live.take_pairs_of(received)
    assert list(live.idempotency.entries) == ["new"] and live.idempotency.clock == 9
    assert live.checksum == checksum
    assert len(received.idempotency) == 0


def test_the_primarys_table_time_goes_on_from_the_tables() -> None:
    clock = TableClock(5_000, now=100.0)
    assert clock.time(5_000, 100.0) == 5_000
    assert clock.time(5_000, 101.5) == 6_500
    # A table ahead of our clock (a copy fetched from a backup): never behind it.
    assert clock.time(9_000, 101.5) == 9_000


def test_what_an_idempotency_key_may_be() -> None:
    assert valid_key("a") and valid_key("x" * MAX_KEY_CHARS)
    assert valid_key("6c1f4a2e-3b7d-4f7e-9a51-0d6c2f0b8e11")
    for bad in ("", "x" * (MAX_KEY_CHARS + 1), "a b", "é", "a\tb", "a\x00"):
        assert not valid_key(bad), bad


def test_the_fingerprint_tells_requests_apart() -> None:
    prints = {
        fingerprint("insert", "k", "v"),
        fingerprint("update", "k", "v"),
        fingerprint("insert", "k", "w"),
        fingerprint("insert", "kv", ""),
        fingerprint("delete", "k", None),
        fingerprint("delete", "k", ""),
    }
    assert len(prints) == 6
    assert fingerprint("insert", "k", "v") == fingerprint("insert", "k", "v")


_NAMES = [f"key-{i}" for i in range(30)]


def _recounted(table: IdempotencyTable) -> tuple[int, int]:
    """The checksum and memory of the entries held, counted one by one afresh."""
    fresh = IdempotencyTable()
    fresh.load(0, [item for k, e in table.entries.items() for item in (k, *e[:4])])
    return fresh.checksum, sum(entry_size(k, e[2]) for k, e in table.entries.items())


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_a_batchs_entries_are_counted_as_one_by_one_even_when_they_replace(
    data: st.DataObject,
) -> None:
    """Batches are counted in bulk; a batch that repeats a key (within itself or from
    the table: never in a consistent history) is counted exactly all the same."""
    ttl = data.draw(st.sampled_from([1.0, 1000.0]))  # with expiry, and without
    table = IdempotencyTable(capacity=data.draw(st.integers(1, 20)), ttl=ttl)
    time = replaced = 0
    for _ in range(data.draw(st.integers(1, 12))):
        time += data.draw(st.integers(0, 600))
        # Up to 12 entries: small batches are added one by one, larger ones in bulk.
        names = data.draw(
            st.lists(st.sampled_from(_NAMES), max_size=12, unique=data.draw(st.booleans()))
        )
        value = data.draw(st.sampled_from([None, "", "v", "√ü"]))
        if ttl > 100:  # nothing expires before the batch's entries come in
            replaced += len(names) - len(set(names)) + len(set(names) & set(table.entries))
        table.apply(time, keyed(*names, value=value))
        assert (table.checksum, table.memory) == _recounted(table)
        made = [e[3] for e in table.entries.values()]
        assert made == sorted(made)  # the order made: the expiry's
    assert table.replaced == replaced or ttl < 100
