"""Failover with real member processes and a real etcd (SPEC section 8).

Three members on loopback, started by ``bin/start_server -m``; a writer that
records every write's answer; then a fault. Each test checks what an operator
relies on: another member takes over by itself, every acknowledged write is
there, a write that was refused is nowhere, and the old primary never answers
as primary again.
"""

from __future__ import annotations

import signal
import time
import urllib.request
from collections.abc import Iterator

import pytest

from pbkv.client import Unavailable
from pbkv.testing.members import LocalMembers
from tests.support.failover import Writer, check_no_loss, start_three
from tests.support.raw_http import Raw


@pytest.fixture
def members(tmp_path, etcd, prefix) -> Iterator[LocalMembers]:
    with LocalMembers(tmp_path, etcd.client_url, cluster=prefix) as cluster:
        yield cluster


def test_a_killed_primary_is_replaced_by_its_recorded_backup_with_every_write(members) -> None:
    old = start_three(members)
    recorded = members.status(old)["recorded_backup"]
    with Writer(members) as writer:
        writer.wait_acknowledged(200)
        members.kill(old)
        faulted = time.monotonic()
        new = members.wait_writable(exclude=(old,))
        writer.wait_acknowledged(200)
    took = time.monotonic() - faulted
    status = members.status(new)
    assert status["member"] == recorded, "only the recorded backup may be promoted"
    assert status["promotions"] == 1
    assert "etcd records this member as the in-sync backup" in status["last_role_change"]
    assert f"promoted to primary of epoch {status['epoch']}" in members.log(new)
    with urllib.request.urlopen(f"http://{members.name(new)}/metrics", timeout=5) as reply:
        metrics = reply.read().decode()
    assert 'pbkv_promotions_total{role="primary"} 1.0' in metrics
    check_no_loss(members, new, writer)
    # The third member was brought in sync with nobody acting, and is recorded.
    third = ({0, 1, 2} - {old, new}).pop()
    assert status["recorded_backup"] == members.status(third)["member"]
    assert took < 20


def test_a_primary_paused_past_its_lease_never_answers_as_primary_again(members) -> None:
    old = start_three(members)
    with members.client(old) as client:
        assert client.insert("before", "pause")
    members.signal(old, signal.SIGSTOP)
    try:
        new = members.wait_writable(exclude=(old,))
        with members.client(new) as client:
            assert client.update("before", "changed by the new primary")
        # The kernel accepts and buffers these while the old primary sleeps: it reads
        # them first thing when it wakes, on a clock now past its lease.
        reader, writer = Raw(members.addresses[old]), Raw(members.addresses[old])
        reader.send(b"GET /kv/get?key=before HTTP/1.1\r\nHost: x\r\n\r\n")
        writer.send(
            b"POST /kv/insert HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b"application/x-www-form-urlencoded\r\nContent-Length: 15\r\n\r\nkey=late&value="
        )
    finally:
        members.signal(old, signal.SIGCONT)
    read, write = reader.reply(), writer.reply()
    # Course mode (the default): the failure shape, the status in a header.
    assert read.headers["x-pbkv-status"] == "503" and b"pause" not in read.body, read
    assert write.headers["x-pbkv-status"] == "503", write
    members.wait(
        lambda: (s := members.status(old)) is not None and s["role"] != "primary",
        what="the old primary to step down",
    )
    assert members.status(old)["fencings"] == 1
    assert "primary fenced itself" in members.log(old)
    with members.client(new) as client:
        assert client.get("before") == "changed by the new primary"
        assert client.get("late") is None


@pytest.fixture
def long_lease_members(tmp_path, etcd, prefix) -> Iterator[LocalMembers]:
    with LocalMembers(tmp_path, etcd.client_url, cluster=prefix, lease_ttl="30") as cluster:
        yield cluster


def test_a_primary_restarted_within_its_lease_comes_back_empty_as_a_spare(
    long_lease_members: LocalMembers,
) -> None:
    members = long_lease_members
    old = start_three(members)
    with Writer(members) as writer:
        writer.wait_acknowledged(300)
        members.kill(old)
        killed = time.monotonic()
        members.start(old)  # within the lease: its leader key still stands
        restarted = members.status(old)
        assert restarted["role"] != "primary"
        new = members.wait_writable(exclude=(old,))
        # The restarted run resigned its dead run's key: nobody waited out the lease.
        assert time.monotonic() - killed < 20
        writer.wait_acknowledged(100)
    assert new != old
    check_no_loss(members, new, writer)
    members.wait(
        lambda: (s := members.status(old)) is not None and s["keys"] >= len(writer.acknowledged),
        what="the restarted member to receive the data",
    )
    assert "promoted to primary" not in members.log(old).split(" of cluster ")[-1]


def test_nobody_is_promoted_when_the_recorded_backup_is_gone_too(members) -> None:
    members.start(0)
    members.start(1)
    old = members.wait_writable()
    backup = 1 - old
    with members.client(old) as client:
        assert client.insert("k", "v")
    members.kill(backup)
    members.kill(old)
    members.start(2)
    why = members.wait(
        lambda: (
            (s := members.status(2)) is not None
            and s["primary"] is None
            and "may be promoted" in (s["why_not_primary"] or "")
            and s["why_not_primary"]
        ),
        what="the third member to say why it is not promoted",
    )
    assert members.status(2)["role"] != "primary"
    assert f"127.0.0.{backup + 1}" in why
    assert f"no primary, and this member may not become it: {why}" in members.log(2)


def test_a_stopped_primary_hands_over_before_its_lease_runs_out(members) -> None:
    old = start_three(members)
    started = time.monotonic()
    members.stop(old)  # SIGTERM: it resigns its leader key instead of letting it expire
    members.wait_writable(exclude=(old,))
    assert time.monotonic() - started < float(members.settings["lease_ttl"])


@pytest.fixture
def own_members(tmp_path, own_etcd, prefix) -> Iterator[LocalMembers]:
    with LocalMembers(tmp_path, own_etcd.client_url, cluster=prefix) as cluster:
        yield cluster


def test_while_etcd_is_silent_the_primary_serves_until_its_lease_runs_out(
    own_members, own_etcd
) -> None:
    """Rule (e): nobody can be promoted without etcd, so the primary goes on while its
    lease certainly holds, then fences; nobody campaigns; etcd back, writes resume."""
    members = own_members
    members.start(0)
    members.start(1)
    old = members.wait_writable()
    backup = 1 - old
    lease_ttl = float(members.settings["lease_ttl"])
    with members.client(old) as client:
        assert client.insert("before", "1")
        own_etcd.pause()
        paused = time.monotonic()
        assert client.insert("during", "1"), "the lease still holds: writes go on"
        members.wait(
            lambda: members.status(old)["role"] != "primary",
            timeout=lease_ttl + 5,
            what="the primary to fence itself",
        )
        fenced_after = time.monotonic() - paused
        with pytest.raises(Unavailable):
            client.insert("after", "1")
    assert fenced_after <= lease_ttl + 1.0
    status = members.status(backup)
    assert status["role"] != "primary" and status["promotions"] == 0
    own_etcd.resume()
    primary = members.wait_writable(timeout=30)
    with members.client(primary) as client:
        assert client.get("before") == "1" and client.get("during") == "1"
        assert client.get("after") is None
        assert client.insert("resumed", "1")
