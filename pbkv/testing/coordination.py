"""A deterministic model of etcd for the simulation: leases and keys on virtual time.

``EtcdModel`` is the part of etcd's v3 API that pbkv's coordinator uses, as one
linearizable store with no I/O, no asyncio and no clock of its own: every
operation takes ``now`` (virtual seconds, never decreasing) and first expires the
leases whose deadline has passed.  ``Coordination`` builds the coordinator's
operations (leases, leadership, the in-sync record, members, the leader watch)
on the model's generic ``txn`` with the same comparisons as the real client, so a
simulation that runs the members against it exercises the same transactions.
``EtcdSession`` is one member's connection to it through a simulated network:
a request is answered after a delay, or lost; a write whose answer is lost may
still have been applied (indeterminate), as with a real etcd.  ``ExpiryClock``
runs expiries on the simulation's queue at their deadlines, so that watchers
hear of them on time.  For the simulation's checks (never for a member):
``peek``, ``history``, ``time_of(revision)`` and ``Coordination.tenures()``,
who held the leader key over which span of virtual time.

What is modelled, as etcd does it:

- revisions: global, starting at 1; every transaction that writes (a put, a
  delete, a revoked or expired lease that held keys) takes the next revision,
  and all its writes share it; reads and failed comparisons take none;
- keys: value, create revision (0 once deleted: a new put creates it again),
  mod revision, version, lease;
- leases: granted or kept alive at ``t`` with TTL ``T``, a lease expires at
  ``t + T`` exactly (alive while ``now < deadline``); its keys are deleted at
  expiry in one revision; a keepalive on a lease that is gone answers None,
  a put bound to it fails;
  TTLs below ``min_ttl`` are raised to it (etcd's default flags grant at least 2 s);
- ``txn(compares, success, failure)``: comparisons on value, version, create
  or mod revision and lease, with etcd's rule that a value comparison on a
  missing key fails and the others see zeros;
- watches on a key or a prefix, from the current revision or an earlier one
  (the whole history is kept): events in revision order, expiry deletes
  included, accumulated for ``events(watch_id)`` or passed to a callback.

Fault hooks, each a behaviour a correct etcd has (nothing here makes etcd itself
inconsistent; who reaches it is the simulation's business):

- ``outage(now)`` / ``recover(now)``: etcd loses its quorum or restarts.  Every
  request fails meanwhile and no lease expires (only an etcd leader revokes
  leases); on recovery every lease's deadline is renewed to a full TTL, as
  etcd's lessor does when a new leader takes over;
- ``renew_all(now)``: an election inside etcd without an outage (leases are
  extended the same way).  Both only make keys live longer than their holder
  can assume, never shorter.

Left out: etcd's own Raft (elections, log, followers: the model is the
linearizable result), compaction (every revision stays readable and
watchable), the lessor's checkpoint and its expiry lag (keys vanish exactly at
the deadline; a late expiry is ``renew_all``'s direction), authentication,
range limits and sorting, ``prev_kv`` options (a delete always reports what it
removed), multi-key range comparisons, nested transactions, and byte values
(values are text; the records here are JSON).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, Literal, Protocol, TypeVar

from pbkv.coordinator import (
    Leader,
    LeaderChanged,
    LeaderRead,
    Lease,
    MemberInfo,
    SyncRead,
    sync_record_from,
    sync_value,
)

T = TypeVar("T")

FIRST_REVISION = 1  # an empty etcd is at revision 1; the first write makes 2
DEFAULT_MIN_TTL = 2.0  # etcd's minimum lease TTL with its default election timeout


class EtcdError(Exception):
    """A request etcd answered with an error: nothing was applied."""


class LeaseNotFound(EtcdError):
    """The lease does not exist (never granted, revoked or expired)."""


class Unavailable(EtcdError):
    """etcd has no quorum (an outage): the request was not applied."""


# -- the key-value store ------------------------------------------------------------


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0  # 0: no lease


class EventType(Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class Event:
    """One change, as a watcher sees it.  A delete's ``kv`` carries the key and
    the deleting revision only (as etcd's does); ``prev_kv`` what it removed."""

    type: EventType
    kv: KeyValue
    prev_kv: KeyValue | None = None

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


class Target(Enum):
    VALUE = "value"
    VERSION = "version"
    CREATE = "create_revision"
    MOD = "mod_revision"
    LEASE = "lease"


Operator = Literal["==", "!=", "<", ">"]


@dataclass(frozen=True)
class Compare:
    key: str
    target: Target
    op: Operator
    operand: int | str

    def holds(self, found: KeyValue | None) -> bool:
        if found is None:
            if self.target is Target.VALUE:
                return False  # etcd: a value comparison on a missing key fails
            found = KeyValue(self.key, "", 0, 0, 0, 0)
        actual: int | str = getattr(found, self.target.value)
        if type(actual) is not type(self.operand):
            raise TypeError(f"comparing {self.target.value} with {self.operand!r}")
        if self.op == "==":
            return actual == self.operand
        if self.op == "!=":
            return actual != self.operand
        if self.op == "<":
            return actual < self.operand  # type: ignore[operator]  # same type, checked above
        return actual > self.operand  # type: ignore[operator]  # same type, checked above


@dataclass(frozen=True)
class Put:
    key: str
    value: str
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True)
class Get:
    key: str
    prefix: bool = False


