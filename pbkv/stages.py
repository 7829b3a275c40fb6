"""The stages of both roles and the steps of their handshake, as data.

Two rules, as in h11's ``_state.py``:

1. Everything that decides what a server does next lives in this file: the
   transition tables (``stage -> {event: next stage}``), the events a stage
   ignores, the acceptance table (``stage -> what reads and writes get``) and
   the handshake tables (``step -> {frame type: steps it may lead to}``).  The
   replication cores in ``primary.py`` and ``backup.py`` only name events and
   steps; ``StageMachine.fire`` looks the next stage up and raises
   ``ProtocolError`` for an event that the current stage does not expect,
   instead of silently ignoring it; a frame the current step does not list
   closes the channel.  Who wins a handshake is decided here too, from both
   sides' copies (``plan``, and ``refusal`` for the backup's acceptance of a
   directive).
2. No I/O and no clock here.  The README's stage diagram and tables are
   generated from these tables (``python -m pbkv.stages``), so they cannot drift.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from pbkv.wire import FrameType, Hello


class Role(enum.StrEnum):
    PRIMARY = "primary"
    BACKUP = "backup"

    @property
    def peer(self) -> Role:
        return Role.BACKUP if self is Role.PRIMARY else Role.PRIMARY


class Stage(enum.Enum):
    COLD_START = "cold_start"
    BOOTSTRAPPING_SECONDARY = "bootstrapping_secondary"  # primary only
    BOOTSTRAPPING_PRIMARY = "bootstrapping_primary"  # backup only
    WARM_START = "warm_start"
    IN_SYNC = "in_sync"

    # Members are singletons compared by identity: hashed by identity too, in C (as
    # ``Command``: Enum's own __hash__ is Python code, and every frame looks its
    # handshake step up in a table keyed by these).
    __hash__ = object.__hash__


class Event(enum.Enum):
    # Primary: outcome of looking for the backup / of a handshake.
    BACKUP_UNREACHABLE = "backup_unreachable"
    BACKUP_HOLDS_DATA = "backup_holds_data"  # and we hold nothing confirmed
    BACKUP_NEEDS_DATA = "backup_needs_data"
    # Backup: outcome of looking for the primary (a probe), and of waiting for
    # it to connect (peer_timeout after the probe found it, or after it left).
    PRIMARY_RUNNING = "primary_running"
    PRIMARY_ABSENT = "primary_absent"
    NO_PRIMARY_IN_TIME = "no_primary_in_time"
    # Either side.
    TRANSFER_STARTED = "transfer_started"  # the primary began sending its data
    SYNC_CONFIRMED = "sync_confirmed"  # checksums matched, mutual ack done
    TRANSFER_FAILED = "transfer_failed"
    PEER_LOST = "peer_lost"  # channel closed, silent or fenced


S, E = Stage, Event

PRIMARY_TRANSITIONS: dict[Stage, dict[Event, Stage]] = {
    S.COLD_START: {
        E.BACKUP_UNREACHABLE: S.BOOTSTRAPPING_SECONDARY,
        E.BACKUP_NEEDS_DATA: S.BOOTSTRAPPING_SECONDARY,
        E.BACKUP_HOLDS_DATA: S.WARM_START,
        E.PEER_LOST: S.BOOTSTRAPPING_SECONDARY,  # the backup left during the handshake
    },
    S.BOOTSTRAPPING_SECONDARY: {
        E.SYNC_CONFIRMED: S.IN_SYNC,
        E.TRANSFER_FAILED: S.BOOTSTRAPPING_SECONDARY,
        E.PEER_LOST: S.BOOTSTRAPPING_SECONDARY,
        # Only while our own (empty) data is unconfirmed: the backup's wins.
        E.BACKUP_HOLDS_DATA: S.WARM_START,
    },
    S.WARM_START: {
        E.SYNC_CONFIRMED: S.IN_SYNC,
        E.TRANSFER_FAILED: S.WARM_START,
        E.PEER_LOST: S.WARM_START,
        # The backup came back without data: the only full copy is gone.
        E.BACKUP_NEEDS_DATA: S.BOOTSTRAPPING_SECONDARY,
    },
    S.IN_SYNC: {
        E.PEER_LOST: S.BOOTSTRAPPING_SECONDARY,
    },
}

BACKUP_TRANSITIONS: dict[Stage, dict[Event, Stage]] = {
    S.COLD_START: {
        E.PRIMARY_RUNNING: S.WARM_START,
        E.PRIMARY_ABSENT: S.BOOTSTRAPPING_PRIMARY,
        E.TRANSFER_STARTED: S.WARM_START,  # the primary reached us before the probe did
        E.TRANSFER_FAILED: S.BOOTSTRAPPING_PRIMARY,
        E.PEER_LOST: S.BOOTSTRAPPING_PRIMARY,
    },
    S.BOOTSTRAPPING_PRIMARY: {
        E.SYNC_CONFIRMED: S.IN_SYNC,  # the primary fetched our data, or both matched
        E.TRANSFER_STARTED: S.WARM_START,  # a primary with newer data overwrites us
        E.TRANSFER_FAILED: S.BOOTSTRAPPING_PRIMARY,
        E.PEER_LOST: S.BOOTSTRAPPING_PRIMARY,
    },
    S.WARM_START: {
        E.TRANSFER_STARTED: S.WARM_START,
        E.SYNC_CONFIRMED: S.IN_SYNC,
        # Seed: "reply failure and listen again" -- the primary reconnects and
        # sends again; only when it stays away for peer_timeout do we give up.
        E.TRANSFER_FAILED: S.WARM_START,
        E.PEER_LOST: S.WARM_START,
        E.NO_PRIMARY_IN_TIME: S.BOOTSTRAPPING_PRIMARY,
    },
    S.IN_SYNC: {
        E.PEER_LOST: S.BOOTSTRAPPING_PRIMARY,
        # We are in sync (and said so) before the primary: it may still refuse.
        E.TRANSFER_FAILED: S.BOOTSTRAPPING_PRIMARY,
    },
}

TRANSITIONS = {Role.PRIMARY: PRIMARY_TRANSITIONS, Role.BACKUP: BACKUP_TRANSITIONS}

# Events that may happen in a stage and change nothing (not logged): news that
# comes late or repeats what the stage already knows.
PRIMARY_IGNORED: dict[Stage, frozenset[Event]] = {
    # Retrying: the backup is still unreachable, or needs our data again.
    S.BOOTSTRAPPING_SECONDARY: frozenset({E.BACKUP_UNREACHABLE, E.BACKUP_NEEDS_DATA}),
    # Retrying the fetch.
    S.WARM_START: frozenset({E.BACKUP_UNREACHABLE, E.BACKUP_HOLDS_DATA}),
}

BACKUP_IGNORED: dict[Stage, frozenset[Event]] = {
    # The probe's answer after the primary reached us first, and the end of a
    # wait that no longer matters.
    S.BOOTSTRAPPING_PRIMARY: frozenset({E.PRIMARY_RUNNING, E.PRIMARY_ABSENT, E.NO_PRIMARY_IN_TIME}),
    S.WARM_START: frozenset({E.PRIMARY_RUNNING, E.PRIMARY_ABSENT}),
    S.IN_SYNC: frozenset({E.PRIMARY_RUNNING, E.PRIMARY_ABSENT}),
}

IGNORED = {Role.PRIMARY: PRIMARY_IGNORED, Role.BACKUP: BACKUP_IGNORED}


class ReadRule(enum.Enum):
    REFUSE = "refuse"
    SERVE = "serve"
    # Serve only data that a peer has confirmed: on a primary in bootstrapping
    # secondary (a primary that restarted and found no backup may have lost
    # writes), on a backup in warm start (the copy it keeps while a new one arrives).
    SERVE_IF_CONFIRMED = "serve if our data is confirmed"
    # Warm start: serve a key only when its whole shard has arrived, so the
    # answer, a miss included, is certainly right.
    SERVE_IF_SHARD_COMPLETE = "serve if the key's shard has arrived"


class WriteRule(enum.Enum):
    REFUSE = "refuse"
    REPLICATE = "apply after the backup acknowledges"
    REDIRECT = "refuse, naming the primary"


@dataclass(frozen=True, slots=True)
class Acceptance:
    reads: ReadRule
    writes: WriteRule


PRIMARY_ACCEPTANCE: dict[Stage, Acceptance] = {
    S.COLD_START: Acceptance(ReadRule.REFUSE, WriteRule.REFUSE),
    S.BOOTSTRAPPING_SECONDARY: Acceptance(ReadRule.SERVE_IF_CONFIRMED, WriteRule.REFUSE),
    S.WARM_START: Acceptance(ReadRule.SERVE_IF_SHARD_COMPLETE, WriteRule.REFUSE),
    S.IN_SYNC: Acceptance(ReadRule.SERVE, WriteRule.REPLICATE),
}

BACKUP_ACCEPTANCE: dict[Stage, Acceptance] = {
    S.COLD_START: Acceptance(ReadRule.REFUSE, WriteRule.REDIRECT),
    S.BOOTSTRAPPING_PRIMARY: Acceptance(ReadRule.SERVE, WriteRule.REDIRECT),
    # Receiving into a separate map: a confirmed copy we keep is still whole.
    S.WARM_START: Acceptance(ReadRule.SERVE_IF_CONFIRMED, WriteRule.REDIRECT),
    S.IN_SYNC: Acceptance(ReadRule.SERVE, WriteRule.REDIRECT),
}

ACCEPTANCE = {Role.PRIMARY: PRIMARY_ACCEPTANCE, Role.BACKUP: BACKUP_ACCEPTANCE}


# -- the handshake ---------------------------------------------------------------
# Within a stage, the replication channel moves through steps (as Redis's
# REPL_STATE_*): which frame each step accepts, and the steps that frame may
# lead to, are the tables below.  A frame a step does not list is a protocol
# violation: the channel closes with the step and the frame in the reason.
# Losing the channel (a failure, a close, silence) returns every step to
# ``NONE``; opening it starts at the role's ``FIRST_STEP``: with a secret set,
# both sides first prove they hold it (nonces and proofs, see ``auth.py``), and
# only then does the HELLO count.


class Step(enum.Enum):
    __hash__ = object.__hash__  # as Stage's

    NONE = "none"  # no channel
    # With a secret: the primary sent its nonce and awaits the backup's nonce and proof;
    AWAIT_AUTH_RESPONSE = "await_auth_response"
    # the backup awaits the primary's nonce, then (its own sent) the primary's proof.
    AWAIT_CHALLENGE = "await_challenge"
    AWAIT_PROOF = "await_proof"
    AWAIT_HELLO = "await_hello"  # the peer's HELLO comes next
    # Backup: our HELLO sent; the primary says what happens (send, skip, fetch).
    AWAIT_DIRECTIVE = "await_directive"
    # Backup: told to catch up; the batches it lacks arrive, unacknowledged one by one.
    CATCHING_UP = "catching_up"
    AWAIT_SYNC_ACK = "await_sync_ack"  # primary: our data (or SKIP) sent; is it verified?
    RECEIVE_SNAPSHOT = "receive_snapshot"  # the peer's whole database arrives
    AWAIT_FINAL_ACK = "await_final_ack"  # our verdict on a transfer sent; the peer's comes
    STREAMING = "streaming"  # in sync: batches and their acknowledgements


F = FrameType
_SHARDS = {
    F.SHARD_CHUNK: (Step.RECEIVE_SNAPSHOT,),
    F.SHARD_END: (Step.RECEIVE_SNAPSHOT,),
    F.IDEMPOTENCY_CHUNK: (Step.RECEIVE_SNAPSHOT,),  # the idempotency table, after the shards
}

# Where a new channel starts: without a secret / with one.
FIRST_STEP = {
    Role.PRIMARY: {False: Step.AWAIT_HELLO, True: Step.AWAIT_AUTH_RESPONSE},
    Role.BACKUP: {False: Step.AWAIT_HELLO, True: Step.AWAIT_CHALLENGE},
}
# The steps before the proofs: nothing but their own frames, not even heartbeats
# (the first keyed frame must follow the last plain one on both sides).
AUTH_STEPS = frozenset({Step.AWAIT_AUTH_RESPONSE, Step.AWAIT_CHALLENGE, Step.AWAIT_PROOF})

PRIMARY_HANDSHAKE: dict[Step, dict[FrameType, tuple[Step, ...]]] = {
    Step.NONE: {},
    # A good proof: send ours, switch to keyed frames, send our HELLO.
    Step.AWAIT_AUTH_RESPONSE: {F.AUTH_RESPONSE: (Step.AWAIT_HELLO,), F.AUTH_FAILED: (Step.NONE,)},
    # The backup's hello decides: send our data or SKIP (await_sync_ack), or FETCH.
    # (AUTH_FAILED: the backup has a secret and we do not.)
    Step.AWAIT_HELLO: {
        F.HELLO: (Step.AWAIT_SYNC_ACK, Step.RECEIVE_SNAPSHOT),
        F.AUTH_FAILED: (Step.NONE,),
    },
    Step.AWAIT_SYNC_ACK: {F.SYNC_ACK: (Step.STREAMING,), F.SYNC_NACK: (Step.NONE,)},
    Step.RECEIVE_SNAPSHOT: {
        F.SNAPSHOT_BEGIN: (Step.RECEIVE_SNAPSHOT,),
        **_SHARDS,
        F.SNAPSHOT_END: (Step.AWAIT_FINAL_ACK,),
        F.SYNC_NACK: (Step.NONE,),
    },
    Step.AWAIT_FINAL_ACK: {F.SYNC_ACK: (Step.STREAMING,), F.SYNC_NACK: (Step.NONE,)},
    Step.STREAMING: {F.ACK: (Step.STREAMING,)},
}

BACKUP_HANDSHAKE: dict[Step, dict[FrameType, tuple[Step, ...]]] = {
    Step.NONE: {},
    Step.AWAIT_CHALLENGE: {F.AUTH_CHALLENGE: (Step.AWAIT_PROOF,), F.HELLO: (Step.NONE,)},
    # A good proof: switch to keyed frames; the primary's HELLO follows.
    Step.AWAIT_PROOF: {F.AUTH_PROOF: (Step.AWAIT_HELLO,), F.AUTH_FAILED: (Step.NONE,)},
    # (AUTH_CHALLENGE here: the primary has a secret and we do not.)
    Step.AWAIT_HELLO: {F.HELLO: (Step.AWAIT_DIRECTIVE,), F.AUTH_CHALLENGE: (Step.NONE,)},
    Step.AWAIT_DIRECTIVE: {
        F.SNAPSHOT_BEGIN: (Step.RECEIVE_SNAPSHOT,),
        F.SKIP: (Step.STREAMING,),
        F.ROLLBACK: (Step.STREAMING,),  # partial resync: undo the batches it never applied
        # Partial resync: apply the batches we lack (none: in sync at once).
        F.CATCHUP: (Step.CATCHING_UP, Step.STREAMING),
        F.FETCH: (Step.AWAIT_FINAL_ACK,),
    },
    # The last batch brings us to the primary's state: in sync (and we say so).
    Step.CATCHING_UP: {
        F.BATCH: (Step.CATCHING_UP, Step.STREAMING),
        F.SYNC_NACK: (Step.NONE,),
    },
    # The backup is in sync (and says so) before the primary: the primary may
    # still refuse our acknowledgement, in streaming.
    Step.RECEIVE_SNAPSHOT: {
        **_SHARDS,  # SNAPSHOT_BEGIN was the directive
        F.SNAPSHOT_END: (Step.STREAMING,),
        F.SYNC_NACK: (Step.NONE,),
    },
    Step.AWAIT_FINAL_ACK: {F.SYNC_ACK: (Step.STREAMING,), F.SYNC_NACK: (Step.NONE,)},
    Step.STREAMING: {F.BATCH: (Step.STREAMING,), F.FENCE: (Step.NONE,), F.SYNC_NACK: (Step.NONE,)},
}

# A heartbeat is welcome in every step past the proofs, and changes nothing.
for _table in (PRIMARY_HANDSHAKE, BACKUP_HANDSHAKE):
    for _step, _frames in _table.items():
        if _step is not Step.NONE and _step not in AUTH_STEPS:
            _frames[F.HEARTBEAT] = (_step,)

HANDSHAKES = {Role.PRIMARY: PRIMARY_HANDSHAKE, Role.BACKUP: BACKUP_HANDSHAKE}


class ProtocolError(Exception):
    """An event or a step arrived that the tables have no entry for (a bug).

    Not a subclass of any error a driver handles (frames, transfers, sockets), so none
    of their handlers swallows it."""


class StageMachine:
    """Holds the current stage of one role and fires transitions from the table.

    ``on_transition(old, new, reason)`` is called for every transition,
    self-transitions included (a failed attempt that starts over is news);
    an ignored event changes nothing and is not reported.
    """

    def __init__(
        self,
        role: Role | str,  # a name too: the machine holds the Role
        initial: Stage,
        on_transition: Callable[[Stage, Stage, str], None] | None = None,
    ) -> None:
        self.role = Role(role)
        self.table = TRANSITIONS[self.role]
        self.ignored = IGNORED[self.role]
        if initial not in self.table:
            raise ValueError(f"{initial.value} is not a stage of the {role}")
        self.stage = initial
        self.acceptance = ACCEPTANCE[self.role][initial]
        self._on_transition = on_transition

    def fire(self, event: Event, reason: str) -> Stage:
        old = self.stage
        new = self.table[old].get(event)
        if new is None:
            if event in self.ignored.get(old, ()):
                return old
            raise ProtocolError(
                f"{self.role} in stage {old.value} has no transition for {event.value}"
            )
        self.stage = new
        self.acceptance = ACCEPTANCE[self.role][new]
        if self._on_transition is not None:
            self._on_transition(old, new, reason)
        return new


class Handshake:
    """The current handshake step of one role, moved only along its table."""

    def __init__(self, role: Role | str) -> None:
        self.role = Role(role)
        self.table = HANDSHAKES[self.role]
        self.step = Step.NONE

    def accepts(self, kind: FrameType) -> bool:
        return kind in self.table[self.step]

    def advance(self, kind: FrameType, new: Step) -> None:
        """After handling a ``kind`` frame, move to ``new`` (which its entry must list)."""
        if new not in self.table[self.step].get(kind, ()):
            raise ProtocolError(
                f"{self.role} handshake: {kind.name} in step {self.step.value} "
                f"cannot lead to {new.value}"
            )
        self.step = new

    def opened(self, authenticate: bool) -> None:
        self.step = FIRST_STEP[self.role][authenticate]

    def reset(self) -> None:
        self.step = Step.NONE


# -- who wins a handshake ----------------------------------------------------------
# The primary decides from its copy and the copy the backup's HELLO describes
# (``plan``); the backup checks the directive against its own copy before it
# obeys (``refusal``).  Epochs first (a coordinated cluster's leadership terms;
# all 0 without a coordinator, and then rules 1 and 3 never apply), then the data:
#
# 1. A primary that serves under a lower epoch than the backup has seen, or than
#    the epoch of the backup's copy, is STALE: a newer primary exists.  It
#    changes nothing on the backup (no send, skip, rollback, fetch or empty
#    start), loses the channel and steps down.
# 2. Both confirmed copies hold the same data (checksum and count): SKIP.
# 3. A backup's confirmed copy of a newer epoch than ours wins even over our
#    confirmed copy: that epoch's primary held every write acknowledged before
#    it, and may have acknowledged more.  We FETCH it.
# 4. A primary whose data a backup has confirmed (it has been in sync since it
#    started) keeps it: it has the backup ROLL BACK when the backup is of the
#    same history, not behind, and can undo back to our seq into exactly our
#    data (the batches whose acknowledgement we never saw); it has the backup
#    CATCH UP when the backup is of the same history, behind, and our record of
#    the batches we applied last (``catchup.py``) reaches back to the backup's
#    seq with exactly the backup's state there (checksum and count, which cover
#    the idempotency table too): our batches then lead from its data to ours
#    (none, when it already holds our data but not confirmed).
#    Its copy need not be confirmed for that: nothing of it survives that is not
#    also ours (its data *is* ours as of that seq), the batches come from our
#    record, and the backup checks the result against our checksum and count
#    before it says it is in sync, as after any transfer.  Else it SENDs its data.
# 5. A primary without confirmed data (freshly started) FETCHes the backup's
#    data when the backup holds a confirmed copy.
# 6. Neither copy is confirmed, but one or both were *recovered* (loaded from disk
#    at start, with ``persistence`` set): a recovered copy wins over one that was
#    not (an empty start); of two recovered copies the newer wins: the higher
#    epoch, then the higher seq (the primary's on a tie).  Writes need both
#    servers, so of one history the copy with the higher seq holds every batch
#    the other holds, and more: batches in flight when both went down, never
#    acknowledged.  A primary SENDs its newer copy (the backup's extra batches
#    are dropped: they were never acknowledged) or FETCHes the backup's.
# 7. Otherwise neither copy holds anything worth keeping: the primary STARTs
#    EMPTY and sends that.


@dataclass(frozen=True, slots=True)
class State:
    """A state of the data: after batch ``seq``, this checksum and count of pairs."""

    seq: int
    checksum: int
    count: int

    def __init__(self, seq: int, checksum: int, count: int) -> None:
        # Written out: compiled, it builds the object natively (made per batch; see
        # ``compiled.py``).
        object.__setattr__(self, "seq", seq)
        object.__setattr__(self, "checksum", checksum)
        object.__setattr__(self, "count", count)


@dataclass(frozen=True, slots=True)
class Copy:
    """What one side holds, as its HELLO says (new facts become new fields with a default)."""

    confirmed: bool  # a peer verified this data
    history: int  # its lineage: new whenever the data is replaced
    seq: int  # the last replicated batch applied
    checksum: int
    count: int
    undo: tuple[State, ...] = ()  # the states it can roll back to (a backup's)
    epoch: int = 0  # the epoch under which this copy was last confirmed (and written)
    # The epoch its holder acts under: a primary's own, a backup's highest seen.
    serving: int = 0
    # Loaded from disk at start, not yet confirmed by a peer (``persistence``).
    recovered: bool = False
    # The states a primary can lead on from by the batches it recorded (not in a HELLO).
    record: tuple[State, ...] = ()

    @classmethod
    def of(cls, hello: Hello) -> Copy:
        undo = tuple(State(seq, checksum, count) for seq, checksum, count in hello.undo)
        return cls(
            hello.confirmed,
            hello.history,
            hello.seq,
            hello.checksum,
            hello.count,
            undo,
            hello.copy_epoch,
            hello.epoch,
            hello.recovered,
        )


class Resync(enum.Enum):
    """How a sync reached matching data (what the resync counters count)."""

    FULL = "full"  # the data was copied whole: a new history on both sides
    PARTIAL = "partial"  # the backup rolled back batches, or caught up by them
    NONE = "none"  # both already held the same data


class Directive(enum.Enum):
    """What happens to the data (the value completes "N pairs ... the backup")."""

    SEND = "sent to"  # our confirmed data wins
    SKIP = "already matched on"  # both hold the same confirmed data
    ROLLBACK = "rolled back on"  # the backup is ahead by batches we never applied: it undoes them
    CATCHUP = "caught up on"  # the backup is behind by batches we recorded: it applies them
    FETCH = "fetched from"  # the backup's confirmed data wins
    START_EMPTY = "started empty with"  # neither side holds confirmed data
    STALE = "withheld from"  # a newer primary exists: we step down, nothing moves

    @property
    def resync(self) -> Resync:
        if self is Directive.SKIP or self is Directive.STALE:
            return Resync.NONE
        if self is Directive.ROLLBACK or self is Directive.CATCHUP:
            return Resync.PARTIAL
        return Resync.FULL


@dataclass(frozen=True, slots=True)
class Plan:
    """The primary's decision and why (the reason goes into its log line)."""

    directive: Directive
    reason: str


