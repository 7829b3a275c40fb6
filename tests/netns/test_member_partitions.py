"""Failover under network partitions: etcd and three members, each on a host of
its own (``pbkv/testing/hosts.py``), the test client in the hub that reaches all.

The faults cut the primary off from everyone, from etcd alone, or from its
backup alone, while the client still reaches it. Each test checks that no
acknowledged write is lost, and that the cut-off primary answers no read as
primary once another member has acknowledged a write.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from pbkv.client import PbkvError
from pbkv.testing.etcd import ETCD_MISSING, EtcdServer, etcd_binary
from pbkv.testing.hosts import CLIENT, Hosts, available
from pbkv.testing.members import LocalMembers

PORT = 7400
MEMBERS = ("m1", "m2", "m3")


@dataclass
class Cluster:
    net: Hosts
    members: LocalMembers

    def host(self, index: int) -> str:
        return MEMBERS[index]


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    reason = available()
    if reason is not None:
        pytest.skip(reason)
    if etcd_binary() is None:
        pytest.skip(ETCD_MISSING)
    with Hosts(["etcd", *MEMBERS]) as net, net.inside(CLIENT):
        with net.inside("etcd"):
            etcd = EtcdServer(tmp_path / "etcd", host=net.addresses["etcd"])
            etcd.start()
        members = LocalMembers(
            tmp_path / "members",
            etcd.client_url,
            addresses=[(net.addresses[host], PORT) for host in MEMBERS],
            wrap=lambda index, argv: net.command(MEMBERS[index], *argv),
        )
        try:
            for index in range(3):
                members.start(index)
            members.wait_writable()
            yield Cluster(net, members)
        finally:
            members.cleanup()
            etcd.cleanup()


@dataclass
class Reads:
    """Reads of one key from one member, one after another, with their times."""

    cluster: Cluster
    index: int
    served: list[tuple[float, float, str | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.cluster.net.inside(CLIENT):
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    with self.cluster.members.client(self.index, timeout=1.0) as client:
                        value = client.get("probe")
                except (OSError, PbkvError):
                    continue
                self.served.append((sent, time.monotonic(), value))

    def __enter__(self) -> Reads:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join(10)


def write_on_new_primary(members: LocalMembers, old: int) -> tuple[int, float]:
    """Wait for another primary, have it acknowledge a write; (its index, when)."""
    new = members.wait_writable(exclude=(old,), timeout=30)
    with members.client(new) as client:
        assert client.update("probe", "new")
    return new, time.monotonic()


def check_old_primary_silent_after(reads: Reads, moment: float) -> None:
    late = [(sent, value) for sent, _, value in reads.served if sent > moment]
    assert not late, f"the cut-off primary answered reads after the new one acknowledged: {late}"


def acknowledged_writes(
    members: LocalMembers, index: int, count: int, prefix: str = "k"
) -> list[str]:
    keys = []
    with members.client(index) as client:
        for number in range(count):
            key = f"{prefix}{number}"
            assert client.insert(key, "v")
            keys.append(key)
    return keys


def all_present(members: LocalMembers, index: int, keys: list[str]) -> None:
    with members.client(index, timeout=10) as client:
        data = dict(client.dump())
    lost = [key for key in keys if key not in data]
    assert not lost, f"acknowledged writes lost: {lost[:5]}"


def test_a_primary_cut_off_from_everyone_is_replaced_and_answers_nothing_after(cluster) -> None:
    members = cluster.members
    old = members.wait_writable()
    keys = acknowledged_writes(members, old, 50)
    with members.client(old) as client:
        assert client.insert("probe", "old")
    with Reads(cluster, old) as reads:
        cluster.net.isolate(cluster.host(old))
        new, acknowledged = write_on_new_primary(members, old)
    check_old_primary_silent_after(reads, acknowledged)
    assert any(value == "old" for _, _, value in reads.served)  # it served before the cut
    cluster.net.heal()
    members.wait(
        lambda: (
            (s := members.status(old)) is not None
            and s["role"] != "primary"
            and s["primary"] == members.name(new)
        ),
        what="the old primary to follow the new one",
    )
    all_present(members, new, [*keys, "probe"])
    assert members.status(old)["fencings"] == 1


def test_a_primary_cut_off_from_etcd_alone_fences_and_its_backup_takes_over(cluster) -> None:
    members = cluster.members
    old = members.wait_writable()
    keys = acknowledged_writes(members, old, 50)
    with members.client(old) as client:
        assert client.insert("probe", "old")
    others = [cluster.host(i) for i in range(3) if i != old]
    with Reads(cluster, old) as reads:
        cluster.net.isolate(cluster.host(old), keep_reachable_from=[CLIENT, *others])
        new, acknowledged = write_on_new_primary(members, old)
    check_old_primary_silent_after(reads, acknowledged)
    assert members.status(old)["role"] != "primary"
    cluster.net.heal()
    all_present(members, new, [*keys, "probe"])


def test_a_primary_cut_off_from_its_backup_alone_takes_the_spare_and_stays(cluster) -> None:
    members = cluster.members
    old = members.wait_writable()
    status = members.status(old)
    epoch, backup_name = status["epoch"], status["recorded_backup"]
    backup = next(i for i in range(3) if members.status(i)["member"] == backup_name)
    keys = acknowledged_writes(members, old, 50)
    keep = [CLIENT, "etcd", *(cluster.host(i) for i in range(3) if i not in (old, backup))]
    cluster.net.isolate(cluster.host(old), keep_reachable_from=keep)
    # No failover: the leader key stands; the primary brings the spare in sync.
    members.wait(
        lambda: (
            (s := members.status(old)) is not None
            and s["recorded_backup"] not in (None, backup_name)
            and members.writable() == old
        ),
        timeout=30,
        what="the primary to record the spare as its backup",
    )
    keys += acknowledged_writes(members, old, 20, prefix="after")
    assert members.status(old)["epoch"] == epoch
    assert members.status(backup)["role"] != "primary"
    cluster.net.heal()
    all_present(members, old, keys)
