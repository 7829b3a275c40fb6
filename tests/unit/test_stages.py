"""The stage tables of both roles, and the small machine that fires them.

Everything that decides which stage follows which, and what a stage accepts,
is data in ``pbkv.stages``; these tests read that data against the seed design
(the primary's four stages, the backup's four stages, and what each of them
answers) and check that ``StageMachine`` does exactly what the table says.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from pbkv.stages import (
    ACCEPTANCE,
    AUTH_STEPS,
    BACKUP_ACCEPTANCE,
    BACKUP_TRANSITIONS,
    FIRST_STEP,
    HANDSHAKES,
    IGNORED,
    PRIMARY_ACCEPTANCE,
    PRIMARY_TRANSITIONS,
    TRANSITIONS,
    Acceptance,
    Copy,
    Directive,
    Event,
    Handshake,
    Plan,
    ProtocolError,
    ReadRule,
    Resync,
    Role,
    Stage,
    StageMachine,
    State,
    Step,
    WriteRule,
    describe,
    plan,
    refusal,
    why_no_rollback,
)
from pbkv.transfer import TransferError
from pbkv.wire import FrameError, FrameType, Hello

S, E = Stage, Event

ROLE_STAGES = {
    "primary": {S.COLD_START, S.BOOTSTRAPPING_SECONDARY, S.WARM_START, S.IN_SYNC},
    "backup": {S.COLD_START, S.BOOTSTRAPPING_PRIMARY, S.WARM_START, S.IN_SYNC},
}
ROLES = tuple(ROLE_STAGES)

EDGES = [
    (role, stage, event, new)
    for role in ROLES
    for stage, edges in TRANSITIONS[role].items()
    for event, new in edges.items()
]
IGNORED_EVENTS = [
    (role, stage, event)
    for role in ROLES
    for stage, events in IGNORED[role].items()
    for event in sorted(events, key=lambda e: e.value)
]
MISSING = [
    (role, stage, event)
    for role in ROLES
    for stage, edges in TRANSITIONS[role].items()
    for event in Event
    if event not in edges and event not in IGNORED[role].get(stage, ())
]


def edge_id(part: object) -> str:
    """Test ids from stage and event names."""
    return str(getattr(part, "value", part))


# -- the shape of the tables -----------------------------------------------------------


def test_the_role_tables_are_the_published_ones() -> None:
    assert TRANSITIONS == {"primary": PRIMARY_TRANSITIONS, "backup": BACKUP_TRANSITIONS}
    assert ACCEPTANCE == {"primary": PRIMARY_ACCEPTANCE, "backup": BACKUP_ACCEPTANCE}


@pytest.mark.parametrize("role", ROLES)
def test_every_stage_of_the_role_has_a_transition_and_an_acceptance_entry(role: str) -> None:
    assert set(TRANSITIONS[role]) == ROLE_STAGES[role]
    assert set(ACCEPTANCE[role]) == ROLE_STAGES[role]
    for stage, edges in TRANSITIONS[role].items():
        assert edges, f"{role} {stage.value} is a dead end"
        assert isinstance(ACCEPTANCE[role][stage], Acceptance)


@pytest.mark.parametrize("role", ROLES)
def test_transitions_stay_within_the_role(role: str) -> None:
    for edges in TRANSITIONS[role].values():
        assert set(edges.values()) <= ROLE_STAGES[role]


@pytest.mark.parametrize("role", ROLES)
def test_every_stage_is_reachable_from_cold_start_and_in_sync_from_every_stage(
    role: str,
) -> None:
    table = TRANSITIONS[role]

    def reachable(start: Stage) -> set[Stage]:
        seen, todo = {start}, deque([start])
        while todo:
            for new in table[todo.popleft()].values():
                if new not in seen:
                    seen.add(new)
                    todo.append(new)
        return seen

    assert reachable(S.COLD_START) == ROLE_STAGES[role]
    for stage in ROLE_STAGES[role]:
        assert S.IN_SYNC in reachable(stage), f"{role} cannot get back in sync from {stage}"


@pytest.mark.parametrize(
    ("role", "stage", "event", "new"),
    [
        # Primary, seed: "if none exist ... bootstrapping stage with empty data".
        ("primary", S.COLD_START, E.BACKUP_UNREACHABLE, S.BOOTSTRAPPING_SECONDARY),
        ("primary", S.COLD_START, E.BACKUP_NEEDS_DATA, S.BOOTSTRAPPING_SECONDARY),
        # "If there exists a backup server already, then primary ... warm start".
        ("primary", S.COLD_START, E.BACKUP_HOLDS_DATA, S.WARM_START),
        ("primary", S.BOOTSTRAPPING_SECONDARY, E.SYNC_CONFIRMED, S.IN_SYNC),
        # "if any failure happens ... start over the bootstrapping".
        ("primary", S.BOOTSTRAPPING_SECONDARY, E.PEER_LOST, S.BOOTSTRAPPING_SECONDARY),
        ("primary", S.WARM_START, E.SYNC_CONFIRMED, S.IN_SYNC),
        # "if failed, restart the warm start".
        ("primary", S.WARM_START, E.PEER_LOST, S.WARM_START),
        ("primary", S.WARM_START, E.TRANSFER_FAILED, S.WARM_START),
        # "If backup server fails or timed out ... enters Bootstrapping Secondary".
        ("primary", S.IN_SYNC, E.PEER_LOST, S.BOOTSTRAPPING_SECONDARY),
        # Backup: look for a primary.
        ("backup", S.COLD_START, E.PRIMARY_RUNNING, S.WARM_START),
        ("backup", S.COLD_START, E.PRIMARY_ABSENT, S.BOOTSTRAPPING_PRIMARY),
        # "if the primary has ... replied with the correct checksum ... enters in sync".
        ("backup", S.BOOTSTRAPPING_PRIMARY, E.SYNC_CONFIRMED, S.IN_SYNC),
        ("backup", S.BOOTSTRAPPING_PRIMARY, E.TRANSFER_FAILED, S.BOOTSTRAPPING_PRIMARY),
        ("backup", S.WARM_START, E.SYNC_CONFIRMED, S.IN_SYNC),
        # "If not matched, the secondary will reply failure and listen again".
        ("backup", S.WARM_START, E.TRANSFER_FAILED, S.WARM_START),
        # "if primary is offline ... kick itself to bootstrapping stage".
        ("backup", S.IN_SYNC, E.PEER_LOST, S.BOOTSTRAPPING_PRIMARY),
    ],
    ids=edge_id,
)
def test_the_seed_transitions_are_in_the_tables(
    role: str, stage: Stage, event: Event, new: Stage
) -> None:
    assert TRANSITIONS[role][stage][event] is new


@pytest.mark.parametrize("role", ROLES)
def test_in_sync_is_left_only_for_bootstrapping_when_the_peer_is_lost(role: str) -> None:
    back_to = S.BOOTSTRAPPING_SECONDARY if role == "primary" else S.BOOTSTRAPPING_PRIMARY
    assert TRANSITIONS[role][S.IN_SYNC][E.PEER_LOST] is back_to
    assert set(TRANSITIONS[role][S.IN_SYNC].values()) == {back_to}
    # The primary is in sync only after the backup: only the backup can still fail there.
    expected = {E.PEER_LOST} if role == "primary" else {E.PEER_LOST, E.TRANSFER_FAILED}
    assert set(TRANSITIONS[role][S.IN_SYNC]) == expected


# -- StageMachine ----------------------------------------------------------------------


@pytest.mark.parametrize(("role", "stage", "event", "new"), EDGES, ids=edge_id)
def test_fire_follows_the_table_and_reports_the_transition(
    role: str, stage: Stage, event: Event, new: Stage
) -> None:
    seen: list[tuple[Stage, Stage, str]] = []
    machine = StageMachine(role, stage, lambda old, to, why: seen.append((old, to, why)))
    assert machine.acceptance == ACCEPTANCE[role][stage]

    assert machine.fire(event, "because") is new

    assert machine.stage is new
    assert machine.acceptance == ACCEPTANCE[role][new]
    # Self-transitions (a failed attempt that starts over) are reported too.
    assert seen == [(stage, new, "because")]


def test_the_tables_hold_self_transitions() -> None:
    selfish = {(role, stage, event) for role, stage, event, new in EDGES if stage is new}
    assert ("primary", S.WARM_START, E.PEER_LOST) in selfish
    assert ("backup", S.WARM_START, E.TRANSFER_FAILED) in selfish
    assert ("backup", S.BOOTSTRAPPING_PRIMARY, E.PEER_LOST) in selfish


@pytest.mark.parametrize(("role", "stage", "event"), MISSING, ids=edge_id)
def test_an_event_not_in_the_table_raises_and_changes_nothing(
    role: str, stage: Stage, event: Event
) -> None:
    seen: list[object] = []
    machine = StageMachine(role, stage, lambda *args: seen.append(args))

    with pytest.raises(ProtocolError) as info:
        machine.fire(event, "should not happen")

    assert machine.stage is stage
    assert machine.acceptance == ACCEPTANCE[role][stage]
    assert seen == []
    message = str(info.value)
    assert role in message and stage.value in message and event.value in message


@pytest.mark.parametrize(("role", "stage", "event"), IGNORED_EVENTS, ids=edge_id)
def test_an_ignored_event_changes_nothing_and_is_not_reported(
    role: str, stage: Stage, event: Event
) -> None:
    assert event not in TRANSITIONS[role][stage], "an event is either a transition or ignored"
    seen: list[object] = []
    machine = StageMachine(role, stage, lambda *args: seen.append(args))

    assert machine.fire(event, "old news") is stage

    assert machine.stage is stage and seen == []


def test_the_late_and_repeated_news_the_stages_ignore() -> None:
    assert E.BACKUP_UNREACHABLE in IGNORED["primary"][S.BOOTSTRAPPING_SECONDARY]
    assert E.BACKUP_HOLDS_DATA in IGNORED["primary"][S.WARM_START]
    assert E.PRIMARY_RUNNING in IGNORED["backup"][S.IN_SYNC]
    # Only the backup's own waiting may end a warm start for want of a primary.
    assert TRANSITIONS["backup"][S.WARM_START][E.NO_PRIMARY_IN_TIME] is S.BOOTSTRAPPING_PRIMARY
    assert E.PRIMARY_ABSENT in IGNORED["backup"][S.WARM_START]  # a late probe
    assert E.PEER_LOST not in IGNORED["primary"].get(S.IN_SYNC, ())


def test_fire_without_a_callback() -> None:
    machine = StageMachine("backup", S.COLD_START)
    assert machine.fire(E.PRIMARY_ABSENT, "nobody home") is S.BOOTSTRAPPING_PRIMARY
    assert machine.fire(E.TRANSFER_STARTED, "a primary sends") is S.WARM_START
    assert machine.fire(E.SYNC_CONFIRMED, "checksum verified") is S.IN_SYNC
    with pytest.raises(ProtocolError):
        machine.fire(E.TRANSFER_STARTED, "no transfer starts while streaming")
    assert machine.fire(E.PRIMARY_RUNNING, "a late probe") is S.IN_SYNC  # ignored
    assert machine.stage is S.IN_SYNC


def test_a_protocol_error_is_no_error_a_driver_handles() -> None:
    # A bug, not a fault the drivers expect: no handler they have for a bad frame, a
    # bad transfer or a lost connection may swallow it.
    machine = StageMachine("backup", S.IN_SYNC)
    with pytest.raises(ProtocolError, match="backup in stage in_sync has no transition"):
        try:
            machine.fire(E.TRANSFER_STARTED, "no transfer starts while streaming")
        except (FrameError, TransferError, OSError):
            pass


@pytest.mark.parametrize(
    ("role", "stage"),
    [("primary", S.BOOTSTRAPPING_PRIMARY), ("backup", S.BOOTSTRAPPING_SECONDARY)],
)
def test_the_machine_refuses_a_stage_of_the_other_role(role: str, stage: Stage) -> None:
    with pytest.raises(ValueError, match=stage.value):
        StageMachine(role, stage)


def test_roles_know_their_peer() -> None:
    assert Role.PRIMARY.peer is Role.BACKUP and Role.BACKUP.peer is Role.PRIMARY
    assert Role("primary") is Role.PRIMARY and Role.PRIMARY == "primary"


def test_the_machine_does_not_know_which_side_it_plays_beyond_its_table() -> None:
    primary = StageMachine("primary", S.COLD_START)
    backup = StageMachine("backup", S.COLD_START)
    assert primary.table is PRIMARY_TRANSITIONS
    assert backup.table is BACKUP_TRANSITIONS
    with pytest.raises(ProtocolError):
        primary.fire(E.PRIMARY_RUNNING, "a backup event")
    with pytest.raises(ProtocolError):
        backup.fire(E.BACKUP_UNREACHABLE, "a primary event")


# -- acceptance (seed: what each stage answers) ----------------------------------------


def test_cold_start_refuses_everything() -> None:
    # Seed: "During this stage, the server refuses all query."
    assert PRIMARY_ACCEPTANCE[S.COLD_START] == Acceptance(ReadRule.REFUSE, WriteRule.REFUSE)
    assert BACKUP_ACCEPTANCE[S.COLD_START].reads is ReadRule.REFUSE
    assert BACKUP_ACCEPTANCE[S.COLD_START].writes is WriteRule.REDIRECT


def test_primary_bootstrapping_secondary_serves_confirmed_reads_and_refuses_writes() -> None:
    rule = PRIMARY_ACCEPTANCE[S.BOOTSTRAPPING_SECONDARY]
    assert rule.reads is ReadRule.SERVE_IF_CONFIRMED
    assert rule.writes is WriteRule.REFUSE


def test_primary_warm_start_refuses_writes_and_reads_outside_complete_shards() -> None:
    rule = PRIMARY_ACCEPTANCE[S.WARM_START]
    assert rule.reads is ReadRule.SERVE_IF_SHARD_COMPLETE
    assert rule.writes is WriteRule.REFUSE


def test_primary_in_sync_serves_everything() -> None:
    assert PRIMARY_ACCEPTANCE[S.IN_SYNC] == Acceptance(ReadRule.SERVE, WriteRule.REPLICATE)


def test_only_the_primary_in_sync_accepts_writes() -> None:
    accepting = [
        (role, stage)
        for role in ROLES
        for stage, rule in ACCEPTANCE[role].items()
        if rule.writes is WriteRule.REPLICATE
    ]
    assert accepting == [("primary", S.IN_SYNC)]


@pytest.mark.parametrize("stage", sorted(ROLE_STAGES["backup"], key=lambda s: s.value))
def test_the_backup_always_refuses_client_writes_naming_the_primary(stage: Stage) -> None:
    assert BACKUP_ACCEPTANCE[stage].writes is WriteRule.REDIRECT


def test_the_backup_serves_reads_only_from_a_whole_database() -> None:
    assert BACKUP_ACCEPTANCE[S.IN_SYNC].reads is ReadRule.SERVE
    assert BACKUP_ACCEPTANCE[S.BOOTSTRAPPING_PRIMARY].reads is ReadRule.SERVE
    # Receiving: a new copy arrives beside the old one, which is whole only if confirmed.
    assert BACKUP_ACCEPTANCE[S.WARM_START].reads is ReadRule.SERVE_IF_CONFIRMED


# -- the handshake ---------------------------------------------------------------------

HANDSHAKE_EDGES = [
    (role, step, kind, following)
    for role in ROLES
    for step, frames in HANDSHAKES[role].items()
    for kind, following in frames.items()
]


@pytest.mark.parametrize("role", ROLES)
def test_every_step_has_a_row_and_none_accepts_no_frame(role: str) -> None:
    assert set(HANDSHAKES[role]) <= set(Step)
    assert HANDSHAKES[role][Step.NONE] == {}
    for step, frames in HANDSHAKES[role].items():
        if step is not Step.NONE and step not in AUTH_STEPS:
            assert frames[FrameType.HEARTBEAT] == (step,)
        if step in AUTH_STEPS:  # the first keyed frame must follow the last plain one
            assert FrameType.HEARTBEAT not in frames
        for following in frames.values():
            assert following and set(following) <= set(HANDSHAKES[role])


@pytest.mark.parametrize("role", ROLES)
def test_the_handshake_reaches_streaming_from_the_hello_and_only_the_primary_opens(
    role: str,
) -> None:
    table = HANDSHAKES[role]
    starts = set(FIRST_STEP[role].values())
    seen, todo = set(starts), deque(starts)
    while todo:
        for following in table[todo.popleft()].values():
            for step in following:
                if step not in seen:
                    seen.add(step)
                    todo.append(step)
    assert Step.STREAMING in seen
    assert seen | {Step.NONE} == set(table)


def test_the_frames_each_role_accepts_while_streaming() -> None:
    assert set(HANDSHAKES["primary"][Step.STREAMING]) == {FrameType.ACK, FrameType.HEARTBEAT}
    assert set(HANDSHAKES["backup"][Step.STREAMING]) == {
        FrameType.BATCH,
        FrameType.FENCE,
        FrameType.SYNC_NACK,
        FrameType.HEARTBEAT,
    }
    # Only the primary decides: the backup never sends FETCH, SKIP or a snapshot unasked.
    assert FrameType.FETCH not in {k for f in HANDSHAKES["primary"].values() for k in f}
    assert FrameType.HELLO in HANDSHAKES["backup"][Step.AWAIT_HELLO]


@pytest.mark.parametrize(("role", "step", "kind", "following"), HANDSHAKE_EDGES, ids=edge_id)
def test_a_handshake_moves_only_along_its_table(
    role: str, step: Step, kind: FrameType, following: tuple[Step, ...]
) -> None:
    handshake = Handshake(role)
    handshake.step = step
    assert handshake.accepts(kind)
    for new in set(Step) - set(following):
        with pytest.raises(ProtocolError, match=kind.name):
            handshake.advance(kind, new)
        assert handshake.step is step
    handshake.advance(kind, following[0])
    assert handshake.step is following[0]


def test_a_handshake_starts_at_the_hello_and_ends_with_the_channel() -> None:
    handshake = Handshake("backup")
    assert handshake.step is Step.NONE and not handshake.accepts(FrameType.HELLO)
    handshake.opened(authenticate=False)
    assert handshake.step is Step.AWAIT_HELLO and handshake.accepts(FrameType.HELLO)
    assert not handshake.accepts(FrameType.BATCH)
    handshake.reset()
    assert handshake.step is Step.NONE


@pytest.mark.parametrize("role", ROLES)
def test_with_a_secret_nothing_but_the_proofs_counts_before_the_hello(role: str) -> None:
    handshake = Handshake(role)
    handshake.opened(authenticate=True)
    assert handshake.step in AUTH_STEPS
    for kind in (FrameType.HELLO, FrameType.BATCH, FrameType.SNAPSHOT_BEGIN, FrameType.ACK):
        if kind in HANDSHAKES[role][handshake.step]:  # the backup refuses a bare HELLO
            assert HANDSHAKES[role][handshake.step][kind] == (Step.NONE,)
        else:
            assert not handshake.accepts(kind)
    # Every way out of the proof steps that does not close the channel leads to the HELLO.
    for step in AUTH_STEPS & set(HANDSHAKES[role]):
        for following in HANDSHAKES[role][step].values():
            assert set(following) <= AUTH_STEPS | {Step.AWAIT_HELLO, Step.NONE}


# -- describe(): the README tables -----------------------------------------------------


def test_describe_mentions_every_stage_event_and_rule() -> None:
    text = describe()
    for role in ROLES:
        assert role.capitalize() in text
    for stage in Stage:
        assert stage.value in text
    for _, _, event, _ in EDGES:
        assert event.value in text
    for rule in (*ReadRule, *WriteRule):
        if any(rule in (a.reads, a.writes) for t in ACCEPTANCE.values() for a in t.values()):
            assert rule.value in text


def test_describe_has_one_row_per_transition_and_per_stage() -> None:
    rows = [line for line in describe().splitlines() if line.startswith("| ")]
    headers = [row for row in rows if row.startswith(("| stage |", "| handshake step |"))]
    body = [row for row in rows if row not in headers and not row.startswith("| ---")]
    stage_rows = sum(len(ACCEPTANCE[role]) for role in ROLES)
    opened_rows = sum(len(FIRST_STEP[role]) for role in ROLES)
    expected = len(EDGES) + len(IGNORED_EVENTS) + stage_rows + opened_rows + len(HANDSHAKE_EDGES)
    assert len(body) == expected
    for role, stage, event, new in EDGES:
        assert f"| {stage.value} | {event.value} | {new.value} |" in body, role
    for role in ROLES:
        for stage, rule in ACCEPTANCE[role].items():
            assert f"| {stage.value} | {rule.reads.value} | {rule.writes.value} |" in body
    for _, stage, event in IGNORED_EVENTS:
        assert f"| {stage.value} | {event.value} | (ignored) |" in body
    for _, step, kind, following in HANDSHAKE_EDGES:
        row = f"| {step.value} | {kind.name} | {', '.join(s.value for s in following)} |"
        assert row in body


# -- who wins a handshake --------------------------------------------------------------
H, OTHER = 0x1111, 0x2222  # history ids
A, B = 0xAAAA, 0xBBBB  # checksums


def held(
    confirmed: bool = True,
    seq: int = 5,
    checksum: int = A,
    count: int = 3,
    history: int = H,
    undo: tuple[State, ...] = (),
    epoch: int = 0,
    serving: int = 0,
    recovered: bool = False,
    record: tuple[State, ...] = (),
) -> Copy:
    return Copy(confirmed, history, seq, checksum, count, undo, epoch, serving, recovered, record)


def recovered(**changes: Any) -> Copy:
    """A copy loaded from disk at start (``persistence``), not confirmed since."""
    return held(confirmed=False, recovered=True, **changes)


NEITHER = "the backup holds no confirmed or recovered copy"


# A backup two batches ahead of the primary's seq 5, whose record reaches seq 5 as A/3.
AHEAD = (State(4, B, 2), State(5, A, 3), State(6, B, 4))
# A primary at seq 5 whose record of batches leads on from seq 2 (B/1) and 3 (B/2).
RECORDED = (State(2, B, 1), State(3, B, 2), State(4, A, 2))
# A primary of epoch 4 meets a backup that has seen epoch 7.
STALE_SEEN = Plan(Directive.STALE, "the backup has seen epoch 7 > our 4: a newer primary exists")

# (the primary's copy, the backup's copy, the plan)
PLANS: list[tuple[Copy, Copy, Plan]] = [
    # A confirmed primary keeps its data: skip when the backup's confirmed copy matches...
    (held(), held(), Plan(Directive.SKIP, "primary and backup already hold the same data")),
    (
        held(),
        held(seq=9, history=OTHER),  # the data decides, not the seq or the history
        Plan(Directive.SKIP, "primary and backup already hold the same data"),
    ),
    # ... have the backup undo the batches we never applied, when it can ...
    (
        held(),
        held(seq=7, checksum=B, count=4, undo=AHEAD),
        Plan(Directive.ROLLBACK, "the backup rolls back 2 batches, seq 7 -> 5"),
    ),
    # ... and send it otherwise, saying why.
    (
        held(),
        held(confirmed=False, checksum=B),
        Plan(Directive.SEND, NEITHER),
    ),
    (  # our very data, not confirmed (a spare that followed us): caught up by no batch
        held(),
        held(confirmed=False),
        Plan(Directive.CATCHUP, "the backup catches up 0 batches, seq 5 -> 5"),
    ),
    (
        held(),
        held(seq=7, checksum=B, count=4, history=OTHER, undo=AHEAD),
        Plan(
            Directive.SEND,
            "the backup's data has another history (a restart or a replaced copy)",
        ),
    ),
    (
        held(),
        held(seq=3, checksum=B),
        Plan(Directive.SEND, "the backup is behind (seq 3 < 5) past our record of batches"),
    ),
    # ... or have a backup behind us catch up by the batches we recorded, when our
    # record reaches back to its seq with exactly its data: confirmed or not.
    (
        held(record=RECORDED),
        held(seq=3, checksum=B, count=2),
        Plan(Directive.CATCHUP, "the backup catches up 2 batches, seq 3 -> 5"),
    ),
    (
        held(record=RECORDED),
        held(confirmed=False, seq=2, checksum=B, count=1),
        Plan(Directive.CATCHUP, "the backup catches up 3 batches, seq 2 -> 5"),
    ),
    (
        held(record=RECORDED),
        held(confirmed=False, seq=1, checksum=B, count=1),
        Plan(Directive.SEND, "the backup is behind (seq 1 < 5) past our record of batches"),
    ),
    (
        held(record=RECORDED),
        held(confirmed=False, seq=3, checksum=B, count=3),  # same checksum, not count
        Plan(Directive.SEND, "the backup's data at seq 3 differs from ours then"),
    ),
    (
        held(record=RECORDED),
        held(confirmed=False, seq=3, checksum=A, count=2),
        Plan(Directive.SEND, "the backup's data at seq 3 differs from ours then"),
    ),
    (
        held(record=RECORDED),
        held(confirmed=False, seq=3, checksum=B, count=2, history=OTHER),
        Plan(Directive.SEND, NEITHER),
    ),
    (  # a newer epoch's confirmed copy still wins (rule 3): no catch-up over it
        held(record=RECORDED, epoch=4, serving=9),
        held(seq=3, checksum=B, count=2, epoch=7, serving=7),
        Plan(Directive.FETCH, "backup holds 2 confirmed pairs of a newer epoch (7 > our copy's 4)"),
    ),
    (  # and a stale primary catches nobody up
        held(record=RECORDED, epoch=4, serving=4),
        held(seq=3, checksum=B, count=2, serving=7),
        STALE_SEEN,
    ),
    (
        held(),
        held(seq=7, checksum=B, count=4, undo=AHEAD[2:]),
        Plan(
            Directive.SEND,
            "the backup cannot undo back to seq 5 (its undo record is too short)",
        ),
    ),
    (
        held(),
        held(seq=7, checksum=B, count=4, undo=(State(5, B, 3), State(6, B, 4))),
        Plan(Directive.SEND, "the backup's data at seq 5 differs from ours"),
    ),
    (
        held(),
        held(seq=7, checksum=B, count=4, undo=(State(5, A, 2),)),  # same checksum, not count
        Plan(Directive.SEND, "the backup's data at seq 5 differs from ours"),
    ),
    # A primary without confirmed data takes the backup's confirmed copy, however small...
    (
        held(confirmed=False),
        held(seq=9, checksum=B),
        Plan(Directive.FETCH, "backup holds 3 confirmed pairs"),
    ),
    (
        held(confirmed=False, seq=0, count=0),
        held(count=0),
        Plan(Directive.FETCH, "backup holds 0 confirmed pairs"),
    ),
    # ... and starts empty when neither side's data is confirmed.
    (
        held(confirmed=False),
        held(confirmed=False, checksum=B, count=7),
        Plan(Directive.START_EMPTY, "no confirmed data on either side: start empty"),
    ),
    (
        held(confirmed=False),
        held(confirmed=False),  # even the same data
        Plan(Directive.START_EMPTY, "no confirmed data on either side: start empty"),
    ),
    # -- recovered copies (persistence: loaded from disk at start, not yet confirmed) --
    # A recovered copy wins over an empty start, on either side...
    (
        recovered(),
        held(confirmed=False, seq=0, checksum=B, count=0),
        Plan(Directive.SEND, f"the primary recovered 3 pairs from disk (seq 5); {NEITHER}"),
    ),
    (
        held(confirmed=False, seq=0, count=0),
        recovered(seq=9, checksum=B, count=4),
        Plan(
            Directive.FETCH,
            "the backup recovered 4 pairs from disk (seq 9); "
            "the primary holds no confirmed or recovered copy",
        ),
    ),
    # ... of two recovered copies of one history and epoch the primary's wins: the
    # backup's batches beyond it were never acknowledged; it undoes them if it can,
    (
        recovered(),
        recovered(seq=7, checksum=B, count=4, undo=AHEAD),
        Plan(
            Directive.ROLLBACK,
            "both recovered from disk: the primary's seq 5 epoch 0, the backup's seq 7 "
            "epoch 0: the backup's 2 batches beyond ours were never acknowledged: it rolls "
            "them back",
        ),
    ),
    (  # ... else it is sent the primary's copy,
        recovered(),
        recovered(seq=7, checksum=B, count=4),
        Plan(
            Directive.SEND,
            "both recovered from disk: the primary's seq 5 epoch 0, the backup's seq 7 "
            "epoch 0: the backup's 2 batches beyond ours were never acknowledged, and it "
            "cannot roll them back: the backup cannot undo back to seq 5 (its undo record "
            "is too short)",
        ),
    ),
    (  # ... even when its record reaches seq 5 as other data (a base written meanwhile)
        recovered(),
        recovered(seq=7, checksum=B, count=4, undo=(State(5, B, 3),)),
        Plan(
            Directive.SEND,
            "both recovered from disk: the primary's seq 5 epoch 0, the backup's seq 7 "
            "epoch 0: the backup's 2 batches beyond ours were never acknowledged, and it "
            "cannot roll them back: the backup's data at seq 5 differs from ours",
        ),
    ),
    (  # ... of two histories, the newer (their seqs say nothing of each other)
        recovered(),
        recovered(seq=7, checksum=B, count=4, history=OTHER),
        Plan(
            Directive.FETCH,
            "both recovered from disk: the primary's seq 5 epoch 0, the backup's seq 7 "
            "epoch 0: the backup's copy is newer",
        ),
    ),
    (  # ... and the primary's when it is ahead (the backup's log lost its last second)
        recovered(seq=9),
        recovered(seq=7, checksum=B, count=4),
        Plan(
            Directive.SEND,
            "both recovered from disk: the primary's seq 9 epoch 0, the backup's seq 7 "
            "epoch 0: the primary's copy is as new or newer",
        ),
    ),
    (
        recovered(),
        recovered(history=OTHER),
        Plan(
            Directive.SEND,
            "both recovered from disk: the primary's seq 5 epoch 0, the backup's seq 5 "
            "epoch 0: the primary's copy is as new or newer",
        ),
    ),
    (  # ... the newer epoch first, whatever the seqs
        recovered(seq=9, epoch=5, serving=7),
        recovered(seq=3, checksum=B, epoch=7, serving=7),
        Plan(
            Directive.FETCH,
            "both recovered from disk: the primary's seq 9 epoch 5, the backup's seq 3 "
            "epoch 7: the backup's copy is newer",
        ),
    ),
    # A stale recovered copy never overwrites a live confirmed one, on either side...
    (recovered(seq=9), held(seq=7), Plan(Directive.FETCH, "backup holds 3 confirmed pairs")),
    (
        held(),
        recovered(seq=9, checksum=B),
        Plan(
            Directive.SEND,
            "the backup cannot undo back to seq 5 (its undo record is too short)",
        ),
    ),
    (  # ... which, of our history, undoes the batches we never acknowledged
        held(),
        recovered(seq=7, checksum=B, count=4, undo=AHEAD),
        Plan(Directive.ROLLBACK, "the backup rolls back 2 batches, seq 7 -> 5"),
    ),
    # ... and a recovered primary of an older epoch than the backup has seen is stale.
    (recovered(serving=4), recovered(seq=9, serving=7), STALE_SEEN),
    # -- epochs (a coordinated cluster; every row above is epoch 0 on both sides) --
    # Equal epochs past 0 change nothing.
    (
        held(epoch=7, serving=7),
        held(epoch=7, serving=7),
        Plan(Directive.SKIP, "primary and backup already hold the same data"),
    ),
    (
        held(epoch=7, serving=7),
        held(seq=7, checksum=B, count=4, undo=AHEAD, epoch=7, serving=7),
        Plan(Directive.ROLLBACK, "the backup rolls back 2 batches, seq 7 -> 5"),
    ),
    # A primary of an older epoch than the backup has seen is stale: it sends nothing...
    (held(serving=4), held(confirmed=False, serving=7), STALE_SEEN),  # no SEND
    (held(serving=4), held(serving=7), STALE_SEEN),  # no SKIP
    (held(serving=4), held(seq=7, checksum=B, count=4, undo=AHEAD, serving=7), STALE_SEEN),
    (held(confirmed=False, serving=4), held(confirmed=False, serving=7), STALE_SEEN),
    (held(confirmed=False, serving=4), held(serving=7), STALE_SEEN),  # not even a FETCH
    # ... nor over a copy of a newer epoch than its own (whatever the backup says it saw).
    (
        held(epoch=4, serving=4),
        held(checksum=B, epoch=7),
        Plan(
            Directive.STALE,
            "the backup's copy is of epoch 7 > our 4: a newer primary exists",
        ),
    ),
    # A confirmed copy of a newer epoch wins over our confirmed copy of an older one...
    (
        held(epoch=5, serving=9),
        held(checksum=B, epoch=7, serving=9),
        Plan(Directive.FETCH, "backup holds 3 confirmed pairs of a newer epoch (7 > our copy's 5)"),
    ),
    (  # ... and is never rolled back: those batches may be that epoch's acknowledged writes
        held(epoch=5, serving=9),
        held(seq=7, checksum=B, count=4, undo=AHEAD, epoch=7, serving=9),
        Plan(Directive.FETCH, "backup holds 4 confirmed pairs of a newer epoch (7 > our copy's 5)"),
    ),
    (  # ... unless it holds the same data
        held(epoch=5, serving=9),
        held(epoch=7, serving=9),
        Plan(Directive.SKIP, "primary and backup already hold the same data"),
    ),
    # Our copy of a newer epoch wins over the backup's of an older one, as in rule 4: an
    # old primary that comes back undoes what it never had acknowledged, or takes ours.
    (
        held(epoch=7, serving=7),
        held(seq=7, checksum=B, count=4, undo=AHEAD, epoch=5, serving=7),
        Plan(Directive.ROLLBACK, "the backup rolls back 2 batches, seq 7 -> 5"),
    ),
    (
        held(epoch=7, serving=7),
        held(checksum=B, history=OTHER, epoch=5, serving=7),
        Plan(
            Directive.SEND,
            "the backup's data has another history (a restart or a replaced copy)",
        ),
    ),
]


def plans_that_differ(rule: Callable[[Copy, Copy], Plan]) -> list[tuple[Copy, Copy, Plan]]:
    return [(ours, theirs, want) for ours, theirs, want in PLANS if rule(ours, theirs) != want]


def test_every_handshake_case_has_its_plan() -> None:
    assert plans_that_differ(plan) == []
    assert {want.directive for _, _, want in PLANS} == set(Directive)


def test_the_table_catches_a_primary_that_sends_over_a_backups_confirmed_copy() -> None:
    def sends_over_a_confirmed_backup(ours: Copy, theirs: Copy) -> Plan:
        if not ours.confirmed and not ours.recovered:
            return Plan(Directive.START_EMPTY, "no confirmed data on either side: start empty")
        return plan(ours, theirs)

    wrong = plans_that_differ(sends_over_a_confirmed_backup)
    assert [want.directive for _, _, want in wrong] == [
        Directive.FETCH,
        Directive.FETCH,
        Directive.FETCH,  # the backup's recovered copy
        Directive.STALE,
        Directive.STALE,
    ]


def test_the_table_catches_a_primary_that_forgets_recovered_copies() -> None:
    """Treating a copy loaded from disk as an empty start loses it (both down at once)."""

    def forgetful(ours: Copy, theirs: Copy) -> Plan:
        return plan(replace(ours, recovered=False), replace(theirs, recovered=False))

    wrong = plans_that_differ(forgetful)
    assert [got.directive for got in (forgetful(o, t) for o, t, _ in wrong)] == [
        Directive.START_EMPTY
    ] * 9 + [Directive.SEND] * 2  # (the last two: a live primary's, sent whole)


def test_the_table_catches_a_primary_that_lets_the_newer_recovered_copy_win() -> None:
    """Of two recovered copies of one history, "the newer wins" would bring back
    batches the primary never acknowledged (a write answered "replication failed")."""

    def newer_wins(ours: Copy, theirs: Copy) -> Plan:
        both_recovered = ours.recovered and theirs.recovered
        if both_recovered and (theirs.epoch, theirs.seq) > (ours.epoch, ours.seq):
            return Plan(Directive.FETCH, "newer")
        return plan(ours, theirs)

    wrong = [
        want.directive
        for ours, theirs, want in PLANS
        if newer_wins(ours, theirs).directive is not want.directive
    ]
    assert wrong == [Directive.ROLLBACK, Directive.SEND, Directive.SEND, Directive.STALE]


def test_the_table_catches_a_primary_that_ignores_epochs() -> None:
    def blind(ours: Copy, theirs: Copy) -> Plan:
        return plan(replace(ours, epoch=0, serving=0), replace(theirs, epoch=0, serving=0))

    wrong = plans_that_differ(blind)
    assert {want.directive for _, _, want in wrong} == {Directive.STALE, Directive.FETCH}
    assert len(wrong) == 12


def test_the_table_catches_a_primary_that_rolls_back_a_newer_epochs_batches() -> None:
    def rolls_back_first(ours: Copy, theirs: Copy) -> Plan:
        if ours.serving >= theirs.serving and why_no_rollback(ours, theirs) is None:
            return Plan(Directive.ROLLBACK, "rolled back")
        return plan(ours, theirs)

    wrong = [
        (theirs.epoch, want.directive)
        for ours, theirs, want in PLANS
        if rolls_back_first(ours, theirs).directive is not want.directive
    ]
    assert wrong == [(7, Directive.FETCH)]


@pytest.mark.parametrize(
    ("ours", "theirs", "want"),
    [row for row in PLANS if row[2].directive not in (Directive.SEND, Directive.STALE)],
    ids=lambda v: v.directive.name if isinstance(v, Plan) else "",
)
def test_the_backup_obeys_every_directive_the_primary_plans(
    ours: Copy, theirs: Copy, want: Plan
) -> None:
    """The two sides' rules agree: what the primary plans, the backup accepts."""
    target = State(ours.seq, ours.checksum, ours.count)
    if want.directive is Directive.CATCHUP:  # from the backup's state on
        target = State(theirs.seq, theirs.checksum, theirs.count)
    assert refusal(want.directive, target, theirs, ours) is None


