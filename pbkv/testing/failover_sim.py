"""Deterministic simulation of failover: three members, the etcd model, the real cores.

Each member runs what a ``pbkv serve --member`` process runs, on virtual time: the
real :class:`pbkv.leadership.Leadership`, fed and gated through the real
:class:`pbkv.membership.Membership` (as ``pbkv.member`` does), against the etcd
model (``pbkv.testing.coordination``) through its own session; and the real
replication cores around one store, switched with ``pbkv.roles`` as
``pbkv.node`` switches them (promoted, fenced, following, no longer following),
the primary's core acknowledging only with the leadership's leave. Channels
between members are ``pbkv.testing.link``'s. Clients send get, insert, update and
delete to whichever member they believe is primary (a refusal names the primary,
if the member knows it) and record each call and answer on the true virtual time.

One seed draws every delay and fault: crashes (a restart is a new incarnation
with an empty store), pauses longer than the lease (a paused member runs
nothing; its clock has jumped when it wakes), partitions between any two of the
three members and etcd, slow messages (past the etcd request time-out, too), and
clocks that drift a little. Then faults stop, everything heals, and the run
waits for a primary in sync with a backup again (unless nobody may ever be
promoted: the recorded backup is gone, and every member says why).

Checked:

- the history is linearizable (a write answered "replication failed" or not at
  all may or may not have happened; a refused one did not), and, when the
  cluster is in sync again, ends in the primary's content, which its backup's
  equals: so no acknowledged write was lost;
- on the true time, at once: a member lets a client in only while etcd's leader
  key is its own, at its epoch, with its lease (``serve``); the primary's core
  acknowledges a write only while etcd records that backup under its epoch
  (``ack``); a member becomes primary only as the recorded backup, or with no
  record ever written (``promotion``); a member never leads or follows an epoch
  below one it was told of (``epoch``).

``Bug`` (``pbkv.testing.leadership_sim``'s) replaces one rule of the leadership
with a broken one; each must be caught. Run:
``python -m pbkv.testing.failover_sim --seeds 100 [--bug NAME] [--seed N --verbose]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pbkv.backup import BackupCore
from pbkv.commands import Command, Done, KeyReused, Outcome, Refused, ReplicationFailed
from pbkv.leadership import (
    Action,
    BecomeBackup,
    BecomePrimary,
    BecomeSpare,
    EtcdFailed,
    Event,
    Fence,
    LeaderObserved,
    Leadership,
    Operation,
    Phase,
    ReadLeader,
    StopFollowing,
    Tick,
    address_of,
    member_name,
)
from pbkv.membership import Membership, parse_address
from pbkv.primary import PrimaryCore
from pbkv.roles import demoted, promoted
from pbkv.stages import Stage
from pbkv.store import make_store
from pbkv.testing import linearizability
from pbkv.testing.coordination import (
    Answered,
    Coordination,
    EtcdModel,
    EtcdSession,
    ExpiryClock,
    Reply,
)
from pbkv.testing.coordination import Event as EtcdEvent
from pbkv.testing.leadership_sim import MACHINES, TIMING, Bug, EtcdCalls, epoch_in
from pbkv.testing.link import Network, Process
from pbkv.testing.sim import COMMANDS, KEYS, sim_settings

__all__ = ["Bug", "Outcome", "Simulation", "Stats", "Violation", "main", "run_seed"]

ADDRESSES = ("m0:7000", "m1:7000", "m2:7000")
ETCD = -1  # etcd's place in a partition (the members are 0, 1, 2)
DRIFT = 0.002  # a member's clock runs at 1 +- this
CLIENTS = 4
CLIENT_TIMEOUT = 3.0  # a request unanswered this long is given up: indeterminate
# Half the clients send writes with an Idempotency-Key and retry them until this long
# after the call (long enough to ride out a failover).
KEYED_DEADLINE = 12.0
SETTLE = 40.0  # after the faults: how long the cluster may take to be in sync again
DRAIN = 4.0  # then: answers still on their way arrive
FAULTS = ("crash", "pause", "etcd_cut", "member_cut", "slow")
FAULT_WEIGHTS = (2, 3, 3, 3, 1)


@dataclass
class _KeyedWrite:
    """Where one keyed write's attempts stand."""

    attempt: int = 0
    done: bool = False
    maybe: bool = False  # an attempt was lost or rewound: it may have been applied
    backoff: float = 0.05


