"""Faults between hosts: the primary and the backup in two network namespaces.

Each server runs in its own namespace (``pbkv.testing.netns.NamespacePair``: a
``LocalPair`` started with the real ``bin/start_server`` under ``ip netns exec``);
the test process talks to
both from a third namespace over links that the faults leave alone.  During each
fault a few concurrent clients keep working on the primary and record a history;
once the fault is healed and the pair is back in sync, the dumps of both servers
must be equal and the history linearizable with the primary's dump as its end.

Writes whose outcome is unknown ("replication failed", 503, no reply) enter the
history as indeterminate.  Two things are checked on top of that, by value (every
written value is unique): a write refused with 503 is never seen by anyone, and,
unless the primary restarted from the backup, neither is a write answered
"replication failed" (it was rewound, and the primary's data wins the re-sync).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pytest

from pbkv.client import AsyncClient, PbkvError, ReplicationFailed, Unavailable
from pbkv.testing import netns
from pbkv.testing.linearizability import History, Operation, check
from pbkv.testing.netns import NamespacePair
from tests.support.harness import FAST_SETTINGS, wait_for

pytestmark = pytest.mark.netns

PORT = 8080
PROXY_PORT = 8081
# The pair runs with LocalPair's short timeouts.
ACK_TIMEOUT = float(FAST_SETTINGS["ack_timeout"])
PEER_TIMEOUT = float(FAST_SETTINGS["peer_timeout"])
# A write is answered within ack_timeout, plus one tick, plus a busy machine's noise.
WRITE_DEADLINE = ACK_TIMEOUT + 1.0
# Longer than any answer can take: a client that waits this long saw a hang.
CLIENT_TIMEOUT = 5.0
WRITES = ("insert", "update", "delete")
BULK_KEYS = 4000  # about 1 MB: a few seconds over the rate-limited link


# -- concurrent clients recording a history -------------------------------------------------
@dataclass(frozen=True, slots=True)
class Record:
    """One request as the workload saw it; ``outcome`` is ``ok`` (success true),
    ``no`` (a logical failure), ``failed`` (replication failed), ``unavailable``
    (503), ``timeout`` (no answer within CLIENT_TIMEOUT) or ``error: ...``."""

    kind: str
    key: str
    value: str | None
    call: float
    ret: float
    outcome: str

    @property
    def latency(self) -> float:
        return self.ret - self.call


class Workload:
    """A few asyncio clients hammering the primary from a background thread.

    The thread is started from the calling thread, so it lives in that thread's
    network namespace.  Every written value is unique, so a value seen anywhere
    names the write that produced it.
    """

    def __init__(
        self, address: tuple[str, int], clients: int = 4, keys: int = 12, seed: int = 0
    ) -> None:
        self.address = address
        self.clients = clients
        self.keys = keys
        self.seed = seed
        self.history = History()
        self.records: list[Record] = []
        self._stop = threading.Event()
        self._crash: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="workload", daemon=True)

    def start(self) -> Workload:
        self._thread.start()
        return self

    def halt(self) -> None:
        """Ask the clients to stop and wait for them (their last requests finish)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=CLIENT_TIMEOUT + 10)

    def stop(self) -> list[Operation]:
        """Stop, and return the history."""
        self.halt()
        assert not self._thread.is_alive(), "the workload did not stop"
        if self._crash is not None:
            raise AssertionError(f"the workload crashed: {self._crash!r}") from self._crash
        return self.history.operations()

    def alive(self) -> bool:
        if self._crash is not None:
            raise AssertionError(f"the workload crashed: {self._crash!r}") from self._crash
        return self._thread.is_alive()

    def count(self, outcomes: Iterable[str], kinds: Iterable[str], since: float = 0.0) -> int:
        outcomes, kinds = set(outcomes), set(kinds)
        # list() copies in one step: the workload thread may append meanwhile.
        return sum(
            1
            for r in list(self.records)
            if r.outcome in outcomes and r.kind in kinds and r.call >= since
        )

    def acked_writes(self, since: float = 0.0) -> int:
        return self.count(("ok", "no"), WRITES, since)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by stop() / alive()
            self._crash = exc

    async def _main(self) -> None:
        await asyncio.gather(*(self._client(n) for n in range(self.clients)))

    async def _client(self, n: int) -> None:
        rng = random.Random(f"{self.seed}-{n}")
        history = self.history
        # One attempt a write: the history records each outcome as the server gave it.
        async with AsyncClient(*self.address, timeout=CLIENT_TIMEOUT, retry_for=0) as client:
            i = 0
            while not self._stop.is_set():
                i += 1
                key = f"k{rng.randrange(self.keys)}"
                kind = rng.choices(("get", "insert", "update", "delete"), (4, 2, 2, 2))[0]
                value = f"c{n}-{i}" if kind in ("insert", "update") else None
                call = time.monotonic()
                op = history.invoke(n, kind, key, value)
                pause = 0.005
                try:
                    if kind == "get":
                        got = await client.get(key)
                        history.complete(op, got is not None, got)
                        outcome = "ok" if got is not None else "no"
                    elif kind == "delete":
                        old = await client.delete(key)
                        history.complete(op, old is not None, old)
                        outcome = "ok" if old is not None else "no"
                    else:
                        assert value is not None
                        method = client.insert if kind == "insert" else client.update
                        done = await method(key, value)
                        history.complete(op, done)
                        outcome = "ok" if done else "no"
                except ReplicationFailed:
                    history.indeterminate(op)
                    outcome = "failed"
                except Unavailable:
                    history.indeterminate(op)
                    outcome = "unavailable"
                    pause = 0.02  # the server said "retry later": do not spin
                except TimeoutError:
                    history.indeterminate(op)
                    outcome = "timeout"
                except (OSError, PbkvError) as exc:
                    history.indeterminate(op)
                    outcome = f"error: {exc!r}"
                    pause = 0.02
                self.records.append(Record(kind, key, value, call, time.monotonic(), outcome))
                await asyncio.sleep(pause)  # pacing, keeps the history checkable


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture
def net():
    reason = netns.available()
    if reason is not None:
        pytest.skip(reason)
    with netns.Topology() as topology, topology.inside("client"):
        yield topology


