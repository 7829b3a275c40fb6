"""Replication on real processes: start orders, failures under load, restarts,
every handshake case (who wins), and faults injected by a proxy.

Every test starts a real primary (127.0.0.1) and backup (127.0.0.2) with the
real scripts and short timeouts (see ``tests/support/harness.py``), drives them with
real clients and compares their dumps with a model of the acknowledged writes.
"""

from __future__ import annotations

import random
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from pbkv.client import Client, NotPrimary, PbkvError, ReplicationFailed, Unavailable
from pbkv.stages import Role
from pbkv.testing.proxy import FaultProxy
from tests.support.harness import FAST_SETTINGS, Pair, wait_for

ACK_TIMEOUT = float(FAST_SETTINGS["ack_timeout"])
# Every write must be answered within this: the ack timeout, the heartbeat tick
# that notices it, and scheduling slack on a busy two-core machine.
ANSWER_BOUND = ACK_TIMEOUT + 2.0
CLIENT_TIMEOUT = ANSWER_BOUND + 5.0  # a hang shows up as a slow answer, not a stuck test
LOAD_SECONDS = 3.0

# Keys and values that must round-trip through replication and transfers.
ODD_TEXT = ["&=+%", "two words", "line\nbreak\r\n", 'quote" back\\slash', "é ü 🙂", "\0nul", ""]


# -- models and checks -------------------------------------------------------------------------
def _diff(actual: dict[str, str], expected: dict[str, str], limit: int = 8) -> str:
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    changed = sorted(k for k in expected.keys() & actual.keys() if expected[k] != actual[k])
    return (
        f"{len(missing)} missing {missing[:limit]!r}, {len(extra)} unexpected {extra[:limit]!r}, "
        f"{len(changed)} changed {changed[:limit]!r}"
    )


def wait_in_sync(pair: Pair, timeout: float = 20.0) -> None:
    pair.wait_stage("backup", "in_sync", timeout)
    pair.wait_stage("primary", "in_sync", timeout)


def assert_replicas_equal(pair: Pair, expected: dict[str, str] | None = None) -> dict[str, str]:
    """Both in sync, dumps equal (to ``expected`` too), checksums and counts equal."""
    wait_in_sync(pair)
    primary = pair.dump("primary")
    backup = pair.dump("backup")
    assert primary == backup, f"backup differs from primary: {_diff(backup, primary)}"
    if expected is not None:
        assert primary == expected, f"primary differs from the model: {_diff(primary, expected)}"
    p_status, b_status = pair.status("primary"), pair.status("backup")
    assert p_status is not None and b_status is not None
    assert p_status["checksum"] == b_status["checksum"]
    assert p_status["keys"] == b_status["keys"] == len(primary)
    assert p_status["handshake"] == b_status["handshake"] == "streaming"
    with pair.client("primary") as p, pair.client("backup") as b:
        assert p.count() == b.count() == len(primary)
    return primary


def run_ops(
    client: Client, model: dict[str, str], count: int, rng: random.Random, tag: str
) -> None:
    """``count`` sequential inserts/updates/deletes (some failing logically), each
    checked against ``model``, which is updated as they are acknowledged."""
    for n in range(count):
        roll = rng.random()
        if roll < 0.45 or not model:
            key = f"{tag}-{n}-{ODD_TEXT[n % len(ODD_TEXT)]}"
            value = f"v{n}{ODD_TEXT[rng.randrange(len(ODD_TEXT))]}"
            assert client.insert(key, value) is True, key
            model[key] = value
        elif roll < 0.7:
            key = rng.choice(sorted(model))
            value = f"u{n}{ODD_TEXT[rng.randrange(len(ODD_TEXT))]}"
            assert client.update(key, value) is True, key
            model[key] = value
        elif roll < 0.9:
            key = rng.choice(sorted(model))
            assert client.delete(key) == model.pop(key)
        elif roll < 0.94:
            assert client.insert(rng.choice(sorted(model)), "dup") is False
        elif roll < 0.97:
            assert client.update(f"{tag}-missing-{n}", "x") is False
        else:
            assert client.delete(f"{tag}-missing-{n}") is None