def plan(ours: Copy, theirs: Copy) -> Plan:
    """What the primary (``ours``) does with a backup that holds ``theirs``."""
    if theirs.serving > ours.serving:
        return Plan(
            Directive.STALE,
            f"the backup has seen epoch {theirs.serving} > our {ours.serving}: "
            "a newer primary exists",
        )
    if theirs.epoch > ours.serving:
        return Plan(
            Directive.STALE,
            f"the backup's copy is of epoch {theirs.epoch} > our {ours.serving}: "
            "a newer primary exists",
        )
    same = (theirs.checksum, theirs.count) == (ours.checksum, ours.count)
    if ours.confirmed and theirs.confirmed and same:
        return Plan(Directive.SKIP, "primary and backup already hold the same data")
    if theirs.confirmed and theirs.epoch > ours.epoch:
        # Not even a rollback: the batches it would undo may be that epoch's acknowledged writes.
        return Plan(
            Directive.FETCH,
            f"backup holds {theirs.count} confirmed pairs of a newer epoch "
            f"({theirs.epoch} > our copy's {ours.epoch})",
        )
    if ours.confirmed:
        why_not = why_no_rollback(ours, theirs)
        if why_not is None:
            return Plan(
                Directive.ROLLBACK,
                f"the backup rolls back {theirs.seq - ours.seq} batches, "
                f"seq {theirs.seq} -> {ours.seq}",
            )
        why_behind = why_no_catchup(ours, theirs)
        if why_behind is None:
            return Plan(
                Directive.CATCHUP,
                f"the backup catches up {ours.seq - theirs.seq} batches, "
                f"seq {theirs.seq} -> {ours.seq}",
            )
        if theirs.history == ours.history and theirs.seq < ours.seq:
            why_not = why_behind  # says more than "not confirmed" or "behind"
        return Plan(Directive.SEND, why_not)
    if theirs.confirmed:
        return Plan(Directive.FETCH, f"backup holds {theirs.count} confirmed pairs")
    if ours.recovered or theirs.recovered:
        return recovered_plan(ours, theirs)
    return Plan(Directive.START_EMPTY, "no confirmed data on either side: start empty")