Request = Put | Delete | Get


@dataclass(frozen=True)
class TxnResult:
    """``responses[i]`` answers the i-th request of the branch taken: a get's
    keys, a delete's removed keys, a put's previous key (if any)."""

    succeeded: bool
    revision: int  # the store's revision after the transaction
    responses: tuple[tuple[KeyValue, ...], ...]


@dataclass
class _Lease:
    id: int
    ttl: float
    deadline: float
    keys: set[str] = field(default_factory=set)


@dataclass
class _Watch:
    key: str
    prefix: bool
    callback: Callable[[Event], None] | None
    pending: list[Event] = field(default_factory=list)

    def matches(self, key: str) -> bool:
        return key.startswith(self.key) if self.prefix else key == self.key


class EtcdModel:
    """A linearizable etcd on virtual time; see the module's docstring."""

    def __init__(self, *, min_ttl: float = DEFAULT_MIN_TTL, first_lease_id: int = 0x1000) -> None:
        self.min_ttl = min_ttl
        self.now = 0.0
        self.revision = FIRST_REVISION
        self.available = True
        self._keys: dict[str, KeyValue] = {}
        self._leases: dict[int, _Lease] = {}
        self._next_lease_id = first_lease_id
        self._watches: dict[int, _Watch] = {}
        self._next_watch_id = 1
        # Every event ever, in order, and the virtual time of every revision.
        self.history: list[Event] = []
        self._revision_times: dict[int, float] = {FIRST_REVISION: 0.0}

    # -- time -------------------------------------------------------------------------
    def advance(self, now: float) -> None:
        """Move to ``now`` and expire every lease whose deadline has passed, in
        deadline order (each holding keys takes a revision, at its deadline)."""
        if now < self.now:
            raise ValueError(f"time goes back: {now} < {self.now}")
        if self.available:
            while True:
                due = [lease for lease in self._leases.values() if lease.deadline <= now]
                if not due:
                    break
                lease = min(due, key=lambda lease: (lease.deadline, lease.id))
                self.now = max(self.now, lease.deadline)
                self._revoke(lease)
        self.now = now

    def next_expiry(self) -> float | None:
        """When the next lease expires (the simulation calls ``advance`` then, so
        that watchers see the delete on time), or None."""
        if not self.available or not self._leases:
            return None
        return min(lease.deadline for lease in self._leases.values())

    def time_of(self, revision: int) -> float:
        """The virtual time at which ``revision`` was written."""
        return self._revision_times[revision]

    def _begin(self, now: float) -> None:
        self.advance(now)
        if not self.available:
            raise Unavailable("etcd has no quorum")

    # -- fault hooks --------------------------------------------------------------------
    def outage(self, now: float) -> None:
        """etcd stops answering (lost quorum, restart); leases stop expiring."""
        self.advance(now)
        self.available = False

    def recover(self, now: float) -> None:
        """etcd answers again; every lease gets a full TTL from ``now`` (even one
        whose deadline passed during the outage: nobody revoked it)."""
        self.advance(now)
        self.available = True
        self._extend(now)

    def renew_all(self, now: float) -> None:
        """A leader change inside etcd: every live lease gets a full TTL."""
        self.advance(now)
        self._extend(now)

    def _extend(self, now: float) -> None:
        for lease in self._leases.values():
            lease.deadline = max(lease.deadline, now + lease.ttl)

    # -- leases -------------------------------------------------------------------------
    def grant(self, now: float, ttl: float) -> tuple[int, float]:
        """A new lease: its id and the TTL granted."""
        self._begin(now)
        ttl = max(ttl, self.min_ttl)
        lease_id = self._next_lease_id
        self._next_lease_id += 1
        self._leases[lease_id] = _Lease(lease_id, ttl, now + ttl)
        return lease_id, ttl

    def keepalive(self, now: float, lease_id: int) -> float | None:
        """Renew the lease to a full TTL from ``now``; the TTL, or None once it is gone."""
        self._begin(now)
        lease = self._leases.get(lease_id)
        if lease is None:
            return None
        lease.deadline = now + lease.ttl
        return lease.ttl

    def time_to_live(self, now: float, lease_id: int) -> float | None:
        self._begin(now)
        lease = self._leases.get(lease_id)
        return None if lease is None else lease.deadline - now

    def revoke(self, now: float, lease_id: int) -> bool:
        """Revoke the lease and delete its keys; False if it was already gone."""
        self._begin(now)
        lease = self._leases.get(lease_id)
        if lease is None:
            return False
        self._revoke(lease)
        return True

    def _revoke(self, lease: _Lease) -> None:
        del self._leases[lease.id]
        if lease.keys:
            events = [self._delete_one(key) for key in sorted(lease.keys)]
            self._commit(events)

    # -- reads and writes -------------------------------------------------------------------
    def get(self, now: float, key: str) -> KeyValue | None:
        self._begin(now)
        return self._keys.get(key)

    def peek(self, now: float, key: str) -> KeyValue | None:
        """What etcd holds at ``now``, even during an outage: for the
        simulation's checks, never for a member (it would bypass the network)."""
        self.advance(now)
        return self._keys.get(key)

    def range(self, now: float, prefix: str) -> list[KeyValue]:
        self._begin(now)
        return self._range(prefix)

    def put(self, now: float, key: str, value: str, lease: int = 0) -> int:
        """Put and return the new revision."""
        return self.txn(now, [], [Put(key, value, lease)]).revision

    def delete(self, now: float, key: str, prefix: bool = False) -> int:
        """How many keys were deleted."""
        return len(self.txn(now, [], [Delete(key, prefix)]).responses[0])

    def txn(
        self,
        now: float,
        compares: Sequence[Compare],
        success: Sequence[Request],
        failure: Sequence[Request] = (),
    ) -> TxnResult:
        """etcd's transaction: if every comparison holds, ``success`` runs, else
        ``failure``; atomically, with one revision for all its writes.  A put on
        a lease that is gone fails the whole transaction (``LeaseNotFound``)."""
        self._begin(now)
        succeeded = all(compare.holds(self._keys.get(compare.key)) for compare in compares)
        requests = success if succeeded else failure
        written = [r.key for r in requests if isinstance(r, Put)]
        if len(set(written)) != len(written):
            raise EtcdError("duplicate key given in txn request")
        for request in requests:
            if isinstance(request, Put) and request.lease and request.lease not in self._leases:
                raise LeaseNotFound(f"lease {request.lease:x} not found")
        responses: list[tuple[KeyValue, ...]] = []
        events: list[Event] = []
        revision = self.revision + 1  # used only if something is written
        for request in requests:
            if isinstance(request, Get):
                responses.append(tuple(self._select(request.key, request.prefix)))
            elif isinstance(request, Put):
                previous = self._keys.get(request.key)
                responses.append(() if previous is None else (previous,))
                events.append(self._put_one(request, revision))
            else:
                selected = self._select(request.key, request.prefix)
                removed = [self._delete_one(kv.key, revision) for kv in selected]
                responses.append(tuple(e.prev_kv for e in removed if e.prev_kv is not None))
                events.extend(removed)
        if events:
            self._commit(events)
        return TxnResult(succeeded, self.revision, tuple(responses))

    def _range(self, prefix: str) -> list[KeyValue]:
        return [self._keys[key] for key in sorted(self._keys) if key.startswith(prefix)]

    def _select(self, key: str, prefix: bool) -> list[KeyValue]:
        if prefix:
            return self._range(key)
        found = self._keys.get(key)
        return [] if found is None else [found]

    def _put_one(self, request: Put, revision: int) -> Event:
        previous = self._keys.get(request.key)
        if previous is not None and previous.lease:
            self._leases[previous.lease].keys.discard(request.key)
        if request.lease:
            self._leases[request.lease].keys.add(request.key)
        kv = KeyValue(
            request.key,
            request.value,
            previous.create_revision if previous is not None else revision,
            revision,
            previous.version + 1 if previous is not None else 1,
            request.lease,
        )
        self._keys[request.key] = kv
        return Event(EventType.PUT, kv, previous)

    def _delete_one(self, key: str, revision: int | None = None) -> Event:
        revision = self.revision + 1 if revision is None else revision
        previous = self._keys.pop(key)
        if previous.lease and previous.lease in self._leases:
            self._leases[previous.lease].keys.discard(key)
        return Event(EventType.DELETE, KeyValue(key, "", 0, revision, 0, 0), previous)

    def _commit(self, events: list[Event]) -> None:
        self.revision += 1
        self._revision_times[self.revision] = self.now
        self.history.extend(events)
        for event in events:
            for watch in self._watches.values():
                if watch.matches(event.kv.key):
                    self._notify(watch, event)

    # -- watches ------------------------------------------------------------------------------
    def watch(
        self,
        now: float,
        key: str,
        *,
        prefix: bool = False,
        start_revision: int | None = None,
        callback: Callable[[Event], None] | None = None,
    ) -> int:
        """Watch a key (or a prefix) from ``start_revision`` (default: the next
        one).  Events go to ``callback`` as they happen (it must only record or
        schedule: it runs inside the model's operation) or wait for ``events``."""
        self._begin(now)
        watch_id = self._next_watch_id
        self._next_watch_id += 1
        watch = self._watches[watch_id] = _Watch(key, prefix, callback)
        if start_revision is not None:
            start = bisect.bisect_left(self.history, start_revision, key=lambda e: e.revision)
            for event in self.history[start:]:
                if watch.matches(event.kv.key):
                    self._notify(watch, event)
        return watch_id

    def events(self, watch_id: int) -> list[Event]:
        """The events a watch has accumulated since the last call."""
        watch = self._watches[watch_id]
        found, watch.pending = watch.pending, []
        return found

    def cancel(self, watch_id: int) -> None:
        self._watches.pop(watch_id, None)

    @staticmethod
    def _notify(watch: _Watch, event: Event) -> None:
        if watch.callback is not None:
            watch.callback(event)
        else:
            watch.pending.append(event)


