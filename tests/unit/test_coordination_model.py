"""The etcd model of the simulation (pbkv/testing/coordination.py): revisions,
leases on virtual time, transactions, watches, the coordinator's operations
built on them, and one member's session over a simulated network."""

from __future__ import annotations

import heapq
import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pbkv.coordinator import Leader, LeaderChanged, LeaderRead, Lease, SyncRead, SyncRecord
from pbkv.testing.coordination import (
    Answered,
    Compare,
    Coordination,
    Delete,
    EtcdError,
    EtcdModel,
    EtcdSession,
    Event,
    EventType,
    ExpiryClock,
    Failed,
    Get,
    Indeterminate,
    LeaseNotFound,
    Put,
    Reply,
    Target,
    Unavailable,
)

MEMBERS = ("a", "b", "c")


def coordination(min_ttl: float = 2.0) -> Coordination:
    return Coordination(EtcdModel(min_ttl=min_ttl), prefix="pbkv")


# -- revisions ------------------------------------------------------------------------

write_steps = st.lists(
    st.tuples(
        st.sampled_from(["put", "put_leased", "delete", "txn", "grant", "revoke", "keepalive"]),
        st.sampled_from(["k1", "k2", "k3"]),
        st.floats(0.0, 2.0),
    ),
    max_size=60,
)


@given(write_steps)
@settings(max_examples=150, deadline=None)
def test_revisions_strictly_increase_one_per_write(steps: list[tuple[str, str, float]]) -> None:
    etcd = EtcdModel()
    now = 0.0
    leases: list[int] = []
    seen = etcd.revision
    for kind, key, gap in steps:
        now += gap
        history_before = len(etcd.history)
        etcd.advance(now)
        if kind == "put":
            etcd.put(now, key, f"v{now}")
        elif kind == "put_leased" and leases:
            try:
                etcd.put(now, key, "leased", leases[-1])
            except LeaseNotFound:
                pass  # expired on the way: the put wrote nothing (checked below)
        elif kind == "delete":
            etcd.delete(now, key)
        elif kind == "txn":
            etcd.txn(
                now,
                [Compare(key, Target.VERSION, ">", 1)],
                [Put(key, "again"), Delete("k3" if key != "k3" else "k1")],
                [Get(key)],
            )
        elif kind == "grant":
            leases.append(etcd.grant(now, 2.0)[0])
        elif kind == "revoke" and leases:
            etcd.revoke(now, leases.pop(0))
        elif kind == "keepalive" and leases:
            etcd.keepalive(now, leases[-1])
        new_events = etcd.history[history_before:]
        revisions = sorted({event.revision for event in new_events})
        # Each write took the next revision, none was skipped, none reused.
        assert revisions == list(range(seen + 1, etcd.revision + 1))
        for revision in revisions:
            assert etcd.time_of(revision) <= now
        seen = etcd.revision
    history = [event.revision for event in etcd.history]
    assert history == sorted(history)


def test_reads_and_failed_comparisons_take_no_revision() -> None:
    etcd = EtcdModel()
    assert etcd.revision == 1
    assert etcd.put(0.0, "k", "v") == 2
    etcd.get(0.1, "k")
    etcd.range(0.2, "")
    result = etcd.txn(0.3, [Compare("k", Target.VALUE, "==", "other")], [Put("k", "x")])
    assert not result.succeeded and result.revision == 2
    result = etcd.txn(0.4, [Compare("k", Target.VALUE, "==", "v")], [Put("k", "x"), Put("j", "y")])
    assert result.succeeded and result.revision == 3
    assert etcd.get(0.5, "k") == etcd.get(0.5, "k")
    found = etcd.get(0.5, "k")
    assert found is not None and (found.create_revision, found.mod_revision) == (2, 3)
    assert found.version == 2