def recovered_plan(ours: Copy, theirs: Copy) -> Plan:
    """Rule 6: neither copy is confirmed, at least one was recovered from disk."""
    if not theirs.recovered:
        return Plan(
            Directive.SEND,
            f"the primary recovered {ours.count} pairs from disk (seq {ours.seq}); "
            "the backup holds no confirmed or recovered copy",
        )
    if not ours.recovered:
        return Plan(
            Directive.FETCH,
            f"the backup recovered {theirs.count} pairs from disk (seq {theirs.seq}); "
            "the primary holds no confirmed or recovered copy",
        )
    both = f"both recovered from disk: the primary's seq {ours.seq} epoch {ours.epoch}, "
    both += f"the backup's seq {theirs.seq} epoch {theirs.epoch}"
    if (theirs.history, theirs.epoch) == (ours.history, ours.epoch) and theirs.seq > ours.seq:
        # The two were this epoch's pair, and its primary logs a batch only once the
        # backup acknowledged it: batches only the backup logged were never
        # acknowledged (the primary rewound them, or died first).  As a live primary
        # does in memory, ours wins: the backup undoes them, or is sent our copy.
        beyond = f"{both}: the backup's {theirs.seq - ours.seq} batches beyond ours were never "
        beyond += "acknowledged"
        why_not = why_no_rollback(ours, theirs)
        if why_not is None:
            return Plan(Directive.ROLLBACK, f"{beyond}: it rolls them back")
        return Plan(Directive.SEND, f"{beyond}, and it cannot roll them back: {why_not}")
    if (theirs.epoch, theirs.seq) > (ours.epoch, ours.seq):
        return Plan(Directive.FETCH, f"{both}: the backup's copy is newer")
    return Plan(Directive.SEND, f"{both}: the primary's copy is as new or newer")


