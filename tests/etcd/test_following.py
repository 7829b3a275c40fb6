"""A spare follows the recorded backup's stream, so that after a failover it is
brought in sync by the batches it lacks (a catch-up), not by a full transfer.

Three members and a real etcd, a writer that records every answer, then
``kill -9`` of the primary: the promoted backup catches the spare up, writes
resume, no acknowledged write is lost and no refused write is visible.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import pytest

from pbkv import auth
from pbkv.testing.members import LocalMembers
from pbkv.wire import UPGRADE_TOKEN, AuthChallenge, AuthProof, AuthResponse, Frame, FrameCodec
from tests.support.failover import Writer, check_no_loss, start_three


@pytest.fixture
def members(tmp_path, etcd, prefix) -> Iterator[LocalMembers]:
    with LocalMembers(tmp_path, etcd.client_url, cluster=prefix) as cluster:
        yield cluster


def roles(members: LocalMembers) -> tuple[int, int, int]:
    """(primary, recorded backup, spare) by index, once the spare follows the backup."""

    def found() -> tuple[int, int, int] | None:
        statuses = members.statuses()
        if any(status is None for status in statuses):
            return None
        names = [status["member"] for status in statuses if status]
        by_role = {status["role"]: index for index, status in enumerate(statuses) if status}
        if set(by_role) != {"primary", "backup", "spare"}:
            return None
        spare = statuses[by_role["spare"]]
        assert spare is not None
        backup_address = members.name(by_role["backup"])
        if spare["following"] != backup_address or spare["follow_step"] != "following":
            return None
        assert len(set(names)) == 3
        return by_role["primary"], by_role["backup"], by_role["spare"]

    result: tuple[int, int, int] = members.wait(found, what="the spare to follow the backup")
    return result


def test_a_spare_that_follows_the_backup_is_caught_up_after_a_failover(members) -> None:
    start_three(members)
    with Writer(members) as writer:
        writer.wait_acknowledged(200)
        old, backup, spare = roles(members)
        # The spare's copy keeps up with the backup's (its lag is some batches at most).
        members.wait(
            lambda: (s := members.status(spare)) is not None and s["follow_batches_applied"] > 10,
            what="the spare to apply the backup's batches",
        )
        status = members.status(spare)
        assert status is not None and status["confirmed"] is False
        assert members.status(backup)["followers"] == [status["member"]]
        full_before = status["resyncs_full"]
        writer.wait_acknowledged(100)
        members.kill(old)
        new = members.wait_writable(exclude=(old,))
        writer.wait_acknowledged(200)
    assert new == backup, "only the recorded backup may be promoted"
    check_no_loss(members, new, writer)
    third = members.wait(
        lambda: (s := members.status(spare)) is not None and s["role"] == "backup" and s,
        what="the spare to learn that it is the recorded backup now",
    )
    assert third["stage"] == "in_sync"
    assert third["catchups"] == 1 and third["resyncs_full"] == full_before
    assert members.status(new)["catchups_sent"] == 1
    log = members.log(spare)
    assert re.search(r"backup resync: partial: catching up \d+ batches", log), log[-3000:]
    assert "primary resync: partial: the backup catches up" in members.log(new)
    # The promoted member's record names the spare it caught up.
    assert members.status(new)["recorded_backup"] == third["member"]


def test_a_killed_spare_follows_again_after_a_restart(members) -> None:
    start_three(members)
    with Writer(members) as writer:
        writer.wait_acknowledged(100)
        _, backup, spare = roles(members)
        members.kill(spare)
        members.wait(
            lambda: members.status(backup)["followers"] == [],
            what="the backup to drop its dead follower",
        )
        members.start(spare)
        _, _, again = roles(members)
        assert again == spare
        writer.wait_acknowledged(100)
        deadline = time.monotonic() + 30
        while (s := members.status(spare)) is None or s["follow_lag"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert members.status(spare)["follow_copies_installed"] == 1


def test_an_outsider_without_the_secret_gets_nothing_from_the_backup(members) -> None:
    """A forged follower (pbkv's code, not the secret) is closed after its proof
    fails: no HELLO, no copy, and the backup's data and stream are untouched."""
    primary = start_three(members)
    with members.client(primary) as client:
        for i in range(50):  # a copy would be far larger than a refusal
            assert client.insert(f"k{i}", "v" * 100)
    _, backup, _ = roles(members)
    before = members.status(backup)
    assert before is not None
    outsider = socket.create_connection(members.addresses[backup], timeout=10)
    host, port = members.addresses[backup]
    outsider.sendall(
        b"GET /kvrepl/follow HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: %s\r\n"
        b"Connection: Upgrade\r\n\r\n" % (host.encode(), port, UPGRADE_TOKEN)
    )
    codec = FrameCodec()
    nonce = auth.new_nonce()
    outsider.sendall(codec.encode(AuthChallenge(nonce)))
    received = b""
    while b"\r\n\r\n" not in received:
        received += outsider.recv(4096)
    head, rest = received.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 101")
    frames: list[Frame] = []
    while not frames:
        frames = codec.feed(rest)
        rest = b"" if frames else rest + outsider.recv(4096)
    assert isinstance(frames[0], AuthResponse)
    outsider.sendall(codec.encode(AuthProof(bytes(32))))  # a proof without the secret
    tail = b""
    while chunk := outsider.recv(65536):
        tail += chunk
    outsider.close()
    assert len(tail) < 1024, "the backup sent data to an unproven follower"
    after = members.status(backup)
    assert after is not None and after["followers"] == before["followers"]
    assert after["confirmed"] and after["stage"] == "in_sync"
