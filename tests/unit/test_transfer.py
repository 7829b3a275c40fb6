"""Full database transfer: SnapshotSender -> (wire) -> SnapshotReceiver."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbkv.config import MAX_SHARDS
from pbkv.store import ShardedStore, make_store, shard_of
from pbkv.transfer import SnapshotReceiver, SnapshotSender, TransferError
from pbkv.wire import (
    Frame,
    FrameCodec,
    FrameError,
    FrameType,
    SnapshotBegin,
    checksum_to_bytes,
    encode,
    frame_from_wire,
)
from tests.support.forge import transfer_frames

SHAPES = [("sharded", 1), ("sharded", 3), ("sharded", 16), ("hash", 1)]
SHAPE_IDS = [f"{kind}-{count}" for kind, count in SHAPES]
shapes = st.sampled_from(SHAPES)
keys = st.one_of(st.sampled_from(["a", "b", "", "😀", "k=v&x"]), st.text(max_size=6))
contents = st.dictionaries(keys, st.text(max_size=6), max_size=50)
nonempty = st.dictionaries(keys, st.text(max_size=6), min_size=1, max_size=30)
chunk_sizes = st.one_of(st.integers(1, 8), st.just(10**6))


def filled(shape: tuple[str, int], pairs: dict[str, str]) -> ShardedStore:
    store = make_store(*shape)
    for key, value in pairs.items():
        store.put(key, value)
    return store


def all_frames(store: ShardedStore, chunk_size: int, seq: int = 0) -> list[list[Any]]:
    """Every frame of a transfer as it travels (a list a test may alter)."""
    sender = SnapshotSender(store, chunk_size, seq)
    decoder = FrameCodec()
    frames: list[list[Any]] = []
    while not sender.done:
        for frame in sender.next_frames(4):
            frames.extend(decoded.to_wire() for decoded in decoder.feed(encode(frame)))
    return frames


def typed(items: list[Any]) -> Frame:
    """What the receiver gets: the frame as the decoder builds it (FrameError if malformed)."""
    return frame_from_wire(items)


def feed_until_error(receiver: SnapshotReceiver, frames: list[list[Any]]) -> int:
    """Feed frames; returns the index of the first frame refused."""
    for index, frame in enumerate(frames):
        try:
            receiver.feed(typed(frame))
        except (TransferError, FrameError):  # refused by the receiver, or at decode
            return index
    pytest.fail("the receiver accepted a bad transfer")


def shard_end_index(frames: list[list[Any]], shard: int, after: int = 0) -> int:
    return next(
        i
        for i, frame in enumerate(frames)
        if i >= after and frame[0] is FrameType.SHARD_END and frame[1] == shard
    )


def chunk_indexes(frames: list[list[Any]]) -> list[int]:
    return [i for i, frame in enumerate(frames) if frame[0] is FrameType.SHARD_CHUNK]


# -- round trips ---------------------------------------------------------------------------
@settings(max_examples=120, deadline=None)
@given(
    pairs=contents,
    junk=contents,
    sender_shape=shapes,
    receiver_shape=shapes,
    chunk_size=chunk_sizes,
    limit=st.integers(1, 10),
    seq=st.integers(0, 2**63 - 1),
)
def test_round_trip(
    pairs: dict[str, str],
    junk: dict[str, str],
    sender_shape: tuple[str, int],
    receiver_shape: tuple[str, int],
    chunk_size: int,
    limit: int,
    seq: int,
) -> None:
    source = filled(sender_shape, pairs)
    target = filled(receiver_shape, junk)  # replaced by the transfer
    sender = SnapshotSender(source, chunk_size, seq)
    receiver = SnapshotReceiver(target)
    decoder = FrameCodec()
    results = []
    while not sender.done:
        for frame in sender.next_frames(limit):
            [decoded] = decoder.feed(encode(frame))
            results.append(receiver.feed(decoded))

    assert results[-1] == source.checksum
    assert all(result is None for result in results[:-1])
    assert receiver.seq == seq
    assert target.checksum == source.checksum
    assert len(target) == len(source) == len(pairs)
    assert sorted(target.items()) == sorted(pairs.items())
    assert all(target.get(key) == value for key, value in pairs.items())
    assert receiver.complete_shards == set(range(target.shard_count))
    assert sender.total == len(pairs)


@pytest.mark.parametrize("sender_shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("receiver_shape", SHAPES, ids=SHAPE_IDS)
def test_empty_transfer_clears_receiver(
    sender_shape: tuple[str, int], receiver_shape: tuple[str, int]
) -> None:
    target = filled(receiver_shape, {"stale": "data", "more": "stale"})
    receiver = SnapshotReceiver(target)
    results = [receiver.feed(typed(f)) for f in all_frames(make_store(*sender_shape), 5)]
    assert results[-1] == 0
    assert len(target) == 0
    assert target.checksum == 0


# -- complete shards -----------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(pairs=contents, count=st.sampled_from([1, 3, 16]), chunk_size=chunk_sizes)
def test_complete_shards_same_layout(pairs: dict[str, str], count: int, chunk_size: int) -> None:
    source = filled(("sharded", count), pairs)
    target = ShardedStore(count)
    receiver = SnapshotReceiver(target)
    done: set[int] = set()
    probes = [*pairs, "absent", "also-absent", "😀😀"]
    for frame in all_frames(source, chunk_size):
        receiver.feed(typed(frame))
        if frame[0] is FrameType.SHARD_END:
            done.add(frame[1])
        assert receiver.complete_shards == done or frame[0] is FrameType.SNAPSHOT_END
        # The warm-start rule: in a complete shard, hits and misses are both certain.
        for key in probes:
            if shard_of(key, count) in receiver.complete_shards:
                assert target.get(key) == source.get(key)
    assert done == set(range(count))
    assert receiver.complete_shards == set(range(count))


@settings(max_examples=40, deadline=None)
@given(pairs=contents, chunk_size=chunk_sizes)
def test_complete_shards_different_layout_only_at_the_end(
    pairs: dict[str, str], chunk_size: int
) -> None:
    """A sender shard is not a receiver shard: nothing is certain before the end."""
    frames = all_frames(filled(("sharded", 3), pairs), chunk_size)
    receiver = SnapshotReceiver(ShardedStore(16))
    for frame in frames[:-1]:
        receiver.feed(typed(frame))
        assert receiver.complete_shards == set()
    receiver.feed(typed(frames[-1]))
    assert receiver.complete_shards == set(range(16))


# -- corruption ----------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(
    pairs=nonempty,
    sender_shape=shapes,
    receiver_shape=shapes,
    chunk_size=st.integers(1, 6),
    data=st.data(),
)
def test_corrupted_chunk_fails_at_shard_end(
    pairs: dict[str, str],
    sender_shape: tuple[str, int],
    receiver_shape: tuple[str, int],
    chunk_size: int,
    data: st.DataObject,
) -> None:
    frames = all_frames(filled(sender_shape, pairs), chunk_size)
    bad = data.draw(st.sampled_from(chunk_indexes(frames)), label="chunk")
    _, shard, flat = frames[bad]
    position = data.draw(st.integers(0, len(flat) - 1), label="position")
    flat[position] += "!"  # a key (even position) or a value (odd position)
    receiver = SnapshotReceiver(make_store(*receiver_shape))
    sender_shards = frames[0][1]
    if position % 2 == 0 and shard_of(flat[position], sender_shards) != shard:
        expected = bad  # the altered key now belongs to another shard: refused at once
    else:
        expected = shard_end_index(frames, shard, bad)
    assert feed_until_error(receiver, frames) == expected
    if sender_shape == receiver_shape:
        assert shard not in receiver.complete_shards


@settings(max_examples=60, deadline=None)
@given(
    pairs=nonempty,
    sender_shape=shapes,
    receiver_shape=shapes,
    chunk_size=st.integers(1, 6),
    data=st.data(),
)
def test_missing_chunk_fails(
    pairs: dict[str, str],
    sender_shape: tuple[str, int],
    receiver_shape: tuple[str, int],
    chunk_size: int,
    data: st.DataObject,
) -> None:
    frames = all_frames(filled(sender_shape, pairs), chunk_size)
    missing = data.draw(st.sampled_from(chunk_indexes(frames)), label="chunk")
    shard = frames[missing][1]
    del frames[missing]
    receiver = SnapshotReceiver(make_store(*receiver_shape))
    failed_at = feed_until_error(receiver, frames)
    assert failed_at in (shard_end_index(frames, shard, missing), len(frames) - 1)


@pytest.mark.parametrize("sender_shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("receiver_shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("which", ["begin", "shard_end", "end"])
@pytest.mark.parametrize("delta", [1, -1])
def test_wrong_count_fails(
    sender_shape: tuple[str, int], receiver_shape: tuple[str, int], which: str, delta: int
) -> None:
    pairs = {f"key{i}": f"value{i}" for i in range(20)}
    frames = all_frames(filled(sender_shape, pairs), 3)
    if which == "begin":
        frames[0][2] += delta
        expected = len(frames) - 1
    elif which == "shard_end":
        expected = shard_end_index(frames, 0)
        frames[expected][3] += delta
    else:
        frames[-1][2] += delta
        expected = len(frames) - 1
    receiver = SnapshotReceiver(make_store(*receiver_shape))
    assert feed_until_error(receiver, frames) == expected


@pytest.mark.parametrize("receiver_shape", SHAPES, ids=SHAPE_IDS)
def test_wrong_checksums_fail(receiver_shape: tuple[str, int]) -> None:
    pairs = {f"key{i}": f"value{i}" for i in range(20)}
    frames = all_frames(filled(("sharded", 3), pairs), 4)
    end = shard_end_index(frames, 1)
    frames[end][2] = checksum_to_bytes(12345)
    assert feed_until_error(SnapshotReceiver(make_store(*receiver_shape)), frames) == end

    frames = all_frames(filled(("sharded", 3), pairs), 4)
    frames[-1][1] = checksum_to_bytes(12345)
    receiver = SnapshotReceiver(make_store(*receiver_shape))
    assert feed_until_error(receiver, frames) == len(frames) - 1


# -- malformed frames ----------------------------------------------------------------------
def begun(shards: int = 4) -> SnapshotReceiver:
    receiver = SnapshotReceiver(ShardedStore(shards))
    receiver.feed(typed([FrameType.SNAPSHOT_BEGIN, shards, 1]))
    return receiver


@pytest.mark.parametrize("shard", [4, 5, MAX_SHARDS - 1])
def test_shard_number_out_of_range(shard: Any) -> None:
    receiver = begun(4)
    with pytest.raises(TransferError, match="shard number"):
        receiver.feed(typed([FrameType.SHARD_CHUNK, shard, ["k", "v"]]))
    with pytest.raises(TransferError, match="shard number"):
        receiver.feed(typed([FrameType.SHARD_END, shard, checksum_to_bytes(0), 0]))
    assert len(receiver.store) == 0


@pytest.mark.parametrize("shard", [-1, "0", None, 1.0, b"\x00", MAX_SHARDS, 2**40])
def test_a_shard_number_that_is_no_count_is_refused_at_decode(shard: Any) -> None:
    with pytest.raises(FrameError, match="non-negative integer below"):
        typed([FrameType.SHARD_CHUNK, shard, ["k", "v"]])


@pytest.mark.parametrize("shards", [0, MAX_SHARDS + 1, 100_000_000, 2**62, 2**64 - 1])
def test_a_shard_count_past_any_store_is_refused_before_anything_is_allocated(
    shards: int,
) -> None:
    """The issue's one tiny frame that allocated 1.5 GB: refused at decode, and by the
    receiver too when a frame is built by hand."""
    with pytest.raises(FrameError, match=f"shard count must be 1 to {MAX_SHARDS}"):
        typed([FrameType.SNAPSHOT_BEGIN, shards, 0])
    receiver = SnapshotReceiver(ShardedStore(4))
    with pytest.raises(TransferError, match="shards"):
        receiver.feed(SnapshotBegin(shards, 0))
    assert receiver.sender_shards == 0


@pytest.mark.parametrize(
    "frame",
    [
        [FrameType.SHARD_CHUNK, 0, ["k", "v"]],
        [FrameType.SHARD_END, 0, checksum_to_bytes(0), 0],
        [FrameType.SNAPSHOT_END, checksum_to_bytes(0), 0, 0],
    ],
)
def test_nothing_before_begin(frame: list[Any]) -> None:
    receiver = SnapshotReceiver(ShardedStore(4))
    with pytest.raises(TransferError, match="before SNAPSHOT_BEGIN"):
        receiver.feed(typed(frame))


def test_a_second_begin_is_refused() -> None:
    receiver = begun(4)
    with pytest.raises(TransferError, match="second SNAPSHOT_BEGIN"):
        receiver.feed(typed([FrameType.SNAPSHOT_BEGIN, 4, 1]))


@pytest.mark.parametrize(
    "flat",
    [
        ["a", "1", 1, "v"],
        ["a", "1", "k", 2],
        ["a", "1", b"k", "v"],
        ["a", "1", "k", None],
        ["a", "1", ["k"], "v"],
        ["a", "1", "k"],
        "a1",
        None,
    ],
)
def test_malformed_chunk_loads_nothing(flat: Any) -> None:
    receiver = begun(1)
    with pytest.raises(FrameError):
        receiver.feed(typed([FrameType.SHARD_CHUNK, 0, flat]))
    assert len(receiver.store) == 0
    assert receiver.received == 0


@pytest.mark.parametrize(
    "frame",
    [
        [FrameType.SNAPSHOT_BEGIN, "4", 0],
        [FrameType.SNAPSHOT_BEGIN, 4, None],
        [FrameType.SNAPSHOT_BEGIN, 4],
        [FrameType.SHARD_CHUNK, 0],
        [FrameType.SHARD_CHUNK, 0, [], "extra"],
        [FrameType.SHARD_END, 0, bytes(15), 0],
        [FrameType.SHARD_END, 0, "0" * 16, 0],
        [FrameType.SHARD_END, 0, checksum_to_bytes(0)],
        [FrameType.SNAPSHOT_END, bytes(17), 0, 0],
        [FrameType.SNAPSHOT_END, checksum_to_bytes(0), 0],
    ],
)
def test_malformed_transfer_frames_are_refused_at_decode(frame: list[Any]) -> None:
    with pytest.raises(FrameError):
        typed(frame)


@pytest.mark.parametrize(
    "frame",
    [
        [FrameType.HEARTBEAT, 1],
        [FrameType.BATCH, 1, [], 0, [], 0],
    ],
)
def test_frames_that_are_no_transfer_raise_transfer_error(frame: list[Any]) -> None:
    receiver = SnapshotReceiver(ShardedStore(1))
    if frame[0] is not FrameType.SNAPSHOT_BEGIN:
        receiver = begun(1)
    with pytest.raises(TransferError):
        receiver.feed(typed(frame))
    assert len(receiver.store) == 0


# -- the sender's pacing -------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(
    pairs=contents,
    shape=shapes,
    chunk_size=st.integers(1, 8),
    limits=st.lists(st.integers(1, 12), min_size=1, max_size=5),
)
def test_next_frames_respects_limit_and_done(
    pairs: dict[str, str], shape: tuple[str, int], chunk_size: int, limits: list[int]
) -> None:
    store = filled(shape, pairs)
    expected = 3 + store.shard_count  # begin, shard ends, one idempotency chunk, end
    expected += sum(math.ceil(store.shard_len(i) / chunk_size) for i in range(store.shard_count))
    sender = SnapshotSender(store, chunk_size, 0)
    assert sender.next_frames(0) == []
    assert not sender.done
    sent: list[Frame] = []
    calls = 0
    while not sender.done:
        limit = limits[calls % len(limits)]
        calls += 1
        frames = sender.next_frames(limit)
        sent.extend(frames)
        if sender.done:
            assert 0 < len(frames) <= limit
            assert frames[-1].kind is FrameType.SNAPSHOT_END
        else:
            assert len(frames) == limit
            assert all(frame.kind is not FrameType.SNAPSHOT_END for frame in frames)
    assert len(sent) == expected
    assert [frame.kind for frame in sent].count(FrameType.SNAPSHOT_END) == 1
    assert sent[0].kind is FrameType.SNAPSHOT_BEGIN
    assert sender.next_frames(5) == []
    assert sender.done


@pytest.mark.parametrize("limit", [1, 2, 4, 8])
def test_done_right_after_last_frame_when_limit_divides(limit: int) -> None:
    """Five frames (begin, two shard ends, the idempotency table, end): the last call
    must report done."""
    sender = SnapshotSender(ShardedStore(2), 10, 0)
    calls = 0
    while not sender.done:
        frames = sender.next_frames(limit)
        calls += 1
        assert frames
    assert calls == math.ceil(5 / limit)


@pytest.mark.parametrize("receiver_shape", [("sharded", 16), ("sharded", 4), ("hash", 1)])
def test_a_key_in_the_wrong_shard_is_refused(receiver_shape: tuple[str, int]) -> None:
    pairs = {f"key{i}": f"value{i}" for i in range(40)}
    frames = transfer_frames(pairs, 16, moved="key7")
    receiver = SnapshotReceiver(make_store(*receiver_shape))
    index = feed_until_error(receiver, frames)
    assert frames[index][0] is FrameType.SHARD_CHUNK
    assert frames[index][1] == (shard_of("key7", 16) + 1) % 16
    # The same transfer with the key at home is accepted: the lie alone was refused.
    honest = SnapshotReceiver(make_store(*receiver_shape))
    results = [honest.feed(typed(f)) for f in all_frames(filled(("sharded", 16), pairs), 8)]
    assert results[-1] is not None and dict(honest.store.items()) == pairs


@given(nonempty, st.data())
def test_any_misplaced_key_is_refused(pairs: dict[str, str], data: st.DataObject) -> None:
    moved = data.draw(st.sampled_from(sorted(pairs)))
    shards = data.draw(st.sampled_from([2, 3, 16]))
    receiver = SnapshotReceiver(make_store(*data.draw(shapes)))
    feed_until_error(receiver, transfer_frames(pairs, shards, moved=moved))
