"""Leadership: which role one member plays, from what etcd says and its own clock.

A pure state machine (no I/O, no clock, no asyncio), as the replication cores are:
the driver turns etcd's answers, the leader watch, the replication side's news and
timer ticks into events, each carrying ``now`` on the member's monotonic clock, and
carries out the actions it gets back (etcd calls, role decisions). The replication
core asks two questions of it before it answers a client: :meth:`Leadership.may_serve`
and :meth:`Leadership.may_acknowledge`. Everything that decides who is primary lives
in this file; etcd itself (``pbkv.coordinator``) only stores the facts.

Facts in etcd (see ``pbkv.coordinator``): the leader key, bound to its holder's lease,
whose create revision is the **epoch**; the in-sync record ``(epoch, backup)``,
written only by the holder of the leader key of that epoch. A member's name is its
*incarnation*, the address plus a run id drawn at start (:func:`member_name`): a
member that restarted is a new member, even at the same address.

The rules
---------

**(a) Who may become primary** (:func:`campaign_refusal`, the only judge):

=====================================  =========================================
in-sync record                         who may campaign and be promoted
=====================================  =========================================
none at all (a brand-new cluster)      anyone: nothing was ever acknowledged
names no backup                        nobody (never written by pbkv; defensive)
names backup B under epoch E           only B, with a confirmed copy of epoch >= E
=====================================  =========================================

As in 6.824's viewservice, the new primary must have been the last backup. The
record is checked twice: before campaigning (to spare useless campaigns) and, the
one that counts, *after winning*, on a read sent after the win: only the holder of
the leader key may write the record, so once our key exists the record is frozen
until we write it, and that read sees exactly the record as of our win. A member
that won but may not be primary resigns at once and never serves. This also closes
the race of a brand-new cluster: a member that saw "no record" long ago and wins
after someone else's whole tenure finds that tenure's record and resigns.

**(b) Winning.** A member campaigns only after :class:`StopFollowing` (it applies
no more frames of the old epoch), then, with the record confirmed, it emits
:class:`BecomePrimary`: its copy is the primary's in place.

**(c) The in-sync record.** When the replication side reports a backup in sync
(:class:`BackupInSync`), the primary records it under its epoch and acknowledges
no write that backup acknowledged until etcd confirmed the record. Each write is
guarded by the primary's own leader key and is a compare-and-swap on the record's
mod revision: it expects the revision the primary last knew (from the read that
confirmed its win, then from each confirmed write). While a record is on its way,
etcd's record is unknown (it may already name the new backup, or still the old
one), so ``may_acknowledge`` is false for every backup. A record whose answer was
lost (a time-out) may still land at etcd at any later moment, but only while the
record is still at the revision it expected; the primary retries with that same
revision, for whichever backup is in sync by then, so of all these writes at most
one ever lands, and once one is confirmed no other can (a repeat of the one that
landed is answered as a success). A refused record means our key is gone, or an
earlier write of ours with a lost answer landed first: either way the primary
steps down (fence and resign), and whichever backup etcd names holds every
acknowledged write, since nothing is acknowledged while a record is unknown.
When its backup is lost, the primary does **not** record "no backup": the record
keeps naming the last member that held every acknowledged write. A promoted
primary likewise leaves its predecessor's record (which names itself) until it
has a backup: it acknowledges nothing without one, so its own copy is the only
one that holds every acknowledged write, and the record already says so. Writing
"no backup" there would let the next failover promote someone with less (or,
read as a new cluster, anyone at all).

**(d) Fencing.** The primary may serve while ``now < sent + ttl - margin``, ``sent``
being when the last keepalive (or grant) that succeeded was *sent*: etcd restarted
the TTL when it received it, later than that, so the key outlives the belief, and
``margin`` absorbs the drift of our clock against etcd's. It fences
(:class:`Fence`) as soon as that passes (on any event), and at once when it sees
its key gone, another leader or a higher epoch, a refused record, or its lease
gone. A fenced member keeps its data and rejoins as a backup or spare of the
next primary; the replication handshake decides whether the data is replaced.

**(e) etcd unreachable.** Nothing changes but the clock: the primary goes on
serving reads, and acknowledging the writes its recorded backup acknowledged,
while its lease is certainly valid, then fences. Safe because nobody can be
promoted without etcd (a campaign is an etcd transaction), and etcd keeps our key
at least until the lease deadline it holds, which is after ours (an etcd outage or
leader change only lengthens leases). A backup keeps its data and its role; no
member campaigns on a stale view, since a campaign is itself an etcd call.

**(f) Nobody to promote.** If the leader key is gone and the recorded backup is gone
too (crashed: a restart is a new incarnation), nobody may campaign: no
acknowledged write is risked. :meth:`Leadership.status` gives every member's
``why_not_primary``, naming the member that alone could be promoted.

**Epochs.** A leader seen with a lower revision than one already seen, or an epoch
lower than the highest seen (in a leader or a record), is stale and ignored: a
member never follows, nor accepts frames from, an older epoch
(:meth:`Leadership.accepts`).

Timing follows Patroni's ``loop_wait + 2 * retry_timeout <= ttl``: a keepalive every
``keepalive_interval``, each etcd call bounded by ``request_timeout``, and
``keepalive_interval + 2 * request_timeout + margin <= ttl``, so one lost
keepalive still leaves time for another before the primary must fence.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pbkv.coordinator import Leader, SyncRecord

__all__ = [
    "Action",
    "BackupInSync",
    "BackupLost",
    "BecomeBackup",
    "BecomePrimary",
    "BecomeSpare",
    "Campaign",
    "CampaignAnswered",
    "CampaignResult",
    "CopyChanged",
    "EMPTY",
    "EtcdFailed",
    "Event",
    "Fence",
    "GrantLease",
    "Holding",
    "KeepAlive",
    "KeepaliveAnswered",
    "LeaderObserved",
    "Leadership",
    "LeaseGranted",
    "Operation",
    "Phase",
    "ReadLeader",
    "ReadSync",
    "RecordResult",
    "RecordSync",
    "RecordSyncAnswered",
    "Register",
    "Resign",
    "RevokeLease",
    "Role",
    "Started",
    "Status",
    "Stop",
    "StopFollowing",
    "SyncObserved",
    "Tick",
    "Timing",
    "address_of",
    "campaign_refusal",
    "lease_valid_until",
    "member_name",
]

RUN_SEPARATOR = "#"


def member_name(address: str, run: str) -> str:
    """A member's name: its address and the run id of this process (an incarnation)."""
    return f"{address}{RUN_SEPARATOR}{run}"


