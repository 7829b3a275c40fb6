"""A smoke run of bench/dump_memory.py: a few thousand pairs, this checkout's CLI
measured beside itself; it must run, print each CLI's peak RSS and time, and find
every dump byte for byte the same (the figures are not checked)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"\d+(?:\.\d+)?"


@pytest.mark.timeout(120)
def test_each_clis_memory_and_time_are_printed() -> None:
    command = [sys.executable, "-m", "bench.dump_memory", "--keys", "3000", "--rounds", "1"]
    command += ["--checkout", str(ROOT)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=110)
    out = done.stdout
    assert done.returncode == 0, f"exited {done.returncode}:\n{out}{done.stderr}"
    assert re.search(r"^pbkv dump of 3,000 pairs to a file, 1 round\(s\) per CLI$", out, re.M)
    for name in ("this", "other"):
        row = rf"^  {name}\s+\S+\s+peak RSS MiB {NUMBER}  seconds {NUMBER}$"
        assert re.search(row, out, re.M), out
    assert re.search(r"^  every dump wrote the same bytes: yes$", out, re.M), out