def why_no_rollback(ours: Copy, theirs: Copy) -> str | None:
    """Why the backup (``theirs``) cannot reach our data by undoing batches (None: it can).

    Replication is synchronous, so a live backup of our history is never behind
    our acknowledged state: at most ahead, by the batches whose acknowledgement
    we never saw."""
    if not (theirs.confirmed or theirs.recovered):
        return "the backup holds no confirmed or recovered copy"
    if theirs.history != ours.history:
        return "the backup's data has another history (a restart or a replaced copy)"
    if theirs.seq < ours.seq:
        return f"the backup is behind (seq {theirs.seq} < {ours.seq})"
    reachable = {state.seq: state for state in theirs.undo}
    if ours.seq not in reachable:
        return f"the backup cannot undo back to seq {ours.seq} (its undo record is too short)"
    state = reachable[ours.seq]
    if (state.checksum, state.count) != (ours.checksum, ours.count):
        return f"the backup's data at seq {ours.seq} differs from ours"
    return None


def why_no_catchup(ours: Copy, theirs: Copy) -> str | None:
    """Why the backup (``theirs``) cannot reach our data by our recorded batches (None:
    it can): rule 4."""
    if theirs.history != ours.history:
        return "the backup's data has another history (a restart or a replaced copy)"
    if theirs.seq > ours.seq:
        return f"the backup is ahead (seq {theirs.seq} > {ours.seq})"
    recorded = {state.seq: state for state in ours.record}
    recorded[ours.seq] = State(ours.seq, ours.checksum, ours.count)  # none to send
    state = recorded.get(theirs.seq)
    if state is None:
        return f"the backup is behind (seq {theirs.seq} < {ours.seq}) past our record of batches"
    if (state.checksum, state.count) != (theirs.checksum, theirs.count):
        return f"the backup's data at seq {theirs.seq} differs from ours then"
    return None