def address_of(member: str) -> str:
    """The address part of a member's name (clients connect there)."""
    return member.rsplit(RUN_SEPARATOR, 1)[0]


# Reasons ``why_not_primary`` gives on the way to leading, not against it.
NO_LEASE_YET = "no lease yet"
LEASE_NOT_CONFIRMED = "the lease is not confirmed yet"
CAMPAIGNING = "campaigning"
_ON_THE_WAY = frozenset({NO_LEASE_YET, LEASE_NOT_CONFIRMED, CAMPAIGNING})


# -- settings and facts ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timing:
    ttl: float = 3.0  # the lease asked of etcd (it may grant more; validity uses what it granted)
    margin: float = 0.3  # subtracted from every validity: our clock's drift against etcd's
    keepalive_interval: float = 0.9
    request_timeout: float = 0.9  # every etcd call answers or fails within this
    read_interval: float = 1.0  # how often the leader (and record) are read afresh

    def __post_init__(self) -> None:
        if self.margin <= 0 or self.keepalive_interval <= 0 or self.request_timeout <= 0:
            raise ValueError("margin, keepalive_interval and request_timeout must be positive")
        # Patroni's rule, with the margin: a keepalive that fails leaves time for one more.
        if self.keepalive_interval + 2 * self.request_timeout + self.margin > self.ttl + 1e-9:
            raise ValueError("need keepalive_interval + 2 * request_timeout + margin <= ttl")

    @classmethod
    def for_ttl(cls, ttl: float) -> Timing:
        margin = ttl / 10
        third = (ttl - margin) / 3
        return cls(ttl, margin, third, third, third)

    @property
    def retry_delay(self) -> float:
        """How soon a failed grant, keepalive or record is tried again."""
        return self.keepalive_interval / 4


@dataclass(frozen=True, slots=True)
class Holding:
    """What this member's store holds, as the replication side describes it."""

    confirmed: bool = False  # a complete copy, verified with its primary
    epoch: int = 0  # the epoch of the primary it was last in sync with (or led)
    history: int = 0
    seq: int = 0


EMPTY = Holding()


def lease_valid_until(sent: float, ttl: float, margin: float) -> float:
    """Until when a lease granted or kept alive by a request *sent* at ``sent`` is
    certainly alive at etcd: etcd started its TTL when the request arrived, later."""
    return sent + ttl - margin


def campaign_refusal(member: str, holding: Holding, record: SyncRecord | None) -> str | None:
    """Why ``member`` may not become primary under ``record`` (None: it may); rule (a)."""
    if record is None:
        return None  # a brand-new cluster: no write was ever acknowledged
    if record.backup is None:
        return f"the primary of epoch {record.epoch} recorded no in-sync backup"
    if record.backup != member:
        return (
            f"only {record.backup}, the in-sync backup recorded under epoch "
            f"{record.epoch}, may be promoted"
        )
    if not holding.confirmed:
        return "this member is the recorded backup, but its copy is incomplete"
    if holding.epoch < record.epoch:
        return (
            f"this member is the recorded backup, but its copy is of epoch "
            f"{holding.epoch}, older than the record's {record.epoch}"
        )
    return None