def test_compare_rules_follow_etcd() -> None:
    etcd = EtcdModel()
    # A value comparison on a missing key fails whatever the operator; the others see zeros.
    assert not etcd.txn(0, [Compare("x", Target.VALUE, "!=", "v")], []).succeeded
    assert etcd.txn(0, [Compare("x", Target.CREATE, "==", 0)], []).succeeded
    assert etcd.txn(0, [Compare("x", Target.VERSION, "<", 1)], []).succeeded
    etcd.put(1, "x", "v")
    assert etcd.txn(1, [Compare("x", Target.MOD, ">", 1)], []).succeeded
    assert etcd.txn(1, [Compare("x", Target.LEASE, "==", 0)], []).succeeded
    with pytest.raises(TypeError):
        etcd.txn(1, [Compare("x", Target.VALUE, "==", 3)], [])
    with pytest.raises(EtcdError):
        etcd.txn(1, [], [Put("y", "1"), Put("y", "2")])
    # A deleted key is created anew: a new create revision, version 1.
    etcd.delete(2, "x")
    etcd.put(3, "x", "w")
    found = etcd.get(3, "x")
    assert found is not None and found.create_revision == etcd.revision and found.version == 1


def test_time_never_goes_back() -> None:
    etcd = EtcdModel()
    etcd.advance(5.0)
    with pytest.raises(ValueError):
        etcd.get(4.0, "k")


# -- leases ---------------------------------------------------------------------------------


def test_a_lease_not_kept_alive_expires_exactly_at_its_deadline() -> None:
    etcd = EtcdModel()
    lease, ttl = etcd.grant(1.0, 3.0)
    assert ttl == 3.0
    etcd.put(1.5, "a", "1", lease)
    etcd.put(1.5, "b", "2", lease)
    etcd.put(1.5, "c", "3")
    watch = etcd.watch(1.5, "", prefix=True)
    assert etcd.next_expiry() == 4.0
    assert etcd.time_to_live(3.5, lease) == pytest.approx(0.5)
    assert etcd.get(3.999, "a") is not None
    before = etcd.revision
    assert etcd.get(4.0, "a") is None and etcd.get(4.0, "b") is None
    assert etcd.get(4.0, "c") is not None
    # Both keys went in one revision, written at the deadline.
    assert etcd.revision == before + 1
    assert etcd.time_of(etcd.revision) == 4.0
    events = etcd.events(watch)
    assert [(e.type, e.kv.key, e.revision) for e in events] == [
        (EventType.DELETE, "a", before + 1),
        (EventType.DELETE, "b", before + 1),
    ]
    assert all(e.prev_kv is not None and e.prev_kv.lease == lease for e in events)
    assert etcd.next_expiry() is None


def test_expiry_is_applied_even_when_the_next_request_comes_much_later() -> None:
    etcd = EtcdModel()
    first, _ = etcd.grant(0.0, 2.0)
    etcd.put(0.0, "first", "1", first)
    second, _ = etcd.grant(1.0, 2.0)
    etcd.put(1.0, "second", "2", second)
    etcd.put(10.0, "later", "3")
    deletes = [e for e in etcd.history if e.type is EventType.DELETE]
    assert [e.kv.key for e in deletes] == ["first", "second"]
    assert [etcd.time_of(e.revision) for e in deletes] == [2.0, 3.0]
    assert etcd.time_of(etcd.revision) == 10.0


def test_keepalive_renews_a_full_ttl_until_the_lease_is_gone() -> None:
    coord = coordination()
    lease = coord.grant(0.0, 3.0)
    assert coord.keepalive(2.9, lease) == 3.0
    assert coord.etcd.time_to_live(5.8, lease.id) == pytest.approx(0.1)
    assert coord.keepalive(5.9, lease) is None  # expired at 5.9
    assert coord.etcd.time_to_live(6.0, lease.id) is None
    with pytest.raises(LeaseNotFound):
        coord.campaign(6.0, "a", lease)
    assert coord.etcd.revision == 1  # the refused transaction wrote nothing


def test_ttls_below_the_minimum_are_raised_to_it() -> None:
    assert coordination(min_ttl=2.0).grant(0.0, 1.0) == Lease(0x1000, 2.0)
    assert coordination(min_ttl=0.5).grant(0.0, 1.0).ttl == 1.0


def test_revoke_deletes_the_keys_at_once() -> None:
    coord = coordination()
    lease = coord.grant(0.0, 5.0)
    coord.register(0.0, "a", {"address": "a:1"}, lease)
    assert [m.member for m in coord.members(0.1)] == ["a"]
    coord.revoke(0.2, lease)
    assert coord.members(0.2) == []
    assert coord.keepalive(0.3, lease) is None
    assert coord.etcd.revoke(0.4, lease.id) is False


# -- leadership -------------------------------------------------------------------------------


