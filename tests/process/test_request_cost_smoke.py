"""bench/request_cost.py runs and prints a cost per request for pbkv and the bare protocol."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(60)
def test_request_cost_measures_pbkv_and_bare() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.request_cost", "--requests", "2000", "--rounds", "1"]
        + ["--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert rows["bare protocol"]["get"] > 0
    assert rows["pbkv"]["get"] > 0 and rows["pbkv"]["insert"] > 0
    assert rows["pbkv"]["keyed insert"] > 0
