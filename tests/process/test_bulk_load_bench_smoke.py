"""A smoke run of bench/bulk_load.py: a few thousand pairs; it must run, load every
pair into both systems and print both times and the ratio (their values are not
checked)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"\d+(?:\.\d+)?"


@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_both_times_and_the_ratio_are_printed() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.bulk_load", "--keys", "5000", "--no-install"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    out = done.stdout
    assert done.returncode == 0, f"exited {done.returncode}:\n{out}{done.stderr}"
    assert re.search(r"^bulk load of 5,000 pairs", out, re.M), out
    for label in (r"pbkv load \(primary \+ backup\)", r"redis-cli --pipe \+ WAIT 1 0"):
        row = rf"^  {label}\s+{NUMBER}\s+[\d,]+\s+{NUMBER}  {NUMBER}$"
        assert re.search(row, out, re.M), out
    for system in ("pbkv", "redis"):  # each round's CPU: primary + backup + client
        each = rf"^    {system}\s+{NUMBER} s: {NUMBER} \+ {NUMBER} \+ {NUMBER}$"
        assert re.search(each, out, re.M), out
    verdict = rf"^  pbkv / Redis \(seconds\) {NUMBER}x \(target <= 1.2\): (met|MISSED)$"
    assert re.search(verdict, out, re.M), out
    assert re.search(rf"^  pbkv / Redis \(CPU seconds, servers and client\) {NUMBER}x$", out, re.M)
