"""A smoke run of bench/abuse.py: every attack runs briefly and prints its figures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_every_attack_prints_its_figures() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.abuse", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    out = done.stdout
    assert done.returncode == 0, f"exited {done.returncode}:\n{out}{done.stderr}"
    for name in ("resources", "upgrade", "memory", "params", "handshakes"):
        assert f"== {name}\n" in out, out
    gaps = re.findall(r"longest gap between acknowledged writes (\d+) ms", out)
    assert len(gaps) == 3, out  # resources, upgrade, params
    assert re.search(r"answered 101", out), out
    # The two bounds this branch holds: memory with the writes in flight, descriptors.
    memory = re.search(r"peak memory_bytes ([\d.]+) MB, with writes in flight ([\d.]+) MB", out)
    assert memory and float(memory.group(2)) <= 50.5, out
    held = re.search(r"connections still open then: (\d+)", out)
    assert held and held.group(1) == "0", out
