"""The course grading flow on real processes, started by the real scripts."""

from __future__ import annotations

import subprocess

from tests.support.harness import BIN, wait_for


def test_course_grading_flow(pair):
    pair.start_both()
    primary = pair.client("primary")
    expected = {f"key{i}": f"value{i}" for i in range(10)}
    for key, value in expected.items():
        assert primary.insert(key, value) is True
    for key, value in expected.items():
        assert primary.get(key) == value

    # Shut the backup down through the API and restart it.
    backup = pair.client("backup")
    backup.shutdown()
    wait_for(lambda: pair.status("backup") is None, what="backup to stop")
    pair.start("backup")
    pair.wait_stage("primary", "in_sync")

    for key in ("key0", "key1"):
        assert primary.delete(key) == expected.pop(key)
    for key in ("key2", "key3"):
        assert primary.update(key, key + "-updated") is True
        expected[key] = key + "-updated"

    pair.kill("primary")
    pair.start("primary")
    pair.wait_stage("primary", "in_sync")
    assert pair.dump("primary") == expected
    assert pair.dump("backup") == expected
    assert len(expected) == 8


def test_bin_test_prints_the_four_course_lines(pair):
    pair.start_both()
    result = subprocess.run(
        [str(BIN / "test"), "--config", str(pair.config), "--count", "200"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stderr
    assert len(lines) == 4
    assert lines[0] == "Result: success"
    assert lines[1] == "Insertion: 200/200"
    assert lines[2].startswith("Average latency: ") and lines[2].endswith(" ms")
    assert lines[3].startswith("Percentile latency: ") and lines[3].count("/") == 4