@pytest.fixture
def servers(net, tmp_path):
    pair = NamespacePair(net, tmp_path, port=str(PORT))
    yield pair
    pair.cleanup()
    for role in ("primary", "backup"):  # shown with a failure
        print(f"--- {role} log, last lines")
        print("\n".join(pair.log_tail(role)))
    print(net.rules())


@pytest.fixture
def workload(servers):
    made: list[Workload] = []

    def start(seed: int = 0) -> Workload:
        load = Workload(servers.address["primary"], seed=seed).start()
        made.append(load)
        return load

    yield start
    for load in made:
        load.halt()


# -- helpers --------------------------------------------------------------------------------------
def hold(seconds: float, load: Workload) -> None:
    """Keep a fault on for ``seconds`` while the workload runs (and is still alive)."""
    end = time.monotonic() + seconds
    wait_for(lambda: time.monotonic() >= end or not load.alive(), seconds + 5, "fault duration")
    assert load.alive(), "the workload stopped"


def wait_acked_writes(load: Workload, since: float, at_least: int = 10) -> None:
    wait_for(
        lambda: load.acked_writes(since) >= at_least or not load.alive(),
        20,
        f"{at_least} acknowledged writes",
    )
    assert load.alive(), "the workload stopped"


def assert_partitioned_primary_serves_reads(servers: NamespacePair) -> None:
    """Bootstrapping secondary, confirmed data: reads served, writes refused."""
    with servers.client(timeout=CLIENT_TIMEOUT) as client:
        client.get("k0")  # no 503
        data = dict(client.dump())  # writes are refused: the data holds still meanwhile
        assert client.count() == len(data)
        assert client.get("k0") == data.get("k0")
        with pytest.raises(Unavailable) as refused:
            client.insert("probe-during-partition", "x")
        assert refused.value.stage == "bootstrapping_secondary"


def back_in_sync(servers: NamespacePair, since: float) -> float:
    """Wait until both servers are in sync again; seconds since ``since``."""
    servers.wait_stage("primary", "in_sync")
    servers.wait_stage("backup", "in_sync")
    return time.monotonic() - since


def finish(servers: NamespacePair, load: Workload, in_sync_at: float) -> list[Operation]:
    """Let the recovered pair acknowledge writes again, stop the load, check it all."""
    wait_acked_writes(load, since=in_sync_at)
    ops = load.stop()
    verify(servers, load, ops)
    return ops


