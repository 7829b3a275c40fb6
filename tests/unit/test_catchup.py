"""The primary's record of the batches it applied last (``pbkv.catchup``)."""

from __future__ import annotations

import gc

from pbkv.catchup import AppliedRecord
from pbkv.stages import State


def fill(record: AppliedRecord, first: int, last: int, text: str = "v") -> None:
    """Batches ``first``..``last``, each from state (seq - 1, seq - 1, seq - 1) on."""
    for seq in range(first, last + 1):
        record.applied(seq, [f"k{seq}", text], 0, [], seq - 1, seq - 1, State(seq, seq, seq))


def test_the_record_leads_on_from_each_state_it_holds_to_the_current_one() -> None:
    record = AppliedRecord(1 << 20)
    fill(record, 4, 6)
    assert record.states(State(6, 6, 6)) == (State(3, 3, 3), State(4, 4, 4), State(5, 5, 5))
    assert [entry.seq for entry in record.after(4)] == [5, 6]


def test_data_changed_otherwise_makes_the_record_offer_nothing() -> None:
    record = AppliedRecord(1 << 20)
    fill(record, 1, 3)
    assert record.states(State(3, 99, 3)) == ()  # same seq, other data
    assert record.states(State(4, 4, 4)) == ()  # a batch it does not hold


def test_a_batch_that_does_not_follow_the_last_one_starts_the_record_over() -> None:
    record = AppliedRecord(1 << 20)
    fill(record, 1, 3)
    record.applied(9, ["k", "v"], 0, [], 8, 8, State(9, 9, 9))
    assert [entry.seq for entry in record.entries] == [9]
    record.applied(10, ["k", "v"], 0, [], 77, 9, State(10, 10, 10))  # not where 9 left it
    assert [entry.seq for entry in record.entries] == [10]


def test_the_record_is_bounded_by_bytes_and_by_batches() -> None:
    by_bytes = AppliedRecord(1000)
    fill(by_bytes, 1, 50, "x" * 200)
    assert 0 < len(by_bytes) < 50 and by_bytes.size <= 1000
    assert by_bytes.entries[-1].seq == 50  # the newest are kept
    by_count = AppliedRecord(1 << 30, max_batches=8)
    fill(by_count, 1, 50)
    assert [entry.seq for entry in by_count.entries] == list(range(43, 51))


def test_without_undo_bytes_nothing_is_recorded() -> None:
    record = AppliedRecord(0)
    fill(record, 1, 3)
    assert len(record) == 0 and record.states(State(3, 3, 3)) == ()


def test_the_record_holds_nothing_the_garbage_collector_walks_item_by_item() -> None:
    # Lists would be walked in every full collection: millions of strings after a load.
    record = AppliedRecord(1 << 20)
    ops: list[str | None] = ["k", "v", "gone", None]
    record.applied(1, ops, 0, ["ident", 1234, True, "v"], 0, 0, State(1, 1, 1))
    gc.collect()
    entry = record.entries[0]
    assert entry.ops == ("k", "v", "gone", None) and entry.keyed == ("ident", 1234, True, "v")
    assert not gc.is_tracked(entry.ops) and not gc.is_tracked(entry.keyed)
