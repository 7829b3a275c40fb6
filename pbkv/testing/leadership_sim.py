"""Deterministic simulation of leadership: three members and the etcd model.

Each member runs the real :class:`pbkv.leadership.Leadership` against the etcd model
(``pbkv.testing.coordination``) through its own ``EtcdSession`` on virtual time:
requests cross a network that delays (sometimes past the time-out, so a write may
be applied after its caller gave up), loses them in a partition, and reorders
answers against the watch. One seed draws every delay and fault: crashes (a
restart is a new incarnation with an empty store), pauses longer than the lease
(a paused member runs nothing; what reaches it waits, and its clock has jumped
when it wakes), partitions between a member and etcd or between two members, etcd
outages, and clocks that drift a little.

The replication side is abstract: a member's store is a set of write ids. A
primary brings one follower of its epoch in sync after a delay while both run and
reach each other (a full transfer empties the follower first), then reports
``BackupInSync``; a write is applied on the primary and its in-sync backup and
acknowledged only when ``may_acknowledge`` allows it.

Checked, on the true virtual time (never on a member's belief):

- ``serve``: a member for which ``may_serve`` holds is the holder of the leader key
  at etcd, at its epoch, with its lease: so two members never serve at once;
- ``ack``: ``may_acknowledge(backup)`` holds only while etcd's in-sync record is
  ``(its epoch, backup)``;
- ``promotion``: a member becomes primary only as the recorded backup of the
  latest record (or with no record ever written), holding every acknowledged write;
- ``epoch``: a member never follows or leads at an epoch below one it was told of;
- ``stuck``: when nobody can be promoted, every running member says why.

``Bug`` replaces one rule of the machine with a broken one; each must be caught.
Run: ``python -m pbkv.testing.leadership_sim --seeds 500 [--bug NAME]``.
"""

from __future__ import annotations

import argparse
import enum
import heapq
import itertools
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pbkv.coordinator import Leader, LeaderRead, Lease, SyncRead, SyncRecord
from pbkv.leadership import (
    EMPTY,
    Action,
    BackupInSync,
    BackupLost,
    BecomeBackup,
    BecomePrimary,
    BecomeSpare,
    Campaign,
    CampaignAnswered,
    CampaignResult,
    CopyChanged,
    EtcdFailed,
    Event,
    Fence,
    GrantLease,
    Holding,
    KeepAlive,
    KeepaliveAnswered,
    LeaderObserved,
    Leadership,
    LeaseGranted,
    Operation,
    Phase,
    ReadLeader,
    ReadSync,
    RecordResult,
    RecordSync,
    RecordSyncAnswered,
    Register,
    Resign,
    RevokeLease,
    Started,
    StopFollowing,
    SyncObserved,
    Tick,
    Timing,
    member_name,
)
from pbkv.testing.coordination import (
    Answered,
    Coordination,
    EtcdModel,
    EtcdSession,
    ExpiryClock,
    Failed,
    LeaseNotFound,
    Reply,
)
from pbkv.testing.coordination import Event as EtcdEvent

ADDRESSES = ("m0:7000", "m1:7000", "m2:7000")
TIMING = Timing(ttl=2.0, margin=0.2, keepalive_interval=0.6, request_timeout=0.6, read_interval=1.0)
TICK = 0.1  # how often a member's driver ticks its machine
STEP = 0.05  # how often the replication side, the clients and the checks run
SYNC_DELAY = (0.1, 0.4)  # bringing a follower in sync
DRIFT = 0.002  # a member's clock runs at 1 +- this
SETTLE = 8.0  # fault-free time at the end (faults heal within 5 s), before the stuck check


# -- injected bugs -----------------------------------------------------------------------


class Bug(enum.Enum):
    LEASE_FROM_REPLY = "lease_from_reply"  # valid from the answer, no margin
    PROMOTE_ANYONE = "promote_anyone"  # the in-sync record is not consulted
    ACCEPT_LOWER_EPOCH = "accept_lower_epoch"  # stale leader news is believed
    ACK_BEFORE_RECORD = "ack_before_record"  # acknowledge with a backup not yet recorded
    RESIGN_ANY_LEADER = "resign_any_leader"  # any leader taken for a dead run of ours


class LeaseFromReply(Leadership):
    def _valid_until(self, sent: float, received: float, ttl: float) -> float:
        return received + ttl


