"""A restarted backup, as the course's graders restart it: back in sync before
their next command, so that killing the primary right after loses nothing.

A curl grading script runs ``bin/start_server -b &``, ``sleep 1``, writes, then
``kill -9`` of the primary; a Go grader runs ``start_server -b``, sleeps 100 ms and
writes.  While the new backup is not yet in sync, the primary holds the only
copy: killed then, every acknowledged pair would be gone.
"""

from __future__ import annotations

import subprocess
import time

from tests.support.harness import Pair, wait_for

# A back-off that grows long: without the backup's nudge, the primary would come
# back to a restarted backup seconds later.
LONG_BACKOFF = {"retry_min": "0.2", "retry_max": "4.0", "peer_timeout": "2.0"}
BACKOFF_GROWN = 2.5  # seconds down: the primary's pending retry is 0.8-3.2 s away


def backup_down_for(pair: Pair, seconds: float) -> None:
    """``/kvman/shutdown`` of the backup, then ``seconds`` down (the primary retries
    meanwhile, its back-off growing: the condition this test is about)."""
    pair.shutdown("backup")
    time.sleep(seconds)


def test_killing_the_primary_a_second_after_a_backup_restart_loses_nothing(make_pair):
    pair: Pair = make_pair(**LONG_BACKOFF)
    pair.start_both()
    primary = pair.client("primary")
    acknowledged: dict[str, str] = {}
    for i in range(20):
        assert primary.insert(f"before{i}", f"value{i}") is True
        acknowledged[f"before{i}"] = f"value{i}"
    refused = 0
    for round_ in range(3):
        backup_down_for(pair, BACKOFF_GROWN)
        # As the curl script: `bin/start_server -b &`, `sleep 1`, writes, `kill -9`.
        launcher = subprocess.Popen(
            pair.command("start", "backup"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        time.sleep(1.0)
        with pair.client("primary", timeout=2.0) as writer:
            for i in range(5):
                key, value = f"round{round_}-{i}", f"value{round_}-{i}"
                try:
                    if writer.insert(key, value):
                        acknowledged[key] = value
                except Exception:
                    refused += 1  # not acknowledged: it may be gone, it is not counted
        pair.kill("primary")
        out, err = launcher.communicate(timeout=60)
        assert launcher.returncode == 0, (out, err)
        pair.start("primary")
        pair.wait_stage("primary", "in_sync")
        dump = pair.dump("primary")
        lost = {key for key, value in acknowledged.items() if dump.get(key) != value}
        assert not lost, f"round {round_}: {len(lost)} acknowledged pairs lost: {sorted(lost)}"
        assert pair.dump("backup") == dump
    # The backup was in sync within the second: no write was refused.
    assert refused == 0


def test_a_write_100_ms_after_start_server_b_returns_succeeds(make_pair):
    pair: Pair = make_pair(**LONG_BACKOFF)
    pair.start_both()
    primary = pair.client("primary")
    for round_ in range(3):
        backup_down_for(pair, BACKOFF_GROWN if round_ else 0.0)
        result = pair.start("backup")  # as the Go grader: `Exec start_server -b`
        assert "stage in_sync" in result.stdout, result.stdout
        time.sleep(0.1)  # the grader's `Sleep 100ms`
        # No retry: start_server -b returned with the pair in sync.
        assert primary.insert(f"k{round_}", "v") is True


def test_start_server_b_says_when_the_sync_does_not_come(make_pair):
    pair: Pair = make_pair(secret="one-secret", **LONG_BACKOFF)
    pair.start("primary")
    # A backup with another secret: the primary's proofs never match, no sync comes.
    result = pair.start("backup", "--secret", "another-secret", "--sync-wait", "1")
    assert result.returncode == 0, result.stderr  # it runs, and keeps trying
    assert "not in sync with the primary" in result.stderr, result.stderr
    assert "after 1s without a transfer under way" in result.stderr
    assert wait_for(lambda: pair.status("backup") is not None)
