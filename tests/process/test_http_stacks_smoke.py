"""Smoke runs of bench/http_stacks.py: the two stacks that need no optional package, and
the report for stacks whose package is missing (which must never fail the run)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"\d+(?:\.\d+)?"


def _run(args: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.timeout(30)
def test_bare_and_pbkv_measured() -> None:
    started = time.monotonic()
    done = _run(
        ["-m", "bench.http_stacks", "--duration", "0.3", "--rounds", "2", "--stacks", "bare,pbkv"]
    )
    elapsed = time.monotonic() - started
    out = done.stdout
    assert done.returncode == 0, f"exited {done.returncode}:\n{out}{done.stderr}"
    assert elapsed < 20, f"took {elapsed:.1f} s"
    for stack in ("bare", "pbkv"):
        # stack, version, req/s, p50 ms, p99 ms, ratio to bare, server CPU, its CPU per
        # request (us), load CPU, errors
        row = (
            rf"^{stack}\s+.*?\s([\d,]+)\s+{NUMBER}\s+{NUMBER}\s+({NUMBER})x\s+\d+%"
            rf"\s+({NUMBER})\s+\d+%\s+0$"
        )
        match = re.search(row, out, re.M)
        assert match, out
        assert float(match.group(1).replace(",", "")) > 0, out
        assert float(match.group(2)) > 0, out
        assert float(match.group(3)) > 0, out
    assert re.search(r"^bare\s.*\s1\.00x\s", out, re.M), out
    for stack in ("bare", "pbkv"):  # both rounds of each, the stacks in turn
        assert re.search(rf"^{stack} rounds \(req/s\): [\d,]+, [\d,]+$", out, re.M), out
    assert "server pinned to core" in out
    assert re.search(r"^versions: python \S+, uvloop \S+, httptools \S+", out, re.M), out


@pytest.mark.timeout(30)
def test_missing_packages_are_skipped() -> None:
    # sys.modules[name] = None makes importlib.util.find_spec report the package missing.
    code = (
        "import sys\n"
        "for name in ('granian', 'uvicorn', 'aiohttp'):\n"
        "    sys.modules[name] = None\n"
        "from bench.http_stacks import main\n"
        "sys.exit(main(['--duration', '0.2', '--stacks', 'granian,uvicorn,aiohttp']))\n"
    )
    done = _run(["-c", code])
    assert done.returncode == 0, f"exited {done.returncode}:\n{done.stdout}{done.stderr}"
    for name in ("granian", "uvicorn", "aiohttp"):
        line = rf"^{name}\s+.*skipped \(not installed: pip install {name}\)$"
        assert re.search(line, done.stdout, re.M), done.stdout


def test_each_stack_shows_its_median_round_and_a_failure_wins() -> None:
    from bench.http_stacks import Row, median_round

    rows = [Row("pbkv", "pbkv", "1", "ok", throughput=t, p50_ms=t / 1000) for t in (30, 10, 20)]
    middle = median_round(rows)
    assert middle.throughput == 20 and middle.p50_ms == 0.02  # the whole round, not a mix
    assert middle.rounds == [30, 10, 20]  # in the order measured
    even = median_round([Row("b", "b", "1", "ok", throughput=t) for t in (40, 10, 30, 20)])
    assert even.throughput == 20
    failed = Row("b", "b", "1", "failed", reason="no reply")
    assert median_round([rows[0], failed, rows[1]]) is failed
