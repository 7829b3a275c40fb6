"""The follow channel's two ends (``pbkv.follower``), without I/O: a backup's copy and
stream reach a spare's core, and nothing else changes anything."""

from __future__ import annotations

import random
from typing import Any

import pytest

from pbkv import follower as follower_module
from pbkv.backup import BackupCore
from pbkv.config import Settings
from pbkv.coordinator import Leader, SyncRecord
from pbkv.follower import Follower, FollowStep, Source, SourceStep
from pbkv.leadership import Leadership
from pbkv.leadership import Role as LeaderRole
from pbkv.membership import Membership
from pbkv.store import ShardedStore, make_store
from pbkv.wire import AuthChallenge, Batch, FrameCodec, Hello

SECRET = "the-clusters-secret"
SHARDS = 4


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"shards": SHARDS, "transfer_chunk": 2, "secret": SECRET}
    values.update(overrides)
    return Settings(**values)


def spare_core(**overrides: Any) -> BackupCore:
    return BackupCore(settings(**overrides), make_store("sharded", SHARDS), 0.0, random.Random(1))


def source_store(pairs: int = 9) -> ShardedStore:
    store = make_store("sharded", SHARDS)
    for i in range(pairs):
        store.put(f"key{i}", f"value {i}")
    return store


class Pair:
    """A source and a follower joined by two byte pipes (delivered by ``run``)."""

    def __init__(self, target: BackupCore, secret: str = SECRET) -> None:
        self.source = Source(secret, 2, 0.0)
        self.follower = Follower(settings(), target, "127.0.0.3:7000#abcd", 0.0)
        self.target = target
        self.store = source_store()
        self.seq, self.history = 7, 0xFEED

    def run(self) -> None:
        for _ in range(1000):
            moved = False
            for data in self.follower.take():
                self.source.received(1.0, data)
                moved = True
            if self.source.wants_copy:
                self.source.start(self.store.copy(), self.seq, self.history, 3, 1.0)
            self.source.pump(1.0, 4)
            for data in self.source.take():
                self.follower.received(1.0, data)
                moved = True
            if not moved:
                return
        raise AssertionError("the ends never settled")

    def greet(self) -> None:
        """The follower's HELLO, the source's answer and the follower's next words,
        delivered once each (the copy is not started)."""
        for data in self.follower.take():
            self.source.received(1.0, data)
        for data in self.source.take():
            self.follower.received(1.0, data)
        for data in self.follower.take():
            self.source.received(1.0, data)

    def batch(self, ops: list[str | None]) -> Batch:
        """A batch the source's backup applies and forwards."""
        self.seq += 1
        self.store.apply(ops)
        frame = Batch(self.seq, ops, 0, [], epoch=3)
        self.source.forward(frame, 1.0)
        return frame


def assert_holds_source_data(ends: Pair) -> None:
    target = ends.target
    assert dict(target.store.items()) == dict(ends.store.items())
    assert target.store.checksum == ends.store.checksum
    assert (target.seq, target.history) == (ends.seq, ends.history)


def test_a_follower_installs_the_copy_then_applies_the_stream() -> None:
    target = spare_core()
    target.store.put("old", "ends")  # whatever the spare held goes
    ends = Pair(target)
    ends.run()

    assert ends.follower.step is FollowStep.FOLLOWING and ends.follower.closed is None
    assert ends.source.step is SourceStep.FORWARDING and ends.source.member.startswith("127.0.0.3")
    assert_holds_source_data(ends)
    assert not target.confirmed and target.copy_epoch == 0  # never trusted as a copy
    assert ends.follower.discard  # the old pairs, dropped gradually by the driver

    ends.batch(["key1", "changed", "new", "ends"])
    ends.batch(["key2", None])
    ends.run()
    assert_holds_source_data(ends)
    assert ends.follower.batches_applied == 2 and ends.follower.lag == 0


def test_batches_applied_while_the_copy_is_on_its_way_wait_then_follow_in_order() -> None:
    ends = Pair(spare_core())
    ends.greet()
    assert ends.source.wants_copy
    ends.source.start(ends.store.copy(), ends.seq, ends.history, 3, 1.0)
    ends.batch(["late", "write"])  # applied after the copy was taken
    assert len(ends.source.waiting) == 1
    ends.run()
    assert_holds_source_data(ends)


def test_a_follower_with_another_secret_gets_nothing() -> None:
    target = spare_core()
    ends = Pair(target, secret="another-secret")
    ends.run()
    assert ends.follower.closed == "the source did not prove the secret"
    assert len(target.store) == 0 and target.seq == 0


def test_a_source_takes_nothing_from_its_follower_past_the_name() -> None:
    ends = Pair(spare_core())
    ends.run()
    codec = ends.follower.codec  # keyed: the follower's own frames would verify
    ends.source.received(1.0, codec.encode(Hello("backup", True, 0, 0, 99, 1, (), 0, "", False)))
    assert ends.source.closed is not None and "unexpected HELLO" in ends.source.closed


def test_a_source_closes_a_channel_that_does_not_prove_the_secret_in_time() -> None:
    source = Source(SECRET, 2, 0.0)
    source.tick(1.0, 0.2, 2.0)
    assert source.closed is None
    source.tick(2.5, 0.2, 2.0)
    assert source.closed is not None and "no proof" in source.closed


def test_a_source_refuses_frames_before_the_proofs() -> None:
    source = Source(SECRET, 2, 0.0)
    source.received(0.0, FrameCodec().encode(Hello("backup", True, 0, 0, 0, 1, (), 0, "", False)))
    assert source.closed is not None and source.sender is None and not source.wants_copy