# -- the coordinator's operations ---------------------------------------------------------
# The same names, meanings and values as pbkv's etcd client (pbkv.coordinator), each
# with ``now`` first.


@dataclass(frozen=True)
class Tenure:
    """One leader key's life, for the simulation's checks: from the revision
    (and time) that created it to the one that deleted it (None: still held)."""

    leader: Leader
    start: float
    end: float | None
    end_revision: int | None


class Coordination:
    """The coordinator's operations on an ``EtcdModel``, built on its ``txn``
    the way the real client builds them on etcd's."""

    def __init__(self, etcd: EtcdModel, prefix: str = "pbkv") -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.leader_key = f"{prefix}/leader"
        self.sync_key = f"{prefix}/sync"
        self.members_prefix = f"{prefix}/members/"

    # -- leases ---------------------------------------------------------------------
    def grant(self, now: float, ttl: float) -> Lease:
        lease_id, granted = self.etcd.grant(now, ttl)
        return Lease(lease_id, granted)

    def keepalive(self, now: float, lease: Lease) -> float | None:
        return self.etcd.keepalive(now, lease.id)

    def revoke(self, now: float, lease: Lease) -> None:
        self.etcd.revoke(now, lease.id)

    # -- leadership -------------------------------------------------------------------
    def campaign(self, now: float, member: str, lease: Lease) -> int | None:
        """Create the leader key bound to ``lease`` if nobody holds it: the epoch
        (its create revision), or None.  ``LeaseNotFound`` if the lease is gone.
        Asked again with the same lease after an answer was lost, it finds its
        own key and answers the same epoch."""
        result = self.etcd.txn(
            now,
            [Compare(self.leader_key, Target.CREATE, "==", 0)],
            [Put(self.leader_key, member, lease.id)],
            [Get(self.leader_key)],
        )
        if result.succeeded:
            return result.revision
        found = result.responses[0]
        if found and found[0].lease == lease.id and found[0].value == member:
            return found[0].create_revision
        return None

    def leader(self, now: float) -> LeaderRead:
        """The leader and the revision the read saw."""
        found = self.etcd.get(now, self.leader_key)
        leader = None if found is None else Leader(found.value, found.create_revision)
        return LeaderRead(leader, self.etcd.revision)

    def resign(self, now: float, epoch: int) -> bool:
        """Delete the leader key if it is still the one of ``epoch``."""
        return self.etcd.txn(
            now,
            [Compare(self.leader_key, Target.CREATE, "==", epoch)],
            [Delete(self.leader_key)],
        ).succeeded

    # -- the in-sync record ----------------------------------------------------------------
    def record_sync(
        self, now: float, epoch: int, backup: str | None, *, expected: int
    ) -> int | None:
        """Record ``backup`` as in sync under ``epoch``, only while the leader key
        is still the one of ``epoch`` and the record still at mod revision
        ``expected`` (0: absent): its new mod revision, or None when a guard
        fails.  A repeat of a write that landed answers its revision."""
        value = sync_value(epoch, backup)
        result = self.etcd.txn(
            now,
            [
                Compare(self.leader_key, Target.CREATE, "==", epoch),
                Compare(self.sync_key, Target.MOD, "==", expected),
            ],
            [Put(self.sync_key, json.dumps(value, sort_keys=True)), Get(self.sync_key)],
            [Get(self.leader_key), Get(self.sync_key)],
        )
        found = result.responses[-1]
        if not found:
            return None
        if result.succeeded:
            return found[0].mod_revision
        leader = result.responses[0]
        ours = bool(leader) and leader[0].create_revision == epoch
        if ours and json.loads(found[0].value) == value:
            return found[0].mod_revision
        return None

    def sync(self, now: float) -> SyncRead:
        """The in-sync record and the sync key's mod revision (0: absent)."""
        found = self.etcd.get(now, self.sync_key)
        if found is None:
            return SyncRead(None, 0)
        return SyncRead(sync_record_from(json.loads(found.value)), found.mod_revision)

    # -- members -------------------------------------------------------------------------------
    def register(self, now: float, member: str, info: dict[str, Any], lease: Lease) -> None:
        self.etcd.put(now, self.members_prefix + member, json.dumps(info, sort_keys=True), lease.id)

    def members(self, now: float) -> list[MemberInfo]:
        return [
            MemberInfo(kv.key[len(self.members_prefix) :], json.loads(kv.value), kv.lease)
            for kv in self.etcd.range(now, self.members_prefix)
        ]

    # -- the leader watch ------------------------------------------------------------------------
    def watch_leader(
        self,
        now: float,
        callback: Callable[[LeaderChanged], None] | None = None,
        start_revision: int | None = None,
    ) -> int:
        """Watch the leader key; changes go to ``callback`` or wait for ``leader_changes``."""
        forward: Callable[[Event], None] | None = None
        if callback is not None:
            change = callback

            def forward(event: Event) -> None:
                change(self.leader_change(event))

        return self.etcd.watch(
            now, self.leader_key, start_revision=start_revision, callback=forward
        )

    def leader_changes(self, watch_id: int) -> list[LeaderChanged]:
        return [self.leader_change(event) for event in self.etcd.events(watch_id)]

    @staticmethod
    def leader_change(event: Event) -> LeaderChanged:
        if event.type is EventType.PUT:
            return LeaderChanged(Leader(event.kv.value, event.kv.create_revision), event.revision)
        return LeaderChanged(None, event.revision)

    # -- for the simulation's checks ------------------------------------------------------------
    def tenures(self) -> list[Tenure]:
        """Every leader key's life so far, in order (from the model's history)."""
        found: list[Tenure] = []
        for event in self.etcd.history:
            if event.kv.key != self.leader_key:
                continue
            if event.type is EventType.PUT and event.prev_kv is None:
                leader = Leader(event.kv.value, event.kv.create_revision)
                found.append(Tenure(leader, self.etcd.time_of(event.revision), None, None))
            elif event.type is EventType.DELETE:
                last = found[-1]
                end = self.etcd.time_of(event.revision)
                found[-1] = Tenure(last.leader, last.start, end, event.revision)
        return found

    def leader_at(self, time: float) -> Leader | None:
        """Who held the leader key at virtual ``time`` (its value just after
        every write made at that time)."""
        for tenure in self.tenures():
            if tenure.start <= time and (tenure.end is None or time < tenure.end):
                return tenure.leader
        return None