def fill(
    pair: Pair, count: int, threads: int = 4, tag: str = "fill", value_size: int = 32
) -> dict[str, str]:
    """Insert ``count`` keys from concurrent clients (group commit makes it quick)."""
    model: dict[str, str] = {}
    errors: list[BaseException] = []

    def work(part: int) -> None:
        try:
            with Client(
                *pair.address["primary"], timeout=CLIENT_TIMEOUT, idempotency_keys=False
            ) as client:
                for n in range(part, count, threads):
                    key, value = f"{tag}-{n:05d}", f"value-{n:05d}-" + "x" * value_size
                    assert client.insert(key, value) is True
                    model[key] = value
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors, errors
    return model


def last_run(log: str) -> str:
    """The part of a log written by the most recent start of that server."""
    return log[log.rfind(" listening on ") :]


# -- a concurrent write load -------------------------------------------------------------------
@dataclass(slots=True)
class Op:
    kind: str  # insert, update, delete
    key: str
    value: str | None
    started: float
    ended: float = 0.0
    # ok | wrong (acknowledged with an unexpected result) | failed (replication failed)
    # | refused (503) | unknown (transport error: outcome indeterminate)
    outcome: str = ""
    detail: str = ""

    @property
    def latency(self) -> float:
        return self.ended - self.started


@dataclass
class Worker:
    """One client thread writing to its own keys, so its model is exact."""

    number: int
    host: str
    port: int
    stop: threading.Event
    stop_on_unknown: bool
    model: dict[str, str] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)
    pending: Op | None = None  # the op whose outcome is unknown, if any

    def prefix(self) -> str:
        return f"w{self.number}:"

    def run(self) -> None:
        rng = random.Random(self.number)
        fresh = 0
        with Client(self.host, self.port, timeout=CLIENT_TIMEOUT, idempotency_keys=False) as client:
            while not self.stop.is_set():
                roll = rng.random()
                if roll < 0.5 or not self.model:
                    fresh += 1
                    op = Op("insert", f"{self.prefix()}{fresh}", f"v{fresh}", time.monotonic())
                elif roll < 0.75:
                    key = rng.choice(list(self.model))
                    op = Op("update", key, f"u{fresh}-{rng.randrange(1000)}", time.monotonic())
                else:
                    op = Op("delete", rng.choice(list(self.model)), None, time.monotonic())
                self._do(client, op)
                self.ops.append(op)
                if op.outcome == "unknown" and self.stop_on_unknown:
                    self.pending = op
                    return
                if op.outcome != "ok":
                    self.stop.wait(0.01)  # pace retries against a refusing server

    def _do(self, client: Client, op: Op) -> None:
        try:
            if op.kind == "insert":
                result: object = client.insert(op.key, op.value or "")
                expected: object = True
            elif op.kind == "update":
                result, expected = client.update(op.key, op.value or ""), True
            else:
                result, expected = client.delete(op.key), self.model[op.key]
        except ReplicationFailed:
            op.outcome = "failed"
        except Unavailable as exc:
            op.outcome, op.detail = "refused", str(exc.stage)
        except (OSError, PbkvError) as exc:
            op.outcome, op.detail = "unknown", repr(exc)
        else:
            if result == expected:
                op.outcome = "ok"
                if op.value is None:
                    del self.model[op.key]
                else:
                    self.model[op.key] = op.value
            else:
                op.outcome, op.detail = "wrong", f"got {result!r}, expected {expected!r}"
        op.ended = time.monotonic()