def test_the_follower_stops_once_the_spares_replication_channel_is_up() -> None:
    target = spare_core()
    ends = Pair(target)
    ends.run()
    target.channel_up = True  # a primary connected: it decides what the spare holds
    before = dict(target.store.items())
    ends.batch(["key1", "changed"])
    ends.run()
    assert ends.follower.closed is not None and "replication channel is up" in ends.follower.closed
    assert dict(target.store.items()) == before


def test_the_follower_stops_once_the_spares_data_changed_otherwise() -> None:
    target = spare_core()
    ends = Pair(target)
    ends.run()
    target.store.put("written", "by a primary's sync meanwhile")
    ends.batch(["key1", "changed"])
    ends.run()
    assert ends.follower.closed is not None and "changed otherwise" in ends.follower.closed
    assert target.store.get("key1") == "value 1"


def test_a_spare_holding_a_confirmed_copy_keeps_it() -> None:
    target = spare_core()
    target.confirmed = True
    target.store.put("confirmed", "ends")
    ends = Pair(target)
    ends.run()
    assert ends.follower.closed is not None and "confirmed copy" in ends.follower.closed
    assert dict(target.store.items()) == {"confirmed": "ends"}


def test_a_gap_in_the_stream_closes_the_source() -> None:
    ends = Pair(spare_core())
    ends.run()
    ends.source.forward(Batch(ends.seq + 2, ["k", "v"], 0, []), 1.0)
    assert ends.source.closed is not None and "gap" in ends.source.closed


def test_a_follower_that_lags_past_the_bound_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(follower_module, "FOLLOW_QUEUE_BYTES", 1000)
    ends = Pair(spare_core())
    ends.greet()
    ends.source.start(ends.store.copy(), ends.seq, ends.history, 3, 1.0)
    for i in range(20):  # the copy is not sent yet: the batches wait, up to the bound
        ends.batch([f"k{i}", "v" * 100])
    assert ends.source.closed is not None and "lags" in ends.source.closed


def test_a_silent_source_is_given_up() -> None:
    ends = Pair(spare_core())
    ends.run()
    ends.follower.tick(1.0 + settings().peer_timeout + 0.1)
    assert ends.follower.closed is not None and "silent" in ends.follower.closed


def test_a_corrupted_frame_closes_the_follower() -> None:
    target = spare_core()
    ends = Pair(target)
    for data in ends.follower.take():
        ends.source.received(1.0, data)
    data = bytearray(b"".join(ends.source.take()))
    data[-1] ^= 1
    ends.follower.received(1.0, bytes(data))
    assert ends.follower.closed is not None and "bad frame" in ends.follower.closed


def test_the_follower_opens_with_its_challenge() -> None:
    follower = Follower(settings(), spare_core(), "m", 0.0)
    frame = FrameCodec().feed(b"".join(follower.take()))[0]
    assert isinstance(frame, AuthChallenge)


# -- who a spare follows, and whom a promoted member brings in sync first -------------


ME, PRIMARY, BACKUP = "10.0.0.3:7000#c", "10.0.0.1:7000#a", "10.0.0.2:7000#b"


def membership(role: LeaderRole, leader: Leader | None, record: SyncRecord | None) -> Membership:
    leadership = Leadership()
    leadership.role, leadership.leader, leadership.record = role, leader, record
    return Membership(leadership, ME, lambda action: None)


@pytest.mark.parametrize(
    ("role", "leader", "record", "target"),
    [
        (LeaderRole.SPARE, Leader(PRIMARY, 5), SyncRecord(5, BACKUP), "10.0.0.2:7000"),
        (LeaderRole.BACKUP, Leader(PRIMARY, 5), SyncRecord(5, ME), None),
        (LeaderRole.SPARE, None, SyncRecord(5, BACKUP), None),  # nobody leads
        (LeaderRole.SPARE, Leader(BACKUP, 6), SyncRecord(5, BACKUP), None),  # just promoted
        (LeaderRole.SPARE, Leader(PRIMARY, 5), SyncRecord(5, None), None),
        (LeaderRole.SPARE, Leader(PRIMARY, 5), SyncRecord(5, ME), None),
        (LeaderRole.SPARE, Leader(PRIMARY, 5), None, None),
    ],
)
def test_a_spare_follows_the_backup_recorded_under_its_primarys_epoch(
    role: LeaderRole, leader: Leader | None, record: SyncRecord | None, target: str | None
) -> None:
    assert membership(role, leader, record).follow_target() == target


def test_a_promoted_member_brings_its_follower_in_sync_first() -> None:
    glue = membership(LeaderRole.PRIMARY, Leader(BACKUP, 6), SyncRecord(5, BACKUP))
    registered = [PRIMARY, ME, BACKUP]
    own = ("10.0.0.2", 7000)
    assert glue.choose_backup(own, registered) == ("10.0.0.1", 7000)  # by registration
    glue = membership(LeaderRole.PRIMARY, Leader(BACKUP, 6), SyncRecord(5, BACKUP))
    assert glue.choose_backup(own, registered, frozenset({ME})) == ("10.0.0.3", 7000)


def test_a_copy_other_than_the_hello_announced_is_not_installed() -> None:
    target = spare_core()
    target.store.put("kept", "pair")
    ends = Pair(target)
    ends.greet()
    copy = ends.store.copy()
    ends.source.start(copy, ends.seq, ends.history, 3, 1.0)
    copy.put("extra", "pair")  # the copy sent is not the one its HELLO described
    ends.run()
    assert ends.follower.closed is not None and "not what its HELLO announced" in (
        ends.follower.closed
    )
    assert dict(target.store.items()) == {"kept": "pair"} and target.seq == 0
