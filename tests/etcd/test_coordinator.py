"""pbkv's coordinator module against a real etcd: leases, the leader key and its
epoch, the guarded in-sync record, members, the leader watch, and etcd going away."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import aetcd
import pytest

from pbkv.coordinator import (
    Coordinator,
    CoordinatorUnavailable,
    Leader,
    LeaderChanged,
    LeaderEvent,
    LeaderRead,
    LeaseGone,
    SyncRead,
    SyncRecord,
    WatchLost,
)
from pbkv.testing.etcd import EtcdServer, free_port

T = TypeVar("T")
TIMEOUT = 1.0


def run(scenario: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(scenario)


async def until(
    condition: Callable[[], Awaitable[T]], what: str, timeout: float = 10.0, interval: float = 0.05
) -> T:
    """Poll ``condition`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = await condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def next_event(events: AsyncGenerator[LeaderEvent, None], timeout: float = 10.0) -> Any:
    return await asyncio.wait_for(anext(events), timeout)


async def event_where(
    events: AsyncGenerator[LeaderEvent, None],
    wanted: Callable[[LeaderEvent], bool],
    timeout: float = 15.0,
) -> LeaderEvent:
    """The next event that is ``wanted`` (a WatchLost and a re-read may come first
    when a keepalive ping gives up on a stream to a paused etcd)."""
    deadline = time.monotonic() + timeout
    while True:
        event = await next_event(events, max(0.0, deadline - time.monotonic()))
        if wanted(event):
            return event


async def create_revision(etcd: EtcdServer, key: str) -> int:
    """The key's create revision as etcd's own client reads it."""
    async with aetcd.Client(etcd.host, etcd.client_port, timeout=5) as raw:
        found = await raw.get(key.encode())
        return int(found.create_revision) if found is not None else 0


# -- leases --------------------------------------------------------------------------------
def test_a_lease_not_kept_alive_expires_with_its_keys(etcd: EtcdServer, prefix: str) -> None:
    async def scenario() -> None:
        async with await Coordinator.open(etcd.client_url, prefix, TIMEOUT) as coord:
            # etcd's floor: with its default timing no lease is shorter than 2 s.
            assert (await coord.grant(1)).ttl == 2
            lease = await coord.grant(2)
            assert lease.ttl == 2
            assert await coord.keepalive(lease) == 2.0
            await coord.register("a:1", {"role": "spare"}, lease)
            assert [m.member for m in await coord.members()] == ["a:1"]
            started = time.monotonic()
            await until(lambda: _empty(coord.members()), "the member key to expire")
            assert time.monotonic() - started < lease.ttl + 2.0
            # A refresh of an expired lease is no error from etcd: TTL 0, here None.
            assert await coord.keepalive(lease) is None
            with pytest.raises(LeaseGone):
                await coord.register("a:1", {"role": "spare"}, lease)
            with pytest.raises(LeaseGone):
                await coord.campaign("a:1", lease)
            await coord.revoke(lease)  # already gone: nothing to do

    run(scenario())


async def _empty(listing: Awaitable[list[Any]]) -> bool:
    return not await listing


def test_keepalive_keeps_a_lease_past_its_ttl(etcd: EtcdServer, prefix: str) -> None:
    async def scenario() -> None:
        async with await Coordinator.open(etcd.client_url, prefix, TIMEOUT) as coord:
            lease = await coord.grant(2)
            await coord.register("a:1", {}, lease)
            deadline = time.monotonic() + lease.ttl + 1.5
            while time.monotonic() < deadline:
                assert await coord.keepalive(lease) == 2.0
                assert [m.member for m in await coord.members()] == ["a:1"]
                await asyncio.sleep(0.5)  # the keepalive period under test, not a wait
            await coord.revoke(lease)
            assert await coord.members() == []
            assert await coord.keepalive(lease) is None

    run(scenario())


# -- leadership ----------------------------------------------------------------------------
def test_one_member_wins_and_the_epoch_is_the_create_revision(
    etcd: EtcdServer, prefix: str
) -> None:
    async def scenario() -> None:
        async with (
            await Coordinator.open(etcd.client_url, prefix, TIMEOUT) as a,
            await Coordinator.open(etcd.client_url, prefix, TIMEOUT) as b,
        ):
            lease_a = await a.grant(2)
            lease_b = await b.grant(30)
            epoch_a = await a.campaign("a:1", lease_a)
            assert epoch_a is not None
            assert epoch_a == await create_revision(etcd, f"{prefix}/leader")
            assert await b.campaign("b:1", lease_b) is None
            assert (await b.leader()).leader == Leader("a:1", epoch_a)
            # A campaign repeated after a lost reply finds its own key.
            assert await a.campaign("a:1", lease_a) == epoch_a
            # a stops keeping its lease alive: the key goes, b wins a higher epoch.
            await until(lambda: _no_leader(b), "a's leader key to expire")
            epoch_b = await b.campaign("b:1", lease_b)
            assert epoch_b is not None and epoch_b > epoch_a
            assert (await a.leader()).leader == Leader("b:1", epoch_b)
            assert epoch_b == await create_revision(etcd, f"{prefix}/leader")
            await b.revoke(lease_b)

    run(scenario())


async def _no_leader(coord: Coordinator) -> bool:
    return (await coord.leader()).leader is None


def test_only_the_holders_epoch_resigns(etcd: EtcdServer, prefix: str) -> None:
    async def scenario() -> None:
        async with (
            await Coordinator.open(etcd.client_url, prefix, TIMEOUT) as a,
            await Coordinator.open(etcd.client_url, prefix, TIMEOUT) as b,
        ):
            lease_a, lease_b = await a.grant(30), await b.grant(30)
            epoch_a = await a.campaign("a:1", lease_a)
            assert epoch_a is not None
            assert not await b.resign(epoch_a + 1)
            assert (await b.leader()).leader == Leader("a:1", epoch_a)
            assert await a.resign(epoch_a)
            assert (await a.leader()).leader is None
            assert not await a.resign(epoch_a)
            epoch_b = await b.campaign("b:1", lease_b)
            assert epoch_b is not None
            # The old holder's epoch no longer names the key: b keeps it.
            assert not await a.resign(epoch_a)
            assert (await a.leader()).leader == Leader("b:1", epoch_b)
            with pytest.raises(ValueError):
                await a.resign(0)
            await a.revoke(lease_a)
            await b.revoke(lease_b)

    run(scenario())


# -- the in-sync record ----------------------------------------------------------------------
def test_the_in_sync_record_is_written_only_by_the_leader(etcd: EtcdServer, prefix: str) -> None:
    async def scenario() -> None:
        async with (
            await Coordinator.open(etcd.client_url, prefix, TIMEOUT) as a,
            await Coordinator.open(etcd.client_url, prefix, TIMEOUT) as b,
        ):
            assert await a.sync() == SyncRead(None, 0)
            lease_a, lease_b = await a.grant(30), await b.grant(30)
            epoch_a = await a.campaign("a:1", lease_a)
            assert epoch_a is not None
            first = await a.record_sync(epoch_a, "b:1", expected=0)
            assert first is not None and first > epoch_a
            assert await b.sync() == SyncRead(SyncRecord(epoch_a, "b:1"), first)
            second = await a.record_sync(epoch_a, None, expected=first)
            assert second is not None and second > first
            assert await b.sync() == SyncRead(SyncRecord(epoch_a, None), second)
            # b is not the leader: its claim of epoch a's is refused like any other.
            assert await b.record_sync(epoch_a + 1, "b:1", expected=second) is None
            # a loses leadership (its lease ends): it can no longer record.
            await a.revoke(lease_a)
            assert await a.record_sync(epoch_a, "c:1", expected=second) is None
            epoch_b = await b.campaign("b:1", lease_b)
            assert epoch_b is not None
            assert await a.record_sync(epoch_a, "a:1", expected=second) is None
            assert await b.sync() == SyncRead(SyncRecord(epoch_a, None), second)
            third = await b.record_sync(epoch_b, "a:1", expected=second)
            assert third is not None
            assert await a.sync() == SyncRead(SyncRecord(epoch_b, "a:1"), third)
            with pytest.raises(ValueError):
                await a.record_sync(0, "a:1", expected=0)  # 0 would match an absent leader key
            await b.revoke(lease_b)

    run(scenario())


def test_a_record_expecting_a_stale_revision_is_refused(etcd: EtcdServer, prefix: str) -> None:
    """A compare-and-swap on the record's mod revision: of the writes sent while
    the record was at one revision, one lands; a late one is refused, and a repeat
    of the one that landed (its answer lost) answers its revision."""

    async def scenario() -> None:
        async with await Coordinator.open(etcd.client_url, prefix, TIMEOUT) as coord:
            lease = await coord.grant(30)
            epoch = await coord.campaign("a:1", lease)
            assert epoch is not None
            newer = await coord.record_sync(epoch, "c:1", expected=0)
            assert newer is not None
            assert await coord.record_sync(epoch, "b:1", expected=0) is None
            assert await coord.sync() == SyncRead(SyncRecord(epoch, "c:1"), newer)
            assert await coord.record_sync(epoch, "b:1", expected=newer + 1) is None
            # The one that landed, asked again: its revision, and nothing written.
            assert await coord.record_sync(epoch, "c:1", expected=0) == newer
            assert await coord.sync() == SyncRead(SyncRecord(epoch, "c:1"), newer)
            latest = await coord.record_sync(epoch, "b:1", expected=newer)
            assert latest is not None and latest > newer
            assert await coord.sync() == SyncRead(SyncRecord(epoch, "b:1"), latest)
            # Under a key of another epoch, the same value is not ours.
            assert await coord.resign(epoch)
            assert await coord.record_sync(epoch, "b:1", expected=newer) is None
            await coord.revoke(lease)

    run(scenario())


def test_a_leader_read_says_the_revision_it_read_at(etcd: EtcdServer, prefix: str) -> None:
    async def scenario() -> None:
        async with await Coordinator.open(etcd.client_url, prefix, TIMEOUT) as coord:
            before = await coord.leader()
            assert before.leader is None
            lease = await coord.grant(30)
            epoch = await coord.campaign("a:1", lease)
            assert epoch is not None and epoch > before.revision
            read = await coord.leader()
            assert read == LeaderRead(Leader("a:1", epoch), read.revision)
            assert read.revision >= epoch
            await coord.register("a:1", {}, lease)  # any write raises the revision
            assert (await coord.leader()).revision > read.revision
            await coord.revoke(lease)

    run(scenario())


# -- members -------------------------------------------------------------------------------
def test_members_register_with_their_lease(etcd: EtcdServer, prefix: str) -> None:
    async def scenario() -> None:
        async with (
            await Coordinator.open(etcd.client_url, prefix, TIMEOUT) as coord,
            await Coordinator.open(etcd.client_url, prefix + "x", TIMEOUT) as neighbour,
        ):
            lease_a, lease_b = await coord.grant(30), await coord.grant(30)
            await coord.register("b:1", {"role": "backup", "stage": "in_sync"}, lease_b)
            await coord.register("a:1", {"role": "primary", "stage": "in_sync"}, lease_a)
            await neighbour.register("z:1", {"role": "spare"}, lease_a)
            members = await coord.members()
            assert [(m.member, m.info["role"], m.lease) for m in members] == [
                ("a:1", "primary", lease_a.id),
                ("b:1", "backup", lease_b.id),
            ]
            await coord.register("b:1", {"role": "spare", "stage": "cold_start"}, lease_b)
            assert [m.info for m in await coord.members()][1] == {
                "role": "spare",
                "stage": "cold_start",
            }
            await coord.revoke(lease_b)
            assert [m.member for m in await coord.members()] == ["a:1"]
            await coord.revoke(lease_a)
            assert await coord.members() == []
            assert await neighbour.members() == []

    run(scenario())


# -- watching the leader ---------------------------------------------------------------------
def test_the_watch_sees_a_new_leader_and_its_end(etcd: EtcdServer, prefix: str) -> None:
    async def scenario() -> None:
        async with (
            await Coordinator.open(etcd.client_url, prefix, TIMEOUT) as coord,
            contextlib.aclosing(coord.watch_leader()) as events,
        ):
            first = await next_event(events)
            assert isinstance(first, LeaderChanged) and first.leader is None
            lease = await coord.grant(30)
            epoch = await coord.campaign("a:1", lease)
            assert epoch is not None
            assert await next_event(events) == LeaderChanged(Leader("a:1", epoch), epoch)
            assert await coord.resign(epoch)
            gone = await next_event(events)
            assert isinstance(gone, LeaderChanged) and gone.leader is None
            assert gone.revision > epoch
            # The end of a lease is a delete too.
            epoch = await coord.campaign("a:1", lease)
            assert epoch is not None
            assert await next_event(events) == LeaderChanged(Leader("a:1", epoch), epoch)
            await coord.revoke(lease)
            assert (await next_event(events)).leader is None

    run(scenario())


def test_a_watch_started_late_reads_the_current_leader(etcd: EtcdServer, prefix: str) -> None:
    async def scenario() -> None:
        async with await Coordinator.open(etcd.client_url, prefix, TIMEOUT) as coord:
            lease = await coord.grant(30)
            epoch = await coord.campaign("a:1", lease)
            assert epoch is not None
            async with contextlib.aclosing(coord.watch_leader()) as events:
                first = await next_event(events)
                assert isinstance(first, LeaderChanged)
                assert first.leader == Leader("a:1", epoch) and first.revision >= epoch
            await coord.revoke(lease)

    run(scenario())


# -- etcd away -------------------------------------------------------------------------------
async def _every_call(coord: Coordinator, lease: Any, epoch: int, timeout: float) -> list[str]:
    """Each call against an etcd that cannot answer: what did not raise in time."""
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "grant": lambda: coord.grant(2),
        "keepalive": lambda: coord.keepalive(lease),
        "campaign": lambda: coord.campaign("a:1", lease),
        "leader": coord.leader,
        # A write that timed out may still land once etcd answers again (it is
        # indeterminate), so this one names an epoch that never held the key.
        "resign": lambda: coord.resign(epoch + 1000),
        "record_sync": lambda: coord.record_sync(epoch, "b:1", expected=0),
        "sync": coord.sync,
        "register": lambda: coord.register("a:1", {}, lease),
        "members": coord.members,
    }
    wrong = []
    for name, call in calls.items():
        started = time.monotonic()
        try:
            await call()
            wrong.append(f"{name} answered")
        except CoordinatorUnavailable:
            if time.monotonic() - started > timeout + 0.5:
                wrong.append(f"{name} took {time.monotonic() - started:.2f}s")
    return wrong


def test_etcd_away_raises_in_time_and_back_works_again(own_etcd: EtcdServer) -> None:
    timeout = 0.5

    def leader_is(leader: Leader | None) -> Callable[[LeaderEvent], bool]:
        return lambda event: isinstance(event, LeaderChanged) and event.leader == leader

    async def scenario() -> None:
        async with (
            await Coordinator.open(own_etcd.client_url, "away", timeout) as coord,
            contextlib.aclosing(coord.watch_leader()) as events,
        ):
            await event_where(events, leader_is(None))
            lease = await coord.grant(30)
            epoch = await coord.campaign("a:1", lease)
            assert epoch is not None
            await event_where(events, leader_is(Leader("a:1", epoch)))

            # Paused: connections stay open and nothing answers.
            own_etcd.pause()
            try:
                assert await _every_call(coord, lease, epoch, timeout) == []
            finally:
                own_etcd.resume()
            assert (await coord.leader()).leader == Leader("a:1", epoch)

            # Gone: connections are refused; the watch says so.
            own_etcd.kill()
            assert await _every_call(coord, lease, epoch, timeout) == []
            await event_where(events, lambda event: isinstance(event, WatchLost))

            # Back (same data): calls work again, the lease and the leader key
            # survived, and the watch reads the leader afresh.
            own_etcd.start()
            await until(lambda: _answers(coord), "the coordinator to reach etcd again")
            assert await coord.keepalive(lease) == 30.0
            assert (await coord.leader()).leader == Leader("a:1", epoch)
            await event_where(events, leader_is(Leader("a:1", epoch)))
            assert await coord.resign(epoch)
            await event_where(events, leader_is(None))

    run(scenario())


def test_a_watch_on_a_silent_etcd_is_reported_lost(own_etcd: EtcdServer) -> None:
    """A paused etcd keeps its connections open and sends nothing, as across a
    partition: keepalive pings find the dead stream within 6 s + 3 s."""

    async def scenario() -> None:
        async with (
            await Coordinator.open(own_etcd.client_url, "silent", TIMEOUT) as coord,
            contextlib.aclosing(coord.watch_leader()) as events,
        ):
            assert isinstance(await next_event(events), LeaderChanged)
            own_etcd.pause()
            try:
                started = time.monotonic()
                lost = await next_event(events, timeout=20.0)
                assert isinstance(lost, WatchLost)
                assert time.monotonic() - started < 9.0 + 3.0
            finally:
                own_etcd.resume()
            back = await next_event(events)
            assert isinstance(back, LeaderChanged) and back.leader is None

    run(scenario())


async def _answers(coord: Coordinator) -> bool:
    try:
        await coord.leader()
    except CoordinatorUnavailable:
        return False
    return True


def test_an_unreachable_endpoint_moves_calls_to_the_next(etcd: EtcdServer, prefix: str) -> None:
    dead = f"http://127.0.0.1:{free_port('127.0.0.1')}"

    async def scenario() -> None:
        async with await Coordinator.open([dead, etcd.client_url], prefix, TIMEOUT) as coord:
            with pytest.raises(CoordinatorUnavailable):
                await coord.leader()
            assert (await coord.leader()).leader is None

    run(scenario())