class WriteLoad:
    """Threads with their own clients writing to the primary until stopped."""

    def __init__(self, pair: Pair, threads: int = 4, stop_on_unknown: bool = False) -> None:
        host, port = pair.address["primary"]
        self.stop = threading.Event()
        self.workers = [Worker(i, host, port, self.stop, stop_on_unknown) for i in range(threads)]
        self.threads = [threading.Thread(target=w.run, daemon=True) for w in self.workers]
        self.started = 0.0

    def __enter__(self) -> WriteLoad:
        self.started = time.monotonic()
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(CLIENT_TIMEOUT + 5)
        assert not any(t.is_alive() for t in self.threads), "a load thread is stuck"

    def ops(self) -> Iterator[Op]:
        for worker in self.workers:
            yield from list(worker.ops)

    def count(self, outcome: str, since: float = 0.0) -> int:
        return sum(1 for op in self.ops() if op.outcome == outcome and op.started >= since)

    def wait_count(self, outcome: str, at_least: int, since: float = 0.0, what: str = "") -> None:
        wait_for(
            lambda: self.count(outcome, since) >= at_least,
            30,
            what or f"{at_least} writes answered {outcome}",
        )

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def model(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for worker in self.workers:
            merged.update(worker.model)
        return merged

    def summary(self) -> str:
        outcomes: dict[str, int] = {}
        for op in self.ops():
            outcomes[op.outcome] = outcomes.get(op.outcome, 0) + 1
        return ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))

    def assert_every_write_answered_in_time(self) -> None:
        ops = list(self.ops())
        assert ops
        wrong = [op for op in ops if op.outcome == "wrong"]
        assert not wrong, f"acknowledged with a wrong result: {wrong[:5]}"
        unknown = [op for op in ops if op.outcome == "unknown"]
        assert not unknown, f"writes without an answer: {unknown[:5]}"
        slowest = max(ops, key=lambda op: op.latency)
        assert slowest.latency <= ANSWER_BOUND, f"answered after {slowest.latency:.2f}s: {slowest}"

    def assert_failed_inserts_invisible(self, *dumps: dict[str, str]) -> None:
        for op in self.ops():
            if op.kind == "insert" and op.outcome in ("failed", "refused"):
                for dump in dumps:
                    assert op.key not in dump, f"{op.outcome} insert is visible: {op}"


# -- start orders and plain replication --------------------------------------------------------
@pytest.mark.parametrize("first", ["primary", "backup"])
def test_both_start_orders_reach_in_sync_and_replicate(pair: Pair, first: str):
    second = Role(first).peer
    pair.start(first)
    assert pair.stage(first) == (
        "bootstrapping_secondary" if first == "primary" else "bootstrapping_primary"
    )
    pair.start(second)
    wait_in_sync(pair)
    model: dict[str, str] = {}
    run_ops(pair.client("primary"), model, 500, random.Random(first), "order")
    assert len(model) > 100
    assert_replicas_equal(pair, model)
    status = pair.status("primary")
    assert status is not None and status["seq"] > 0
    wait_for(lambda: (s := pair.status("backup")) and s["seq"] == status["seq"], 5, "backup seq")


def test_backup_refuses_writes_naming_the_primary_and_mirrors_reads(pair: Pair):
    pair.start_both()
    model: dict[str, str] = {}
    run_ops(pair.client("primary"), model, 60, random.Random(1), "mirror")
    backup = pair.client("backup")
    primary_address = "%s:%d" % pair.address["primary"]
    for attempt in (
        lambda: backup.insert("new-key", "v"),
        lambda: backup.update(next(iter(model)), "v"),
        lambda: backup.delete(next(iter(model))),
    ):
        with pytest.raises(NotPrimary) as refused:
            attempt()
        assert refused.value.status == 503
        assert refused.value.primary == primary_address
        assert primary_address in refused.value.error
    primary = pair.client("primary")
    assert backup.count() == primary.count() == len(model)
    assert sorted(backup.dump()) == sorted(primary.dump()) == sorted(model.items())
    key = next(iter(model))
    assert backup.get(key) == primary.get(key) == model[key]
    assert backup.get("new-key") is None
    assert_replicas_equal(pair, model)