def verify(
    servers: NamespacePair,
    load: Workload,
    ops: list[Operation],
    primary_restarted: bool = False,
    initial: dict[str, str] | None = None,
) -> dict[str, str]:
    """Once the workload stopped: the pair in sync with equal dumps, the history
    linearizable, nothing refused (or rewound) visible, no request hung or slow."""
    for role in ("primary", "backup"):
        status = servers.status(role)
        assert status is not None and status["stage"] == "in_sync", f"{role}: {status}"
    primary = servers.dump("primary")
    assert servers.dump("backup") == primary, "primary and backup hold different data"
    result = check(ops, initial=initial, final=primary)
    assert result.ok is True, result.explanation

    observed = {op.output for op in ops if op.ok and op.kind in ("get", "delete")}
    observed |= set(primary.values())
    refused = {r.value for r in load.records if r.outcome == "unavailable" and r.value}
    assert not refused & observed, f"writes refused with 503 became visible: {refused & observed}"
    if not primary_restarted:
        # Rewound on the primary, whose data then won the re-sync. (After a restart
        # from the backup such a write may survive: its outcome is indeterminate.)
        rewound = {r.value for r in load.records if r.outcome == "failed" and r.value}
        assert not rewound & observed, f"rewound writes became visible: {rewound & observed}"

    hung = [r for r in load.records if r.outcome == "timeout"]
    assert not hung, f"{len(hung)} requests got no answer in {CLIENT_TIMEOUT}s: {hung[:3]}"
    errors = [r for r in load.records if r.outcome.startswith("error")]
    if primary_restarted:  # requests that met the dead primary: a connection error, or a
        # write whose reply never came (OutcomeUnknown, recorded as indeterminate)
        errors = [
            r for r in errors if "Connection" not in r.outcome and "OutcomeUnknown" not in r.outcome
        ]
    assert not errors, f"{len(errors)} unexpected errors: {errors[:3]}"
    slow = [
        r
        for r in load.records
        if r.kind in WRITES and r.latency > WRITE_DEADLINE and not r.outcome.startswith("error")
    ]
    assert not slow, f"writes answered after more than {WRITE_DEADLINE}s: {slow[:3]}"
    return primary


async def _preload(address: tuple[str, int], data: dict[str, str], width: int = 32) -> None:
    items = list(data.items())

    async def insert(start: int) -> None:
        async with AsyncClient(*address, timeout=CLIENT_TIMEOUT) as client:
            for key, value in items[start::width]:
                assert await client.insert(key, value) is True

    await asyncio.gather(*(insert(start) for start in range(width)))


def outcomes(load: Workload) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in load.records:
        label = r.outcome if not r.outcome.startswith("error") else "error"
        counts[f"{r.kind}:{label}"] = counts.get(f"{r.kind}:{label}", 0) + 1
    return counts


def partition_while_writing(
    servers: NamespacePair,
    load: Workload,
    fault: Callable[[], None],
    heal: Callable[[], None],
    *,
    detect_within: float,
) -> dict[str, float]:
    """Fault the server link under load, check both sides' stages, heal, check all."""
    wait_acked_writes(load, since=0.0, at_least=20)
    faulted = time.monotonic()
    fault()
    servers.wait_stage("primary", "bootstrapping_secondary", timeout=10)
    detected = time.monotonic() - faulted
    servers.wait_stage("backup", "bootstrapping_primary", timeout=10)
    backup_detected = time.monotonic() - faulted
    assert detected <= detect_within, f"the primary took {detected:.2f}s to notice the fault"
    assert_partitioned_primary_serves_reads(servers)
    # The isolated primary keeps answering the workload's reads and refuses its writes.
    wait_for(
        lambda: (
            load.count(("ok", "no"), ("get",), since=faulted + detected) >= 10
            and load.count(("unavailable",), WRITES, since=faulted + detected) >= 5
        ),
        10,
        "reads served and writes refused during the partition",
    )
    status = servers.status("primary")
    assert status is not None and status["stage"] == "bootstrapping_secondary"

    healed = time.monotonic()
    heal()
    recovered = back_in_sync(servers, healed)
    ops = finish(servers, load, healed + recovered)

    during = [r for r in load.records if faulted <= r.call and r.kind in WRITES]
    failed = [r for r in during if r.outcome == "failed"]
    timings = {
        "primary_detect_s": round(detected, 3),
        "backup_detect_s": round(backup_detected, 3),
        "recover_s": round(recovered, 3),
        "replication_failed": len(failed),
        "max_failed_latency_s": round(max((r.latency for r in failed), default=0.0), 3),
        "operations": len(ops),
    }
    print("timings", timings, "outcomes", outcomes(load))
    return timings