# -- events ----------------------------------------------------------------------------------


class Operation(enum.StrEnum):
    GRANT = "grant"
    KEEPALIVE = "keepalive"
    READ_LEADER = "read_leader"
    READ_SYNC = "read_sync"
    WATCH = "watch"
    RESIGN = "resign"
    REGISTER = "register"


class CampaignResult(enum.Enum):
    WON = "won"
    LOST = "lost"  # the key existed (perhaps our own, from an earlier campaign)
    LEASE_GONE = "lease_gone"
    INDETERMINATE = "indeterminate"  # failed or timed out: may have been applied


class RecordResult(enum.Enum):
    OK = "ok"
    REFUSED = "refused"  # our leader key is gone
    FAILED = "failed"  # failed or timed out: may have been applied


@dataclass(frozen=True, slots=True)
class Started:
    now: float
    member: str  # member_name(address, run)
    holding: Holding = EMPTY


@dataclass(frozen=True, slots=True)
class LeaseGranted:
    now: float
    sent: float  # when the grant request was sent
    lease: int
    ttl: float


@dataclass(frozen=True, slots=True)
class KeepaliveAnswered:
    now: float
    sent: float  # when the keepalive was sent
    lease: int
    ttl: float | None  # None: the lease is gone


@dataclass(frozen=True, slots=True)
class EtcdFailed:
    """A call (or the watch) failed or timed out: etcd may be unreachable."""

    now: float
    operation: Operation
    reason: str = ""


@dataclass(frozen=True, slots=True)
class LeaderObserved:
    """The leader key as of etcd revision ``revision`` (a watch event or a read)."""

    now: float
    leader: Leader | None
    revision: int


@dataclass(frozen=True, slots=True)
class SyncObserved:
    now: float
    sent: float  # when the read was sent
    record: SyncRecord | None
    mod_revision: int  # the sync key's (0: absent), what the next record expects


@dataclass(frozen=True, slots=True)
class CampaignAnswered:
    now: float
    sent: float
    lease: int
    result: CampaignResult
    epoch: int | None = None  # with WON


@dataclass(frozen=True, slots=True)
class RecordSyncAnswered:
    now: float
    epoch: int
    backup: str
    result: RecordResult
    mod_revision: int | None = None  # with OK: the record's new mod revision


@dataclass(frozen=True, slots=True)
class BackupInSync:
    """The replication side: ``backup`` is in sync with this primary."""

    now: float
    backup: str


@dataclass(frozen=True, slots=True)
class BackupLost:
    now: float
    backup: str


@dataclass(frozen=True, slots=True)
class CopyChanged:
    """The replication side: this member's store now holds ``holding``."""

    now: float
    holding: Holding


@dataclass(frozen=True, slots=True)
class Tick:
    now: float


@dataclass(frozen=True, slots=True)
class Stop:
    """A graceful stop: hand over at once rather than after the lease."""

    now: float


Event = (
    Started
    | LeaseGranted
    | KeepaliveAnswered
    | EtcdFailed
    | LeaderObserved
    | SyncObserved
    | CampaignAnswered
    | RecordSyncAnswered
    | BackupInSync
    | BackupLost
    | CopyChanged
    | Tick
    | Stop
)


# -- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GrantLease:
    ttl: float


@dataclass(frozen=True, slots=True)
class KeepAlive:
    lease: int


@dataclass(frozen=True, slots=True)
class RevokeLease:
    lease: int


@dataclass(frozen=True, slots=True)
class ReadLeader:
    """Read the leader key (answer: LeaderObserved with the read's revision)."""


@dataclass(frozen=True, slots=True)
class ReadSync:
    """Read the in-sync record (answer: SyncObserved with the send time)."""


@dataclass(frozen=True, slots=True)
class Campaign:
    member: str
    lease: int


@dataclass(frozen=True, slots=True)
class RecordSync:
    """Record ``backup`` under ``epoch`` if the record is still at ``expected``."""

    epoch: int
    backup: str
    expected: int  # the sync key's mod revision as last known


@dataclass(frozen=True, slots=True)
class Resign:
    epoch: int


@dataclass(frozen=True, slots=True)
class Register:
    member: str
    lease: int
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StopFollowing:
    """Apply no more frames of ``epoch`` or older (before a campaign)."""

    epoch: int