def test_campaign_is_exclusive_and_the_epoch_is_the_create_revision() -> None:
    coord = coordination()
    a, b = coord.grant(0.0, 3.0), coord.grant(0.0, 3.0)
    epoch = coord.campaign(0.5, "a", a)
    assert epoch is not None
    found = coord.etcd.get(0.5, coord.leader_key)
    assert found is not None and found.create_revision == epoch and found.lease == a.id
    assert coord.leader(0.5).leader == Leader("a", epoch)
    assert coord.campaign(0.6, "b", b) is None
    # A campaign repeated after a lost answer finds its own key; with another lease
    # (an earlier incarnation's key) it does not.
    assert coord.campaign(0.7, "a", a) == epoch
    assert coord.campaign(0.7, "a", b) is None
    assert coord.leader(0.8).leader == Leader("a", epoch)


def test_after_the_holders_lease_expires_another_campaign_wins_a_higher_epoch() -> None:
    coord = coordination()
    a, b = coord.grant(0.0, 3.0), coord.grant(0.0, 3.0)
    first = coord.campaign(0.0, "a", a)
    assert first is not None
    for t in (1.0, 2.0, 2.9):
        assert coord.keepalive(t, b) == 3.0
        assert coord.campaign(t, "b", b) is None
    assert coord.leader(2.999).leader == Leader("a", first)
    # a's lease ran out at 3.0: its key went then.
    assert coord.leader(3.0).leader is None
    assert coord.leader(4.0).leader is None
    second = coord.campaign(4.0, "b", b)
    assert second is not None and second > first
    assert coord.leader(4.0).leader == Leader("b", second)
    assert [(t.leader.member, t.start, t.end) for t in coord.tenures()] == [
        ("a", 0.0, 3.0),
        ("b", 4.0, None),
    ]
    assert coord.leader_at(2.99) == Leader("a", first) and coord.leader_at(3.5) is None


def test_resign_only_by_the_holders_epoch() -> None:
    coord = coordination()
    a, b = coord.grant(0.0, 3.0), coord.grant(0.0, 3.0)
    first = coord.campaign(0.0, "a", a)
    assert first is not None
    assert coord.resign(0.1, first + 1) is False
    assert coord.resign(0.1, first - 1) is False
    assert coord.leader(0.1).leader == Leader("a", first)
    assert coord.resign(0.2, first) is True
    assert coord.leader(0.2).leader is None
    second = coord.campaign(0.3, "b", b)
    assert second is not None
    # The old holder's late resign does not remove the new leader.
    assert coord.resign(0.4, first) is False
    assert coord.leader(0.4).leader == Leader("b", second)


def test_a_leader_read_says_the_revision_it_read_at() -> None:
    coord = coordination()
    assert coord.leader(0.0) == LeaderRead(None, coord.etcd.revision)
    lease = coord.grant(0.0, 2.0)
    epoch = coord.campaign(0.1, "a", lease)
    assert epoch is not None
    coord.etcd.put(0.2, "pbkv/other", "x")  # any write raises the revision
    assert coord.leader(0.3) == LeaderRead(Leader("a", epoch), epoch + 1)
    # The lease (granted at 0) expires at 2.0 with the key: a later read is at that revision.
    read = coord.leader(2.5)
    assert read.leader is None and read.revision == epoch + 2
    assert coord.etcd.time_of(read.revision) == 2.0


def test_record_sync_is_refused_once_leadership_is_lost() -> None:
    coord = coordination()
    a, b = coord.grant(0.0, 2.0), coord.grant(0.0, 2.0)
    first = coord.campaign(0.0, "a", a)
    assert first is not None
    assert coord.sync(0.0) == SyncRead(None, 0)
    recorded = coord.record_sync(0.5, first, "b", expected=0)
    assert recorded is not None
    assert coord.sync(0.5) == SyncRead(SyncRecord(first, "b"), recorded)
    coord.keepalive(1.5, b)
    # a was paused past its lease: it still believes it leads under ``first``.
    assert coord.leader(2.0).leader is None
    assert coord.record_sync(2.0, first, "c", expected=recorded) is None
    # The record outlives the leader key.
    assert coord.sync(2.0) == SyncRead(SyncRecord(first, "b"), recorded)
    second = coord.campaign(2.1, "b", b)
    assert second is not None
    assert coord.record_sync(2.2, first, "c", expected=recorded) is None
    again = coord.record_sync(2.3, second, "c", expected=recorded)
    assert again is not None and again > recorded
    assert coord.sync(2.3) == SyncRead(SyncRecord(second, "c"), again)
    # "No backup" is a record too, read back as written.
    nobody = coord.record_sync(2.4, second, None, expected=again)
    assert nobody is not None
    assert coord.sync(2.4) == SyncRead(SyncRecord(second, None), nobody)