def refusal(directive: Directive, target: State | None, ours: Copy, theirs: Copy) -> str | None:
    """Why the backup (``ours``) refuses the primary's (``theirs``) directive; None: it obeys.

    ``target``: the state a SKIP or ROLLBACK says we reach, the state a CATCHUP says we
    start from.  Nothing is obeyed from
    a primary of a lower epoch than we have seen or than our copy's (a STALE one
    never sends a directive).  Only a confirmed copy may be kept as the primary's
    (SKIP), only a confirmed or recovered one rolled back to it (ROLLBACK: the
    checksum then proves it is the primary's) or become it (FETCH); a rollback
    needs our history and a
    recorded state at the target's seq (and the backup then checks that undoing
    really reached the target); a catch-up needs our history and must start from
    exactly our state (the backup checks the state it reaches at the end).  Data the
    primary sends is always taken, once all of it has arrived."""
    newest = max(ours.serving, ours.epoch)
    if theirs.serving < newest:
        return f"directive of epoch {theirs.serving} < {newest} seen"
    if directive is Directive.STALE:
        return "a stale primary has nothing to say"
    if directive is Directive.SKIP:
        assert target is not None
        if not ours.confirmed or (target.checksum, target.count) != (ours.checksum, ours.count):
            return "skip proposed but the data differs"
    elif directive is Directive.ROLLBACK:
        assert target is not None
        if (
            not (ours.confirmed or ours.recovered)
            or theirs.history != ours.history
            or all(state.seq != target.seq for state in ours.undo)
        ):
            return f"cannot roll back to seq {target.seq}"
    elif directive is Directive.CATCHUP:
        assert target is not None
        if theirs.history != ours.history or target != State(ours.seq, ours.checksum, ours.count):
            return f"cannot catch up from seq {target.seq}: our copy is not in that state"
    elif directive is Directive.FETCH and not (ours.confirmed or ours.recovered):
        return "fetch asked of a backup without confirmed data"
    return None


