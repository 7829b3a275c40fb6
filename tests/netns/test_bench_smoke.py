"""Smoke runs of the benchmarks (bench/compare.py, transfer.py, memory.py, blip.py,
failover.py) at tiny sizes, plus unit checks of the RESP load generator's pieces.

The scripts start their own servers on free ports (port 0 on 127.0.0.1, checked free on
127.0.0.2 too). Redis is used when installed (CI installs it); otherwise the scripts must
still succeed and say "redis: skipped (...)". They never apt-get here (--no-install).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench import blip, bulk, failover, resp_load, servers
from pbkv.launcher import process_alive
from pbkv.testing import hosts, netns

ROOT = Path(__file__).resolve().parents[2]
HAVE_REDIS = shutil.which("redis-server") is not None
NUMBER = r"\d+(?:\.\d+)?"


def _run(*args: str, timeout: float = 50) -> str:
    done = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


def _redis_or_skipped(out: str) -> None:
    if HAVE_REDIS:
        assert "redis: skipped" not in out
    else:
        assert re.search(r"redis: skipped \(.+\)", out), out


# ---------------------------------------------------------------- the scripts


def test_compare_quick() -> None:
    out = _run("bench.compare", "--quick", "--no-install")
    for system, op in (("pbkv replicated", "insert"), ("pbkv standalone", "get")):
        row = rf"^{system}\s+{op}\s+8\s+({NUMBER})\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+0\s"
        match = re.search(row, out, re.M)
        assert match, out
        assert float(match.group(1)) > 0
    assert re.search(rf"pbkv replicated / pbkv standalone \(inserts/s\)\s+{NUMBER}x", out), out
    if HAVE_REDIS:
        assert re.search(rf"^redis\s+SET\+WAIT 1 0\s+8\s+{NUMBER}", out, re.M), out
        assert re.search(rf"pbkv gets / Redis GET .*\s{NUMBER}x", out), out
    _redis_or_skipped(out)
    assert re.search(r"^targets .*at 8:$", out, re.M), out


def test_transfer_small() -> None:
    out = _run("bench.transfer", "--keys", "2000", "--no-redis-if-missing", "--no-install")
    assert "full transfer of 2000 pairs" in out
    for label in ("pbkv new backup -> in_sync", "pbkv restarted primary -> in_sync"):
        row = rf"^{re.escape(label)}\s+({NUMBER})\s+({NUMBER})\s+(?:{NUMBER}|n/a)\s+{NUMBER}"
        match = re.search(row, out, re.M)
        assert match, out
        # From the first HTTP answer can round to 0.00 at this size (done before it).
        assert 0 <= float(match.group(2)) <= float(match.group(1)), out
    if HAVE_REDIS:
        assert re.search(rf"^redis REPLICAOF -> master_link_status:up\s+{NUMBER}", out, re.M), out
    _redis_or_skipped(out)


def test_memory_small() -> None:
    out = _run("bench.memory", "--keys", "2000", "--no-redis-if-missing", "--no-install")
    assert "memory holding 2000 pairs" in out
    for name in ("pbkv primary", "pbkv backup"):
        match = re.search(rf"^{name}\s+({NUMBER})\s+({NUMBER})", out, re.M)
        assert match, out
        assert float(match.group(2)) > 0
    if HAVE_REDIS:
        assert re.search(rf"^redis primary\s+{NUMBER}\s+{NUMBER}", out, re.M), out
        assert re.search(rf"RSS pbkv / redis: primary {NUMBER}x", out), out
    _redis_or_skipped(out)


@pytest.mark.netns
def test_blip_quick() -> None:
    reason = netns.available()
    if reason is not None:
        pytest.skip(reason)
    before = _namespaces()
    report = json.loads(_run("bench.blip", "--quick", "--no-redis", "--json", timeout=60))
    assert report["redis_skipped"] == "--no-redis"
    results = {r["fault"]: r for r in report["results"]}
    assert set(results) == {"drop", "pause"}
    for r in results.values():
        assert r["system"] == "pbkv" and r["keys"] == 20_000, r
        assert r["blip_seconds"] >= 2.5, r
        # The writer waited out the blip: nothing was acknowledged while the backup was cut,
        # so the longest gap spans the blip and the wait for the first ack after the heal
        # (less what was in flight as the fault began).
        assert r["max_gap_ms"] >= 2500 * 0.9, r
        assert r["max_gap_ms"] >= r["blip_seconds"] * 1000 * 0.9 + r["heal_to_first_ack_ms"], r
        assert r["writes_acked"] >= 2 * blip.AFTER_ACKS, r
        assert isinstance(r["full_transfers"], int) and r["full_transfers"] >= 0, r
        # The blip outlasts the ack timeout: the servers log giving up and the resync.
        assert r["events"], r
        assert "primary_transfers_completed" in r["counters_after"], r
    targets = {t["target"]: t for t in report["targets"]}
    for fault in ("drop", "pause"):
        r = results[fault]
        ack = targets[f"pbkv {fault} 20000: heal to first ack <= 100 ms"]
        assert ack["value"] == r["heal_to_first_ack_ms"]
        assert ack["met"] == (r["heal_to_first_ack_ms"] <= blip.TARGET_MS)
        full = targets[f"pbkv {fault} 20000: no full transfer"]
        assert full["met"] == (r["full_transfers"] == 0)
    # Its namespaces went with it (a namespace's name carries its creator's pid).
    left = {
        name
        for name in _namespaces() - before
        if (match := re.match(r"^pbkv[a-z]*-(\d+)-", name)) and not process_alive(int(match[1]))
    }
    assert not left, left


@pytest.mark.netns
def test_failover_redis_quick() -> None:
    reason = hosts.available() or failover.redis_missing()
    if reason is not None:
        pytest.skip(reason)
    before = _namespaces()
    pairs, lease = 3000, 2
    out = _run(
        "bench.failover", "--only", "redis", "--pairs", str(pairs), "--faults", "kill",
        "--lease", str(lease), "--window", "20", "--json",
        timeout=60,
    )  # fmt: skip
    report = json.loads(out)
    assert report["skipped"] == {} and report["targets"] == [], report
    [r] = report["results"]
    assert "error" not in r, r
    assert (r["system"], r["fault"], r["pairs"]) == ("redis", "kill", pairs), r
    # Sentinel needs down-after, then an election and a promotion: never sooner.
    assert lease <= r["first_read_s"] < 20, r
    assert lease <= r["first_ack_s"] < 20, r
    assert r["lost"] == 0 and r["acknowledged"] >= pairs + failover.WARMUP_ACKS, r
    assert r["faulted_host"] in failover.SERVERS, r
    left = {
        name
        for name in _namespaces() - before
        if (match := re.match(r"^pbkv[a-z0-9]*-(\d+)-", name)) and not process_alive(int(match[1]))
    }
    assert not left, left


def _namespaces() -> set[str]:
    try:
        return {path.name for path in Path("/run/netns").iterdir()}
    except OSError:
        return set()


def test_blip_gap() -> None:
    assert blip._gap([1.0, 1.2, 2.0], 0.5, 3.0) == pytest.approx(1.0)
    assert blip._gap([], 0.5, 3.0) == pytest.approx(2.5)  # silence throughout


# ---------------------------------------------------------------- pieces


def test_failover_first_after_and_targets() -> None:
    ops = [
        failover.Op(0.5, 0.6, "ok", "n1"),  # sent before the fault
        failover.Op(1.0, 1.2, "error: ConnectionRefusedError", "n1"),
        failover.Op(1.3, 1.4, "ok", "n1"),  # from the cut-off server
        failover.Op(1.5, 4.1, "ok", "n2"),
    ]
    assert failover.first_after(ops, 1.0) == pytest.approx(1.4)
    assert failover.first_after(ops, 1.0, exclude="n1") == pytest.approx(4.1)
    assert failover.first_after(ops, 5.0) is None
    assert failover.tally(ops) == {"ok": 3, "error: ConnectionRefusedError": 1}
    common = {"lost": 0, "first_read_s": 3.2}
    results = [
        {"system": "pbkv", "fault": "kill", **common, "first_ack_s": 4.0, "transfer_s": 1.0},
        {"system": "redis", "fault": "kill", **common, "first_ack_s": 4.3},
        {"system": "pbkv", "fault": "restart", **common, "first_ack_s": 3.6, "lost": 1},
        {"system": "redis", "fault": "restart", "error": "RuntimeError: no master"},
    ]
    met = {t["target"].split(" (")[0]: t["met"] for t in failover.targets(results, 3)}
    assert met == {
        "pbkv kill: 0 acknowledged writes lost": True,
        "pbkv kill: first read <= lease + 0.5 s": True,
        "pbkv kill: first acked write <= lease + 0.5 s + transfer": True,
        "pbkv kill: first acked write sooner than Sentinel's": True,
        "pbkv restart: 0 acknowledged writes lost": False,
        "pbkv restart: first read <= lease + 0.5 s": True,
        "pbkv restart: first acked write <= lease + 0.5 s + transfer": False,
    }


def test_resp_encoding_and_replies() -> None:
    assert (
        resp_load.command("SET", "k", b"v", 7)
        == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n$1\r\n7\r\n"
    )
    template = resp_load.SetTemplate("p-", b"xyz", wait_replicas=1)
    assert template.request(5) == resp_load.command("SET", "p-000000005", "xyz") + (
        resp_load.command("WAIT", 1, 0)
    )
    assert template.replies == 2
    buf = b"+OK\r\n:1\r\n$3\r\nabc\r\n$-1\r\n-ERR no\r\n*2\r\n:1\r\n$1\r\nx\r\n$5\r\nab"
    replies = []
    pos = 0
    while (parsed := resp_load.parse_reply(buf, pos)) is not None:
        reply, pos = parsed
        replies.append(reply)
    assert replies == [
        (ord("+"), b"OK"),
        (ord(":"), 1),
        (ord("$"), b"abc"),
        (ord("$"), None),
        (ord("-"), b"ERR no"),
        (ord("*"), [(ord(":"), 1), (ord("$"), b"x")]),
    ]
    assert buf[pos:] == b"$5\r\nab"  # incomplete: left for the next read


def test_data_set_sizes() -> None:
    assert len(bulk.key_of(999_999)) == bulk.KEY_BYTES == 16
    assert len(bulk.value_of(3)) == bulk.VALUE_BYTES == 100
    assert bulk.value_of(3) != bulk.value_of(4)


def test_free_port_is_free_on_both_addresses() -> None:
    port = servers.free_port()
    for host in servers.LOOPBACK:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))


def test_prober_gap() -> None:
    prober = servers.Prober()
    prober.samples = [(1.0, 200, b""), (1.05, 0, b""), (1.2, 503, b""), (1.3, 200, b"")]
    assert prober.max_gap(0.9, 1.4) == pytest.approx(0.2)  # a failed request is no reply
    assert prober.max_gap(0.9, 1.4, only_ok=True) == pytest.approx(0.3)  # nor is a 503 here
    assert prober.max_gap(1.0, 2.0) == pytest.approx(0.7)  # silence up to the end counts


def test_variant_ratios_pair_the_rounds_measured_back_to_back() -> None:
    from bench.compare import REPLICATED, Cell, paired_ratios
    from bench.loadgen import LoadResult

    def cell(system: str, rates: list[float]) -> Cell:
        rounds = [LoadResult("insert", 64, 1, 0, 0, 1, 0, 1.0, rate, 1, 1, 1, 1) for rate in rates]
        return Cell(system, "insert", 64, rounds, [{}] * len(rates))

    # The machine slowed both down in round 2: the ratios stay near 1 where
    # best-of or median-of each over the run would not.
    cells = {
        (REPLICATED, "insert", 64): cell(REPLICATED, [100, 50, 100]),
        ("pbkv before", "insert", 64): cell("pbkv before", [95, 48, 97]),
    }
    assert paired_ratios(cells, "pbkv before", "insert", 64) == [0.95, 0.96, 0.97]
    assert paired_ratios(cells, "pbkv before", "get", 64) == []