# -- one member's connection through the simulated network ---------------------------------


class Scheduler(Protocol):
    """What the simulation offers: virtual time and a queue of events."""

    @property
    def now(self) -> float: ...

    def schedule(self, delay: float, event: Callable[[], None]) -> None: ...


@dataclass(frozen=True)
class Answered(Generic[T]):
    value: T


@dataclass(frozen=True)
class Failed:
    """etcd answered with an error: the request was not applied."""

    error: EtcdError


@dataclass(frozen=True)
class Indeterminate:
    """No answer within the time-out: the request may or may not have been applied."""


Reply = Answered[T] | Failed | Indeterminate


@dataclass(eq=False)  # compared and hashed by identity
class WatchStream:
    """A watch over the session's connection; events arrive in order, with delay."""

    session: EtcdSession
    on_event: Callable[[Event], None]
    on_lost: Callable[[], None]
    watch_id: int = 0
    last_arrival: float = 0.0
    last_revision: int = 0  # the last revision delivered: a new watch resumes after it
    open: bool = True

    def cancel(self) -> None:
        if self.open:
            self.open = False
            self.session.coordination.etcd.cancel(self.watch_id)
            self.session.streams.discard(self)

    def _forward(self, event: Event) -> None:
        session = self.session
        if not self.open:
            return
        if not session.reachable():
            self._break()
            return
        now = session.scheduler.now
        arrival = max(now + session.latency(), self.last_arrival)  # one stream keeps order
        self.last_arrival = arrival

        def arrive() -> None:
            if self.open:
                self.last_revision = event.revision
                self.on_event(event)

        session.deliver(arrival - now, arrive)

    def _break(self) -> None:
        """The connection is gone: the member notices after its time-out."""
        if self.open:
            self.cancel()
            self.session.deliver(self.session.timeout, self.on_lost)