# -- the tests ----------------------------------------------------------------------------------
def _udp(net: netns.Topology, role: str) -> socket.socket:
    """A UDP socket in ``role``'s namespace, on its server address."""
    with net.inside(role):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((net.addresses[role], 0))
    return sock


def _arrives(
    sender: socket.socket, receiver: socket.socket, payload: bytes, wait: float = 5.0
) -> bool:
    """Whether ``payload`` gets through within ``wait`` (a dropped one never does)."""
    sender.sendto(payload, receiver.getsockname())
    receiver.settimeout(wait)
    try:
        return receiver.recv(64) == payload
    except TimeoutError:
        return False


def test_drop_from_one_direction(net):
    """drop_from(sender) loses what the sender sends and nothing else; undrop_from
    removes that rule only."""
    primary, backup = _udp(net, "primary"), _udp(net, "backup")
    with primary, backup:
        net.drop_from("backup")
        assert _arrives(primary, backup, b"to the backup"), net.rules()
        assert not _arrives(backup, primary, b"to the primary", wait=0.5), net.rules()
        net.undrop_from("backup")
        assert _arrives(backup, primary, b"healed"), net.rules()
        net.drop_from("primary")
        net.loss(100)  # another fault's rules, which undrop_from keeps
        net.undrop_from("primary")
        assert "-m statistic" in net.rules() and "-A INPUT" not in net.rules(), net.rules()
        net.clear_rules()
        assert _arrives(primary, backup, b"cleared") and _arrives(backup, primary, b"cleared")
    with pytest.raises(ValueError):
        net.drop_from("client")


def test_silent_partition_drop(servers, net, workload):
    """iptables DROP both ways: in-flight writes fail after ack_timeout, nothing hangs,
    the primary serves reads alone, and the pair re-syncs once healed."""
    servers.start_both()
    load = workload(seed=1)
    timings = partition_while_writing(
        servers, load, net.partition_drop, net.clear_rules,
        detect_within=ACK_TIMEOUT + PEER_TIMEOUT + 1.0,
    )  # fmt: skip
    # A silent partition is noticed only by the ack timeout or peer silence.
    assert timings["replication_failed"] > 0, "no write was in flight during the partition"
    assert timings["primary_detect_s"] >= ACK_TIMEOUT * 0.8
    assert timings["max_failed_latency_s"] <= WRITE_DEADLINE


def test_lost_acknowledgements_resync_without_a_full_transfer(servers, net, workload):
    """Only the backup's packets are lost (its acknowledgements): the primary rewinds
    and fences; once healed, the backup undoes what it applied beyond the primary's
    data (or already matches it): no copy of the database."""
    servers.start_both()
    load = workload(seed=9)
    timings = partition_while_writing(
        servers, load, lambda: net.drop_from("backup"), lambda: net.undrop_from("backup"),
        detect_within=ACK_TIMEOUT + PEER_TIMEOUT + 1.0,
    )  # fmt: skip
    assert timings["replication_failed"] > 0, "no write was in flight when the path broke"
    status = servers.status("primary")
    assert status is not None
    assert status["resyncs_full"] == 1, "a full transfer after the first sync"
    assert status["transfers_completed"] >= 2  # a rollback, or data that already matched


def test_fast_partition_reject(servers, net, workload):
    """REJECT with TCP resets: both sides see the channel break at once."""
    servers.start_both()
    load = workload(seed=2)
    timings = partition_while_writing(
        servers, load, net.partition_reject, net.clear_rules,
        detect_within=ACK_TIMEOUT * 0.8,
    )  # fmt: skip
    assert timings["backup_detect_s"] < PEER_TIMEOUT, "the backup waited for silence"
    assert timings["max_failed_latency_s"] < ACK_TIMEOUT


def test_link_down_then_up(servers, net, workload):
    """``ip link set down`` on the server link, the client links stay up."""
    servers.start_both()
    load = workload(seed=3)
    timings = partition_while_writing(
        servers, load, net.cut, net.heal, detect_within=ACK_TIMEOUT + PEER_TIMEOUT + 1.0
    )
    assert timings["replication_failed"] > 0, "no write was in flight when the link went down"


