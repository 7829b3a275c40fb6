"""Chaos on real processes: both servers started by the real scripts, concurrent
clients, and a seeded nemesis that kills (-9), shuts down and pauses (SIGSTOP) them;
every history is checked for linearizability against the final dump."""

from __future__ import annotations

import pytest

from pbkv.testing import chaos
from pbkv.testing.chaos import KILL, PAUSE, ChaosOptions, run_chaos
from pbkv.testing.linearizability import check

DURATION = 20.0


def _explain(report: chaos.ChaosReport) -> str:
    return f"{report.summary()}\n{report.details()}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_pair_stays_linearizable_under_kills_shutdowns_and_pauses(tmp_path, seed):
    report = run_chaos(ChaosOptions(duration=DURATION, seed=seed), tmp_path)

    assert report.ok, _explain(report)
    assert report.verdict is not None and report.verdict.ok is True
    assert report.dumps_equal and set(report.dumps) == {"primary", "backup"}
    # The nemesis did its job: both roles crashed, something was paused.
    assert report.count(KILL, "primary") >= 1, report.summary()
    assert report.count(KILL, "backup") >= 1, report.summary()
    assert report.count(PAUSE, "primary") + report.count(PAUSE, "backup") >= 1, report.summary()
    # And the clients got real work done around the faults.
    assert report.outcomes["acknowledged"] >= 500, report.summary()
    assert sum(op.definite for op in report.operations) >= 2000, report.summary()

    # The same history against a dump holding a value nobody wrote must fail.
    tampered = dict(report.final or {})
    key = next(iter(tampered), "k0")
    tampered[key] = "never written"
    verdict = check(report.operations, final=tampered)
    assert verdict.ok is False and verdict.key == key


@pytest.mark.slow
def test_chaos_catches_a_primary_that_loses_acknowledged_writes(tmp_path, capsys):
    # A standalone primary answers writes without a backup, so kill -9 and a restart
    # lose what it acknowledged: the driver must say so, with what to chase it by.
    args = f"--duration 6 --seed 3 --standalone --faults {KILL}".split()
    code = chaos.main([*args, "--dir", str(tmp_path)])
    out = capsys.readouterr().out

    assert code == 1, out
    assert "kill primary x" in out
    assert "verdict: NOT linearizable" in out
    assert "result: FAIL" in out
    assert "seed 3; replay: python -m pbkv.testing.chaos --duration 6 --seed 3" in out
    assert "is not linearizable" in out  # the checker's explanation
    assert "last lines of the primary log:" in out
    assert "nemesis timeline:" in out and "kill -9 primary" in out


def test_nemesis_moves():
    assert set(ChaosOptions().moves()) == {
        ("kill", "primary"),
        ("kill", "backup"),
        ("shutdown", "backup"),
        ("pause", "primary"),
        ("pause", "backup"),
    }
    assert ChaosOptions(standalone=True, faults=(KILL,)).moves() == [("kill", "primary")]
    assert ChaosOptions(faults=()).moves() == []
