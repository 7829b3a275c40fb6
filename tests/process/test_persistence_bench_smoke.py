"""A smoke run of bench/persistence.py: tiny rounds and a small start-up; it must run
and print every figure and every target (their values are not checked)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"\d+(?:\.\d+)?"


def bench(*arguments: str) -> str:
    """``python -m bench.persistence`` with ``arguments``: what it printed (it must
    succeed)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.persistence", *arguments, "--no-install"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=55,
    )
    assert done.returncode == 0, f"exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_every_figure_and_target_is_printed() -> None:
    out = bench("--seconds", "0.2", "--warmup", "0.05", "--rounds", "1", "--pairs", "2000")
    for system in ("pbkv", "redis"):
        for mode in ("off", "everysec", "always"):
            for conns in (64, 1):
                row = rf"^{system} {mode}\s+{conns}\s+(\d+)\s+{NUMBER}\s+{NUMBER}\s+\d+"
                match = re.search(row, out, re.M)
                assert match and int(match.group(1)) > 0, out
    assert re.search(r"^start-up from disk, 2,000 pairs", out, re.M), out
    for name in ("pbkv primary", "redis"):
        assert re.search(rf"^  {name}\s+{NUMBER} s\s+{NUMBER} s\s+{NUMBER} MiB$", out, re.M), out
    assert re.search(rf"pair in sync: {NUMBER} s", out), out
    verdicts = re.findall(r"^  (.+?)\s+\S+x \(target [<>]= \S+\): (met|MISSED)$", out, re.M)
    labels = [label for label, _ in verdicts]
    assert labels == [
        "everysec / off @ 64",
        "everysec / off @ 1",
        "always / off @ 64",
        "everysec: pbkv / Redis @ 64",
        "everysec: pbkv / Redis @ 1",
        "always: pbkv / Redis @ 64",
        "always: pbkv / Redis @ 1",
        "start-up: pbkv / Redis (seconds)",
    ], out


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_startup_only_measures_the_start_up_alone() -> None:
    out = bench("--startup-only", "--pairs", "2000")
    assert not re.search(r"^(pbkv|redis) (off|everysec|always)\s+\d", out, re.M), out
    for name in ("pbkv primary", "redis"):
        assert re.search(rf"^  {name}\s+{NUMBER} s\s+{NUMBER} s\s+{NUMBER} MiB$", out, re.M), out
    verdicts = re.findall(r"^  (.+?)\s+\S+x \(target [<>]= \S+\): (met|MISSED)$", out, re.M)
    assert [label for label, _ in verdicts] == ["start-up: pbkv / Redis (seconds)"], out
