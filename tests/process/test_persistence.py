"""Persistence on real processes: both servers killed (``kill -9``) at once under
concurrent writers, restarted in either order, and every acknowledged write is back;
damaged files stop the start with the file and offset."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pbkv.client import PbkvError, ReplicationFailed
from pbkv.persist import address_folder
from pbkv.testing.cluster import process_alive
from pbkv.testing.proxy import FaultProxy
from tests.support.harness import Pair, wait_for
from tests.support.keyed_writes import retry_them, write_three

WRITERS = 8


class Writers:
    """Threads inserting unique keys through their own connections, each noting the
    writes the primary acknowledged."""

    def __init__(self, pair: Pair, round_: int) -> None:
        self.pair = pair
        self.round = round_
        self.stop = threading.Event()
        self.acknowledged: dict[str, str] = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._write, args=(n,)) for n in range(WRITERS)]

    def _write(self, number: int) -> None:
        try:
            client = self.pair.client("primary", timeout=3.0)
        except Exception:
            return
        with client:
            for i in range(1_000_000):
                if self.stop.is_set():
                    return
                key, value = f"r{self.round}-w{number}-{i}", f"value {i} é&="
                try:
                    if client.insert(key, value):
                        with self.lock:
                            self.acknowledged[key] = value
                except Exception:
                    return  # the servers were killed: this write's outcome is unknown

    def __enter__(self) -> Writers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


def kill_both(pair: Pair, rng: random.Random) -> None:
    """``kill -9`` of both, in a random order, back to back; then wait until both are gone."""
    pids = {role: pair.pid(role) for role in rng.sample(["primary", "backup"], 2)}
    for pid in pids.values():
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    for role, pid in pids.items():
        assert pid is not None
        wait_for(lambda pid=pid: not process_alive(pid), 15, what=f"{role} to die")
        pair.pid_file(role).unlink(missing_ok=True)


def restart(pair: Pair, first: str) -> None:
    second = "backup" if first == "primary" else "primary"
    pair.start(first)
    pair.start(second)
    pair.wait_stage("primary", "in_sync", 30)
    pair.wait_stage("backup", "in_sync", 30)


@pytest.mark.parametrize("mode", ["always", "everysec"])
@pytest.mark.parametrize("first", ["primary", "backup"])
def test_both_killed_under_writers_lose_no_acknowledged_write(
    make_pair, tmp_path: Path, mode: str, first: str
) -> None:
    """With ``always`` nothing acknowledged is lost however both servers die.  With
    ``everysec`` a process killed loses nothing either: its records are in the
    kernel's page cache (only a machine that loses power loses the last second)."""
    rng = random.Random(f"{mode}-{first}")
    pair: Pair = make_pair(persistence=mode, data_dir=str(tmp_path / "data"))
    pair.start_both()
    everything: dict[str, str] = {}
    for round_ in range(3):
        with Writers(pair, round_) as writers:
            time.sleep(rng.uniform(0.3, 1.0))
            kill_both(pair, rng)
        assert writers.acknowledged, "the writers got nothing acknowledged"
        everything.update(writers.acknowledged)
        restart(pair, first)
        dump = pair.dump("primary")
        lost = {key for key, value in everything.items() if dump.get(key) != value}
        assert not lost, f"round {round_}: {len(lost)} acknowledged writes lost"
        assert pair.dump("backup") == dump
        status = pair.status("primary")
        assert status is not None and status["persistence"]["mode"] == mode
    log = pair.log("primary") + pair.log("backup")
    assert "recovered" in log


def test_each_server_freezes_what_it_built_and_recovered_before_serving(
    make_pair, tmp_path: Path
) -> None:
    """Kept out of every full collection (``metrics.freeze_startup_objects``): the
    collections while a base is written walk only what was made since."""
    pair: Pair = make_pair(persistence="everysec", data_dir=str(tmp_path / "data"))
    pair.start_both()
    for role in ("primary", "backup"):
        status = pair.status(role)
        assert status is not None and status["gc_frozen"] > 1000, role


