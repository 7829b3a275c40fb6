"""Failover under faults: three members with the real leadership and cores, the etcd
model, clients (pbkv/testing/failover_sim.py), many seeds; each injected bug is caught."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from pbkv.testing.failover_sim import Bug, RunOutcome, Simulation, run_seed

SEEDS = 80
BUG_SEEDS = 150


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    logger = logging.getLogger("pbkv")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def report(outcome: RunOutcome, bug: Bug | None = None) -> str:
    return (
        f"seed {outcome.seed}: {outcome.violation}\n  faults: {'; '.join(outcome.faults)}\n"
        f"  replay: {outcome.replay_command(bug)}"
    )


def test_many_seeds_are_linearizable_lose_nothing_and_fail_over() -> None:
    outcomes = [run_seed(seed) for seed in range(SEEDS)]
    bad = [o for o in outcomes if o.violation is not None]
    assert not bad, "\n".join(report(o) for o in bad[:3])
    stats = [o.stats for o in outcomes]
    # The runs did what they are for: failovers and fencings under load, most ending in
    # sync again (their final content checked), some with nobody promotable.
    assert sum(s.promotions for s in stats) > 2 * SEEDS
    assert sum(s.fences for s in stats) > SEEDS
    assert sum(s.acknowledged for s in stats) > 40 * SEEDS
    assert sum(s.indeterminate for s in stats) > 3 * SEEDS
    assert sum(s.converged for s in stats) > SEEDS / 2
    assert 0 < sum(s.stuck for s in stats) < SEEDS / 2
    assert all(s.converged or s.stuck for s in stats)
    assert all(s.crashes + s.pauses + s.partitions for s in stats)


def test_a_seed_replays_exactly() -> None:
    traces: tuple[list[str], list[str]] = ([], [])
    first, second = (Simulation(77, trace=lines.append) for lines in traces)
    assert first.run() == second.run()
    assert traces[0] == traces[1] and traces[0]
    assert first.operations == second.operations


@pytest.mark.parametrize(
    ("bug", "kind"),
    [
        (Bug.LEASE_FROM_REPLY, "serve"),  # a primary serves after its lease ran out at etcd
        (Bug.PROMOTE_ANYONE, "promotion"),  # a member that is not the recorded backup
        (Bug.ACCEPT_LOWER_EPOCH, "epoch"),  # follows a leader of a lower epoch
        (Bug.ACK_BEFORE_RECORD, "ack"),  # acknowledges before etcd records the new backup
        (Bug.RESIGN_ANY_LEADER, "serve"),  # deletes a live leader's key
    ],
)
def test_an_injected_bug_is_caught(bug: Bug, kind: str) -> None:
    for seed in range(BUG_SEEDS):
        outcome = run_seed(seed, bug)
        if outcome.violation is not None:
            assert outcome.violation.kind == kind, report(outcome, bug)
            return
    pytest.fail(f"{bug.value} went unnoticed in {BUG_SEEDS} seeds")


@pytest.mark.parametrize("bug", [Bug.PROMOTE_ANYONE, Bug.ACK_BEFORE_RECORD])
def test_without_the_direct_checks_the_history_shows_what_a_bug_costs(bug: Bug) -> None:
    """Promoting a member that lacks acknowledged writes, or acknowledging with a backup
    etcd does not name, loses acknowledged writes: the history is not linearizable."""
    for seed in range(BUG_SEEDS):
        outcome = run_seed(seed, bug, checks=False)
        if outcome.violation is not None:
            assert outcome.violation.kind == "linearizability", report(outcome, bug)
            return
    pytest.fail(f"{bug.value} lost no acknowledged write in {BUG_SEEDS} seeds")


def test_a_promotion_that_forgets_the_idempotency_table_is_caught(monkeypatch) -> None:
    """Half the clients retry keyed writes across failovers; a promoted primary that
    lost the table (keys replicated, but not carried into the new role) applies a
    retried write a second time, and the histories show it."""
    import pbkv.testing.failover_sim as failover_sim

    real = failover_sim.promoted

    def forgetting(*args, **kwargs):  # type: ignore[no-untyped-def]
        primary = real(*args, **kwargs)
        primary.store.idempotency.clear()
        return primary

    monkeypatch.setattr(failover_sim, "promoted", forgetting)
    caught = next((o for o in map(run_seed, range(BUG_SEEDS)) if o.violation is not None), None)
    assert caught is not None, f"a forgotten table went unnoticed in {BUG_SEEDS} seeds"


@pytest.mark.pure_python
def test_a_backup_whose_copy_goes_astray_is_caught_at_its_acknowledgement(monkeypatch) -> None:
    """A backup that changes a pair no batch changed: the ACK's checksum is not the
    primary's after that batch, and the run reports it (the primary resyncs the copy,
    so the final contents alone would not show it)."""
    from pbkv.backup import BackupCore

    real = BackupCore._apply

    def astray(self, seq, ops, time, keyed, absent=0):  # type: ignore[no-untyped-def]
        written = real(self, seq, ops, time, keyed, absent)
        if seq % 7 == 3 and ops:
            self.store.write(ops[0], "astray")
        return written

    monkeypatch.setattr(BackupCore, "_apply", astray)
    outcomes = [run_seed(seed) for seed in range(10)]
    caught = [o for o in outcomes if o.violation is not None and o.violation.kind == "divergence"]
    assert len(caught) >= 5, [str(o.violation) for o in outcomes]