class PromoteAnyone(Leadership):
    def _refusal(self, record: SyncRecord | None) -> str | None:
        return None


class AcceptLowerEpoch(Leadership):
    def _accepts_epoch(self, epoch: int) -> bool:
        return True

    def _is_stale(self, leader: Leader | None, revision: int) -> bool:
        return False


class AckBeforeRecord(Leadership):
    def _acknowledgeable(self, backup: str) -> bool:
        return backup == self.in_sync


class ResignAnyLeader(Leadership):
    def _earlier_incarnation(self, leader: Leader) -> bool:
        return leader.member != self.member


MACHINES: dict[Bug | None, type[Leadership]] = {
    None: Leadership,
    Bug.LEASE_FROM_REPLY: LeaseFromReply,
    Bug.PROMOTE_ANYONE: PromoteAnyone,
    Bug.ACCEPT_LOWER_EPOCH: AcceptLowerEpoch,
    Bug.ACK_BEFORE_RECORD: AckBeforeRecord,
    Bug.RESIGN_ANY_LEADER: ResignAnyLeader,
}


# -- a member's etcd calls on the model --------------------------------------------------


@dataclass
class EtcdCalls:
    """A member's etcd calls through its session to the model, as ``pbkv.member`` makes
    them on etcd: each answer (or failure, or time-out) goes back as the leadership's
    event, stamped with the member's ``clock``."""

    coordination: Coordination
    session: EtcdSession
    clock: Callable[[], float]
    feed: Callable[[Event], None]

    def carry_out(
        self, action: Action, on_record: Callable[[int | None], None] | None = None
    ) -> bool:
        """Send ``action`` if it is an etcd call (False: it is not). ``on_record`` hears
        of every in-sync record as applied at etcd (its revision, or None: refused)."""
        coord, session, clock, feed = self.coordination, self.session, self.clock, self.feed
        etcd = coord.etcd
        sent = clock()

        def failed(operation: Operation) -> Callable[[Reply[Any]], None]:
            def on_reply(reply: Reply[Any]) -> None:
                feed(EtcdFailed(clock(), operation))

            return on_reply

        if isinstance(action, GrantLease):

            def granted(reply: Reply[Lease]) -> None:
                if isinstance(reply, Answered):
                    lease = reply.value
                    feed(LeaseGranted(clock(), sent, lease.id, lease.ttl))
                else:
                    failed(Operation.GRANT)(reply)

            session.call(lambda now: coord.grant(now, action.ttl), granted)
        elif isinstance(action, KeepAlive):

            def kept(reply: Reply[float | None]) -> None:
                if isinstance(reply, Answered):
                    feed(KeepaliveAnswered(clock(), sent, action.lease, reply.value))
                else:
                    failed(Operation.KEEPALIVE)(reply)

            session.call(lambda now: etcd.keepalive(now, action.lease), kept)
        elif isinstance(action, RevokeLease):
            session.call(lambda now: etcd.revoke(now, action.lease), lambda _: None)
        elif isinstance(action, ReadLeader):

            def leader_read(reply: Reply[LeaderRead]) -> None:
                if isinstance(reply, Answered):
                    read = reply.value
                    feed(LeaderObserved(clock(), read.leader, read.revision))
                else:
                    failed(Operation.READ_LEADER)(reply)

            session.call(coord.leader, leader_read)
        elif isinstance(action, ReadSync):

            def sync_read(reply: Reply[SyncRead]) -> None:
                if isinstance(reply, Answered):
                    read = reply.value
                    feed(SyncObserved(clock(), sent, read.record, read.mod_revision))
                else:
                    failed(Operation.READ_SYNC)(reply)

            session.call(coord.sync, sync_read)
        elif isinstance(action, Campaign):
            lease = Lease(action.lease, TIMING.ttl)

            def campaigned(reply: Reply[int | None]) -> None:
                result, epoch = CampaignResult.INDETERMINATE, None
                if isinstance(reply, Answered):
                    epoch = reply.value
                    result = CampaignResult.LOST if epoch is None else CampaignResult.WON
                elif isinstance(reply, Failed) and isinstance(reply.error, LeaseNotFound):
                    result = CampaignResult.LEASE_GONE
                feed(CampaignAnswered(clock(), sent, action.lease, result, epoch))

            session.call(lambda now: coord.campaign(now, action.member, lease), campaigned)
        elif isinstance(action, RecordSync):

            def recorded(reply: Reply[int | None]) -> None:
                result, revision = RecordResult.FAILED, None
                if isinstance(reply, Answered):
                    revision = reply.value
                    result = RecordResult.REFUSED if revision is None else RecordResult.OK
                feed(RecordSyncAnswered(clock(), action.epoch, action.backup, result, revision))

            def record(now: float) -> int | None:
                done = coord.record_sync(now, action.epoch, action.backup, expected=action.expected)
                if on_record is not None:
                    on_record(done)
                return done

            session.call(record, recorded)
        elif isinstance(action, Resign):
            session.call(lambda now: coord.resign(now, action.epoch), lambda _: None)
        elif isinstance(action, Register):
            lease = Lease(action.lease, TIMING.ttl)

            def register(now: float) -> None:
                coord.register(now, action.member, action.info, lease)

            session.call(register, lambda _: None)
        else:
            return False
        return True


