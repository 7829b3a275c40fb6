"""Leadership under faults: three members and the etcd model on virtual time
(pbkv/testing/leadership_sim.py), many seeds; each injected bug must be caught."""

from __future__ import annotations

import pytest

from pbkv.testing.leadership_sim import Bug, Outcome, Simulation, run_seed

SEEDS = 200


def report(outcome: Outcome) -> str:
    tail = "\n  ".join(outcome.trace[-8:])
    return (
        f"seed {outcome.seed}: {outcome.violation}\n  {tail}\n"
        f"  replay: python -m pbkv.testing.leadership_sim --first {outcome.seed} --seeds 1"
    )


def test_many_seeds_hold_every_invariant_and_fail_over() -> None:
    outcomes = [run_seed(seed) for seed in range(SEEDS)]
    bad = [o for o in outcomes if o.violation is not None]
    assert not bad, "\n".join(report(o) for o in bad[:3])
    # The runs did what they are for: failovers, fencings, acknowledged writes, and
    # some ended with nobody promotable (every member then said why).
    assert sum(o.stats.promotions for o in outcomes) > 2 * SEEDS
    assert sum(o.stats.fences for o in outcomes) > SEEDS
    assert sum(o.stats.acknowledged for o in outcomes) > 100 * SEEDS
    assert 0 < sum(o.stats.stuck for o in outcomes) < SEEDS / 2
    assert all(o.stats.crashes + o.stats.pauses + o.stats.partitions for o in outcomes)


def test_a_seed_replays_exactly() -> None:
    first, second = Simulation(77), Simulation(77)
    assert first.run() == second.run()
    assert first.trace == second.trace


@pytest.mark.parametrize(
    ("bug", "kind"),
    [
        (Bug.LEASE_FROM_REPLY, "serve"),
        (Bug.PROMOTE_ANYONE, "promotion"),
        (Bug.ACCEPT_LOWER_EPOCH, "epoch"),
        (Bug.ACK_BEFORE_RECORD, "ack"),
        (Bug.RESIGN_ANY_LEADER, "serve"),  # deletes a live leader's key
    ],
)
def test_an_injected_bug_is_caught(bug: Bug, kind: str) -> None:
    for seed in range(300):
        outcome = run_seed(seed, bug)
        if outcome.violation is not None:
            assert outcome.violation.kind == kind, report(outcome)
            return
    pytest.fail(f"{bug.value} went unnoticed in 300 seeds")


def test_an_acknowledgement_before_the_record_loses_acknowledged_writes() -> None:
    """Without the direct check on the record, the bug shows as what it costs: a
    promoted member lacks writes that were acknowledged."""
    for seed in range(300):
        outcome = run_seed(seed, Bug.ACK_BEFORE_RECORD, check_acks=False)
        if outcome.violation is not None:
            assert "acknowledged writes" in str(outcome.violation), report(outcome)
            return
    pytest.fail("no acknowledged write was lost in 300 seeds")