@dataclass(frozen=True, slots=True)
class BecomePrimary:
    epoch: int


@dataclass(frozen=True, slots=True)
class BecomeBackup:
    """Follow ``primary``: this member is its recorded in-sync backup."""

    primary: str
    epoch: int


@dataclass(frozen=True, slots=True)
class BecomeSpare:
    """Follow ``primary`` (it may bring us in sync and record us)."""

    primary: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Fence:
    """Stop serving reads and writes now: our authority may have ended."""

    reason: str


Action = (
    GrantLease
    | KeepAlive
    | RevokeLease
    | ReadLeader
    | ReadSync
    | Campaign
    | RecordSync
    | Resign
    | Register
    | StopFollowing
    | BecomePrimary
    | BecomeBackup
    | BecomeSpare
    | Fence
)


# -- the machine -----------------------------------------------------------------------------


class Role(enum.StrEnum):
    PRIMARY = "primary"
    BACKUP = "backup"
    SPARE = "spare"


class Phase(enum.Enum):
    NOT_STARTED = "not_started"
    FOLLOWER = "follower"  # any member that is not primary
    CONFIRMING = "confirming"  # won the leader key; reading the record before serving
    PRIMARY = "primary"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Status:
    member: str
    role: Role
    epoch: int | None  # ours as primary, or the primary's we follow
    primary: str | None
    lease_left: float
    why_not_primary: str | None
    in_sync: str | None
    recorded: str | None
    etcd_reachable: bool


@dataclass
class _Attempt:
    """Campaigns with one lease whose outcome is not settled: a key of ours with an
    epoch above ``floor`` (the highest known when the first was sent) is theirs."""

    lease: int
    floor: int


@dataclass
class _Outstanding:
    grant: bool = False
    keepalive: bool = False
    read_leader: bool = False
    sync_reads: int = 0
    campaign: bool = False


