"""A member of a coordinated cluster: the leadership's driver (asyncio + etcd).

:class:`pbkv.leadership.Leadership` decides; this module turns etcd's answers,
the leader watch and the clock into its events, and carries out its actions:
etcd calls through :class:`pbkv.coordinator.Coordinator` (each bounded by the
timing's ``request_timeout``), and role changes through the node
(``Node.become_primary``, ``fence``, ``follow``, ``stop_following``). The node
asks :meth:`Member.may_serve` before it answers any client, and the primary's
core asks the leadership (``PrimaryCore.authority``) before it acknowledges a
write: so a primary whose lease may have run out on its own clock answers
nothing, even before the timer that fences it fires (after a pause, say).

What happens between the leadership and the core (the gate, the core's news as
events, feeding, the choice of backup) is ``pbkv.membership``'s, which the
failover simulation drives too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from typing import TYPE_CHECKING, Any

from pbkv.config import Settings
from pbkv.coordinator import (
    Coordinator,
    CoordinatorError,
    LeaderChanged,
    Lease,
    LeaseGone,
    MemberInfo,
)
from pbkv.leadership import (
    Action,
    BecomeBackup,
    BecomePrimary,
    BecomeSpare,
    Campaign,
    CampaignAnswered,
    CampaignResult,
    EtcdFailed,
    Event,
    Fence,
    GrantLease,
    KeepAlive,
    KeepaliveAnswered,
    LeaderObserved,
    Leadership,
    LeaseGranted,
    Operation,
    ReadLeader,
    ReadSync,
    RecordResult,
    RecordSync,
    RecordSyncAnswered,
    Register,
    Resign,
    RevokeLease,
    Stop,
    StopFollowing,
    SyncObserved,
    Tick,
    Timing,
    address_of,
    member_name,
)
from pbkv.membership import Membership, parse_address

if TYPE_CHECKING:
    from pbkv.node import Node

log = logging.getLogger(__name__)

__all__ = ["Member", "parse_address"]


class Member:
    """One member's leadership, driven: see the module's docstring."""

    def __init__(self, node: Node, settings: Settings, address: tuple[str, int]) -> None:
        self.node = node
        self.settings = settings
        self.address = address
        self.timing = Timing.for_ttl(float(settings.lease_ttl))
        self.leadership = Leadership(self.timing)
        run_id = secrets.token_hex(4)
        if node.persistence is not None:  # restarted from its data: the same member
            run_id = node.persistence.member_run_id(run_id)
        self.name = member_name("%s:%d" % address, run_id)
        self.coordinator: Coordinator | None = None
        self.leases: dict[int, Lease] = {}
        self.members: list[MemberInfo] = []
        self.promotions = 0
        self.fencings = 0
        self.last_change = ""  # the reason of the last promotion or fencing
        self.membership = Membership(self.leadership, self.name, self._carry_out)
        self._wakeup: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._leaderless_why: str | None = None
        node.core.member = self.name

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        assert self.settings.coordinator is not None
        self.coordinator = await Coordinator.open(
            self.settings.coordinator, self.settings.cluster, timeout=self.timing.request_timeout
        )
        log.info(
            "member %s of cluster %r (etcd %s, lease %ss)",
            self.name,
            self.settings.cluster,
            self.settings.coordinator,
            self.settings.lease_ttl,
        )
        self._feed(self.membership.started(self._now(), self.node.core))
        self._spawn(self._watch(), "pbkv-loop-watch")

    async def stop(self) -> None:
        """Hand over now (fence, resign, revoke), waiting at most one request timeout."""
        if self._stopping:
            return
        self._stopping = True
        self._feed(Stop(self._now()))
        if self._wakeup is not None:
            self._wakeup.cancel()
        pending = [task for task in self._tasks if not task.done()]
        background = [t for t in pending if t.get_name().startswith("pbkv-loop")]
        for task in background:
            task.cancel()
        calls = [t for t in pending if t not in background]
        if calls:
            await asyncio.wait(calls, timeout=self.timing.request_timeout)
        for task in list(self._tasks):
            task.cancel()
        if self.coordinator is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.coordinator.close(), self.timing.request_timeout)

    # -- what the node asks ----------------------------------------------------------------
    def may_serve(self) -> bool:
        return self.membership.may_serve(self._now())

    def authority(self, now: float, backup: str) -> bool:
        """Whether a write ``backup`` acknowledged may be acknowledged (the primary's core)."""
        return self.membership.authority(now, backup)

    def role_name(self) -> str:
        return self.leadership.role.value

    def primary_address(self) -> str | None:
        primary = self.leadership.status(self._now()).primary
        return None if primary is None else address_of(primary)

    def status(self, now: float) -> dict[str, Any]:
        status = self.leadership.status(now)
        return {
            "role": status.role.value,
            "core_role": self.node.core.role.value,
            "member": self.name,
            "cluster": self.settings.cluster,
            "epoch": status.epoch,
            "primary": None if status.primary is None else address_of(status.primary),
            "primary_member": status.primary,
            "lease_left": round(status.lease_left, 3),
            "why_not_primary": status.why_not_primary,
            "in_sync_backup": status.in_sync,
            "recorded_backup": status.recorded,
            "etcd_reachable": status.etcd_reachable,
            "promotions": self.promotions,
            "fencings": self.fencings,
            "last_role_change": self.last_change,
        }

    async def next_backup(self) -> tuple[str, int] | None:
        """The member to connect to next, from who is registered right now: a member
        whose lease ended (the old primary after a failover) is not tried in vain."""
        try:
            self.members = await self._etcd.members()
        except CoordinatorError as exc:
            log.debug("etcd member list failed (the last one is used): %s", exc)
        return self.choose_backup()

    def choose_backup(self) -> tuple[str, int] | None:
        """The member the primary connects to next (None: no other is registered)."""
        registered = [info.member for info in self.members]
        following = self.node.following
        followers = frozenset(following.followed_by) if following is not None else frozenset()
        return self.membership.choose_backup(self.address, registered, followers)

    def replication_changed(self) -> None:
        """The core's news: a backup came in sync or was lost, or our copy changed."""
        for event in self.membership.replication_events(self.node.core, self._now()):
            self._feed(event)

    # -- events in ---------------------------------------------------------------------------
    def _now(self) -> float:
        return self.node.clock()

    def _copy_changed(self) -> None:
        for event in self.membership.copy_events(self.node.core, self._now()):
            self._feed(event)

    def _feed(self, event: Event) -> None:
        """Hand ``event`` to the leadership (``Membership.feed``); once handled, send
        the writes it may have allowed and plan the next tick."""
        if not self.membership.feed(event):
            return
        self.node.flush_if_authorised()
        self._say_why_leaderless()
        self._schedule_wakeup()

    def _say_why_leaderless(self) -> None:
        """One log line each time the reason nobody leads changes (say, the recorded
        backup is gone too: nobody may be promoted)."""
        leadership = self.leadership
        why = None
        if leadership.leader_known and leadership.leader is None and leadership.record_known:
            why = leadership.why_not_primary(self._now())
        if why != self._leaderless_why:
            self._leaderless_why = why
            if why is not None and not leadership.on_the_way(why):
                log.warning("no primary, and this member may not become it: %s", why)

    def _schedule_wakeup(self) -> None:
        if self.leadership.stopped:
            return
        if self._wakeup is not None:
            self._wakeup.cancel()
        # At the latest every read interval (the leadership's next deadline may be none).
        delay = min(self.timing.read_interval, self.leadership.next_wakeup() - self._now())
        self._wakeup = self.node.loop.call_later(max(0.0, delay), self._tick)

    def _tick(self) -> None:
        self._wakeup = None
        self._copy_changed()
        self._feed(Tick(self._now()))
        if self.node.following is not None:
            self.node.following.follow(self.membership.follow_target())

    # -- actions out -------------------------------------------------------------------------
    def _carry_out(self, action: Action) -> None:
        node = self.node
        if isinstance(action, BecomePrimary):
            self.promotions += 1
            record = self.leadership.record
            self.last_change = (
                f"promoted to primary of epoch {action.epoch}: the leader key was free and "
                + (
                    "no member was ever recorded in sync"
                    if record is None
                    else f"etcd records this member as the in-sync backup of epoch {record.epoch}"
                )
            )
            log.warning("%s", self.last_change)
            self.membership.role_changed()
            node.become_primary(action.epoch, self.authority)
        elif isinstance(action, Fence):
            self.fencings += 1
            self.last_change = f"fenced: {action.reason}"
            log.warning("primary fenced itself: %s", action.reason)
            self.membership.role_changed()
            node.fence(action.reason)
        elif isinstance(action, BecomeBackup | BecomeSpare):
            role = "backup" if isinstance(action, BecomeBackup) else "spare"
            log.info("member follows %s at epoch %d as %s", action.primary, action.epoch, role)
            try:
                primary = parse_address(address_of(action.primary))
            except ValueError:
                log.warning("the leader's name %r is no address: not following", action.primary)
                return
            node.follow(primary, action.epoch)
        elif isinstance(action, StopFollowing):
            node.stop_following(action.epoch)
        elif isinstance(action, GrantLease):
            self._spawn(self._grant(action.ttl))
        elif isinstance(action, KeepAlive):
            self._spawn(self._keepalive(action.lease))
        elif isinstance(action, RevokeLease):
            self._spawn(self._revoke(action.lease))
        elif isinstance(action, ReadLeader):
            self._spawn(self._read_leader())
        elif isinstance(action, ReadSync):
            self._spawn(self._read_sync())
        elif isinstance(action, Campaign):
            self._spawn(self._campaign(action.member, action.lease))
        elif isinstance(action, RecordSync):
            self._spawn(self._record(action))
        elif isinstance(action, Resign):
            self._spawn(self._resign(action.epoch))
        elif isinstance(action, Register):
            self._spawn(self._register(action))
        else:  # pragma: no cover - the Action union is closed
            raise TypeError(f"unknown leadership action {action!r}")

    def _spawn(self, coro: Any, name: str = "pbkv-call") -> None:
        task = self.node.loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def _etcd(self) -> Coordinator:
        assert self.coordinator is not None
        return self.coordinator

    def _failed(self, operation: Operation, exc: Exception) -> None:
        log.info("etcd %s failed: %s", operation.value, exc)
        self._feed(EtcdFailed(self._now(), operation, str(exc)))

    async def _grant(self, ttl: float) -> None:
        sent = self._now()
        try:
            lease = await self._etcd.grant(math.ceil(ttl))
        except CoordinatorError as exc:
            self._failed(Operation.GRANT, exc)
            return
        self.leases[lease.id] = lease
        self._feed(LeaseGranted(self._now(), sent, lease.id, lease.ttl))

    async def _keepalive(self, lease_id: int) -> None:
        lease = self.leases.get(lease_id)
        if lease is None:
            return
        sent = self._now()
        try:
            ttl = await self._etcd.keepalive(lease)
        except LeaseGone:
            ttl = None
        except CoordinatorError as exc:
            self._failed(Operation.KEEPALIVE, exc)
            return
        self._feed(KeepaliveAnswered(self._now(), sent, lease_id, ttl))

    async def _revoke(self, lease_id: int) -> None:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return
        try:
            await self._etcd.revoke(lease)
        except CoordinatorError as exc:
            log.info("etcd lease revoke failed (it expires by itself): %s", exc)

    async def _read_leader(self) -> None:
        try:
            read = await self._etcd.leader()
        except CoordinatorError as exc:
            self._failed(Operation.READ_LEADER, exc)
            return
        self._feed(LeaderObserved(self._now(), read.leader, read.revision))

    async def _read_sync(self) -> None:
        sent = self._now()
        try:
            read = await self._etcd.sync()
        except CoordinatorError as exc:
            self._failed(Operation.READ_SYNC, exc)
            return
        self._feed(SyncObserved(self._now(), sent, read.record, read.mod_revision))

    async def _campaign(self, member: str, lease_id: int) -> None:
        lease = self.leases.get(lease_id)
        if lease is None:
            return
        sent = self._now()
        try:
            epoch = await self._etcd.campaign(member, lease)
        except LeaseGone:
            result, epoch = CampaignResult.LEASE_GONE, None
        except CoordinatorError as exc:
            log.info("etcd campaign failed: %s", exc)
            result, epoch = CampaignResult.INDETERMINATE, None
        else:
            result = CampaignResult.WON if epoch is not None else CampaignResult.LOST
        self._feed(CampaignAnswered(self._now(), sent, lease_id, result, epoch))

    async def _record(self, action: RecordSync) -> None:
        try:
            revision = await self._etcd.record_sync(
                action.epoch, action.backup, expected=action.expected
            )
        except CoordinatorError as exc:
            log.info("etcd in-sync record failed: %s", exc)
            result, revision = RecordResult.FAILED, None
        else:
            result = RecordResult.OK if revision is not None else RecordResult.REFUSED
        if result is RecordResult.OK:
            log.info(
                "etcd records %s as the in-sync backup of epoch %d", action.backup, action.epoch
            )
        self._feed(RecordSyncAnswered(self._now(), action.epoch, action.backup, result, revision))

    async def _resign(self, epoch: int) -> None:
        try:
            await self._etcd.resign(epoch)
        except CoordinatorError as exc:
            log.info("etcd resign of epoch %d failed (the lease ends it): %s", epoch, exc)

    async def _register(self, action: Register) -> None:
        lease = self.leases.get(action.lease)
        if lease is None:
            return
        info = {**action.info, "address": "%s:%d" % self.address}
        try:
            await self._etcd.register(action.member, info, lease)
        except CoordinatorError as exc:
            log.info("etcd register failed: %s", exc)

    # -- background loops --------------------------------------------------------------------
    async def _watch(self) -> None:
        async with contextlib.aclosing(self._etcd.watch_leader()) as events:
            async for event in events:
                if isinstance(event, LeaderChanged):
                    self._feed(LeaderObserved(self._now(), event.leader, event.revision))
                else:
                    self._feed(EtcdFailed(self._now(), Operation.WATCH, event.reason))