# -- the simulation ----------------------------------------------------------------------


class Violation(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass
class Stats:
    events: int = 0
    promotions: int = 0
    fences: int = 0
    acknowledged: int = 0
    reads: int = 0
    crashes: int = 0
    pauses: int = 0
    partitions: int = 0
    stuck: bool = False


@dataclass
class Member:
    slot: int
    address: str
    rate: float
    offset: float
    run: int = 0
    alive: bool = False
    paused_until: float = 0.0
    etcd_cut_until: float = 0.0
    name: str = ""
    machine: Leadership = field(default_factory=Leadership)
    session: EtcdSession | None = None
    data: set[int] = field(default_factory=set)
    holding: Holding = EMPTY
    # What the machine decided, as the replication side sees it.
    leads: int | None = None  # the epoch it is primary of
    follows: tuple[str, int] | None = None
    in_sync: Member | None = None  # as primary: the backup in sync with it
    syncing: bool = False
    told_epoch: int = 0  # the highest epoch any event delivered to it carried


class Simulation:
    def __init__(
        self,
        seed: int,
        bug: Bug | None = None,
        duration: float = 20.0,
        *,
        check_acks: bool = True,
    ) -> None:
        self.seed = seed
        self.bug = bug
        # Off: only the lost writes themselves show a premature acknowledgement.
        self.check_acks = check_acks
        self.duration = duration
        self.random = random.Random(seed)
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self.etcd = EtcdModel(min_ttl=TIMING.ttl)
        self.coordination = Coordination(self.etcd)
        self.expiry = ExpiryClock(self.etcd, self, interval=0.1)
        self.members = [
            Member(i, address, 1 + self.random.uniform(-DRIFT, DRIFT), self.random.uniform(0, 50))
            for i, address in enumerate(ADDRESSES)
        ]
        self.cut: set[frozenset[int]] = set()  # member pairs that cannot reach each other
        self.acknowledged: set[int] = set()
        self.next_write = 1
        self.record_ever = False
        self.stats = Stats()
        self.trace: list[str] = []

    # -- the scheduler (coordination.Scheduler) ---------------------------------------------
    def schedule(self, delay: float, event: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (self.now + delay, next(self._counter), event))

    def latency(self) -> float:
        if self.random.random() < 0.03:
            return self.random.uniform(0.2, 0.8)  # slow: sometimes past the time-out
        return self.random.uniform(0.001, 0.02)

    def local(self, member: Member) -> float:
        """The member's monotonic clock (drifting, and running while it is paused)."""
        return member.offset + member.rate * self.now

    def up(self, member: Member) -> bool:
        return member.alive and self.now >= member.paused_until

    def deliver_to(self, member: Member) -> Callable[[float, Callable[[], None]], None]:
        """Run an event at this incarnation of ``member``: dropped if it crashed
        meanwhile, held while it is paused (in the order it came)."""
        run = member.run

        def deliver(delay: float, event: Callable[[], None]) -> None:
            def arrive() -> None:
                if not member.alive or member.run != run:
                    return
                if self.now < member.paused_until:
                    self.schedule(member.paused_until - self.now, arrive)
                    return
                event()

            self.schedule(delay, arrive)

        return deliver

    # -- one member's driver ----------------------------------------------------------------
    def start(self, member: Member) -> None:
        member.run += 1
        member.alive = True
        member.name = member_name(member.address, str(member.run))
        member.machine = MACHINES[self.bug](TIMING)
        member.data, member.holding = set(), EMPTY
        member.leads = member.follows = member.in_sync = None
        member.syncing, member.told_epoch = False, 0
        member.session = EtcdSession(
            self.coordination,
            self,
            latency=self.latency,
            reachable=lambda: member.alive and self.now >= member.etcd_cut_until,
            timeout=TIMING.request_timeout,
            deliver=self.deliver_to(member),
        )
        self.open_watch(member, member.run)
        self.feed(member, Started(self.local(member), member.name, EMPTY))
        self.tick_loop(member)

    def starter(self, member: Member) -> Callable[[], None]:
        return lambda: self.start(member)

    def tick_loop(self, member: Member) -> None:
        def tick() -> None:
            self.feed(member, Tick(self.local(member)))
            deliver(TICK, tick)

        deliver = self.deliver_to(member)
        deliver(TICK, tick)

    def open_watch(self, member: Member, run: int) -> None:
        if not member.alive or member.run != run:
            return
        session = member.session
        assert session is not None

        def on_event(event: EtcdEvent) -> None:
            change = self.coordination.leader_change(event)
            self.feed(member, LeaderObserved(self.local(member), change.leader, change.revision))

        def on_lost() -> None:
            self.feed(member, EtcdFailed(self.local(member), Operation.WATCH, "watch lost"))
            self.deliver_to(member)(0.2, lambda: self.open_watch(member, run))

        stream = session.watch(self.coordination.leader_key, on_event, on_lost)
        if stream is None:
            self.deliver_to(member)(0.2, lambda: self.open_watch(member, run))
        else:
            self.carry_out(member, ReadLeader())  # what happened while it was closed

    def feed(self, member: Member, event: Event) -> None:
        self.stats.events += 1
        member.told_epoch = max(member.told_epoch, epoch_in(event))
        for action in member.machine.handle(event):
            self.carry_out(member, action)

    def carry_out(self, member: Member, action: Action) -> None:
        assert member.session is not None
        calls = EtcdCalls(
            self.coordination, member.session, lambda: self.local(member), self.feed_to(member)
        )
        if calls.carry_out(action, self.recorded):
            return
        if isinstance(action, StopFollowing):
            self.stop_following(member)
        elif isinstance(action, BecomePrimary):
            self.promoted(member, action.epoch)
        elif isinstance(action, BecomeBackup | BecomeSpare):
            self.check_epoch(member, action.epoch, type(action).__name__)
            self.stop_following(member)
            member.follows = (action.primary, action.epoch)
        elif isinstance(action, Fence):
            self.stats.fences += 1
            self.trace.append(f"{self.now:.3f} {member.name} fenced: {action.reason}")
            member.leads = None
            member.in_sync = None

    def feed_to(self, member: Member) -> Callable[[Event], None]:
        return lambda event: self.feed(member, event)

    def recorded(self, revision: int | None) -> None:
        self.record_ever = self.record_ever or revision is not None

    def stop_following(self, member: Member) -> None:
        member.follows = None

    # -- checks -----------------------------------------------------------------------------
    def check_epoch(self, member: Member, epoch: int, what: str) -> None:
        if epoch < member.told_epoch:
            raise Violation(
                "epoch",
                f"{member.name} {what} at epoch {epoch} after hearing of {member.told_epoch}",
            )

    def promoted(self, member: Member, epoch: int) -> None:
        self.check_epoch(member, epoch, "BecomePrimary")
        self.stats.promotions += 1
        self.trace.append(f"{self.now:.3f} {member.name} primary of epoch {epoch}")
        found = self.etcd.peek(self.now, self.coordination.sync_key)
        if found is None:
            if self.record_ever:
                raise Violation("promotion", f"{member.name} promoted with no record")
        else:
            backup = json.loads(found.value)["backup"]
            if backup != member.name:
                raise Violation(
                    "promotion", f"{member.name} promoted at {epoch}; the record names {backup}"
                )
        missing = self.acknowledged - member.data
        if missing:
            raise Violation(
                "promotion",
                f"{member.name} promoted at {epoch} without {len(missing)} acknowledged writes",
            )
        member.leads, member.follows, member.in_sync = epoch, None, None

    def check_instant(self) -> None:
        """The checks on the true time, for every running member."""
        serving: list[tuple[Member, int]] = []
        key = self.etcd.peek(self.now, self.coordination.leader_key)
        for member in self.members:
            if not self.up(member):
                continue
            machine, now = member.machine, self.local(member)
            if not machine.may_serve(now):
                continue
            epoch, lease = machine.epoch, machine.lease
            if key is None or (key.value, key.create_revision, key.lease) != (
                member.name,
                epoch,
                lease,
            ):
                held = None if key is None else (key.value, key.create_revision)
                raise Violation(
                    "serve", f"{member.name} may serve at epoch {epoch}; etcd's leader key: {held}"
                )
            serving.append((member, epoch or 0))
        if len({epoch for _, epoch in serving}) > 1:
            raise Violation("serve", f"two members serve at once: {serving}")

    def check_ack(self, primary: Member, backup: Member) -> None:
        found = self.etcd.peek(self.now, self.coordination.sync_key)
        record = None if found is None else json.loads(found.value)
        expected = {"epoch": primary.machine.epoch, "backup": backup.name}
        if record != expected:
            raise Violation(
                "ack", f"{primary.name} acknowledges with {backup.name}; etcd records {record}"
            )

    # -- the replication side and the clients ------------------------------------------------
    def connected(self, a: Member, b: Member) -> bool:
        return self.up(a) and self.up(b) and frozenset((a.slot, b.slot)) not in self.cut

    def follower_of(self, primary: Member, follower: Member) -> bool:
        return (
            follower is not primary
            and primary.leads is not None
            and follower.follows == (primary.name, primary.leads)
            and self.connected(primary, follower)
        )

    def replicate(self) -> None:
        for primary in self.members:
            if not self.up(primary) or primary.leads is None:
                continue
            backup = primary.in_sync
            if backup is not None and not (backup.alive and self.follower_of(primary, backup)):
                primary.in_sync = None
                self.feed(primary, BackupLost(self.local(primary), backup.name))
            if primary.in_sync is None and not primary.syncing:
                followers = [f for f in self.members if self.follower_of(primary, f)]
                if followers:
                    self.begin_sync(primary, self.random.choice(followers))

    def begin_sync(self, primary: Member, follower: Member) -> None:
        primary.syncing = True
        epoch, primary_run, follower_run = primary.leads, primary.run, follower.run
        if not follower.data <= primary.data:  # a full transfer replaces the follower's copy
            follower.data = set()
            self.feed(follower, CopyChanged(self.local(follower), EMPTY))

        def done() -> None:
            if primary.run == primary_run:
                primary.syncing = False
            if (
                primary.run != primary_run
                or follower.run != follower_run
                or primary.leads != epoch
                or epoch is None
                or not self.follower_of(primary, follower)
            ):
                return
            follower.data = set(primary.data)
            self.feed(follower, CopyChanged(self.local(follower), Holding(True, epoch)))
            primary.in_sync = follower
            self.feed(primary, BackupInSync(self.local(primary), follower.name))

        self.schedule(self.random.uniform(*SYNC_DELAY), done)

    def clients(self) -> None:
        for primary in self.members:
            if not self.up(primary):
                continue
            now = self.local(primary)
            if primary.machine.may_serve(now):
                self.stats.reads += 1
            backup = primary.in_sync
            if backup is None or not self.connected(primary, backup):
                continue
            if primary.machine.may_acknowledge(now, backup.name):
                if self.check_acks:
                    self.check_ack(primary, backup)
                write = self.next_write
                self.next_write += 1
                primary.data.add(write)
                backup.data.add(write)
                self.acknowledged.add(write)
                self.stats.acknowledged += 1

    def step(self) -> None:
        self.replicate()
        self.clients()
        self.check_instant()
        self.schedule(STEP, self.step)

    # -- faults ------------------------------------------------------------------------------
    def fault(self) -> None:
        if self.now >= self.duration:
            return  # the end: let everything heal
        member = self.random.choice(self.members)
        kind = self.random.choices(
            ["crash", "pause", "etcd_cut", "member_cut", "etcd_outage", "etcd_election"],
            weights=[2, 3, 3, 2, 1, 1],
        )[0]
        long = self.random.uniform(0.3, 2 * TIMING.ttl + 1.0)
        if kind == "crash" and member.alive:
            self.stats.crashes += 1
            member.alive = False
            assert member.session is not None
            member.session.link_down()
            self.schedule(self.random.uniform(0.1, 3.0), lambda: self.start(member))
        elif kind == "pause" and member.alive:
            self.stats.pauses += 1
            member.paused_until = max(member.paused_until, self.now + long)
        elif kind == "etcd_cut":
            self.stats.partitions += 1
            member.etcd_cut_until = max(member.etcd_cut_until, self.now + long)
            assert member.session is not None
            member.session.link_down()
        elif kind == "member_cut":
            self.stats.partitions += 1
            other = self.random.choice([m for m in self.members if m is not member])
            pair = frozenset((member.slot, other.slot))
            self.cut.add(pair)
            self.schedule(long, lambda: self.cut.discard(pair))
        elif kind == "etcd_outage" and self.etcd.available:
            self.etcd.outage(self.now)
            for each in self.members:
                if each.session is not None:
                    each.session.link_down()
            self.schedule(self.random.uniform(0.3, 3.0), lambda: self.etcd.recover(self.now))
        elif kind == "etcd_election":
            self.etcd.renew_all(self.now)
        self.schedule(self.random.uniform(0.3, 2.5), self.fault)

    # -- running -----------------------------------------------------------------------------
    def stuck(self) -> bool:
        """Nobody leads, nobody may ever be promoted (the recorded backup is gone),
        and every running member says why."""
        if any(m.leads is not None for m in self.members):
            return False
        found = self.etcd.peek(self.now, self.coordination.sync_key)
        if found is None:
            return False
        backup = json.loads(found.value)["backup"]
        if any(m.alive and m.name == backup for m in self.members):
            return False
        for member in self.members:
            if self.up(member) and member.machine.phase is Phase.FOLLOWER:
                why = member.machine.why_not_primary(self.local(member)) or ""
                if backup not in why and "no valid lease" not in why and "primary" not in why:
                    raise Violation("stuck", f"{member.name} gives no reason: {why!r}")
        return True

    def run(self) -> Stats:
        self.expiry.start()
        for member in self.members:
            self.schedule(self.random.uniform(0, 0.3), self.starter(member))
        self.schedule(0.5, self.step)
        self.schedule(self.random.uniform(1.0, 3.0), self.fault)
        # After the last fault, every fault heals (within 5 s) and the members settle.
        while self._queue and self._queue[0][0] <= self.duration + SETTLE:
            self.now, _, event = heapq.heappop(self._queue)
            self.etcd.advance(self.now)
            event()
        self.stats.stuck = self.stuck()
        return self.stats


def epoch_in(event: Event) -> int:
    """The highest epoch an event tells a member of."""
    if isinstance(event, LeaderObserved) and event.leader is not None:
        return event.leader.epoch
    if isinstance(event, SyncObserved) and event.record is not None:
        return event.record.epoch
    if isinstance(event, CampaignAnswered) and event.epoch is not None:
        return event.epoch
    return 0


@dataclass
class Outcome:
    seed: int
    violation: Violation | None
    stats: Stats
    trace: list[str]


def run_seed(
    seed: int, bug: Bug | None = None, duration: float = 20.0, *, check_acks: bool = True
) -> Outcome:
    simulation = Simulation(seed, bug, duration, check_acks=check_acks)
    try:
        stats = simulation.run()
    except Violation as violation:
        return Outcome(seed, violation, simulation.stats, simulation.trace)
    return Outcome(seed, None, stats, simulation.trace)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--bug", choices=[b.value for b in Bug])
    parser.add_argument("--duration", type=float, default=20.0)
    args = parser.parse_args(argv)
    bug = Bug(args.bug) if args.bug else None
    started = time.perf_counter()
    totals = Stats()
    bad = stuck = 0
    for seed in range(args.first, args.first + args.seeds):
        outcome = run_seed(seed, bug, args.duration)
        for name in ("events", "promotions", "fences", "acknowledged", "reads", "crashes"):
            setattr(totals, name, getattr(totals, name) + getattr(outcome.stats, name))
        stuck += outcome.stats.stuck
        if outcome.violation is not None:
            bad += 1
            print(f"seed {seed}: {outcome.violation}")
    elapsed = time.perf_counter() - started
    print(
        f"{args.seeds} seeds in {elapsed:.2f}s ({args.seeds / elapsed:.0f}/s): {bad} violations; "
        f"{totals.promotions} promotions, {totals.fences} fences, "
        f"{totals.acknowledged} acknowledged writes, {totals.events} events; "
        f"{stuck} seeds ended with nobody promotable"
    )
    return 1 if bad and bug is None else 0


if __name__ == "__main__":
    sys.exit(main())
