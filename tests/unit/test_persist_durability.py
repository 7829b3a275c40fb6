"""Which records an fsync makes durable, and how long each waited
(``pbkv/persist/durability.py``)."""

from __future__ import annotations

import pytest

from pbkv.persist.durability import Durability


def test_an_fsync_covers_the_records_appended_before_it_started() -> None:
    durability = Durability()
    first = durability.append(10.0)
    covered = durability.started()
    second = durability.append(10.5)  # while the fsync runs: not covered by it
    durability.finished(covered, 11.0)
    assert durability.covers(first) and not durability.covers(second)
    assert durability.pending
    durability.finished(durability.started(), 12.0)
    assert durability.covers(second) and not durability.pending


def test_the_wait_is_measured_from_the_oldest_record_not_yet_durable() -> None:
    durability = Durability()
    assert durability.unsynced_age(5.0) == 0.0 and durability.largest_window(5.0) == 0.0
    durability.append(10.0)
    durability.append(10.8)  # younger: the window is the first one's
    assert durability.unsynced_age(11.0) == pytest.approx(1.0)
    durability.finished(durability.started(), 11.25)
    assert durability.longest_wait == pytest.approx(1.25)
    assert durability.unsynced_age(20.0) == 0.0
    durability.append(30.0)
    durability.finished(durability.started(), 30.1)  # a shorter wait keeps the longest
    assert durability.largest_window(31.0) == pytest.approx(1.25)
    durability.append(40.0)  # not durable for longer than any before: counted now
    assert durability.largest_window(42.0) == pytest.approx(2.0)


def test_a_record_appended_during_an_fsync_waits_for_the_next_one() -> None:
    durability = Durability()
    durability.append(1.0)
    covered = durability.started()
    durability.append(1.4)
    durability.finished(covered, 1.5)
    assert durability.longest_wait == pytest.approx(0.5)
    assert durability.unsynced_age(1.6) == pytest.approx(0.2)  # the second record's
    durability.finished(durability.started(), 2.4)
    assert durability.longest_wait == pytest.approx(1.0)


def test_an_older_fsync_finishing_late_moves_nothing_back() -> None:
    durability = Durability()
    durability.append(1.0)
    early = durability.started()
    durability.append(2.0)
    durability.all_durable(3.0)  # a synchronous fsync overtook it
    durability.finished(early, 4.0)
    assert durability.synced == 2 and not durability.pending
    assert durability.longest_wait == pytest.approx(2.0)