def test_a_record_expecting_a_stale_revision_is_refused() -> None:
    """A compare-and-swap on the record's mod revision: a write whose answer was
    lost cannot land later over a newer record."""
    coord = coordination()
    lease = coord.grant(0.0, 10.0)
    epoch = coord.campaign(0.0, "a", lease)
    assert epoch is not None
    # Two writes sent while the record was absent; the second lands first.
    newer = coord.record_sync(0.1, epoch, "c", expected=0)
    assert newer is not None
    assert coord.record_sync(0.2, epoch, "b", expected=0) is None  # the late one
    assert coord.sync(0.2) == SyncRead(SyncRecord(epoch, "c"), newer)
    assert coord.record_sync(0.3, epoch, "b", expected=newer - 1) is None
    assert coord.record_sync(0.3, epoch, "b", expected=newer + 1) is None
    assert coord.sync(0.3) == SyncRead(SyncRecord(epoch, "c"), newer)
    latest = coord.record_sync(0.4, epoch, "b", expected=newer)
    assert latest is not None and latest > newer
    assert coord.sync(0.4) == SyncRead(SyncRecord(epoch, "b"), latest)


def test_a_repeated_record_whose_answer_was_lost_answers_the_revision_it_landed_at() -> None:
    coord = coordination()
    lease = coord.grant(0.0, 10.0)
    epoch = coord.campaign(0.0, "a", lease)
    assert epoch is not None
    landed = coord.record_sync(0.1, epoch, "b", expected=0)
    assert landed is not None
    # Its answer was lost: the same write again finds it, and writes nothing.
    assert coord.record_sync(0.2, epoch, "b", expected=0) == landed
    assert coord.etcd.revision == landed
    # Another backup with that expectation is a late write: refused.
    assert coord.record_sync(0.3, epoch, "c", expected=0) is None
    # Not under another epoch's key, even with the same value.
    assert coord.resign(0.4, epoch)
    assert coord.record_sync(0.5, epoch, "b", expected=0) is None


# -- watches ------------------------------------------------------------------------------------


def test_leader_watch_sees_puts_and_expiry_deletes_in_revision_order() -> None:
    coord = coordination()
    watch = coord.watch_leader(0.0)
    heard: list[LeaderChanged] = []
    coord.watch_leader(0.0, heard.append)
    a, b = coord.grant(0.0, 2.0), coord.grant(0.0, 10.0)
    first = coord.campaign(0.1, "a", a)
    coord.etcd.put(0.2, "pbkv/other", "x")  # not the leader key: not in its watch
    second = coord.campaign(3.0, "b", b)  # a's key expired at 2.0, on the way
    assert first is not None and second is not None
    coord.resign(4.0, second)
    changes = coord.leader_changes(watch)
    assert changes == heard
    assert [c.leader for c in changes] == [
        Leader("a", first),
        None,
        Leader("b", second),
        None,
    ]
    revisions = [c.revision for c in changes]
    assert revisions == sorted(revisions) and len(set(revisions)) == 4
    assert coord.etcd.time_of(changes[1].revision) == 2.0
    assert coord.leader_changes(watch) == []  # drained


def test_a_watch_from_an_earlier_revision_replays_the_history() -> None:
    etcd = EtcdModel()
    etcd.put(0.0, "p/a", "1")
    middle = etcd.put(0.1, "q", "x")
    etcd.put(0.2, "p/b", "2")
    etcd.delete(0.3, "p/a")
    watch = etcd.watch(0.4, "p/", prefix=True, start_revision=middle)
    etcd.put(0.5, "p/c", "3")
    assert [(e.type, e.kv.key) for e in etcd.events(watch)] == [
        (EventType.PUT, "p/b"),
        (EventType.DELETE, "p/a"),
        (EventType.PUT, "p/c"),
    ]
    etcd.cancel(watch)
    etcd.put(0.6, "p/d", "4")
    with pytest.raises(KeyError):
        etcd.events(watch)


# -- fault hooks -------------------------------------------------------------------------------