class EtcdSession:
    """One member's client: each request crosses the network to the model and
    back, each way after ``latency()`` if ``reachable()`` then, else lost.  The
    member gets exactly one reply: the answer, or ``Indeterminate`` after
    ``timeout`` (a write whose answer was lost stays applied).  ``deliver``
    runs an event at the member (the simulation's, which drops events of a
    crashed process and defers those of a paused one); by default the scheduler's.
    """

    def __init__(
        self,
        coordination: Coordination,
        scheduler: Scheduler,
        *,
        latency: Callable[[], float],
        reachable: Callable[[], bool],
        timeout: float = 1.0,
        deliver: Callable[[float, Callable[[], None]], None] | None = None,
    ) -> None:
        self.coordination = coordination
        self.scheduler = scheduler
        self.latency = latency
        self.reachable = reachable
        self.timeout = timeout
        self.deliver = deliver if deliver is not None else scheduler.schedule
        self.streams: set[WatchStream] = set()

    def call(self, operation: Callable[[float], T], on_reply: Callable[[Reply[T]], None]) -> None:
        """Send ``operation`` (run at etcd with the virtual time it arrives at)."""
        replied = False

        def reply(answer: Reply[T]) -> None:
            nonlocal replied
            if not replied:
                replied = True
                on_reply(answer)

        def at_etcd() -> None:
            if not self.reachable():
                return  # lost on the way
            answer: Reply[T]
            try:
                answer = Answered(operation(self.scheduler.now))
            except EtcdError as error:
                answer = Failed(error)
            if self.reachable():  # else the answer is lost: the member times out
                self.deliver(self.latency(), lambda: reply(answer))

        if self.reachable():
            self.scheduler.schedule(self.latency(), at_etcd)
        self.deliver(self.timeout, lambda: reply(Indeterminate()))

    def watch(
        self,
        key: str,
        on_event: Callable[[Event], None],
        on_lost: Callable[[], None],
        *,
        prefix: bool = False,
        start_revision: int | None = None,
    ) -> WatchStream | None:
        """Open a watch now (None if etcd cannot be reached: try again later).
        Opening is immediate, a simplification: events still cross the network."""
        stream = WatchStream(self, on_event, on_lost)
        if not self.reachable():
            return None
        try:
            stream.watch_id = self.coordination.etcd.watch(
                self.scheduler.now,
                key,
                prefix=prefix,
                start_revision=start_revision,
                callback=stream._forward,
            )
        except Unavailable:
            return None
        self.streams.add(stream)
        return stream

    def link_down(self) -> None:
        """The simulation cut this member off: its watches break (noticed after
        the time-out, as a real client notices by its keepalive pings)."""
        for stream in list(self.streams):
            stream._break()


class ExpiryClock:
    """Runs the model's lease expiries on the simulation's queue, each at its
    deadline (not at the next request), so that watchers hear of it on time.
    It wakes at the next deadline or after ``interval``, whichever is first, so
    a lease granted meanwhile is caught exactly if its TTL is at least that."""

    def __init__(self, etcd: EtcdModel, scheduler: Scheduler, interval: float = 0.1) -> None:
        self.etcd = etcd
        self.scheduler = scheduler
        self.interval = interval
        self.running = False

    def start(self) -> None:
        if not self.running:
            self.running = True
            self._tick()

    def stop(self) -> None:
        self.running = False

    def _tick(self) -> None:
        if not self.running:
            return
        now = self.scheduler.now
        self.etcd.advance(now)
        deadline = self.etcd.next_expiry()
        wake = self.interval if deadline is None else min(deadline - now, self.interval)
        self.scheduler.schedule(max(wake, 0.0), self._tick)