def test_a_recovered_primary_alone_refuses_reads_until_a_sync(make_pair, tmp_path: Path) -> None:
    pair: Pair = make_pair(persistence="always", data_dir=str(tmp_path / "data"))
    pair.start_both()
    client = pair.client("primary")
    assert client.insert("k", "v") is True
    pair.kill("primary")
    pair.kill("backup")
    pair.start("primary")
    status = pair.status("primary")
    assert status is not None and status["recovered"] and status["keys"] == 1
    assert status["stage"] == "bootstrapping_secondary"
    pair.start("backup")
    pair.wait_stage("primary", "in_sync")
    assert pair.client("primary").get("k") == "v"


def test_a_torn_last_record_is_cut_and_other_damage_stops_the_start(
    make_pair, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    pair: Pair = make_pair(persistence="always", data_dir=str(data))
    pair.start_both()
    client = pair.client("primary")
    for i in range(20):
        assert client.insert(f"k{i}", "v") is True
    pair.kill("primary")
    pair.kill("backup")
    host, port = pair.address["primary"]
    folder = data / address_folder(host, port)
    (log,) = folder.glob("incr.*.log")
    size = log.stat().st_size
    # A torn last record (a crash in the middle of a write): cut, and the start goes on.
    with open(log, "ab") as file:
        file.write(b"\x00\x00\x01\x00partial")
    pair.start("primary")
    assert "cut a torn last record" in pair.log("primary")
    assert log.stat().st_size == size
    assert pair.status("primary")["keys"] == 20  # type: ignore[index]
    pair.kill("primary")
    # A flipped bit in the middle: the start stops, naming the file and the offset.
    raw = bytearray(log.read_bytes())
    raw[size // 2] ^= 0x10
    log.write_bytes(bytes(raw))
    result = pair.start("primary", check=False)
    assert result.returncode != 0
    assert f"{log}: damage at offset" in pair.log("primary")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 16 MiB tmpfs: a disk that fills up."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def test_a_full_disk_refuses_writes_with_the_reason_and_they_resume_once_freed(
    make_pair, small_disk: Path
) -> None:
    """``always`` on a disk that fills up: writes are refused (507, the reason given)
    before anything is applied, reads go on, nothing refused ever shows up, and once
    space is freed the next write is accepted."""
    headroom = 2 * 1024 * 1024
    data = small_disk / "data"
    pair: Pair = make_pair(persistence="always", data_dir=str(data), disk_headroom=str(headroom))
    pair.start_both()
    client = pair.client("primary")
    assert client.insert("before", "v") is True
    filler = small_disk / "filler"
    with open(filler, "wb") as file:
        file.write(b"\x00" * (free_bytes(small_disk) - headroom - 1024 * 1024))
    value = "x" * 32 * 1024
    acknowledged: set[str] = set()
    refused: list[PbkvError] = []
    refused_keys: set[str] = set()
    for i in range(200):
        key = f"k{i}"
        try:
            assert client.insert(key, value) is True
            acknowledged.add(key)
        except PbkvError as exc:
            refused.append(exc)
            refused_keys.add(key)
            if len(refused) >= 5:
                break
    assert acknowledged and len(refused) == 5, (len(acknowledged), refused)
    assert all(exc.status == 507 and "disk full" in exc.error for exc in refused), refused
    status = pair.status("primary")
    assert status is not None
    persisted = status["persistence"]
    assert persisted["short_of_space"] and persisted["writes_refused"] >= 5
    assert persisted["failed"] is None  # refused cleanly: the log is whole
    # Reads go on; what was refused is nowhere.
    assert client.get("before") == "v"
    for key in refused_keys:
        assert client.get(key) is None
        assert pair.client("backup").get(key) is None
    # Room again: the next write is accepted.
    filler.unlink()
    assert client.insert("after", "v") is True
    status = pair.status("primary")
    assert status is not None and status["persistence"]["short_of_space"] is None
    # Both killed and restarted: every acknowledged write is back, no refused one.
    pair.kill("primary")
    pair.kill("backup")
    restart(pair, "primary")
    dump = pair.dump("primary")
    assert {"before", "after", *acknowledged} <= dump.keys()
    assert not refused_keys & dump.keys()
    assert "refusing writes: disk full" in pair.log("primary")


@pytest.mark.parametrize("where", ["log", "base"])
def test_keyed_writes_are_remembered_after_both_restart_from_disk(
    make_pair, tmp_path: Path, where: str
) -> None:
    """The idempotency table is persisted with the data: after ``kill -9`` of both and
    a restart from disk, a retry gets the recorded reply, not a second apply (an
    insert would say "key exists", a delete "missing").  ``log``: the entries are in
    the batch records; ``base``: a log rewrite put them in a new base first."""
    settings = {"persistence": "always", "data_dir": str(tmp_path / "data"), "errors": "http"}
    if where == "base":
        settings.update(rewrite_min_bytes="1", rewrite_percentage="1")
    pair: Pair = make_pair(**settings)
    pair.start_both()
    address = pair.address["primary"]
    write_three(address)
    if where == "base":
        for role in ("primary", "backup"):
            wait_for(
                lambda role=role: pair.status(role)["persistence"]["rewrites"] >= 1,  # type: ignore[index]
                15,
                what=f"the {role}'s log to be rewritten",
            )
    before = pair.status("primary")
    assert before is not None and before["idempotency_entries"] == 3

    kill_both(pair, random.Random(where))
    restart(pair, "backup")
    status = pair.status("primary")
    assert status is not None and status["checksum"] == before["checksum"]
    assert status["idempotency_entries"] == 3

    retry_them(address)
    after = pair.status("primary")
    assert after is not None and after["checksum"] == before["checksum"]
    assert after["writes_replayed"] == 2 and after["writes_replicated"] == 0
    assert pair.dump("primary") == pair.dump("backup") == {"k": "v"}


@pytest.mark.parametrize("first", ["primary", "backup"])
def test_a_rewound_write_the_backup_logged_stays_rewound_after_both_restart(
    make_pair, tmp_path: Path, first: str
) -> None:
    """A write answered "replication failed" that the backup had applied and logged
    (its acknowledgement lost): in memory the live primary has the backup undo it;
    after ``kill -9`` of both and a restart from disk the same rule holds: the two
    recovered copies are of one history, the primary's wins, and the backup rolls the
    batch back (its undo record rebuilt from its log), whatever the order of the
    restarts."""
    pair: Pair = make_pair(persistence="always", data_dir=str(tmp_path / "data"), ack_timeout="1")
    host, port = pair.address["backup"]
    with FaultProxy(host, 0, host, port, source_host=pair.address["primary"][0]) as proxy:
        pair.start("backup")
        pair.start("primary", "--backup-port", str(proxy.port))
        pair.wait_stage("primary", "in_sync")
        client = pair.client("primary")  # one attempt per write, no key
        for i in range(5):
            assert client.insert(f"acknowledged-{i}", "v") is True
        proxy.down.drop = True  # the backup's acknowledgements are lost
        with pytest.raises(ReplicationFailed):
            client.insert("rewound", "v")
        wait_for(lambda: pair.dump("backup").get("rewound") == "v", 10, what="the backup's copy")
        kill_both(pair, random.Random(first))

    restart(pair, first)
    assert "never acknowledged: it rolls them back" in pair.log("primary")
    dump = pair.dump("primary")
    assert "rewound" not in dump and len(dump) == 5
    assert pair.dump("backup") == dump
    status = pair.status("primary")
    assert status is not None and status["resyncs_partial"] == 1
    # The rollback reached the backup's disk too: restarted again, both hold the same.
    kill_both(pair, random.Random(first))
    restart(pair, first)
    assert pair.dump("backup") == pair.dump("primary") == dump


@pytest.fixture
def failing_disk(tmp_path: Path):
    """An ext4 file system (no journal, ``errors=continue``) on a loop device whose
    file lives on a 16 MiB tmpfs: the file system has room, but once the tmpfs is
    full its blocks cannot be written, so an fsync fails (an I/O error at writeback).
    Yields (the mount point, the tmpfs)."""
    backing, mount = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mount.mkdir()

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, capture_output=True, text=True)

    if (done := run("mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(backing))).returncode:
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    image = backing / "disk.img"
    loop = ""
    try:
        with open(image, "wb") as file:
            file.truncate(64 * 1024 * 1024)  # sparse: its blocks take tmpfs pages when written
        made = run("mkfs.ext4", "-q", "-O", "^has_journal", "-E", "nodiscard", str(image))
        attached = run("losetup", "-f", "--show", str(image))
        if made.returncode or attached.returncode:
            pytest.skip(f"cannot make a loop device file system: {made.stderr}{attached.stderr}")
        loop = attached.stdout.strip()
        if (done := run("mount", "-o", "errors=continue", loop, str(mount))).returncode:
            pytest.skip(f"cannot mount the loop device: {done.stderr.strip()}")
        try:
            yield mount, backing
        finally:
            run("umount", "-l", str(mount))
    finally:
        if loop:
            run("losetup", "-d", loop)
        run("umount", "-l", str(backing))


def test_a_failed_fsync_acknowledges_nothing_and_heals_once_the_disk_works(
    make_pair, failing_disk: tuple[Path, Path]
) -> None:
    """A real failed fsync (a disk whose blocks cannot be written): the write that
    waited for it is not answered as a success, the server says its disk failed, and
    once the disk works again a new base heals it; after ``kill -9`` of both and a
    restart, every acknowledged write is back."""
    mount, backing = failing_disk
    pair: Pair = make_pair(persistence="always", data_dir=str(mount / "data"))
    pair.start_both()
    client = pair.client("primary")
    assert client.insert("before", "v") is True
    acknowledged = {"before"}
    filler = backing / "filler"
    with open(filler, "wb") as file:  # the file system still shows room: writes admitted
        file.write(b"\x01" * free_bytes(backing))
    value = "x" * 32 * 1024  # new blocks for every record
    failure: PbkvError | None = None
    for i in range(100):
        try:
            assert client.insert(f"k{i}", value) is True
            acknowledged.add(f"k{i}")
        except PbkvError as exc:
            failure = exc
            break
    assert failure is not None, "no write failed on a disk that cannot be written"
    # "replication failed" (the backup's fsync failed before its ACK) or the primary's
    # own: "the write did not reach this server's disk"; never a success.
    assert "replication failed" in failure.error or "did not reach" in failure.error, failure
    statuses = [pair.status(role) for role in ("primary", "backup")]
    assert any(s is not None and s["persistence"]["disk_failures"] >= 1 for s in statuses)

    filler.unlink()  # the disk works again: a new base heals each server
    for role in ("primary", "backup"):
        wait_for(
            lambda role=role: (
                (s := pair.status(role)) is not None and s["persistence"]["failed"] is None
            ),
            30,
            what=f"the {role}'s persistence to heal",
        )

    def accepted() -> bool:
        try:
            return client.insert("after", "v") is True
        except PbkvError:
            return False

    wait_for(accepted, 30, what="a write accepted again")
    acknowledged.add("after")
    log = pair.log("primary") + pair.log("backup")
    assert "fsync failed" in log and "persistence works again" in log
    kill_both(pair, random.Random(6))
    restart(pair, "backup")
    dump = pair.dump("primary")
    assert acknowledged <= dump.keys()
    assert pair.dump("backup") == dump