def test_packet_loss(servers, net, workload):
    """30 % loss each way for a few seconds: the pair may flap, nothing acknowledged
    is lost and the history stays linearizable."""
    servers.start_both()
    load = workload(seed=4)
    wait_acked_writes(load, since=0.0, at_least=20)
    start = time.monotonic()
    net.loss(30)
    hold(4.0, load)
    net.clear_rules()
    healed = time.monotonic()
    recovered = back_in_sync(servers, healed)
    finish(servers, load, healed + recovered)
    acked_during = load.acked_writes(start) - load.acked_writes(healed)
    flaps = servers.log("primary").count("stage in_sync -> bootstrapping_secondary")
    print(
        "loss: acked writes during loss", acked_during, "flaps", flaps,
        "recover_s", round(recovered, 3), "outcomes", outcomes(load),
    )  # fmt: skip
    assert acked_during > 0, "no write got through 30 % loss"


def test_primary_killed_and_restarted_while_partitioned(servers, net, workload):
    """kill -9 the isolated primary and restart it still isolated: its data is
    unconfirmed, so it refuses reads and writes (503) until the partition heals;
    then it warm-starts from the backup and every acknowledged write is there."""
    servers.start_both()
    load = workload(seed=5)
    wait_acked_writes(load, since=0.0, at_least=30)
    net.partition_drop()
    servers.wait_stage("primary", "bootstrapping_secondary", timeout=10)
    servers.wait_stage("backup", "bootstrapping_primary", timeout=10)

    servers.kill("primary")
    servers.start("primary")  # returns once it gave up looking for the backup
    restarted = time.monotonic()
    status = servers.status("primary")
    assert status is not None and status["stage"] in ("cold_start", "bootstrapping_secondary")
    assert status["confirmed"] is False
    with servers.client(timeout=CLIENT_TIMEOUT) as client:
        for call in (
            lambda: client.get("k0"),
            lambda: client.count(),
            lambda: client.dump(),
            lambda: client.insert("probe-unconfirmed", "x"),
            lambda: client.delete("k0"),
        ):
            with pytest.raises(Unavailable) as refused:
                call()
            assert refused.value.status == 503
    wait_for(
        lambda: load.count(("unavailable",), ("get", *WRITES), since=restarted) >= 20,
        10,
        "the workload to be refused by the unconfirmed primary",
    )
    served = load.count(("ok", "no"), ("get", *WRITES), since=restarted)
    assert served == 0, f"the unconfirmed primary answered {served} requests"

    healed = time.monotonic()
    net.clear_rules()
    recovered = back_in_sync(servers, healed)
    log = servers.log("primary")
    assert "-> warm_start" in log, "the restarted primary did not fetch the backup's data"
    wait_acked_writes(load, since=healed + recovered)
    ops = load.stop()
    verify(servers, load, ops, primary_restarted=True)
    print("recover_s", round(recovered, 3), "outcomes", outcomes(load))