# -- losing the backup under load ----------------------------------------------------------------
@pytest.mark.parametrize("how", ["shutdown", "kill"])
def test_backup_lost_under_write_load(pair: Pair, how: str):
    pair.start_both()
    with WriteLoad(pair) as load:
        load.wait_count("ok", 50)
        lost_at = time.monotonic()
        if how == "shutdown":
            pair.client("backup").shutdown()
            wait_for(lambda: pair.status("backup") is None, 10, "the backup to stop")
        else:
            pair.kill("backup")
        wait_for(
            lambda: load.count("failed", lost_at) + load.count("refused", lost_at) > 0,
            10,
            "writes to fail",
        )
        pair.wait_stage("primary", "bootstrapping_secondary")
        pair.start("backup")
        back_at = time.monotonic()
        load.wait_count("ok", 20, back_at, "writes to succeed after the backup returned")
        wait_for(lambda: load.elapsed() >= LOAD_SECONDS, 10, "the load to run its course")
    load.assert_every_write_answered_in_time()
    assert load.count("ok", 0) >= 70, load.summary()
    dump = assert_replicas_equal(pair, load.model())
    load.assert_failed_inserts_invisible(dump, pair.dump("backup"))
    status = pair.status("primary")
    assert status is not None
    assert status["writes_rewound"] == load.count("failed"), load.summary()


# -- losing the primary ----------------------------------------------------------------------------
def test_primary_killed_under_write_load_keeps_every_acknowledged_write(pair: Pair):
    pair.start_both()
    with WriteLoad(pair, stop_on_unknown=True) as load:
        load.wait_count("ok", 200)
        pair.kill("primary")
        wait_for(lambda: not any(t.is_alive() for t in load.threads), 15, "clients to notice")
    pair.start("primary")
    dump = assert_replicas_equal(pair)
    for worker in load.workers:
        mine = {k: v for k, v in dump.items() if k.startswith(worker.prefix())}
        allowed = [worker.model]
        op = worker.pending
        if op is not None:  # sent when the primary died: either outcome is fine
            applied = dict(worker.model)
            if op.value is None:
                applied.pop(op.key, None)
            else:
                applied[op.key] = op.value
            allowed.append(applied)
        assert mine in allowed, f"worker {worker.number}: {_diff(mine, worker.model)}"
    assert load.count("failed") == load.count("refused") == 0, load.summary()
    assert "primary stage cold_start -> warm_start" in last_run(pair.log("primary"))


# -- restarts ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_restarts_in_every_order_keep_the_model(pair: Pair):
    rng = random.Random(3)
    pair.start_both()
    model: dict[str, str] = {}
    for round_ in range(3):
        run_ops(pair.client("primary"), model, 60, rng, f"r{round_}a")
        assert_replicas_equal(pair, model)

        # Both down at once, in either order: the data is gone, both start empty.
        order = ("backup", "primary") if round_ % 2 == 0 else ("primary", "backup")
        for role in order:
            pair.stop(role)
        for role in reversed(order):
            pair.start(role)
        model = {}
        assert_replicas_equal(pair, model)

        run_ops(pair.client("primary"), model, 60, rng, f"r{round_}b")
        pair.kill("primary")
        pair.start("primary")
        assert_replicas_equal(pair, model)

        run_ops(pair.client("primary"), model, 60, rng, f"r{round_}c")
        pair.kill("backup")
        pair.start("backup")
        assert_replicas_equal(pair, model)
        assert model


# -- handshakes: the side with the newest acknowledged state wins ---------------------
def test_restarted_empty_primary_warm_starts_from_the_backup(pair: Pair):
    pair.start_both()
    model: dict[str, str] = {}
    run_ops(pair.client("primary"), model, 150, random.Random(4), "warm")
    pair.kill("primary")
    status = pair.wait_stage("backup", "bootstrapping_primary")
    assert status["keys"] == len(model) and status["confirmed"] is True
    pair.start("primary")
    assert_replicas_equal(pair, model)
    primary_log = last_run(pair.log("primary"))
    assert "primary stage cold_start -> warm_start" in primary_log
    assert "-> bootstrapping_secondary" not in primary_log
    assert "fetched by the primary" in pair.log("backup")


