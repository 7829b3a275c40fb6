"""Snapshots: chunked writes, round trips, verification per chunk and as a whole."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbkv.persist.framing import Damage
from pbkv.persist.log import State
from pbkv.persist.snapshot import Section, SnapshotReader, SnapshotWriter, verify_snapshot
from pbkv.store import HashStore, ShardedStore
from tests.support.persist import keys, texts

STATE = State(0x1234, 57, 3)


def write(path: Path, pairs: list[tuple[str, str]], chunk_pairs: int = 3) -> SnapshotWriter:
    writer = SnapshotWriter(
        path, STATE, b"extra\0bytes", chunk_pairs=chunk_pairs, clock=lambda: 5.5
    )
    for _ in writer.write_pairs(pairs):
        pass
    writer.finish()
    return writer


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(keys, texts, max_size=20), st.integers(1, 5))
def test_pairs_round_trip(pairs: dict[str, str], chunk_pairs: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "base.1.snap"
        write(path, list(pairs.items()), chunk_pairs)
        with SnapshotReader(path) as reader:
            assert (reader.state, reader.extra, reader.created) == (STATE, b"extra\0bytes", 5.5)
            assert dict(reader.pairs()) == pairs
        for store in (ShardedStore(7), HashStore()):
            with SnapshotReader(path) as reader:
                reader.fill(store)
            assert dict(store.items()) == pairs
        source = ShardedStore(4)
        for key, value in pairs.items():
            source.put(key, value)
        info = verify_snapshot(path)
        assert (info.count, info.checksum) == (len(source), source.checksum)
        assert info.chunks == -(-len(pairs) // chunk_pairs)


def test_the_writer_yields_after_each_bounded_chunk(tmp_path: Path) -> None:
    writer = SnapshotWriter(tmp_path / "s", STATE, chunk_pairs=4, chunk_chars=30)
    pairs = [(f"k{i}", "v") for i in range(10)] + [("big", "x" * 100), ("after", "y")]
    assert list(writer.write_pairs(pairs)) == [4, 8, 11, 12]
    assert writer.temp_path.exists() and not (tmp_path / "s").exists()  # in place at finish
    info = writer.finish()
    assert not writer.temp_path.exists()
    assert info.size == (tmp_path / "s").stat().st_size
    assert verify_snapshot(tmp_path / "s").chunks == 4


def test_an_abandoned_snapshot_leaves_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "base.1.snap"
    write(path, [("a", "1")])
    before = path.read_bytes()
    writer = SnapshotWriter(path, State(1, 2), chunk_pairs=1)
    for _ in writer.write_pairs([("b", "2"), ("c", "3")]):
        break  # a crash here leaves the temporary file half written
    assert path.read_bytes() == before
    writer.abort()
    assert not writer.temp_path.exists() and path.read_bytes() == before


def _snapshot_bytes(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "base.1.snap"
    write(path, [("k", "v"), ("\r\n", "😀"), ("", ""), ("z", "\0")][1:] + [("k", "v")], 2)
    return path, path.read_bytes()


def test_a_flipped_bit_anywhere_is_damage(tmp_path: Path) -> None:
    path, data = _snapshot_bytes(tmp_path)
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(flipped)
        with pytest.raises(Damage):
            verify_snapshot(path)


def test_a_snapshot_cut_anywhere_is_damage_not_a_torn_tail(tmp_path: Path) -> None:
    path, data = _snapshot_bytes(tmp_path)
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(Damage):
            verify_snapshot(path)
    path.write_bytes(data + b"\0")
    with pytest.raises(Damage, match="after the snapshot's end"):
        verify_snapshot(path)


def test_the_whole_is_checked_against_the_summary(tmp_path: Path) -> None:
    """Every chunk verifies, but the pairs are not what the end frame sums up."""
    writer = SnapshotWriter(tmp_path / "s", STATE)
    writer.write_chunk([("a", "1")])
    writer._checksum ^= 1  # the summary of other pairs
    writer.finish()
    with pytest.raises(Damage, match="checksum"):
        verify_snapshot(tmp_path / "s")
    with SnapshotReader(tmp_path / "s") as reader, pytest.raises(Damage, match="checksum"):
        reader.fill(ShardedStore(4))
    writer = SnapshotWriter(tmp_path / "t", STATE)
    writer.write_chunk([("a", "1")])
    writer.count += 1
    writer.finish()
    with SnapshotReader(tmp_path / "t") as reader, pytest.raises(Damage, match="pairs"):
        reader.fill(ShardedStore(4))


def test_a_base_written_shard_by_shard_fills_any_store(tmp_path: Path) -> None:
    """A base's chunks hold one shard each: a store of that layout takes each in one
    go, another layout spreads them; both hold the pairs, sums and sizes of puts."""
    source = ShardedStore(4)
    for number in range(300):
        source.put(f"key {number}", "é" * (number % 7))
    writer = SnapshotWriter(tmp_path / "s", STATE)
    for index in range(source.shard_count):
        for chunk in source.shard_chunks(index, 16):
            writer.write_chunk(chunk)
    writer.finish()
    for store in (ShardedStore(4), ShardedStore(7), HashStore()):
        with SnapshotReader(tmp_path / "s") as reader:
            reader.fill(store)
        assert dict(store.items()) == dict(source.items())
        assert (len(store), store.checksum, store.memory_bytes) == (
            len(source),
            source.checksum,
            source.memory_bytes,
        )


def test_a_chunk_of_other_than_strings_is_damage_at_its_offset(tmp_path: Path) -> None:
    writer = SnapshotWriter(tmp_path / "s", STATE)
    writer.write_chunk([("a", "1")])
    offset = writer.size
    writer._write_frame([Section.CHUNK, ["b", 2]])
    writer.chunks += 1
    writer.finish()
    expected = f"offset {offset}: keys and values must be strings"
    with pytest.raises(Damage, match=expected):
        verify_snapshot(tmp_path / "s")
    with SnapshotReader(tmp_path / "s") as reader, pytest.raises(Damage, match=expected):
        reader.fill(ShardedStore(4))


def test_a_section_over_the_maximum_is_refused_when_written(tmp_path: Path) -> None:
    writer = SnapshotWriter(tmp_path / "s", STATE, max_record=100)
    with pytest.raises(Exception, match="over the record maximum"):
        writer.write_chunk([("a", "x" * 200)])
    writer.abort()