S5 = State(5, A, 3)  # the primary's state in the directive rows

# (the directive, its target, the backup's copy, the primary's copy, the refusal)
DIRECTIVES: list[tuple[Directive, State | None, Copy, Copy, str | None]] = [
    (Directive.SKIP, S5, held(), held(), None),
    (Directive.SKIP, S5, held(confirmed=False), held(), "skip proposed but the data differs"),
    (Directive.SKIP, S5, held(count=4), held(), "skip proposed but the data differs"),
    (Directive.SKIP, S5, held(checksum=B), held(), "skip proposed but the data differs"),
    (Directive.ROLLBACK, S5, held(seq=7, undo=AHEAD), held(), None),
    (
        Directive.ROLLBACK,
        S5,
        held(confirmed=False, seq=7, undo=AHEAD),
        held(),
        "cannot roll back to seq 5",
    ),
    (
        Directive.ROLLBACK,
        S5,
        held(seq=7, undo=AHEAD),
        held(history=OTHER),
        "cannot roll back to seq 5",
    ),
    (Directive.ROLLBACK, S5, held(seq=7, undo=AHEAD[2:]), held(), "cannot roll back to seq 5"),
    (Directive.ROLLBACK, S5, held(seq=7), held(), "cannot roll back to seq 5"),
    (Directive.FETCH, None, held(), held(confirmed=False), None),
    # A catch-up starts from exactly our state, in our history; confirmed or not.
    (Directive.CATCHUP, State(3, B, 2), held(seq=3, checksum=B, count=2), held(), None),
    (
        Directive.CATCHUP,
        State(3, B, 2),
        held(confirmed=False, seq=3, checksum=B, count=2),
        held(),
        None,
    ),
    (
        Directive.CATCHUP,
        State(3, B, 2),
        held(seq=3, checksum=B, count=2),
        held(history=OTHER),
        "cannot catch up from seq 3: our copy is not in that state",
    ),
    (
        Directive.CATCHUP,
        State(2, B, 2),
        held(seq=3, checksum=B, count=2),
        held(),
        "cannot catch up from seq 2: our copy is not in that state",
    ),
    (
        Directive.CATCHUP,
        State(3, A, 2),
        held(seq=3, checksum=B, count=2),
        held(),
        "cannot catch up from seq 3: our copy is not in that state",
    ),
    (
        Directive.CATCHUP,
        State(3, B, 1),
        held(seq=3, checksum=B, count=2),
        held(),
        "cannot catch up from seq 3: our copy is not in that state",
    ),
    (
        Directive.CATCHUP,
        State(3, B, 2),
        held(seq=3, checksum=B, count=2, serving=7),
        held(serving=4),
        "directive of epoch 4 < 7 seen",
    ),
    (
        Directive.FETCH,
        None,
        held(confirmed=False),
        held(confirmed=False),
        "fetch asked of a backup without confirmed data",
    ),
    # A recovered copy may be fetched (the primary found it the newer).
    (Directive.FETCH, None, recovered(), recovered(seq=3), None),
    # The primary's data is always taken (once all of it has arrived).
    (Directive.SEND, None, held(confirmed=False), held(), None),
    (Directive.START_EMPTY, None, held(), held(confirmed=False), None),
    # -- epochs: nothing is obeyed from a primary of an older epoch than we have seen...
    (Directive.SKIP, S5, held(serving=7), held(serving=4), "directive of epoch 4 < 7 seen"),
    (
        Directive.ROLLBACK,
        S5,
        held(seq=7, undo=AHEAD, serving=7),
        held(serving=4),
        "directive of epoch 4 < 7 seen",
    ),
    (Directive.FETCH, None, held(serving=7), held(serving=4), "directive of epoch 4 < 7 seen"),
    (
        Directive.SEND,
        None,
        held(confirmed=False, serving=7),
        held(serving=4),
        "directive of epoch 4 < 7 seen",
    ),
    (
        Directive.START_EMPTY,
        None,
        held(confirmed=False, serving=7),
        held(confirmed=False, serving=4),
        "directive of epoch 4 < 7 seen",
    ),
    # ... or than our copy's,
    (Directive.SEND, None, held(epoch=7), held(serving=4), "directive of epoch 4 < 7 seen"),
    # ... while the same epoch, or a newer one, is obeyed as ever.
    (Directive.SKIP, S5, held(epoch=7, serving=7), held(epoch=7, serving=7), None),
    (Directive.SEND, None, held(epoch=4, serving=4), held(serving=7), None),
    (Directive.ROLLBACK, S5, held(seq=7, undo=AHEAD, epoch=4, serving=9), held(serving=9), None),
    # A stale primary never sends a directive: none is obeyed as one.
    (Directive.STALE, None, held(), held(), "a stale primary has nothing to say"),
]