def test_restarted_empty_backup_is_bootstrapped_by_the_primary(pair: Pair):
    pair.start_both()
    model: dict[str, str] = {}
    run_ops(pair.client("primary"), model, 150, random.Random(5), "boot")
    pair.kill("backup")
    status = pair.wait_stage("primary", "bootstrapping_secondary")
    assert status["keys"] == len(model)
    primary = pair.client("primary")
    key = next(iter(model))
    assert primary.get(key) == model[key]  # reads go on
    with pytest.raises(Unavailable) as refused:
        primary.insert("while-alone", "x")
    assert refused.value.stage == "bootstrapping_secondary"
    pair.start("backup")
    assert_replicas_equal(pair, model)
    backup_log = last_run(pair.log("backup"))
    assert "backup stage cold_start -> warm_start" in backup_log
    assert f"primary sends {len(model)} pairs" in backup_log
    assert f"transfer to backup started: {len(model)} pairs" in pair.log("primary")


def test_primary_restarted_while_the_backup_is_unreachable_waits_for_its_data(pair: Pair):
    pair.start_both()
    model: dict[str, str] = {}
    run_ops(pair.client("primary"), model, 100, random.Random(9), "paused")
    pair.kill("primary")
    pair.wait_stage("backup", "bootstrapping_primary")
    pair.signal("backup", signal.SIGSTOP)  # the backup holds the only copy, and is silent
    try:
        pair.start("primary")
        status = pair.wait_stage("primary", "bootstrapping_secondary")
        assert status["keys"] == 0 and status["confirmed"] is False
        with pair.client("primary") as primary:
            with pytest.raises(Unavailable):
                primary.get(next(iter(model)))  # an empty, unconfirmed primary may not answer
            with pytest.raises(Unavailable):
                primary.insert("too-early", "x")
    finally:
        pair.signal("backup", signal.SIGCONT)
    assert_replicas_equal(pair, model)  # the backup's data won
    assert "-> warm_start (backup holds" in last_run(pair.log("primary"))


def test_two_empty_servers_start_empty(pair: Pair):
    pair.start_both()
    assert_replicas_equal(pair, {})
    assert "no confirmed data on either side: start empty" in pair.log("primary")
    with pair.client("primary") as primary:
        assert primary.insert("first", "1") is True
    assert_replicas_equal(pair, {"first": "1"})


@pytest.fixture
def proxied(pair: Pair) -> Iterator[FaultProxy]:
    """A FaultProxy between the primary and the backup (the primary reaches the
    backup only through it); the backup is started, the primary is not."""
    host, port = pair.address["backup"]
    # From the primary's address: the backup accepts a channel only from there.
    with FaultProxy(host, 0, host, port, source_host=pair.address["primary"][0]) as proxy:
        pair.start("backup")
        yield proxy


def without_undo(pair: Pair) -> None:
    """Restart the (still unused) backup with no undo record: resyncs are full."""
    pair.stop("backup")
    pair.configure(undo_bytes="0")
    pair.start("backup")


def start_primary_through(pair: Pair, proxy: FaultProxy) -> None:
    pair.start("primary", "--backup-port", str(proxy.port))
    wait_in_sync(pair)
    assert proxy.connections_proxied >= 1


def test_stale_backup_never_overwrites_a_live_primary(pair: Pair, proxied: FaultProxy):
    start_primary_through(pair, proxied)
    primary = pair.client("primary", timeout=CLIENT_TIMEOUT)
    model: dict[str, str] = {}
    run_ops(primary, model, 80, random.Random(6), "live")

    proxied.down.drop = True  # the backup's acknowledgements are lost
    started = time.monotonic()
    with pytest.raises(ReplicationFailed):
        primary.insert("rewound", "only the backup saw this")
    assert time.monotonic() - started <= ANSWER_BOUND
    status = pair.wait_stage("primary", "bootstrapping_secondary")
    assert status["writes_rewound"] == 1
    assert primary.get("rewound") is None

    def backup_value() -> str | None:
        try:
            with pair.client("backup") as backup:
                return backup.get("rewound")
        except Unavailable:
            return None

    # The backup applied the write before its acknowledgement got lost.
    wait_for(lambda: backup_value() == "only the backup saw this", 10, "the backup's copy")
    wait_for(lambda: pair.stage("backup") == "bootstrapping_primary", 10, "the backup to notice")

    proxied.heal()
    assert_replicas_equal(pair, model)  # the live primary's data won
    assert backup_value() is None
    assert "primary stage cold_start -> warm_start" not in pair.log("primary")
    # The backup undid the write the primary never applied: a partial resync, no copy.
    assert "backup resync: partial: rolled back 1 batches" in last_run(pair.log("backup"))
    assert "primary resync: partial" in pair.log("primary")
    status = pair.status("primary")
    assert status is not None and status["resyncs_partial"] == 1
    assert status["resyncs_full"] == 1  # the first sync only


