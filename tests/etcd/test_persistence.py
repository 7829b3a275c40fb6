"""Persistence with a coordinator: members with ``persistence = always`` killed all at
once (``kill -9``) and started again from their disks.  The member etcd records as
the in-sync backup keeps its name across the restart (its run id is kept with its
data), so it may be promoted with the copy it recovered, which holds every
acknowledged write; the others join it."""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pbkv.client import PbkvError
from pbkv.persist import address_folder
from pbkv.testing.cluster import process_alive
from pbkv.testing.members import LocalMembers


@pytest.fixture
def members(tmp_path: Path, etcd, prefix) -> Iterator[LocalMembers]:
    data = str(tmp_path / "data")
    with LocalMembers(
        tmp_path, etcd.client_url, cluster=prefix, persistence="always", data_dir=data
    ) as cluster:
        yield cluster


class Writer:
    """Inserts unique keys into whichever member is primary, noting what it acknowledged."""

    def __init__(self, members: LocalMembers) -> None:
        self.members = members
        self.acknowledged: dict[str, str] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        primary = self.members.primary()
        if primary is None:
            return
        with self.members.client(primary, timeout=2.0) as client:
            for i in range(1_000_000):
                if self.stop.is_set():
                    return
                key = f"w{i}"
                try:
                    if client.insert(key, "v"):
                        self.acknowledged[key] = "v"
                except (OSError, PbkvError):
                    return  # the members were killed: this write's outcome is unknown

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(30)


def name(members: LocalMembers, index: int) -> str:
    return members.name(index)


def kill_all(members: LocalMembers, rng: random.Random) -> None:
    """``kill -9`` of every member, back to back in a random order; then wait until all
    are gone."""
    pids = [pid for pid in members.pids() if pid is not None]
    for pid in rng.sample(pids, len(pids)):
        os.kill(pid, signal.SIGKILL)
    for pid in pids:
        members.wait(lambda pid=pid: not process_alive(pid), 15, what="a member to die")
    for index in range(len(members.addresses)):
        members.pid_file(index).unlink(missing_ok=True)


def test_all_members_killed_come_back_from_disk_with_every_acknowledged_write(
    members: LocalMembers,
) -> None:
    for index in range(3):
        members.start(index)
    primary = members.wait_writable()
    status = members.status(primary)
    assert status is not None
    recorded = status["recorded_backup"]
    backup = next(i for i in range(3) if recorded.startswith(name(members, i) + "#"))
    with Writer(members) as writer:
        members.wait(lambda: len(writer.acknowledged) >= 50, 30, what="50 acknowledged writes")
        kill_all(members, random.Random(1))
    acknowledged = writer.acknowledged

    # Started again, the recorded backup last: the others may not lead meanwhile.
    for index in sorted(range(3), key=lambda i: i == backup):
        members.start(index)
    leader = members.wait_writable(timeout=60)
    assert leader == backup, "only the recorded backup may be promoted"
    leader_status = members.status(leader)
    assert leader_status is not None and leader_status["member"] == recorded
    with members.client(leader) as client:
        dump = client.dump_dict()
        lost = {key for key, value in acknowledged.items() if dump.get(key) != value}
        assert not lost, f"{len(lost)} acknowledged writes lost"
        assert client.insert("after", "restart") is True
    assert "may not become it" not in members.log(backup).split("recovered")[-1]


def test_a_member_whose_data_is_gone_is_a_new_member(members: LocalMembers) -> None:
    """The run id is kept only with the data: a member started on an empty folder is
    not the member it was, and never passes for the recorded backup."""
    for index in range(2):
        members.start(index)
    primary = members.wait_writable()
    backup = 1 - primary
    with members.client(primary) as client:
        assert client.insert("k", "v") is True
    before = members.status(backup)
    assert before is not None
    kill_all(members, random.Random(2))
    # The backup's folder emptied (a new disk).
    emptied = Path(members.settings["data_dir"]) / address_folder(*members.addresses[backup])
    for file in emptied.iterdir():
        file.unlink()
    members.start(backup)
    members.start(primary)
    status = members.wait(
        lambda: (s := members.status(backup)) is not None and s.get("why_not_primary") and s,
        30,
        what="the emptied member's reason",
    )
    assert status["member"] != before["member"]
    assert "may be promoted" in status["why_not_primary"]
    assert members.primary() is None  # the old primary is not the recorded backup either