def mermaid(role: Role) -> str:
    """A state diagram of one role (self-transitions folded into the edge label)."""
    lines = ["```mermaid", "stateDiagram-v2", f"    [*] --> {Stage.COLD_START.value}"]
    edges: dict[tuple[Stage, Stage], list[str]] = {}
    for stage, table in TRANSITIONS[role].items():
        for event, new in table.items():
            edges.setdefault((stage, new), []).append(event.value)
    for (old, new), events in edges.items():
        lines.append(f"    {old.value} --> {new.value}: {', '.join(events)}")
    lines.append("```")
    return "\n".join(lines)


def describe() -> str:
    """Diagrams and markdown tables of both roles, for docs/stages.md."""
    lines: list[str] = []
    for role in Role:
        lines += [f"#### {role.capitalize()}", "", mermaid(role), ""]
        lines += ["| stage | event | next stage |", "| --- | --- | --- |"]
        for stage, edges in TRANSITIONS[role].items():
            for event, new in edges.items():
                lines.append(f"| {stage.value} | {event.value} | {new.value} |")
            for event in sorted(IGNORED[role].get(stage, ()), key=lambda e: e.value):
                lines.append(f"| {stage.value} | {event.value} | (ignored) |")
        lines += ["", "| stage | reads | writes |", "| --- | --- | --- |"]
        for stage, rule in ACCEPTANCE[role].items():
            lines.append(f"| {stage.value} | {rule.reads.value} | {rule.writes.value} |")
        lines += ["", "| handshake step | frame | next step |", "| --- | --- | --- |"]
        for secret, step in FIRST_STEP[role].items():
            opened = "(channel opened, a secret set)" if secret else "(channel opened)"
            lines.append(f"| none | {opened} | {step.value} |")
        for step, frames in HANDSHAKES[role].items():
            for name, steps in frames.items():
                following = ", ".join(s.value for s in steps)
                lines.append(f"| {step.value} | {name.name} | {following} |")
        lines.append("")
    return "\n".join(lines)


STAGES_PAGE = "docs/stages.md"
BEGIN_MARK = f"<!-- stage tables: generated by `python -m pbkv.stages --write {STAGES_PAGE}` -->"
END_MARK = "<!-- end of stage tables -->"


def with_tables(page: str) -> str:
    """The page's text with its generated section replaced by the current tables."""
    head, rest = page.split(BEGIN_MARK, 1)
    _, tail = rest.split(END_MARK, 1)
    return f"{head}{BEGIN_MARK}\n{describe()}\n{END_MARK}{tail}"


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        from pathlib import Path

        path = Path(sys.argv[2])
        path.write_text(with_tables(path.read_text()))
    else:
        print(describe())