def test_stale_backup_without_an_undo_record_gets_the_live_primarys_copy(
    pair: Pair, proxied: FaultProxy
):
    without_undo(pair)
    start_primary_through(pair, proxied)
    primary = pair.client("primary", timeout=CLIENT_TIMEOUT)
    model: dict[str, str] = {}
    run_ops(primary, model, 80, random.Random(6), "live")
    proxied.down.drop = True
    with pytest.raises(ReplicationFailed):
        primary.insert("rewound", "only the backup saw this")
    pair.wait_stage("backup", "bootstrapping_primary")
    proxied.heal()
    assert_replicas_equal(pair, model)
    # The backup's copy was replaced by the primary's, not the other way round.
    assert f"primary sends {len(model)} pairs" in last_run(pair.log("backup"))
    assert "resync: full transfer: the backup cannot undo back" in pair.log("primary")


def test_primary_killed_while_resyncing_a_stale_backup_keeps_acknowledged_writes(
    pair: Pair, proxied: FaultProxy
):
    without_undo(pair)  # the stale backup gets a full transfer to break off
    start_primary_through(pair, proxied)
    model = fill(pair, 2000, value_size=1000)  # a snapshot of ~2 MB
    proxied.down.drop = True  # make the backup stale: it applies a write the primary rewinds
    with pytest.raises(ReplicationFailed), pair.client("primary") as primary:
        primary.insert("rewound", "only the backup saw this")
    pair.wait_stage("primary", "bootstrapping_secondary")
    pair.wait_stage("backup", "bootstrapping_primary")
    # Every acknowledged write is on the backup now; the primary holds them too.
    assert pair.status("backup")["keys"] == len(model) + 1  # type: ignore[index]

    proxied.up.rate = 400_000  # the resync takes ~5 s: time to break it off
    proxied.heal()
    pair.wait_stage("backup", "warm_start")  # it began receiving the primary's data
    proxied.cut()  # the rest of the snapshot never arrives
    pair.kill("primary")  # one server down, the other up: nothing acknowledged may be lost
    status = pair.wait_stage("backup", "bootstrapping_primary")
    assert status["keys"] == len(model) + 1 and status["confirmed"] is True
    proxied.up.rate = None
    proxied.heal()
    pair.start("primary", "--backup-port", str(proxied.port))
    dump = assert_replicas_equal(pair)
    assert "primary stage cold_start -> warm_start" in last_run(pair.log("primary"))
    dump.pop("rewound", None)  # indeterminate ("replication failed"): either outcome is allowed
    assert dump == model, _diff(dump, model)


def test_slow_link_delays_but_does_not_fail_writes(pair: Pair, proxied: FaultProxy):
    start_primary_through(pair, proxied)
    proxied.up.delay = proxied.down.delay = 0.15  # a 300 ms round trip, under ack_timeout
    with WriteLoad(pair) as load:
        load.wait_count("ok", 20)
        wait_for(lambda: load.elapsed() >= 2.0, 10, "the load to run its course")
    load.assert_every_write_answered_in_time()
    assert load.count("ok") == len(list(load.ops())), load.summary()
    # Acknowledged only after the backup acknowledged: each write took a round trip.
    assert min(op.latency for op in load.ops()) >= 0.3
    proxied.up.delay = proxied.down.delay = 0
    assert_replicas_equal(pair, load.model())