class Leadership:
    """One member's leadership; feed :meth:`handle` events, carry out the actions."""

    def __init__(self, timing: Timing | None = None) -> None:
        self.timing = timing or Timing()
        self.member = ""
        self.phase = Phase.NOT_STARTED
        self.holding = EMPTY
        # The lease.
        self.lease: int | None = None
        self.lease_ttl = 0.0
        self.valid_until = -math.inf
        self.next_keepalive = math.inf
        self.next_grant = 0.0
        # What etcd said.
        self.leader: Leader | None = None
        self.leader_known = False
        self.leader_revision = 0
        self.highest_epoch = 0
        self.record: SyncRecord | None = None
        self.record_known = False
        self.record_sent = -math.inf  # when the read behind ``record`` was sent
        self.record_revision = 0  # the sync key's mod revision as of ``record``
        self.next_read = 0.0
        self.etcd_reachable = True
        # Leading.
        self.epoch: int | None = None  # while CONFIRMING or PRIMARY
        self.confirm_since = 0.0
        self.attempt: _Attempt | None = None
        self.resigning: int | None = None
        self.in_sync: str | None = None  # the backup the replication side has in sync
        self.recorded: str | None = None  # etcd's record is known to be (epoch, recorded)
        self.record_inflight: str | None = None
        self.next_record = 0.0
        # Following.
        self.role = Role.SPARE
        self.following: tuple[Role, str, int] | None = None
        self.outstanding = _Outstanding()
        self.registered: dict[str, Any] | None = None
        self._handlers: dict[type[Any], Callable[[Any, list[Action]], None]] = {
            Started: self._started,
            LeaseGranted: self._lease_granted,
            KeepaliveAnswered: self._keepalive_answered,
            EtcdFailed: self._etcd_failed,
            LeaderObserved: self._leader_observed,
            SyncObserved: self._sync_observed,
            CampaignAnswered: self._campaign_answered,
            RecordSyncAnswered: self._record_answered,
            BackupInSync: self._backup_in_sync,
            BackupLost: self._backup_lost,
            CopyChanged: self._copy_changed,
            Tick: self._tick,
            Stop: self._stop,
        }

    # -- rules a simulation may replace to prove its checks catch their breach --------------
    def _valid_until(self, sent: float, received: float, ttl: float) -> float:
        return lease_valid_until(sent, ttl, self.timing.margin)

    def _refusal(self, record: SyncRecord | None) -> str | None:
        return campaign_refusal(self.member, self.holding, record)

    def _accepts_epoch(self, epoch: int) -> bool:
        return epoch >= self.highest_epoch

    def _is_stale(self, leader: Leader | None, revision: int) -> bool:
        if revision < self.leader_revision:
            return True
        return leader is not None and not self._accepts_epoch(leader.epoch)

    def _acknowledgeable(self, backup: str) -> bool:
        return backup == self.in_sync and backup == self.recorded

    # -- queries ---------------------------------------------------------------------------
    @property
    def stopped(self) -> bool:
        return self.phase is Phase.STOPPED

    def may_serve(self, now: float) -> bool:
        """Whether this member may answer reads (and writes) as primary now."""
        return self.phase is Phase.PRIMARY and now < self.valid_until

    def may_acknowledge(self, now: float, backup: str) -> bool:
        """Whether a write ``backup`` acknowledged may be acknowledged to the client."""
        return self.may_serve(now) and self._acknowledgeable(backup)

    def accepts(self, primary: str, epoch: int) -> bool:
        """Whether frames from ``primary`` at ``epoch`` may be applied: only the
        primary we follow, at its epoch, and never below the highest epoch seen."""
        if self.following is None or not self._accepts_epoch(epoch):
            return False
        _, followed, followed_epoch = self.following
        return (followed, followed_epoch) == (primary, epoch)

    def on_the_way(self, why: str | None) -> bool:
        """Whether ``why`` (``why_not_primary``) is a step on the way to leading (the
        lease being granted or confirmed, the campaign) rather than a reason against."""
        return why in _ON_THE_WAY

    def why_not_primary(self, now: float) -> str | None:
        if self.phase is Phase.PRIMARY:
            return None
        if self.phase is Phase.NOT_STARTED:
            return "not started"
        if self.phase is Phase.STOPPED:
            return "stopped"
        if self.lease is None or now >= self.valid_until:
            if not self.etcd_reachable:
                return "no valid lease: etcd unreachable"
            return NO_LEASE_YET if self.lease is None else LEASE_NOT_CONFIRMED
        if self.phase is Phase.CONFIRMING:
            return f"won epoch {self.epoch}; reading the in-sync record before serving"
        if not self.leader_known:
            return "the leader key has not been read yet"
        if self.leader is not None:
            return f"{self.leader.member} is the primary (epoch {self.leader.epoch})"
        if not self.record_known:
            return "the in-sync record has not been read yet"
        refusal = self._refusal(self.record)
        if refusal is not None:
            return refusal
        return CAMPAIGNING

    def status(self, now: float) -> Status:
        primary = self.member if self.phase is Phase.PRIMARY else None
        epoch = self.epoch if self.phase is Phase.PRIMARY else None
        if self.phase is not Phase.PRIMARY and self.following is not None:
            _, primary, epoch = self.following
        return Status(
            member=self.member,
            role=self.role,
            epoch=epoch,
            primary=primary,
            lease_left=max(0.0, self.valid_until - now) if self.lease is not None else 0.0,
            why_not_primary=self.why_not_primary(now),
            in_sync=self.in_sync,
            recorded=self.recorded,
            etcd_reachable=self.etcd_reachable,
        )

    def next_wakeup(self) -> float:
        """When the driver should tick next at the latest: never a time already past
        (the driver would tick at once, again and again). A grant or keepalive on
        its way sets none (its answer or failure is an event), a follower's lease
        none (it may have run out long ago, etcd unreachable); the primary's fencing
        deadline is still ahead, since every event checks it."""
        times = [self.next_read]
        if not self.outstanding.keepalive:
            times.append(self.next_keepalive)
        if self.phase in (Phase.PRIMARY, Phase.CONFIRMING):
            times.append(self.valid_until)
        if self.lease is None and not self.outstanding.grant:
            times.append(self.next_grant)
        return min(t for t in times if t > -math.inf)

    # -- events ------------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Action]:
        actions: list[Action] = []
        if self.phase is Phase.STOPPED:
            return actions
        if self.phase is Phase.NOT_STARTED and not isinstance(event, Started):
            raise RuntimeError(f"{type(event).__name__} before Started")
        self._handlers[type(event)](event, actions)
        if not self.stopped:
            self._check_lease(event.now, actions)
            self._consider_campaign(event.now, actions)
            self._register(event.now, actions)
        return actions

    def _started(self, event: Started, actions: list[Action]) -> None:
        if self.phase is not Phase.NOT_STARTED:
            raise RuntimeError("Started twice")
        self.member = event.member
        self.holding = event.holding
        self.phase = Phase.FOLLOWER
        self._grant(event.now, actions)
        self._read_leader(event.now, actions)

    def _lease_granted(self, event: LeaseGranted, actions: list[Action]) -> None:
        self.outstanding.grant = False
        self.etcd_reachable = True
        if self.lease is not None:
            # A second grant (a retry whose first answer came late): keep one lease.
            actions.append(RevokeLease(event.lease))
            return
        self.lease, self.lease_ttl = event.lease, event.ttl
        self.valid_until = self._valid_until(event.sent, event.now, event.ttl)
        self.next_keepalive = event.now + self.timing.keepalive_interval
        self.registered = None  # register again, bound to this lease
        self._read_sync(event.now, actions)

    def _keepalive_answered(self, event: KeepaliveAnswered, actions: list[Action]) -> None:
        if event.lease != self.lease:
            return  # an answer about a lease we already gave up
        self.outstanding.keepalive = False
        self.etcd_reachable = True
        if event.ttl is None:
            self._lease_lost(event.now, "the lease expired at etcd", actions)
            return
        self.lease_ttl = event.ttl
        self.valid_until = max(
            self.valid_until, self._valid_until(event.sent, event.now, event.ttl)
        )

    def _etcd_failed(self, event: EtcdFailed, actions: list[Action]) -> None:
        self.etcd_reachable = False
        retry = event.now + self.timing.retry_delay
        if event.operation is Operation.GRANT:
            self.outstanding.grant = False
            self.next_grant = retry
        elif event.operation is Operation.KEEPALIVE:
            self.outstanding.keepalive = False
            self.next_keepalive = min(self.next_keepalive, retry)
        elif event.operation is Operation.READ_LEADER:
            self.outstanding.read_leader = False
            self.next_read = min(self.next_read, retry)
        elif event.operation is Operation.READ_SYNC:
            self.outstanding.sync_reads = max(0, self.outstanding.sync_reads - 1)

    def _leader_observed(self, event: LeaderObserved, actions: list[Action]) -> None:
        self.outstanding.read_leader = False
        self.etcd_reachable = True
        leader = event.leader
        if self._is_stale(leader, event.revision):
            return
        self.leader, self.leader_known = leader, True
        self.leader_revision = max(self.leader_revision, event.revision)
        if leader is not None:
            self.highest_epoch = max(self.highest_epoch, leader.epoch)
        ours = leader is not None and leader.member == self.member
        mine = Leader(self.member, self.epoch or 0)
        if self.phase is Phase.PRIMARY and leader != mine:
            self._fence(self._lost_reason(leader), actions)
        elif self.phase is Phase.CONFIRMING and leader != mine:
            self._abandon(actions)
        if leader is None:
            self.resigning = None
            self.following = None  # nobody leads: no primary to name or to follow
            self._read_sync(event.now, actions)
            return
        if ours:
            self._own_key_seen(event.now, leader, actions)
            return
        if self._earlier_incarnation(leader):
            # A run of ours at this very address, now dead: it cannot be serving,
            # since we hold the address's listening socket (a stopped process still
            # holds it, a stopping one has fenced before letting it go). Its key would
            # block every member until its lease ran out; the delete is guarded by
            # its epoch, so asking again is harmless.
            self.resigning = leader.epoch
            actions.append(Resign(leader.epoch))
            return
        self.resigning = None
        if self.attempt is not None and leader.epoch > self.attempt.floor:
            self.attempt = None  # any key our campaigns made is gone
        self._follow(leader, actions)

    def _earlier_incarnation(self, leader: Leader) -> bool:
        return leader.member != self.member and address_of(leader.member) == address_of(self.member)

    def _own_key_seen(self, now: float, leader: Leader, actions: list[Action]) -> None:
        if self.phase in (Phase.PRIMARY, Phase.CONFIRMING):
            return
        attempt = self.attempt
        if (
            leader.epoch != self.resigning
            and attempt is not None
            and attempt.lease == self.lease
            and leader.epoch > attempt.floor
        ):
            self._won(now, leader.epoch, actions)  # a campaign whose answer we missed
            return
        # A key of ours we do not lead under (given up, or of an earlier lease): it
        # must not block the others while our lease lives on. The delete is guarded
        # by its epoch, so asking again is harmless.
        self.resigning = leader.epoch
        actions.append(Resign(leader.epoch))

    def _sync_observed(self, event: SyncObserved, actions: list[Action]) -> None:
        self.outstanding.sync_reads = max(0, self.outstanding.sync_reads - 1)
        self.etcd_reachable = True
        if event.sent < self.record_sent:
            return  # an older read answered late
        self.record, self.record_known, self.record_sent = event.record, True, event.sent
        self.record_revision = event.mod_revision
        if event.record is not None:
            self.highest_epoch = max(self.highest_epoch, event.record.epoch)
            # The leader we know of, or the revision of a read that found none.
            known = self.leader.epoch if self.leader is not None else self.leader_revision
            if known < event.record.epoch:
                # Written by a later leader than the one we know of (perhaps one that
                # leads now, which a "nobody" read before it could not see): read who
                # leads before following, or campaigning under a floor above its epoch.
                self.leader_known = False
                self._read_leader(event.now, actions)
        if self.phase is Phase.CONFIRMING and event.sent >= self.confirm_since:
            self._confirm(event.now, actions)
        elif self.following is not None and self.leader is not None:
            self._follow(self.leader, actions)

    def _campaign_answered(self, event: CampaignAnswered, actions: list[Action]) -> None:
        self.outstanding.campaign = False
        if event.lease != self.lease:
            return
        self.etcd_reachable = event.result is not CampaignResult.INDETERMINATE
        if event.result is CampaignResult.WON and event.epoch is not None:
            # The same as seeing our own key at that revision.
            self._leader_observed(
                LeaderObserved(event.now, Leader(self.member, event.epoch), event.epoch), actions
            )
        elif event.result is CampaignResult.LEASE_GONE:
            self._lease_lost(event.now, "the lease expired at etcd", actions)
        else:
            # Who holds it (perhaps we do)? No new campaign until that is read.
            self.leader_known = False
            self._read_leader(event.now, actions)

    def _record_answered(self, event: RecordSyncAnswered, actions: list[Action]) -> None:
        if self.phase is not Phase.PRIMARY or event.epoch != self.epoch:
            return
        self.record_inflight = None
        if event.result is RecordResult.REFUSED:
            # Our key is gone, or a lost write of ours landed first and etcd's
            # record is not what we know: either way, hand over.
            self._fence(
                f"etcd refused the in-sync record of epoch {event.epoch} (the epoch is over, "
                "or a record whose answer was lost landed first)",
                actions,
            )
            self.resigning = event.epoch
            actions.append(Resign(event.epoch))
            return
        if event.result is RecordResult.FAILED:
            # It may land later, but only while the record is at the revision it
            # expected: the retry expects the same, so at most one of them lands.
            self.etcd_reachable = False
            self.next_record = event.now + self.timing.retry_delay
            return
        self.etcd_reachable = True
        self.recorded = event.backup
        self.record, self.record_known = SyncRecord(event.epoch, event.backup), True
        self.record_sent = event.now
        if event.mod_revision is not None:
            self.record_revision = event.mod_revision
        self._record_in_sync(event.now, actions)  # a newer backup meanwhile

    def _backup_in_sync(self, event: BackupInSync, actions: list[Action]) -> None:
        if self.phase is not Phase.PRIMARY:
            return
        self.in_sync = event.backup
        self.next_record = event.now
        self._record_in_sync(event.now, actions)

    def _backup_lost(self, event: BackupLost, actions: list[Action]) -> None:
        # The record keeps naming it (rule c): our copy and its are the complete ones.
        if self.in_sync == event.backup:
            self.in_sync = None

    def _copy_changed(self, event: CopyChanged, actions: list[Action]) -> None:
        if self.phase is not Phase.PRIMARY:
            self.holding = event.holding

    def _tick(self, event: Tick, actions: list[Action]) -> None:
        now = event.now
        if self.lease is None:
            if now >= self.next_grant:
                self._grant(now, actions)
        elif not self.outstanding.keepalive and now >= self.next_keepalive:
            self.outstanding.keepalive = True
            self.next_keepalive = now + self.timing.keepalive_interval
            actions.append(KeepAlive(self.lease))
        if now >= self.next_read:
            self._read_leader(now, actions)
            if self.leader is None or self.following is not None:
                self._read_sync(now, actions)
            elif self.phase is Phase.CONFIRMING:
                # The read that confirms a win failed (or is late): send another,
                # else the key we hold keeps everyone out while we never serve.
                self._read_sync(now, actions)
        if self.phase is Phase.PRIMARY and now >= self.next_record:
            self._record_in_sync(now, actions)

    def _stop(self, event: Stop, actions: list[Action]) -> None:
        if self.phase is Phase.PRIMARY and self.epoch is not None:
            epoch = self.epoch
            self._fence("stopping", actions)
            actions.append(Resign(epoch))
        if self.lease is not None:
            actions.append(RevokeLease(self.lease))
        self.phase = Phase.STOPPED
        self.lease, self.valid_until = None, -math.inf

    # -- steps -------------------------------------------------------------------------------
    def _grant(self, now: float, actions: list[Action]) -> None:
        if not self.outstanding.grant:
            self.outstanding.grant = True
            self.next_grant = now + self.timing.retry_delay
            actions.append(GrantLease(self.timing.ttl))

    def _read_leader(self, now: float, actions: list[Action]) -> None:
        self.next_read = now + self.timing.read_interval
        if not self.outstanding.read_leader:
            self.outstanding.read_leader = True
            actions.append(ReadLeader())

    def _read_sync(self, now: float, actions: list[Action], *, fresh: bool = False) -> None:
        # At most one read on its way, unless the answer must be newer than the one sent.
        if fresh or self.outstanding.sync_reads == 0:
            self.outstanding.sync_reads += 1
            actions.append(ReadSync())

    def _check_lease(self, now: float, actions: list[Action]) -> None:
        if now < self.valid_until:
            return
        if self.phase is Phase.PRIMARY:
            self._fence("the lease may have expired (no keepalive answered in time)", actions)
        elif self.phase is Phase.CONFIRMING:
            self._abandon(actions)

    def _lease_lost(self, now: float, reason: str, actions: list[Action]) -> None:
        if self.phase is Phase.PRIMARY:
            self._fence(reason, actions)
        elif self.phase is Phase.CONFIRMING:
            self._abandon(actions)
        self.lease, self.valid_until = None, -math.inf
        self.next_keepalive = math.inf
        self.attempt = None
        self._grant(now, actions)

    def _consider_campaign(self, now: float, actions: list[Action]) -> None:
        if (
            self.phase is not Phase.FOLLOWER
            or self.lease is None
            or now >= self.valid_until
            or not self.leader_known
            or self.leader is not None
            or not self.record_known
            or self.outstanding.campaign
            or self._refusal(self.record) is not None
        ):
            return
        if self.attempt is None or self.attempt.lease != self.lease:
            self.attempt = _Attempt(self.lease, max(self.highest_epoch, self.leader_revision))
        actions.append(StopFollowing(self.highest_epoch))
        self.following = None
        self.outstanding.campaign = True
        actions.append(Campaign(self.member, self.lease))

    def _won(self, now: float, epoch: int, actions: list[Action]) -> None:
        """Our key exists at ``epoch``: read the record as of now before serving."""
        self.attempt = None
        self.phase, self.epoch, self.confirm_since = Phase.CONFIRMING, epoch, now
        self.highest_epoch = max(self.highest_epoch, epoch)
        self._read_sync(now, actions, fresh=True)

    def _confirm(self, now: float, actions: list[Action]) -> None:
        epoch = self.epoch
        assert epoch is not None
        refusal = self._refusal(self.record)
        if refusal is not None:
            self.phase, self.epoch = Phase.FOLLOWER, None
            self.resigning = epoch
            actions.append(Resign(epoch))
            return
        self.phase, self.role, self.following = Phase.PRIMARY, Role.PRIMARY, None
        self.holding = Holding(True, epoch, self.holding.history, self.holding.seq)
        self.in_sync = self.recorded = self.record_inflight = None
        actions.append(BecomePrimary(epoch))

    def _abandon(self, actions: list[Action]) -> None:
        """A win not yet confirmed is given up (key gone, lease doubtful): if the
        key is still there, it goes, so that it blocks nobody."""
        if self.epoch is not None:
            self.resigning = self.epoch
            actions.append(Resign(self.epoch))
        self.phase, self.epoch = Phase.FOLLOWER, None

    def _fence(self, reason: str, actions: list[Action]) -> None:
        self.phase, self.role, self.epoch = Phase.FOLLOWER, Role.SPARE, None
        self.in_sync = self.recorded = self.record_inflight = None
        self.following = None
        actions.append(Fence(reason))

    def _lost_reason(self, leader: Leader | None) -> str:
        if leader is None:
            return f"the leader key of epoch {self.epoch} is gone"
        return f"{leader.member} leads at epoch {leader.epoch}"

    def _follow(self, leader: Leader, actions: list[Action]) -> None:
        if self.phase is not Phase.FOLLOWER or not self._accepts_epoch(leader.epoch):
            return
        record = self.record
        ours = record is not None and record.backup == self.member and record.epoch == leader.epoch
        role = Role.BACKUP if ours else Role.SPARE
        following = (role, leader.member, leader.epoch)
        if following == self.following:
            return
        self.following, self.role = following, role
        become = BecomeBackup if ours else BecomeSpare
        actions.append(become(leader.member, leader.epoch))

    def _record_in_sync(self, now: float, actions: list[Action]) -> None:
        backup, epoch = self.in_sync, self.epoch
        if backup is None or epoch is None or self.record_inflight is not None:
            return
        if backup == self.recorded:
            return
        self.recorded, self.record_inflight = None, backup  # etcd's record is uncertain now
        self.next_record = now + self.timing.retry_delay
        actions.append(RecordSync(epoch, backup, self.record_revision))

    def _register(self, now: float, actions: list[Action]) -> None:
        if self.lease is None:
            return
        status = self.status(now)
        info: dict[str, Any] = {
            "role": status.role.value,
            "epoch": status.epoch,
            "primary": status.primary,
            "why_not_primary": status.why_not_primary,
        }
        if info != self.registered:
            self.registered = info
            actions.append(Register(self.member, self.lease, info))