class Violation(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass
class Stats:
    promotions: int = 0
    fences: int = 0
    acknowledged: int = 0  # writes answered with success
    reads: int = 0  # gets answered
    refused: int = 0  # requests a member turned away (not primary, or not accepting)
    indeterminate: int = 0
    crashes: int = 0
    pauses: int = 0
    partitions: int = 0
    stuck: bool = False  # nobody may be promoted at the end
    converged: bool = False  # a primary in sync with a backup at the end


class Member(Process):
    """One member process: its leadership and whichever core holds its store."""

    def __init__(self, sim: Simulation, slot: int, rate: float, offset: float) -> None:
        super().__init__(sim)
        self.sim = sim
        self.slot = slot
        self.address = ADDRESSES[slot]
        self.rate, self.offset = rate, offset
        self.run = 0
        self.name = ""
        self.leadership = Leadership(TIMING)
        self.membership = Membership(self.leadership, "", self.carry_out)
        self.session: EtcdSession | None = None
        self.registered: list[str] = []  # the members etcd lists (the primary's choice)
        self.told_epoch = 0  # the highest epoch any event delivered to it carried
        self._wakeups = itertools.count()
        self._wakeup = 0

    @property
    def label(self) -> str:
        return self.name or self.address

    def clock(self) -> float:
        """Its monotonic clock: drifting, and running on while it is paused."""
        return self.offset + self.rate * self.sim.now

    # -- lifecycle (pbkv.node.Node and pbkv.member.Member starting) ---------------------------
    def start(self) -> None:
        sim = self.sim
        self.run += 1
        self.name = member_name(self.address, str(self.run))
        self.leadership = MACHINES[sim.bug](TIMING)
        self.membership = Membership(self.leadership, self.name, self.carry_out)
        self.registered, self.told_epoch = [], 0
        settings = sim.settings
        store = make_store(settings.store, settings.shards)
        core = self.core = BackupCore(
            settings, store, self.clock(), random.Random(sim.rng.getrandbits(64))
        )
        core.member = self.name
        self.reset_driver()
        self.session = EtcdSession(
            sim.coordination,
            sim,
            latency=sim.latency,
            reachable=functools.partial(self.reaches_etcd, self.life),
            timeout=TIMING.request_timeout,
            deliver=self.deliver,
        )
        sim.trace(f"{self.name} starts")
        core.start(self.clock())
        self.drain()
        self.open_watch()
        self.feed(self.membership.started(self.clock(), core))
        self.refresh_members(once=False)

    def reaches_etcd(self, life: int) -> bool:
        return self.alive and self.life == life and self.sim.reachable_ids(self.slot, ETCD)

    def crash(self) -> None:
        session = self.session
        super().crash()
        if session is not None:
            session.link_down()

    # -- feeding the leadership (pbkv.member.Member) ---------------------------------------
    def feed(self, event: Event) -> None:
        self.told_epoch = max(self.told_epoch, epoch_in(event))
        if not self.membership.feed(event):
            return
        self.flush_if_authorised()
        self.schedule_wakeup()

    def schedule_wakeup(self) -> None:
        if self.leadership.stopped:
            return
        number = self._wakeup = next(self._wakeups)
        delay = min(TIMING.read_interval, self.leadership.next_wakeup() - self.clock())

        def wake() -> None:
            if self._wakeup == number:
                self.tick()

        self.deliver(max(0.0, delay) / self.rate, wake)

    def tick(self) -> None:
        for event in self.membership.copy_events(self.running, self.clock()):
            self.feed(event)
        self.feed(Tick(self.clock()))

    def open_watch(self) -> None:
        session = self.session
        assert session is not None
        sim = self.sim

        def on_event(event: EtcdEvent) -> None:
            change = sim.coordination.leader_change(event)
            self.feed(LeaderObserved(self.clock(), change.leader, change.revision))

        def on_lost() -> None:
            self.feed(EtcdFailed(self.clock(), Operation.WATCH, "watch lost"))
            self.deliver(0.2, self.open_watch)

        stream = session.watch(sim.coordination.leader_key, on_event, on_lost)
        if stream is None:
            self.deliver(0.2, self.open_watch)
        else:
            self.carry_out(ReadLeader())  # what happened while it was closed

    def refresh_members(self, once: bool) -> None:
        """Who is registered, every read interval (and once after a nudge or a win)."""
        session = self.session
        assert session is not None

        def listed(reply: Reply[list[str]]) -> None:
            if isinstance(reply, Answered):
                self.registered = reply.value
                core = self.core
                if once and isinstance(core, PrimaryCore) and not core.channel_up:
                    core.backup_listening(self.clock())
                    core.drain(self)
            if not once:
                self.deliver(TIMING.read_interval, lambda: self.refresh_members(False))

        coordination = self.sim.coordination
        session.call(lambda now: [m.member for m in coordination.members(now)], listed)

    # -- the leadership's actions (pbkv.member.Member._carry_out) ------------------------------
    def carry_out(self, action: Action) -> None:
        sim = self.sim
        assert self.session is not None
        calls = EtcdCalls(sim.coordination, self.session, self.clock, self.feed)
        if calls.carry_out(action, sim.recorded):
            return
        if isinstance(action, BecomePrimary):
            sim.check_promotion(self, action.epoch)
            self.membership.role_changed()
            self.become_primary(action.epoch)
            self.refresh_members(once=True)
        elif isinstance(action, Fence):
            sim.stats.fences += 1
            sim.trace(f"{self.name} fenced: {action.reason}")
            self.membership.role_changed()
            self.fence(action.reason)
        elif isinstance(action, BecomeBackup | BecomeSpare):
            sim.check_epoch(self, action.epoch, type(action).__name__)
            self.follow(action.primary, action.epoch)
        elif isinstance(action, StopFollowing):
            self.stop_following(action.epoch)

    def authority(self, now: float, backup: str) -> bool:
        allowed = self.membership.authority(now, backup)
        if allowed:
            self.sim.check_ack(self, backup)
        return allowed

    # -- roles (pbkv.node.Node) -----------------------------------------------------------------
    def switch_core(self, new: PrimaryCore | BackupCore) -> None:
        self.running.drain(self)
        self.timers.clear()
        for candidate in list(self.candidates):
            self.close_candidate(candidate, "the role changed")
        self.close_channel("the role changed")
        self.core = new
        if isinstance(new, PrimaryCore):
            self.sim.primary_cores.append(new)
        new.start(self.clock())
        new.drain(self)

    def become_primary(self, epoch: int) -> None:
        core, now = self.running, self.clock()
        if isinstance(core, PrimaryCore):
            core.serve_epoch(now, epoch)
            core.drain(self)
            return
        primary = promoted(core, now, epoch)
        primary.authority = self.authority
        self.switch_core(primary)

    def fence(self, reason: str) -> None:
        core = self.core
        if isinstance(core, PrimaryCore):
            self.switch_core(demoted(core, self.clock(), f"fenced: {reason}"))

    def follow(self, primary: str, epoch: int) -> None:
        address = address_of(primary)
        if isinstance(self.core, PrimaryCore):
            self.fence(f"following {address} at epoch {epoch}")
        core = self.backup
        core.epoch_observed(self.clock(), epoch)
        core.primary_address = address
        core.drain(self)
        if address != self.address and not core.channel_up:
            self.sim.nudge(self, address)

    def stop_following(self, epoch: int) -> None:
        core = self.running
        core.epoch_observed(self.clock(), epoch + 1)
        core.drain(self)

    def flush_if_authorised(self) -> None:
        core = self.core
        if isinstance(core, PrimaryCore) and core.queued[0].entries:
            core.flush(self.clock())
            core.drain(self)

    def backup_listening(self) -> None:
        """A nudge arrived (``Node.backup_listening``)."""
        core = self.core
        if isinstance(core, PrimaryCore):
            self.refresh_members(once=True)
            core.backup_listening(self.clock())
            core.drain(self)

    # -- actions.Driver --------------------------------------------------------------------------
    def connect(self) -> None:
        core = self.primary
        target = self.membership.choose_backup(parse_address(self.address), self.registered)
        if target is None:
            core.channel_failed(self.clock(), "no other member is registered yet")
            core.drain(self)
            return
        listener = self.sim.member_at("%s:%d" % target)
        self.sim.open_channel(
            self, listener, next(self.sim.channel_ids), core.settings.peer_timeout
        )

    def probe(self) -> None:
        raise AssertionError("a member's backup starts waiting, it never probes")

    def sync_changed(self) -> None:
        for event in self.membership.replication_events(self.running, self.clock()):
            self.feed(event)

    def flush(self) -> None:
        core = self.core
        if isinstance(core, PrimaryCore):  # the role may have changed since it was asked
            core.flush(self.clock())

    # -- clients (pbkv.node.Node.read / submit) ---------------------------------------------------
    def request(
        self,
        command: Command,
        key: str,
        value: str | None,
        answer: Callable[[Outcome], None],
        ident: str | None = None,
    ) -> None:
        core, now = self.running, self.clock()
        if not self.membership.may_serve(now):
            status = self.leadership.status(now)
            primary = None if status.primary is None else address_of(status.primary)
            answer(Refused(core.stage, self.leadership.role.value, primary=primary))
            return
        self.sim.check_serving(self)
        if command.is_read:
            answer(core.read(command, key))
            return
        if ident is not None:
            core.now = now  # the table's time, as the node stamps it
        outcome = core.submit(command, key, value, answer, ident)
        if outcome is not None:
            answer(outcome)


class Simulation(Network):
    """One seeded run: members, etcd, clients, faults, then the checks."""

    def __init__(
        self,
        seed: int,
        bug: Bug | None = None,
        duration: float = 15.0,
        *,
        faults: bool = True,
        checks: bool = True,
        trace: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(random.Random(seed))
        self.seed, self.bug, self.duration = seed, bug, duration
        self.faults_enabled = faults
        # Off: only the history (and the final content) shows what a bug costs.
        self.checks = checks
        self._trace = trace
        settings = sim_settings(self.rng.choice(("sharded", "hash")), self.rng.choice((1, 2, 3)))
        # A member's backup starts waiting for whoever leads (as pbkv.node starts a member).
        self.settings = dataclasses.replace(
            settings, backup_initial_stage=Stage.BOOTSTRAPPING_PRIMARY.value
        )
        self.etcd = EtcdModel(min_ttl=TIMING.ttl)
        self.coordination = Coordination(self.etcd)
        self.expiry = ExpiryClock(self.etcd, self, interval=0.1)
        self.members = [
            Member(self, slot, 1 + self.rng.uniform(-DRIFT, DRIFT), self.rng.uniform(0, 50))
            for slot in range(len(ADDRESSES))
        ]
        self.cuts: dict[frozenset[int], int] = {}  # pairs that cannot reach each other
        self.slow_until = 0.0
        self.channel_ids = itertools.count(1)
        self.record_ever = False
        self.beliefs = [self.rng.randrange(len(ADDRESSES)) for _ in range(CLIENTS)]
        self.operations: list[linearizability.Operation] = []
        # Every core that served as primary: their ACKs that found the backup's copy not
        # theirs after a batch are counted as a violation (never, when the cores are right).
        self.primary_cores: list[PrimaryCore] = []
        self.stats = Stats()
        self.fault_log: list[str] = []
        self._values = itertools.count()

    # -- the network ----------------------------------------------------------------------------
    def before_event(self) -> None:
        self.etcd.advance(self.now)

    def faulty(self) -> bool:
        return self.faults_enabled and self.now < self.duration

    def latency(self) -> float:
        if self.faulty() and (self.now < self.slow_until or self.rng.random() < 0.02):
            return self.rng.uniform(0.2, 0.9)  # slow: past the etcd time-out, sometimes
        return self.rng.uniform(0.0005, 0.005)

    def reachable_ids(self, a: int, b: int) -> bool:
        return not self.cuts.get(frozenset((a, b)))

    def reachable(self, a: Process, b: Process) -> bool:
        assert isinstance(a, Member) and isinstance(b, Member)
        return self.reachable_ids(a.slot, b.slot)

    def trace(self, text: str) -> None:
        if self._trace is not None:
            self._trace(f"[{self.now:9.4f}] {text}")

    def member_at(self, address: str) -> Member:
        return self.members[ADDRESSES.index(address)]

    def nudge(self, member: Member, address: str) -> None:
        """``member`` tells the primary at ``address`` that it listens (if it reaches it)."""
        target = self.member_at(address)
        if target.alive and self.reachable(member, target):
            target.deliver(self.latency(), target.backup_listening)

    def recorded(self, revision: int | None) -> None:
        self.record_ever = self.record_ever or revision is not None

    # -- checks on the true time -----------------------------------------------------------------
    def check_serving(self, member: Member) -> None:
        if not self.checks:
            return
        leadership = member.leadership
        key = self.etcd.peek(self.now, self.coordination.leader_key)
        held = None if key is None else (key.value, key.create_revision, key.lease)
        if held != (member.name, leadership.epoch, leadership.lease):
            raise Violation(
                "serve", f"{member.name} serves at epoch {leadership.epoch}; etcd's leader: {held}"
            )

    def check_ack(self, member: Member, backup: str) -> None:
        if not self.checks:
            return
        found = self.etcd.peek(self.now, self.coordination.sync_key)
        record = None if found is None else json.loads(found.value)
        expected = {"epoch": member.leadership.epoch, "backup": backup}
        if record != expected:
            raise Violation(
                "ack", f"{member.name} acknowledges with {backup}; etcd records {record}"
            )

    def check_epoch(self, member: Member, epoch: int, what: str) -> None:
        if not self.checks:
            return
        if epoch < member.told_epoch:
            raise Violation(
                "epoch",
                f"{member.name} {what} at epoch {epoch} after hearing of {member.told_epoch}",
            )

    def check_promotion(self, member: Member, epoch: int) -> None:
        self.check_epoch(member, epoch, "BecomePrimary")
        self.stats.promotions += 1
        self.trace(f"{member.name} primary of epoch {epoch}")
        if not self.checks:
            return
        found = self.etcd.peek(self.now, self.coordination.sync_key)
        if found is None:
            if self.record_ever:
                raise Violation("promotion", f"{member.name} promoted at {epoch} with no record")
            return
        backup = json.loads(found.value)["backup"]
        if backup != member.name:
            raise Violation(
                "promotion", f"{member.name} promoted at {epoch}; the record names {backup}"
            )

    # -- clients --------------------------------------------------------------------------------
    def client_loop(self, client: int) -> None:
        if self.now >= self.duration:
            return
        kind = self.rng.choice(("get", "get", "insert", "update", "delete"))
        command, key = COMMANDS[kind], self.rng.choice(KEYS)
        value = f"v{next(self._values)}" if kind in ("insert", "update") else None
        if client % 2 == 0 and kind != "get":
            self.keyed_write(client, kind, key, value)
            return
        call = self.now
        member = self.members[self.beliefs[client]]
        done = False

        def finish(ok: bool | None, output: str | None, record: bool = True) -> None:
            nonlocal done
            if done:
                return
            done = True
            if ok is None and kind == "get":
                record = False  # a read that got no answer observed nothing
            if record:
                ret = self.now if ok is not None else None
                self.operations.append(
                    linearizability.Operation(client, kind, key, value, call, ret, ok, output)
                )
                if ok is None:
                    self.stats.indeterminate += 1
                elif kind == "get":
                    self.stats.reads += 1
                elif ok:
                    self.stats.acknowledged += 1
            self.schedule(self.rng.uniform(0.001, 0.05), lambda: self.client_loop(client))

        def elsewhere() -> None:
            self.beliefs[client] = self.rng.randrange(len(ADDRESSES))

        def refused(primary: str | None) -> None:
            self.stats.refused += 1
            if primary in ADDRESSES:
                self.beliefs[client] = ADDRESSES.index(primary)
            elif primary is None:
                elsewhere()
            finish(None, None, record=False)  # applied nowhere, observed nothing

        def answer(outcome: Outcome) -> None:
            delay = self.latency()
            if isinstance(outcome, Done):
                self.schedule(delay, lambda: finish(outcome.ok, outcome.value))
            elif isinstance(outcome, Refused):
                self.schedule(delay, lambda: refused(outcome.primary))
            elif isinstance(outcome, ReplicationFailed):
                self.schedule(delay, lambda: finish(None, None))
            else:
                raise AssertionError(f"unexpected outcome {outcome!r}")

        def timed_out() -> None:
            if not done:
                elsewhere()
                finish(None, None)

        if member.alive:
            member.deliver(self.latency(), lambda: member.request(command, key, value, answer))
        else:  # connection refused: it never happened
            self.schedule(self.latency(), lambda: refused(None))
        self.schedule(CLIENT_TIMEOUT, timed_out)

    def keyed_write(self, client: int, kind: str, key: str, value: str | None) -> None:
        """A write with an Idempotency-Key, retried as the Python clients retry it:
        after a refusal (at the primary it names), "replication failed" or no answer
        (elsewhere), with back-off, until ``KEYED_DEADLINE``, across failovers. All
        its attempts are one operation: applied at most once, whatever the retries."""
        command = COMMANDS[kind]
        ident = f"c{client}.{next(self._values)}"
        call = self.now
        state = _KeyedWrite()

        def finish(ok: bool | None, output: str | None, record: bool) -> None:
            state.done = True
            if record:
                ret = self.now if ok is not None else None
                self.operations.append(
                    linearizability.Operation(client, kind, key, value, call, ret, ok, output)
                )
                if ok is None:
                    self.stats.indeterminate += 1
                elif ok:
                    self.stats.acknowledged += 1
            self.schedule(self.rng.uniform(0.001, 0.05), lambda: self.client_loop(client))

        def attempt() -> None:
            state.attempt += 1
            number = state.attempt
            member = self.members[self.beliefs[client]]

            def answer(outcome: Outcome) -> None:
                self.schedule(self.latency(), lambda: ended(number, outcome))

            if member.alive:
                member.deliver(
                    self.latency(),
                    lambda: member.request(command, key, value, answer, ident),
                )
            else:  # connection refused: this attempt never happened
                self.schedule(self.latency(), lambda: ended(number, Refused(Stage.COLD_START, "")))
            self.schedule(CLIENT_TIMEOUT, lambda: ended(number, None))

        def ended(number: int, outcome: Outcome | None) -> None:
            if state.done or number != state.attempt:
                return  # a later attempt is under way: its answer counts
            if isinstance(outcome, Done):
                finish(outcome.ok, outcome.value, record=True)
                return
            if isinstance(outcome, KeyReused):
                raise Violation("idempotency", f"{ident}: its own retry refused as another write")
            if isinstance(outcome, Refused):
                self.stats.refused += 1
                if outcome.primary in ADDRESSES:
                    self.beliefs[client] = ADDRESSES.index(outcome.primary)
                else:
                    self.beliefs[client] = self.rng.randrange(len(ADDRESSES))
            else:  # "replication failed" or no answer: it may have been applied
                state.maybe = True
                if outcome is None:
                    self.beliefs[client] = self.rng.randrange(len(ADDRESSES))
            delay = state.backoff * self.rng.uniform(0.5, 1.0)
            state.backoff = min(1.0, 2 * state.backoff)
            if self.now + delay > call + KEYED_DEADLINE or self.now >= self.duration:
                # Given up: indeterminate, or nothing if no attempt may have applied.
                finish(None, None, record=state.maybe)
                return
            self.schedule(delay, attempt)

        attempt()

    # -- faults -----------------------------------------------------------------------------------
    def fault(self, text: str) -> None:
        self.fault_log.append(f"{self.now:.3f} {text}")
        self.trace(f"nemesis: {text}")

    def nemesis(self) -> None:
        if self.now >= self.duration:
            return
        member = self.rng.choice(self.members)
        kind = self.rng.choices(FAULTS, FAULT_WEIGHTS)[0]
        long = self.rng.uniform(0.3, 2 * TIMING.ttl + 1.0)
        if kind == "crash" and all(m.alive for m in self.members):  # one down at a time
            self.stats.crashes += 1
            self.fault(f"crash {member.name}")
            member.crash()
            self.schedule(self.rng.uniform(0.1, 3.0), lambda: self.restart(member))
        elif kind == "pause" and member.alive and not member.paused:
            self.stats.pauses += 1
            self.fault(f"pause {member.name} for {long:.2f}s")
            member.pause()
            self.schedule(long, lambda: self.resume(member))
        elif kind in ("etcd_cut", "member_cut"):
            self.stats.partitions += 1
            if kind == "etcd_cut":
                other, name = ETCD, "etcd"
            else:
                peer = self.rng.choice([m for m in self.members if m is not member])
                other, name = peer.slot, peer.address
            pair = frozenset((member.slot, other))
            self.fault(f"cut {member.address} from {name} for {long:.2f}s")
            self.cuts[pair] = self.cuts.get(pair, 0) + 1
            if other == ETCD and member.session is not None:
                member.session.link_down()
            self.schedule(long, lambda: self.mend(pair))
        elif kind == "slow":
            self.fault("slow network")
            self.slow_until = self.now + self.rng.uniform(0.5, 2.0)
        self.schedule(self.rng.uniform(0.3, 2.0), self.nemesis)

    def restart(self, member: Member) -> None:
        if not member.alive:
            self.fault(f"restart {member.address}")
            member.start()

    def resume(self, member: Member) -> None:
        if member.paused:
            self.fault(f"resume {member.name}")
            member.resume()

    def mend(self, pair: frozenset[int]) -> None:
        left = self.cuts.get(pair, 0) - 1
        if left > 0:
            self.cuts[pair] = left
        else:
            self.cuts.pop(pair, None)

    def heal(self) -> None:
        self.cuts.clear()
        self.slow_until = 0.0
        for member in self.members:
            self.resume(member)
            self.restart(member)

    # -- the end ----------------------------------------------------------------------------------
    def in_sync_pair(self) -> tuple[Member, Member] | None:
        """A primary that may acknowledge with its backup, both running and in sync."""
        for member in self.members:
            core = member.core
            if member.paused or not isinstance(core, PrimaryCore):
                continue
            backup_name = core.in_sync_backup
            if backup_name is None or not member.leadership.may_acknowledge(
                member.clock(), backup_name
            ):
                continue
            for backup in self.members:
                if (
                    backup.name == backup_name
                    and backup.alive
                    and not backup.paused
                    and backup.running.stage is Stage.IN_SYNC
                ):
                    return member, backup
        return None

    def stuck(self) -> bool:
        """Nobody leads and nobody may ever be promoted: the recorded backup is gone."""
        if any(m.alive and m.leadership.phase is Phase.PRIMARY for m in self.members):
            return False
        found = self.etcd.peek(self.now, self.coordination.sync_key)
        if found is None:
            return False
        backup = json.loads(found.value)["backup"]
        return not any(m.alive and m.name == backup for m in self.members)

    def settled(self) -> bool:
        return self.in_sync_pair() is not None or self.stuck()

    def run(self) -> Stats:
        self.expiry.start()
        for member in self.members:
            self.schedule(self.rng.uniform(0, 0.3), member.start)
        for client in range(CLIENTS):
            self.schedule(self.rng.uniform(1.0, 2.0), functools.partial(self.client_loop, client))
        if self.faults_enabled:
            self.schedule(self.rng.uniform(1.0, 3.0), self.nemesis)
        self.run_until(self.duration)
        self.heal()
        self.run_until(self.duration + SETTLE, self.settled)
        self.run_until(self.now + DRAIN)  # answers on their way arrive
        self.run_until(self.now + SETTLE, self.settled)
        pair = self.in_sync_pair()
        self.stats.converged = pair is not None
        self.stats.stuck = pair is None and self.stuck()
        final: dict[str, str] | None = None
        if pair is not None:
            primary, backup = pair
            final = dict(primary.running.store.items())
            copy = dict(backup.running.store.items())
            if final != copy:
                raise Violation("copies", f"primary {final} and backup {copy} differ in sync")
        elif self.stuck():
            backup = json.loads(self.coordination_sync_value())["backup"]
            for member in self.members:
                why = member.leadership.why_not_primary(member.clock()) or ""
                if backup not in why and "primary" not in why:
                    raise Violation("stuck", f"{member.name} gives no reason: {why!r}")
        else:
            states = {
                m.label: (m.leadership.phase.value, m.core.stage.value if m.core else "down")
                for m in self.members
            }
            raise Violation("liveness", f"no primary in sync with a backup again: {states}")
        diverged = sum(core.backup_diverged for core in self.primary_cores)
        if diverged:
            raise Violation("divergence", f"{diverged} ACKs found the backup's copy not ours")
        verdict = linearizability.check(self.operations, final=final, timeout=20.0)
        if verdict.ok is False:
            raise Violation("linearizability", verdict.explanation)
        return self.stats

    def coordination_sync_value(self) -> str:
        found = self.etcd.peek(self.now, self.coordination.sync_key)
        assert found is not None
        return found.value


@dataclass
class RunOutcome:
    seed: int
    violation: Violation | None
    stats: Stats
    faults: list[str] = field(default_factory=list)

    def replay_command(self, bug: Bug | None = None) -> str:
        option = "" if bug is None else f" --bug {bug.value}"
        return f"python -m pbkv.testing.failover_sim --seed {self.seed}{option} --verbose"


def run_seed(
    seed: int,
    bug: Bug | None = None,
    duration: float = 15.0,
    *,
    faults: bool = True,
    checks: bool = True,
    trace: Callable[[str], None] | None = None,
) -> RunOutcome:
    simulation = Simulation(seed, bug, duration, faults=faults, checks=checks, trace=trace)
    try:
        stats = simulation.run()
    except Violation as violation:
        return RunOutcome(seed, violation, simulation.stats, simulation.fault_log)
    return RunOutcome(seed, None, stats, simulation.fault_log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seed", type=int, help="run this one seed")
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run")
    parser.add_argument("--first", type=int, default=0, help="first seed of the range")
    parser.add_argument("--bug", choices=[b.value for b in Bug])
    parser.add_argument("--duration", type=float, default=15.0, help="simulated seconds of load")
    parser.add_argument("--verbose", action="store_true", help="print the trace and the logs")
    parser.add_argument(
        "--history-only",
        action="store_true",
        help="no direct checks on etcd's facts: only the history shows a bug",
    )
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    else:
        logging.getLogger("pbkv").setLevel(logging.ERROR)
    bug = Bug(args.bug) if args.bug else None
    seeds = [args.seed] if args.seed is not None else range(args.first, args.first + args.seeds)
    started = time.perf_counter()
    totals = Stats()
    bad = stuck = 0
    for seed in seeds:
        trace = print if args.verbose else None
        outcome = run_seed(seed, bug, args.duration, checks=not args.history_only, trace=trace)
        for name in ("promotions", "fences", "acknowledged", "reads", "indeterminate"):
            setattr(totals, name, getattr(totals, name) + getattr(outcome.stats, name))
        stuck += outcome.stats.stuck
        if outcome.violation is not None:
            bad += 1
            print(f"seed {seed}: {outcome.violation}")
            print(f"  faults: {'; '.join(outcome.faults)}")
            print(f"  replay: {outcome.replay_command(bug)}")
    elapsed = time.perf_counter() - started
    print(
        f"{len(seeds)} seeds in {elapsed:.1f}s: {bad} violations; {totals.promotions} "
        f"promotions, {totals.fences} fences, {totals.acknowledged} acknowledged writes, "
        f"{totals.reads} reads, {totals.indeterminate} indeterminate writes; "
        f"{stuck} seeds ended with nobody promotable",
        file=sys.stderr,
    )
    return 1 if bad and bug is None else 0


if __name__ == "__main__":
    sys.exit(main())