def test_during_an_outage_requests_fail_and_no_lease_expires_then_all_are_renewed() -> None:
    coord = coordination()
    lease = coord.grant(0.0, 3.0)
    epoch = coord.campaign(0.0, "a", lease)
    coord.etcd.outage(1.0)
    with pytest.raises(Unavailable):
        coord.keepalive(2.0, lease)
    with pytest.raises(Unavailable):
        coord.leader(5.0)
    assert coord.etcd.next_expiry() is None
    coord.etcd.recover(10.0)
    # Nobody revoked it during the outage: a full TTL from the recovery.
    assert coord.leader(12.9).leader == Leader("a", epoch or 0)
    assert coord.leader(13.0).leader is None
    assert coord.etcd.time_of(coord.etcd.revision) == 13.0


def test_renew_all_only_lengthens_leases() -> None:
    etcd = EtcdModel()
    short, _ = etcd.grant(0.0, 2.0)
    long, _ = etcd.grant(0.0, 10.0)
    etcd.renew_all(1.5)
    assert etcd.time_to_live(1.5, short) == pytest.approx(2.0)
    assert etcd.time_to_live(1.5, long) == pytest.approx(10.0)
    etcd.renew_all(4.0)  # short expired at 3.5, before the renewal
    assert etcd.time_to_live(4.0, short) is None


# -- never two leaders --------------------------------------------------------------------------


@dataclass
class Member:
    """A member's own view: its lease, until when it may assume the lease is
    valid (from when it *sent* its last successful grant or keepalive), and the
    epoch it leads under, if any."""

    name: str
    lease: Lease | None = None
    valid_until: float = 0.0
    epoch: int | None = None
    clock: float = 0.0  # the last time it sent anything

    def forget(self) -> None:
        self.lease, self.epoch, self.valid_until = None, None, 0.0


def acting_leaders(members: list[Member], now: float) -> list[Member]:
    """Members that would serve as primary now: leading, their lease still valid."""
    return [m for m in members if m.epoch is not None and now < m.valid_until]


@dataclass
class Cluster:
    coord: Coordination = field(default_factory=coordination)
    members: list[Member] = field(default_factory=lambda: [Member(n) for n in MEMBERS])
    now: float = 0.0

    def send_time(self, member: Member, delay: float) -> float:
        """When the request now arriving was sent (after the member's last one)."""
        sent = max(self.now - delay, member.clock)
        member.clock = sent
        return sent

    def check(self) -> None:
        leaders = acting_leaders(self.members, self.now)
        assert len(leaders) <= 1, f"two acting leaders at {self.now}: {leaders}"
        if leaders:
            found = self.coord.etcd.peek(self.now, self.coord.leader_key)
            holder = None if found is None else Leader(found.value, found.create_revision)
            assert holder == Leader(leaders[0].name, leaders[0].epoch or 0)


# A few values each, so that hypothesis lands on deadlines and races often.
delays = st.sampled_from([0.0, 0.3, 0.8])  # how long a request took to reach etcd
gaps = st.sampled_from([0.0, 0.1, 0.5, 1.0])  # virtual time between two steps
members_ = st.sampled_from(range(len(MEMBERS)))