def test_servers_with_different_store_layouts_replicate_both_ways(pair: Pair):
    pair.start("backup", "--store", "hash")
    pair.start("primary", "--shards", "7")
    wait_in_sync(pair)
    model: dict[str, str] = {}
    run_ops(pair.client("primary"), model, 200, random.Random(10), "layout")
    assert_replicas_equal(pair, model)
    pair.kill("primary")
    pair.start("primary", "--shards", "7")  # warm start: hash map -> 7 shards
    assert_replicas_equal(pair, model)
    pair.kill("backup")
    pair.start("backup", "--store", "hash")  # bootstrap: 7 shards -> hash map
    assert_replicas_equal(pair, model)
    assert (pair.status("backup") or {}).get("store") == "hash"
    assert (pair.status("primary") or {}).get("shards") == 7


# -- a paused backup -------------------------------------------------------------------------------
def test_paused_backup_fails_writes_in_time_and_rejoins(pair: Pair):
    pair.start_both()
    primary = pair.client("primary", timeout=CLIENT_TIMEOUT)
    model: dict[str, str] = {}
    run_ops(primary, model, 50, random.Random(8), "pause")
    pair.signal("backup", signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(ReplicationFailed):
            primary.insert("during-pause", "x")
        assert time.monotonic() - started <= ANSWER_BOUND
        pair.wait_stage("primary", "bootstrapping_secondary")
        key = next(iter(model))
        assert primary.get(key) == model[key]
        assert primary.get("during-pause") is None
        assert primary.count() == len(model)
        with pytest.raises(Unavailable) as refused:
            primary.update(key, "refused")
        assert refused.value.stage == "bootstrapping_secondary"
    finally:
        pair.signal("backup", signal.SIGCONT)
    dump = assert_replicas_equal(pair, model)
    assert "during-pause" not in dump
    assert primary.insert("after-pause", "y") is True
    model["after-pause"] = "y"
    assert_replicas_equal(pair, model)


# -- a corrupted transfer ------------------------------------------------------------------------
def test_corrupted_transfer_is_detected_and_started_over(pair: Pair, proxied: FaultProxy):
    start_primary_through(pair, proxied)
    model = fill(pair, 2000)
    pair.kill("backup")
    pair.wait_stage("primary", "bootstrapping_secondary")
    # The snapshot of 2000 pairs is ~110 kB; the upgrade request and hello are
    # ~200 bytes, so this byte is well inside the shard data.
    proxied.corrupt_next("up", after_bytes=40_000, bit=5)
    pair.start("backup")
    assert_replicas_equal(pair, model)
    assert proxied.corruptions == 1
    backup_log = last_run(pair.log("backup"))
    status = pair.status("backup") or {}
    assert "bad frame" in backup_log, backup_log
    assert status["transfers_failed"] >= 1, status
    assert "frame hash mismatch" in status["last_transfer_error"], status
    # Started over on a new channel; the primary sent the whole snapshot twice.
    assert backup_log.count("accepted a replication channel") >= 2, backup_log
    assert pair.log("primary").count("transfer to backup started: 2000 pairs") >= 2


def test_group_commit_is_visible_in_status_and_metrics(pair):
    pair.start_both()
    primary = pair.client("primary")
    for i in range(20):
        assert primary.insert(f"seq{i}", "v")
    status = pair.status("primary")
    assert status["writes_replicated"] == 20
    assert status["batches_acked"] == 20  # one writer: one write per batch
    assert status["ack_ms_mean"] > 0

    def writer(n: int) -> None:
        with pair.client("primary") as client:
            for i in range(100):
                assert client.insert(f"w{n}-{i}", "v")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    status = pair.status("primary")
    assert status["writes_replicated"] == 20 + 800
    assert status["batches_acked"] < 20 + 800  # concurrent writes shared batches
    assert status["writes_per_batch"] > 1
    host, port = pair.address["primary"]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    assert f"pbkv_replication_ack_seconds_count {status['batches_acked']}.0" in text
    assert 'pbkv_writes_replicated_total{role="primary"} 820.0' in text
    # One full synchronization (the first), no partial one yet.
    assert 'pbkv_resyncs_full_total{role="primary"} 1.0' in text
    assert 'pbkv_resyncs_partial_total{role="primary"} 0.0' in text