def test_partition_during_warm_start(servers, net, workload):
    """The restarted primary fetches a large database from the backup over a slow
    link and is cut off half-way: it answers only reads whose shard has fully
    arrived (always rightly), refuses the rest, and completes once healed."""
    servers.start_both()
    bulk = {f"bulk{i:05d}": f"value-{i}-" + "x" * 200 for i in range(BULK_KEYS)}
    asyncio.run(_preload(servers.address["primary"], bulk))
    load = workload(seed=7)
    wait_acked_writes(load, since=0.0, at_least=20)
    try:  # ~1 s of data in the first burst, then ~300 kB/s
        net.rate_limit("backup", 300)
    except netns.TopologyError as exc:
        pytest.skip(f"iptables hashlimit unavailable: {exc}")

    servers.kill("primary")
    # The launcher returns once the primary is in sync: run it in the background.
    launcher = subprocess.Popen(
        servers.command("start", "primary"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        status = wait_for(
            lambda: (
                (s := servers.status("primary")) is not None
                and (s["stage"] == "in_sync" or s["keys"] >= BULK_KEYS // 2)
                and s
            ),
            20,
            "the primary's warm start to be half-way",
        )
        net.partition_drop()
        assert status["stage"] == "warm_start", f"the transfer was not slowed down: {status}"

        def check_reads() -> tuple[int, int]:
            served = refused = 0
            with servers.client(timeout=CLIENT_TIMEOUT) as client:
                for key in [*list(bulk)[::10], *(f"missing{i}" for i in range(20))]:
                    try:
                        value = client.get(key)
                    except Unavailable as exc:
                        assert exc.stage == "warm_start"
                        refused += 1
                    else:
                        assert value == bulk.get(key), f"warm-start read of {key}: {value!r}"
                        served += 1
                for call in (client.count, lambda: client.insert("probe-warm", "x")):
                    with pytest.raises(Unavailable):
                        call()
            return served, refused

        served, refused = check_reads()
        assert served > 0 and refused > 0, (served, refused)
        # Once the channel is given up for lost, the primary still waits in warm start.
        servers.wait_stage("backup", "bootstrapping_primary")
        status = wait_for(
            lambda: (s := servers.status("primary")) is not None and not s["peer_connected"] and s,
            10,
            "the primary to give up the channel",
        )
        assert status["stage"] == "warm_start", status
        assert status["keys"] < BULK_KEYS
        served_later, _ = check_reads()
        assert served_later >= served

        healed = time.monotonic()
        net.clear_rules()
        recovered = back_in_sync(servers, healed)
        output, _ = launcher.communicate(timeout=60)
        assert launcher.returncode == 0, output
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    wait_acked_writes(load, since=healed + recovered)
    ops = load.stop()
    verify(servers, load, ops, primary_restarted=True, initial=bulk)
    print(
        "warm start: reads served/refused while cut off", served, refused,
        "recover_s", round(recovered, 3), "outcomes", outcomes(load),
    )  # fmt: skip


def test_delay_through_proxy(servers, net, workload):
    """Delay below ack_timeout only slows writes down; above it they fail, the pair
    splits, and it re-syncs once the delay is gone."""
    proxy_module = pytest.importorskip(
        "pbkv.testing.proxy", reason="no userspace TCP proxy: cannot add delay"
    )
    primary_host, backup_host = net.addresses["primary"], net.addresses["backup"]
    # Beside the primary, in its namespace, connecting from the primary's address (the
    # backup accepts a channel only from there): the delayed bytes still cross the
    # server link.  Only the primary is told to go through it.
    with net.inside("primary"):
        proxy = proxy_module.FaultProxy(
            primary_host, PROXY_PORT, backup_host, PORT, source_host=primary_host
        ).start()
    try:
        # The primary's own settings send it to the proxy (the launcher keeps -b for itself).
        via_proxy = json.loads(servers.config.read_text())
        via_proxy.update(backup=primary_host, backup_port=str(PROXY_PORT))
        primary_config = servers.dir / "primary-via-proxy.conf"
        primary_config.write_text(json.dumps(via_proxy))
        servers.start("backup")
        servers.start("primary", "--config", str(primary_config))
        servers.wait_stage("primary", "in_sync")
        servers.wait_stage("backup", "in_sync")
        assert proxy.connections_proxied > 0
        load = workload(seed=6)
        wait_acked_writes(load, since=0.0, at_least=20)
        before = servers.status("primary")
        assert before is not None

        added = 0.1  # each way: 0.2 s per round trip, well below ack_timeout
        proxy.up.delay = proxy.down.delay = added
        slowed = time.monotonic()
        wait_acked_writes(load, since=slowed + 2 * added, at_least=30)
        after = servers.status("primary")
        assert after is not None and after["stage"] == "in_sync"
        assert after["writes_rewound"] == before["writes_rewound"]
        assert after["transfers_completed"] == before["transfers_completed"]
        # Writes sent once the delay applied (give the first round trip time to pass).
        late = [r for r in load.records if r.kind in WRITES and r.call >= slowed + 2 * added]
        assert late and all(r.outcome in ("ok", "no") for r in late), outcomes(load)
        changed = [r for r in late if r.outcome == "ok"]
        assert min(r.latency for r in changed) >= 2 * added * 0.9
        assert max(r.latency for r in changed) < ACK_TIMEOUT

        too_slow = 0.6  # each way: 1.2 s per round trip, above ack_timeout
        proxy.up.delay = proxy.down.delay = too_slow
        split = time.monotonic()
        servers.wait_stage("primary", "bootstrapping_secondary", timeout=10)
        servers.wait_stage("backup", "bootstrapping_primary", timeout=10)
        failed = [r for r in load.records if r.call >= split and r.outcome == "failed"]
        assert failed, "no write failed while the round trip exceeded ack_timeout"
        assert max(r.latency for r in failed) <= WRITE_DEADLINE

        proxy.up.delay = proxy.down.delay = 0.0
        healed = time.monotonic()
        recovered = back_in_sync(servers, healed)
        finish(servers, load, healed + recovered)
        print(
            "delay: write latency with +%.2fs each way: %.3f..%.3f s; recover_s %.3f"
            % (added, min(r.latency for r in changed), max(r.latency for r in changed),
               recovered),
            "outcomes", outcomes(load),
        )  # fmt: skip
    finally:
        proxy.close()