class LeadershipMachine(RuleBasedStateMachine):
    """Members grant, keep alive, campaign, resign, revoke, crash, and record
    their backup, with requests delayed on the way, while etcd has outages and
    elections of its own: at no time do two members act as leader."""

    def __init__(self) -> None:
        super().__init__()
        self.cluster = Cluster()

    @property
    def coord(self) -> Coordination:
        return self.cluster.coord

    def arrive(self, gap: float) -> None:
        self.cluster.now += gap
        self.coord.etcd.advance(self.cluster.now)

    def request(self, index: int, delay: float, gap: float) -> tuple[Member, float]:
        self.arrive(gap)
        member = self.cluster.members[index]
        return member, self.cluster.send_time(member, delay)

    @rule(gap=st.floats(0.0, 3.0))
    def time_passes(self, gap: float) -> None:
        self.arrive(gap)

    @precondition(lambda self: self.coord.etcd.next_expiry() is not None)
    @rule()
    def until_a_lease_expires(self) -> None:
        # Right at a deadline is where a wrong lease rule shows.
        deadline = self.coord.etcd.next_expiry()
        assert deadline is not None
        self.arrive(max(0.0, deadline - self.cluster.now))

    @rule(index=members_, delay=delays, gap=gaps, ttl=st.sampled_from([2.0, 3.0]))
    def grant(self, index: int, delay: float, gap: float, ttl: float) -> None:
        member, sent = self.request(index, delay, gap)
        if member.lease is not None:
            return  # its leadership is bound to the lease it has
        try:
            member.lease = self.coord.grant(self.cluster.now, ttl)
        except Unavailable:
            return
        member.valid_until = sent + member.lease.ttl

    @rule(index=members_, delay=delays, gap=gaps)
    def keepalive(self, index: int, delay: float, gap: float) -> None:
        member, sent = self.request(index, delay, gap)
        if member.lease is None:
            return
        try:
            ttl = self.coord.keepalive(self.cluster.now, member.lease)
        except Unavailable:
            return
        if ttl is None:
            member.forget()
        else:
            member.valid_until = sent + ttl

    @rule(index=members_, delay=delays, gap=gaps)
    def campaign(self, index: int, delay: float, gap: float) -> None:
        member, _ = self.request(index, delay, gap)
        if member.lease is None or member.epoch is not None:
            return
        try:
            member.epoch = self.coord.campaign(self.cluster.now, member.name, member.lease)
        except LeaseNotFound:
            member.forget()
        except Unavailable:
            return

    @rule(index=members_, delay=delays, gap=gaps)
    def resign(self, index: int, delay: float, gap: float) -> None:
        member, _ = self.request(index, delay, gap)
        if member.epoch is not None:
            epoch, member.epoch = member.epoch, None  # it stops acting before it asks
            try:
                self.coord.resign(self.cluster.now, epoch)
            except Unavailable:
                return

    @rule(index=members_, delay=delays, gap=gaps)
    def revoke(self, index: int, delay: float, gap: float) -> None:
        member, _ = self.request(index, delay, gap)
        if member.lease is not None:
            lease = member.lease
            member.forget()
            try:
                self.coord.revoke(self.cluster.now, lease)
            except Unavailable:
                return

    @rule(index=members_)
    def crash(self, index: int) -> None:
        self.cluster.members[index].forget()  # its lease lives on in etcd until it expires

    @rule(index=members_, backup=members_, delay=delays, gap=gaps, stale=st.booleans())
    def record_sync(self, index: int, backup: int, delay: float, gap: float, stale: bool) -> None:
        # Sent by any member that believes it leads, even past its lease, expecting
        # the record's current revision or (a late write) an older one.
        member, _ = self.request(index, delay, gap)
        if member.epoch is None:
            return
        before = self.coord.etcd.peek(self.cluster.now, self.coord.sync_key)
        current = 0 if before is None else before.mod_revision
        expected = current - 1 if stale and current > 0 else current
        try:
            recorded = self.coord.record_sync(
                self.cluster.now, member.epoch, MEMBERS[backup], expected=expected
            )
        except Unavailable:
            return
        key = self.coord.etcd.peek(self.cluster.now, self.coord.leader_key)
        after = self.coord.etcd.peek(self.cluster.now, self.coord.sync_key)
        ours = key is not None and key.create_revision == member.epoch
        wanted = {"epoch": member.epoch, "backup": MEMBERS[backup]}
        same = before is not None and json.loads(before.value) == wanted
        if ours and expected == current:
            assert after is not None and recorded == after.mod_revision > current
        elif ours and same:
            assert recorded == current and after == before  # a repeat: nothing written
        else:
            assert recorded is None and after == before

    @rule(gap=gaps, length=st.floats(0.1, 6.0))
    def etcd_outage(self, gap: float, length: float) -> None:
        self.arrive(gap)
        self.coord.etcd.outage(self.cluster.now)
        self.cluster.check()
        self.arrive(length)
        self.cluster.check()
        self.coord.etcd.recover(self.cluster.now)

    @rule(gap=gaps)
    def etcd_election(self, gap: float) -> None:
        self.arrive(gap)
        self.coord.etcd.renew_all(self.cluster.now)

    @invariant()
    def never_two_leaders(self) -> None:
        self.cluster.check()

    @precondition(lambda self: self.coord.etcd.available)
    @invariant()
    def epochs_only_grow(self) -> None:
        tenures = self.coord.tenures()
        epochs = [t.leader.epoch for t in tenures]
        assert epochs == sorted(set(epochs))
        for before, after in itertools.pairwise(tenures):
            assert before.end is not None and before.end <= after.start