@pytest.mark.parametrize(
    ("directive", "target", "ours", "theirs", "why"),
    DIRECTIVES,
    ids=lambda v: v.name if isinstance(v, Directive) else "",
)
def test_the_backup_refuses_a_directive_its_copy_cannot_follow(
    directive: Directive, target: State | None, ours: Copy, theirs: Copy, why: str | None
) -> None:
    assert refusal(directive, target, ours, theirs) == why


def test_a_copy_reads_a_hello() -> None:
    hello = Hello("backup", True, A, 3, 7, H, ((5, A, 3), (6, B, 4)))
    assert Copy.of(hello) == held(seq=7, undo=(State(5, A, 3), State(6, B, 4)))


def test_a_copy_reads_the_epochs_of_a_hello() -> None:
    """The copy's epoch from the HELLO's fields, the epoch its sender acts under from
    the frame's header."""
    hello = Hello("backup", True, A, 3, 7, H, (), 5, epoch=9)
    assert Copy.of(hello) == held(seq=7, epoch=5, serving=9)


def test_each_directive_counts_as_its_kind_of_resync() -> None:
    kinds = {directive: directive.resync for directive in Directive}
    assert kinds == {
        Directive.SEND: Resync.FULL,
        Directive.SKIP: Resync.NONE,
        Directive.CATCHUP: Resync.PARTIAL,
        Directive.ROLLBACK: Resync.PARTIAL,
        Directive.FETCH: Resync.FULL,
        Directive.START_EMPTY: Resync.FULL,
        Directive.STALE: Resync.NONE,  # nothing moves
    }
