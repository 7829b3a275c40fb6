"""A server's data folder: start, append, rewrite (rotation), crashes, load."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbkv.persist.datadir import (
    LOCK,
    MANIFEST,
    DataDir,
    Loaded,
    address_folder,
    read_manifest,
)
from pbkv.persist.framing import Damage, PersistError, TornTail
from pbkv.persist.log import Record, State, encode_record
from pbkv.store import ShardedStore
from tests.support.persist import ops_lists

HISTORY = 0x5EED
EMPTY = State(HISTORY, 0)
# A base's idempotency table: one remembered reply, made at table time 1000 ms.
TABLE = b"\x92\xcd\x03\xe8\x95\xa4key1\x07\xc3\xc0\xcd\x03\xe8"


def started(folder: Path, state: State = EMPTY, pairs: Iterable[tuple[str, str]] = ()) -> DataDir:
    data = DataDir(folder, chunk_pairs=2)
    writer = data.start(state, TABLE)
    data.write_snapshot(writer, pairs)
    data.finish_rewrite()
    return data


def loaded_store(folder: Path) -> tuple[ShardedStore, Loaded]:
    with DataDir(folder) as data:
        loaded = data.load()
        store = ShardedStore(4)
        loaded.fill(store)
    return store, loaded


def on_disk(folder: Path) -> set[str]:
    return {entry.name for entry in folder.iterdir()}


def test_a_fresh_folder_starts_appends_and_loads(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "d")
    assert not data.exists
    with pytest.raises(PersistError, match="start"):
        data.load()
    data.close()
    data = started(tmp_path / "d", pairs=[("a", "1")])
    data.append(Record.batch(HISTORY, 1, 0, ["b", "2", "a", None]))
    data.append(Record.batch(HISTORY, 2, 0, ["\r\n", "😀"]))
    data.sync()
    assert not data.dirty
    data.close()
    store, loaded = loaded_store(tmp_path / "d")
    assert dict(store.items()) == {"b": "2", "\r\n": "😀"}
    assert (loaded.base, loaded.state, loaded.extra) == (
        State(HISTORY, 0),
        State(HISTORY, 2),
        TABLE,
    )
    assert store.idempotency.clock == 1000
    assert store.idempotency.get("key1") is not None
    assert on_disk(tmp_path / "d") == {MANIFEST, LOCK, "base.1.snap", "incr.1.log"}


def test_one_process_per_folder(tmp_path: Path) -> None:
    data = started(tmp_path / "d")
    with pytest.raises(PersistError, match="in use"):
        DataDir(tmp_path / "d")
    data.close()
    DataDir(tmp_path / "d").close()


def test_each_address_has_its_own_folder(tmp_path: Path) -> None:
    assert address_folder("127.0.0.1", 8001) == "127.0.0.1-8001"
    assert address_folder("::1", 8002) == "__1-8002"
    assert address_folder("../x", 1) == ".._x-1"
    with DataDir.for_address(tmp_path, "127.0.0.1", 8001) as data:
        assert data.folder == tmp_path / "127.0.0.1-8001"


def replay(
    folder: Path, steps: list[tuple[str, list[str | None]]], crash_in_rewrite: bool = False
) -> dict[str, str]:
    """Apply ``steps`` (a batch, or "rewrite": begin one with the batch's ops as the
    writes made while it runs) to a store and to the folder; returns the store."""
    store = ShardedStore(4)
    data = started(folder)
    seq = 0

    def batch(ops: list[str | None]) -> None:
        nonlocal seq
        seq += 1
        store.apply(ops)
        data.append(Record.batch(HISTORY, seq, 0, ops))

    for kind, ops in steps:
        if kind == "batch":
            batch(ops)
            continue
        pairs = list(store.items())  # the data as it is when the rewrite begins
        writer = data.begin_rewrite(State(HISTORY, seq), b"")
        chunks = writer.write_pairs(pairs)
        next(chunks, None)
        batch(ops)  # a write between two chunks goes to the new increment
        for _ in chunks:
            pass
        data.finish_rewrite()
    data.sync()
    data.close()
    return dict(store.items())


steps = st.lists(st.tuples(st.sampled_from(["batch", "batch", "rewrite"]), ops_lists), max_size=12)


@settings(max_examples=40, deadline=None)
@given(steps)
def test_base_and_increments_load_to_the_same_store_as_replaying_everything(
    plan: list[tuple[str, list[str | None]]],
) -> None:
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "d"
        expected = replay(folder, plan)
        store, loaded = loaded_store(folder)
        assert dict(store.items()) == expected
        assert loaded.state.seq == len(plan)
        manifest = read_manifest(folder / MANIFEST)
        # The disk holds one snapshot and the increments after it, nothing else.
        assert on_disk(folder) == {MANIFEST, LOCK, *manifest.files}
        rewrites = sum(1 for kind, _ in plan if kind == "rewrite")
        assert manifest.base == f"base.{1 + rewrites}.snap"
        assert len(manifest.increments) == 1


def test_a_crash_mid_snapshot_leaves_the_previous_one_usable(tmp_path: Path) -> None:
    """kill -9 while the new base is half written: the copy of the folder at that
    moment is what the disk holds."""
    folder = tmp_path / "d"
    data = started(folder, pairs=[("a", "1"), ("b", "2"), ("c", "3")])
    data.append(Record.batch(HISTORY, 1, 0, ["d", "4"]))
    writer = data.begin_rewrite(State(HISTORY, 1), b"")
    chunks = writer.write_pairs([("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")])
    next(chunks)
    data.append(Record.batch(HISTORY, 2, 0, ["e", "5"]))
    data.sync()
    crashed = tmp_path / "crashed"
    shutil.copytree(folder, crashed, ignore=shutil.ignore_patterns(LOCK))
    assert any(name.startswith("temp-") for name in on_disk(crashed))
    data.close()
    with DataDir(crashed) as reopened:
        assert reopened.removed == ["temp-base.2.snap"]
    store, loaded = loaded_store(crashed)
    assert dict(store.items()) == {"a": "1", "b": "2", "c": "3", "d": "4", "e": "5"}
    assert on_disk(crashed) == {MANIFEST, LOCK, "base.1.snap", "incr.1.log", "incr.2.log"}


def test_a_crash_around_the_manifest_switch(tmp_path: Path) -> None:
    """The new base renamed in but not named yet, or named with the old files not yet
    deleted: either way the folder loads, and what is not named is removed."""
    folder = tmp_path / "d"
    data = started(folder, pairs=[("a", "1")])
    data.append(Record.batch(HISTORY, 1, 0, ["b", "2"]))
    writer = data.begin_rewrite(State(HISTORY, 1), b"")
    data.write_snapshot(writer, [("a", "1"), ("b", "2")])
    data.append(Record.batch(HISTORY, 2, 0, ["c", "3"]))
    data.sync()
    old = {name: (folder / name).read_bytes() for name in ("base.1.snap", "incr.1.log")}
    writer.finish()  # renamed in, the manifest not written: a crash here
    before_switch = tmp_path / "before"
    shutil.copytree(folder, before_switch, ignore=shutil.ignore_patterns(LOCK))
    data._rewrite = None
    data.close()
    store, _ = loaded_store(before_switch)
    assert dict(store.items()) == {"a": "1", "b": "2", "c": "3"}
    assert "base.2.snap" not in on_disk(before_switch)

    data = DataDir(folder)
    data.load()
    writer = data.begin_rewrite(State(HISTORY, 2), b"")
    data.write_snapshot(writer, [("a", "1"), ("b", "2"), ("c", "3")])
    data.finish_rewrite()
    data.close()
    for name, content in old.items():  # the old files, as if not deleted yet
        (folder / name).write_bytes(content)
    store, _ = loaded_store(folder)
    assert dict(store.items()) == {"a": "1", "b": "2", "c": "3"}
    assert not {"base.1.snap", "incr.1.log"} & on_disk(folder)


def test_files_without_a_manifest_are_not_touched(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    started(folder).close()
    (folder / MANIFEST).unlink()
    with pytest.raises(PersistError, match="no manifest.json"):
        DataDir(folder)
    assert {"base.1.snap", "incr.1.log"} <= on_disk(folder)


def test_a_torn_tail_is_cut_at_load_and_appends_go_on(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    data = started(folder)
    data.append(Record.batch(HISTORY, 1, 0, ["a", "1"]))
    end = data.append(Record.batch(HISTORY, 2, 0, ["b", "2"]))
    data.close()
    log = folder / "incr.1.log"
    log.write_bytes(log.read_bytes()[: end - 3])
    with DataDir(folder) as reopened, pytest.raises(TornTail):
        reopened.load(cut_torn_tail=False)
    with DataDir(folder) as reopened:
        loaded = reopened.load()
        assert [torn.path for torn in loaded.cut] == [log]
        assert loaded.state.seq == 1
        loaded.snapshot.close()
        reopened.append(Record.batch(HISTORY, 2, 0, ["c", "3"]))
    store, loaded = loaded_store(folder)
    assert dict(store.items()) == {"a": "1", "c": "3"} and loaded.cut == []


def test_damage_refuses_the_load_with_file_and_offset(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    data = started(folder)
    first = data.append(Record.batch(HISTORY, 1, 0, ["a", "1"]))
    data.append(Record.batch(HISTORY, 2, 0, ["b", "2"]))
    data.close()
    log = folder / "incr.1.log"
    content = bytearray(log.read_bytes())
    content[first - 1] ^= 0x40  # the last byte of the first record
    log.write_bytes(content)
    with DataDir(folder) as reopened, pytest.raises(Damage) as caught:
        reopened.load()
    assert caught.value.path == log and caught.value.offset == 8
    assert log.read_bytes() == content  # nothing cut


def test_a_torn_tail_in_an_increment_that_is_not_the_last_is_damage(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    data = started(folder)
    end = data.append(Record.batch(HISTORY, 1, 0, ["a", "1"]))
    data.begin_rewrite(State(HISTORY, 1), b"")
    data.abort_rewrite()  # incr.2.log stays named: appends go on there
    data.append(Record.batch(HISTORY, 2, 0, ["b", "2"]))
    data.close()
    log = folder / "incr.1.log"
    log.write_bytes(log.read_bytes()[: end - 1])
    with DataDir(folder) as reopened, pytest.raises(Damage, match="not the last"):
        reopened.load()


def test_an_increment_left_out_breaks_the_sequence(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    data = started(folder)
    data.append(Record.batch(HISTORY, 1, 0, ["a", "1"]))
    data.begin_rewrite(State(HISTORY, 1), b"")
    data.abort_rewrite()
    data.append(Record.batch(HISTORY, 2, 0, ["b", "2"]))
    data.close()
    manifest = (folder / MANIFEST).read_text()
    (folder / MANIFEST).write_text(manifest.replace('"incr.1.log",', ""))
    with DataDir(folder) as reopened, pytest.raises(Damage, match="batch 2 follows batch 0"):
        reopened.load()


def test_rollbacks_and_marks(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    data = started(folder, pairs=[("base", "0")])
    for seq in range(1, 6):
        data.append(Record.batch(HISTORY, seq, 0, [f"k{seq}", "old"]))
    data.append(Record.rollback(State(HISTORY, 3)))
    data.append(Record.batch(HISTORY, 4, 0, ["k4", "new"]))
    data.append(Record.mark(State(0xBEEF, 10, 2)))  # a sync that kept the data
    data.append(Record.batch(0xBEEF, 11, 2, ["k11", "x"]))
    data.close()
    store, loaded = loaded_store(folder)
    assert dict(store.items()) == {
        "base": "0",
        "k1": "old",
        "k2": "old",
        "k3": "old",
        "k4": "new",
        "k11": "x",
    }
    assert loaded.state == State(0xBEEF, 11, 2)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (Record.rollback(State(HISTORY, 0, 1)), "rollback to 0 outside 1..2"),
        (Record.batch(HISTORY, 3, 0, ["a", "b"]), "epoch 0 after epoch 1"),
        (Record.batch(0xFF, 3, 1, ["a", "b"]), "history"),
        (Record.batch(HISTORY, 4, 1, ["a", "b"]), "batch 4 follows batch 2"),
    ],
)
def test_records_that_do_not_follow_are_damage(tmp_path: Path, record: Record, reason: str) -> None:
    folder = tmp_path / "d"
    data = started(folder)
    data.append(Record.batch(HISTORY, 1, 0, ["a", "1"]))
    data.append(Record.mark(State(HISTORY, 1, 1)))
    data.append(Record.batch(HISTORY, 2, 1, ["a", "2"]))
    offset = data.append(record) - len(encode_record(record))
    data.close()
    with DataDir(folder) as reopened, pytest.raises(Damage, match=reason) as caught:
        reopened.load()
    assert caught.value.offset == offset


def test_start_replaces_everything(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    data = started(folder, pairs=[("old", "1")])
    data.append(Record.batch(HISTORY, 1, 0, ["a", "1"]))
    writer = data.start(State(0xAAAA, 40), b"")
    with pytest.raises(PersistError):
        data.append(Record.batch(HISTORY, 2, 0, ["refused", "while replacing"]))
    data.write_snapshot(writer, [("new", "2")])
    data.finish_rewrite()
    data.append(Record.batch(0xAAAA, 41, 0, ["b", "2"]))
    data.close()
    store, loaded = loaded_store(folder)
    assert dict(store.items()) == {"new": "2", "b": "2"}
    assert loaded.state == State(0xAAAA, 41)
    assert on_disk(folder) == {MANIFEST, LOCK, "base.2.snap", "incr.2.log"}


def test_status(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "d", clock=lambda: 1234.5)
    assert data.status()["snapshot"] is None
    data.write_snapshot(data.start(State(HISTORY, 0), b""), [("a", "1")])
    info = data.finish_rewrite()
    size = data.append(Record.batch(HISTORY, 1, 0, ["b", "2"]))
    status = data.status()
    assert status["snapshot"] == {"file": "base.1.snap", "time": 1234.5, "size": info.size}
    assert status["log_bytes"] == size and status["unsynced_bytes"] == size - 8
    data.begin_rewrite(State(HISTORY, 1), b"")
    assert data.status()["rewrite"] is True and data.status()["increments"] == 2
    data.close()


def test_a_members_run_id_is_kept_only_with_its_data(tmp_path: Path) -> None:
    data = started(tmp_path / "d")
    assert data.member_run_id("first", loaded=False) == "first"  # a fresh folder: kept
    assert data.member_run_id("second", loaded=True) == "first"  # its data loaded: the same
    assert data.member_run_id("third", loaded=False) == "third"  # data not its own: a new one
    data.close()
    assert (tmp_path / "d" / "member").read_text() == "third"
    with DataDir(tmp_path / "d") as again:  # not a leftover: kept at open
        assert again.member_run_id("fourth", loaded=True) == "third"