TestLeadership = LeadershipMachine.TestCase
TestLeadership.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def random_walk(seed: int, steps: int) -> None:
    """The same rules, drawn by a seeded generator: long runs that hypothesis's
    short ones rarely reach (a keepalive late on the way, then its deadline)."""
    rng = random.Random(seed)
    machine = LeadershipMachine()
    ttl = (2.0, 3.0)
    delay = (0.0, 0.3, 0.8)
    gap = (0.0, 0.1, 0.5, 1.0)
    index = range(len(MEMBERS))
    for _ in range(steps):
        step = rng.randrange(11)
        if step == 0:
            machine.time_passes(rng.uniform(0.0, 3.0))
        elif step == 1:
            if machine.coord.etcd.next_expiry() is not None:
                machine.until_a_lease_expires()
        elif step == 2:
            machine.grant(rng.choice(index), rng.choice(delay), rng.choice(gap), rng.choice(ttl))
        elif step == 3:
            machine.crash(rng.choice(index))
        elif step == 4:
            machine.etcd_outage(rng.choice(gap), rng.uniform(0.1, 6.0))
        elif step == 5:
            machine.etcd_election(rng.choice(gap))
        elif step == 6:
            machine.record_sync(
                rng.choice(index),
                rng.choice(index),
                rng.choice(delay),
                rng.choice(gap),
                rng.random() < 0.3,
            )
        else:
            rule = (machine.keepalive, machine.campaign, machine.resign, machine.revoke)[step - 7]
            rule(rng.choice(index), rng.choice(delay), rng.choice(gap))
        machine.never_two_leaders()
        if machine.coord.etcd.available:
            machine.epochs_only_grow()


@pytest.mark.parametrize("first", range(0, 1000, 250))
def test_random_walks_never_yield_two_leaders(first: int) -> None:
    for seed in range(first, first + 250):
        random_walk(seed, 150)


def test_a_member_that_times_its_lease_from_the_reply_overlaps_the_next_leader() -> None:
    """The check above can fail: measuring the lease from when the answer came
    back, not from when the request left, lets two members act at once."""
    cluster = Cluster()
    coord = cluster.coord
    a, b = cluster.members[0], cluster.members[1]
    a.lease = coord.grant(0.0, 2.0)
    a.epoch = coord.campaign(0.0, "a", a.lease)
    # a's keepalive leaves at 1.0, is applied at 1.0, its answer arrives at 1.5.
    assert coord.keepalive(1.0, a.lease) == 2.0
    a.valid_until = 1.5 + 2.0  # wrong: 1.0 + 2.0 is what a may assume
    b.lease = coord.grant(3.0, 2.0)
    b.valid_until = 5.0
    b.epoch = coord.campaign(3.0, "b", b.lease)
    assert b.epoch is not None
    cluster.now = 3.2
    with pytest.raises(AssertionError, match="two acting leaders"):
        cluster.check()


# -- one member's session over the simulated network --------------------------------------------


class Clock:
    """A minimal event queue on virtual time, as the simulation has."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()

    def schedule(self, delay: float, event: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (self.now + delay, next(self._counter), event))

    def idle(self) -> bool:
        return not self._queue

    def run(self, until: float = 100.0) -> None:
        while self._queue and self._queue[0][0] <= until:
            self.now, _, event = heapq.heappop(self._queue)
            event()
        self.now = max(self.now, until)


@dataclass
class Link:
    """Reachability over time: the requests and answers lost are those sent while down."""

    down: list[tuple[float, float]] = field(default_factory=list)
    clock: Clock = field(default_factory=Clock)

    def up(self) -> bool:
        return not any(start <= self.clock.now < end for start, end in self.down)


def session(link: Link, coord: Coordination | None = None) -> EtcdSession:
    return EtcdSession(
        coord or coordination(),
        link.clock,
        latency=lambda: 0.1,
        reachable=link.up,
        timeout=1.0,
    )


def test_a_request_is_answered_after_the_round_trip_at_the_time_it_arrives() -> None:
    link = Link()
    client = session(link)
    replies: list[tuple[float, Reply[Lease]]] = []
    client.call(
        lambda now: client.coordination.grant(now, 3.0),
        lambda r: replies.append((link.clock.now, r)),
    )
    link.clock.run()
    [(when, reply)] = replies
    assert when == pytest.approx(0.2) and reply == Answered(Lease(0x1000, 3.0))
    # Granted when the request arrived, at 0.1: a full TTL left then.
    assert client.coordination.etcd.time_to_live(0.1, 0x1000) == pytest.approx(3.0)


def test_a_lost_request_is_indeterminate_and_not_applied() -> None:
    link = Link(down=[(0.0, 0.05)])
    client = session(link)
    replies: list[Reply[int | None]] = []
    lease = client.coordination.grant(0.0, 3.0)
    client.call(lambda now: client.coordination.campaign(now, "a", lease), replies.append)
    link.clock.run()
    assert replies == [Indeterminate()]
    assert client.coordination.leader(link.clock.now).leader is None


def test_an_answer_lost_after_the_write_applied_leaves_it_applied() -> None:
    link = Link()
    coord = coordination()
    lease = coord.grant(0.0, 3.0)
    replies: list[Reply[int | None]] = []

    def campaign_then_cut(now: float) -> int | None:
        epoch = coord.campaign(now, "a", lease)
        link.down.append((now, now + 0.5))  # the link fails just after etcd applied it
        return epoch

    session(link, coord).call(campaign_then_cut, replies.append)
    link.clock.run(until=2.0)
    assert replies == [Indeterminate()]
    holder = coord.leader(2.0).leader
    assert holder is not None and holder.member == "a"


def test_an_error_answer_is_a_definite_failure() -> None:
    link = Link()
    client = session(link)
    gone = Lease(0x999, 3.0)
    refused: list[Reply[int | None]] = []
    client.call(lambda now: client.coordination.campaign(now, "a", gone), refused.append)
    link.clock.run(until=1.0)
    client.coordination.etcd.outage(1.0)
    unavailable: list[Reply[LeaderRead]] = []
    client.call(client.coordination.leader, unavailable.append)
    link.clock.run(until=2.0)
    assert len(refused) == 1 and isinstance(refused[0], Failed)
    assert isinstance(refused[0].error, LeaseNotFound)
    assert len(unavailable) == 1 and isinstance(unavailable[0], Failed)
    assert isinstance(unavailable[0].error, Unavailable)


def test_a_watch_stream_keeps_order_and_breaks_when_the_link_goes_down() -> None:
    link = Link()
    coord = coordination()
    client = session(link, coord)
    got: list[tuple[float, Event]] = []
    lost: list[float] = []
    stream = client.watch(
        coord.leader_key,
        lambda e: got.append((link.clock.now, e)),
        lambda: lost.append(link.clock.now),
    )
    assert stream is not None
    lease = coord.grant(0.0, 2.0)
    epoch = coord.campaign(0.0, "a", lease)
    coord.resign(0.0, epoch or 0)
    link.clock.run(until=1.0)
    assert [(t, e.type) for t, e in got] == [(0.1, EventType.PUT), (0.1, EventType.DELETE)]
    assert stream.last_revision == coord.etcd.revision
    client.link_down()
    link.clock.run(until=3.0)
    assert lost == [2.0]
    coord.campaign(3.0, "b", coord.grant(3.0, 2.0))
    link.clock.run(until=4.0)
    assert len(got) == 2  # the broken stream carries nothing more
    # A new watch resumes after the last revision seen and misses nothing.
    resumed: list[Event] = []
    client.watch(
        coord.leader_key, resumed.append, lambda: None, start_revision=stream.last_revision + 1
    )
    link.clock.run(until=5.0)
    assert [e.kv.value for e in resumed] == ["b"]


def test_the_expiry_clock_delivers_an_expiry_at_its_deadline() -> None:
    clock = Clock()
    coord = coordination(min_ttl=0.5)
    heard: list[tuple[float, LeaderChanged]] = []
    coord.watch_leader(0.0, lambda change: heard.append((clock.now, change)))
    expiries = ExpiryClock(coord.etcd, clock, interval=0.25)
    expiries.start()
    clock.run(until=1.0)
    lease = coord.grant(1.0, 1.7)  # granted between two wakes
    coord.campaign(1.0, "a", lease)
    clock.run(until=5.0)
    assert [(t, c.leader is None) for t, c in heard] == [(1.0, False), (2.7, True)]
    expiries.stop()
    clock.run(until=6.0)
    assert clock.idle()  # stopped: it schedules nothing more
