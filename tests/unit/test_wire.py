"""Replication frames: typed frames, encoding, incremental decoding, corruption and
malformed-frame detection (everything a handler may assume is checked at decode)."""

from __future__ import annotations

import copy
import pickle
import struct
from dataclasses import fields, replace
from typing import Any

import msgpack
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from pbkv import wire
from pbkv.wire import (
    CONTROL_LIMIT,
    FRAME_CLASSES,
    FRAMES,
    HEADER_SIZE,
    MAX_FRAME,
    MAX_UNDO_POINTS,
    Ack,
    Batch,
    Fence,
    Frame,
    FrameCodec,
    FrameError,
    FrameLimit,
    FrameType,
    Heartbeat,
    Hello,
    IdempotencyChunk,
    ShardEnd,
    checksum_to_bytes,
    encode,
    frame_from_wire,
    frame_limits,
)
from tests.support.strategies import frames


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


def feed_pieces(pieces: list[bytes]) -> list[Frame]:
    decoder = FrameCodec()
    out: list[Frame] = []
    for piece in pieces:
        out.extend(decoder.feed(piece))
    assert decoder.feed(b"") == []  # nothing left over
    return out


def raw_frame(payload: bytes, length: int | None = None, epoch: int = 0) -> bytes:
    """A frame with a correct hash around any payload."""
    size = len(payload) if length is None else length
    return struct.pack(">IQQ", size, epoch, xxhash.xxh3_64_intdigest(payload, epoch)) + payload


def header(length: int) -> bytes:
    """A plain frame's header alone: length, epoch and a hash that is never checked."""
    return struct.pack(">IQQ", length, 0, 0)


def decode_one(items: list[Any]) -> Frame:
    (frame,) = FrameCodec().feed(encode(items))
    return frame


# -- round trips ---------------------------------------------------------------------------
def test_every_frame_type_has_its_class_and_a_kind_for_each_field() -> None:
    assert set(FRAMES) == set(FrameType)
    assert len({cls for cls, _ in FRAMES.values()}) == len(FrameType)
    for kind, (cls, kinds) in FRAMES.items():
        names = [f.name for f in fields(cls)]
        assert names[0] == "epoch" and len(kinds) == len(names) - 1, cls
        assert FRAME_CLASSES[kind] is cls


@settings(max_examples=100, deadline=None)
@given(frame=frames)
def test_a_frame_copies_and_pickles_whole(frame: Frame) -> None:
    """Copies go through ``__reduce__`` (compiled, ``__new__`` alone calls ``__init__``)."""
    for twin in (copy.copy(frame), copy.deepcopy(frame), pickle.loads(pickle.dumps(frame))):
        assert twin == frame and type(twin) is type(frame) and twin.epoch == frame.epoch


@settings(max_examples=150, deadline=None)
@given(frame=frames)
def test_round_trip_all_at_once(frame: Frame) -> None:
    data = encode(frame)
    assert len(data) > HEADER_SIZE
    assert feed_pieces([data]) == [frame]


@settings(max_examples=40, deadline=None)
@given(frame=frames)
def test_round_trip_byte_by_byte(frame: Frame) -> None:
    data = encode(frame)
    assert feed_pieces([data[i : i + 1] for i in range(len(data))]) == [frame]


@settings(max_examples=60, deadline=None)
@given(sent=st.lists(frames, min_size=1, max_size=8), data=st.data())
def test_several_frames_random_chunking(sent: list[Frame], data: st.DataObject) -> None:
    stream = b"".join(encode(frame) for frame in sent)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10), label="cuts")
    assert feed_pieces(split_at(stream, cuts)) == sent


def test_a_checksum_travels_as_16_big_endian_bytes() -> None:
    frame = ShardEnd(3, 2**127 + 5, 10)
    assert frame.to_wire() == [FrameType.SHARD_END, 3, checksum_to_bytes(2**127 + 5), 10]
    assert checksum_to_bytes(1) == bytes(15) + b"\x01"
    assert decode_one(frame.to_wire()) == frame


# -- the epoch: in every frame's header ----------------------------------------------------
@pytest.mark.parametrize("frame", [Batch(3, ["k", "v"]), Ack(1, 0, 0), Heartbeat(2), Fence("why")])
@pytest.mark.parametrize("keyed", [False, True])
def test_every_frame_carries_its_epoch_in_the_header(frame: Frame, keyed: bool) -> None:
    sender, receiver = FrameCodec(), FrameCodec()
    if keyed:
        sender.secure(b"s" * 32, b"r" * 32)
        receiver.secure(b"r" * 32, b"s" * 32)
    stamped = replace(frame, epoch=2**64 - 1)
    data = sender.encode(stamped)
    assert data[4:12] == (2**64 - 1).to_bytes(8, "big")
    assert [decoded.epoch for decoded in receiver.feed(data)] == [2**64 - 1]
    assert receiver.feed(sender.encode(frame)) == [frame]  # epoch 0 by default
    assert frame.to_wire() == stamped.to_wire()  # not among the fields


def test_frames_of_different_epochs_differ() -> None:
    assert Batch(1, ["k", "v"]) != Batch(1, ["k", "v"], epoch=1)
    assert Ack(1, 0, 0).epoch == 0 and Ack(1, 0, 0, epoch=5).epoch == 5


def test_a_raw_list_travels_under_the_epoch_it_is_given() -> None:
    (frame,) = FrameCodec().feed(encode([FrameType.ACK, 4, checksum_to_bytes(0), 0], epoch=7))
    assert frame == Ack(4, 0, 0, epoch=7)


@pytest.mark.parametrize("keyed", [False, True])
def test_an_altered_epoch_fails_like_a_corrupted_byte(keyed: bool) -> None:
    sender, receiver = FrameCodec(), FrameCodec()
    if keyed:
        sender.secure(b"s" * 32, b"r" * 32)
        receiver.secure(b"r" * 32, b"s" * 32)
    data = bytearray(sender.encode(Batch(1, ["k", "v"], epoch=4)))
    data[11] = 7  # the epoch's last byte: 4 -> 7
    with pytest.raises(FrameError, match="hash mismatch" if not keyed else "authentication"):
        receiver.feed(bytes(data))


def test_a_hello_carries_the_epoch_of_its_copy_beside_its_own() -> None:
    hello = Hello("backup", True, 5, 1, 2, 3, (), 4, "10.0.0.2:8080#ab12", epoch=9)
    assert hello.to_wire()[-3:] == [4, "10.0.0.2:8080#ab12", False]
    assert decode_one(hello.to_wire()) == replace(hello, epoch=0)
    (decoded,) = FrameCodec().feed(encode(hello))
    assert (decoded.epoch, decoded.copy_epoch) == (9, 4)


def test_a_hello_says_whether_its_copy_was_recovered_from_disk() -> None:
    hello = Hello("backup", False, 5, 1, 2, 3, recovered=True)
    assert hello.to_wire()[-1] is True
    assert decode_one(hello.to_wire()) == hello


def test_a_batch_keeps_deletes_and_empty_values() -> None:
    frame = decode_one([FrameType.BATCH, 4, ["a", None, "b", "", "", "x"], 0, [], 0])
    assert frame == Batch(4, ["a", None, "b", "", "", "x"])


def test_a_batch_says_how_many_of_its_first_pairs_are_written_where_absent() -> None:
    frame = Batch(4, ["a", "1", "b", "2", "c", None], absent=2)
    assert decode_one(frame.to_wire()) == frame and frame.absent_fault() is None
    assert Batch(4, ["a", "1"], absent=2).absent_fault() == (
        "batch 4: 2 pairs written where absent, of 1"
    )
    assert Batch(4, ["a", "1", "c", None], absent=2).absent_fault() == (
        "batch 4: a pair written where absent deletes"
    )


# -- malformed frames are refused before any handler runs -----------------------------------
@pytest.mark.parametrize(
    ("items", "why"),
    [
        ([FrameType.ACK], "has 0 fields, expected 3"),
        ([FrameType.ACK, 1], "has 1 fields, expected 3"),
        ([FrameType.ACK, 1, bytes(16), 0, 2], "has 4 fields"),
        ([FrameType.ACK, "1", bytes(16), 0], "non-negative integer"),
        ([FrameType.ACK, -1, bytes(16), 0], "non-negative integer"),
        ([FrameType.ACK, True, bytes(16), 0], "non-negative integer"),
        ([FrameType.ACK, 1, bytes(15), 0], "16-byte checksum"),
        ([FrameType.ACK, 1, 0, 0], "16-byte checksum"),
        ([FrameType.ACK, 1, bytes(16), -1], "non-negative integer"),
        ([FrameType.HEARTBEAT, 1.5], "non-negative integer"),
        ([FrameType.HELLO, "backup", 1, bytes(16), 0, 0, 0, [], 0, "", False], "true or false"),
        (
            [FrameType.HELLO, "backup", True, bytes(15), 0, 0, 0, [], 0, "", False],
            "16-byte checksum",
        ),
        (
            [FrameType.HELLO, b"backup", True, bytes(16), 0, 0, 0, [], 0, "", False],
            "must be a string",
        ),
        (
            [FrameType.HELLO, "backup", True, bytes(16), 0, 0, 0, [], 0, "", False, 9],
            "has 11 fields",
        ),
        ([FrameType.HELLO, "backup", True, bytes(16), 0, 0, 0, [], 0], "has 8 fields, expected 10"),
        ([FrameType.HELLO, "backup", True, bytes(16), 0, 0, 0, [], 0, 7, False], "at most 320"),
        (
            [FrameType.HELLO, "backup", True, bytes(16), 0, 0, 0, [], 0, "m" * 321, False],
            "at most 320",
        ),
        (
            [FrameType.HELLO, "backup", True, bytes(16), 0, 0, 0, [], -1, "", False],
            "integer, not -1",
        ),
        ([FrameType.HELLO, "backup", True, bytes(16), 0, 0, 0, [], 1.5, "", False], "not a float"),
        ([FrameType.HELLO, "backup", True, bytes(16), 0, 0, 0, [], "7", "", False], "not a str"),
        ([FrameType.HELLO, "backup", True, bytes(16), 0, 0, 0, [], False, "", False], "not a bool"),
        (
            [FrameType.HELLO, "backup", True, bytes(16), 0, 0, -1, [], 0, "", False],
            "64-bit history",
        ),
        (
            [FrameType.HELLO, "backup", True, bytes(16), 0, 0, 0, [[1, bytes(16)]], 0, "", False],
            "a point",
        ),
        (
            [FrameType.HELLO, "backup", True, bytes(16), 0, 0, 0, [[1, bytes(8), 2]], 0, "", False],
            "16-byte",
        ),
        (
            [
                FrameType.HELLO,
                "backup",
                True,
                bytes(16),
                0,
                0,
                0,
                [[0, bytes(16), 0]] * 65,
                0,
                "",
                False,
            ],
            "at most",
        ),
        ([FrameType.ROLLBACK, 1, bytes(16)], "has 2 fields"),
        ([FrameType.SYNC_ACK, "0" * 16], "16-byte checksum"),
        ([FrameType.SYNC_NACK, None], "must be a string"),
        ([FrameType.FETCH, 1], "has 1 fields, expected 0"),
        ([FrameType.BATCH, 1, ["k"], 0, [], 0], "flat list"),
        ([FrameType.BATCH, 1, ["k", "v", 7, "v"], 0, [], 0], "keys must be strings"),
        ([FrameType.BATCH, 1, ["k", "v", None, "v"], 0, [], 0], "keys must be strings"),
        ([FrameType.BATCH, 1, ["k", 7], 0, [], 0], "values must be strings or null"),
        ([FrameType.BATCH, 1, ["k", b"v"], 0, [], 0], "values must be strings or null"),
        ([FrameType.BATCH, 1, [], 0, ["i", 1, True], 0], "4-item idempotency entries"),
        ([FrameType.BATCH, 1, [], 0, ["i", 1, True, None, "", 1, True, None], 0], "1 to 255"),
        ([FrameType.BATCH, 1, [], 0, ["i" * 256, 1, True, None], 0], "1 to 255"),
        ([FrameType.BATCH, 1, [], 0, ["i", 1, True, None, b"j", 1, True, None], 0], "1 to 255"),
        ([FrameType.BATCH, 1, [], 0, ["i", -1, True, None], 0], "64-bit non-negative"),
        ([FrameType.BATCH, 1, [], 0, ["i", 1, True, None, "j", True, True, None], 0], "64-bit"),
        ([FrameType.BATCH, 1, [], 0, ["i", 1.0, True, None], 0], "64-bit non-negative"),
        ([FrameType.BATCH, 1, [], 0, ["i", 1, 1, None], 0], "a flag and a string or null"),
        ([FrameType.BATCH, 1, [], 0, ["i", 1, True, "v", "j", 1, True, 7], 0], "a flag and a"),
        ([FrameType.BATCH, 1, [], 0, ["i", 1, True, b"v"], 0], "a flag and a string or null"),
        ([FrameType.BATCH, 1, ["k", "v"], 0, [], -1], "field 5: must be a non-negative"),
        ([FrameType.BATCH, 1, ["k", "v"], 0, []], "has 4 fields, expected 5"),
        ([FrameType.IDEMPOTENCY_CHUNK, 0, ["i", 1, True, None]], "5-item idempotency entries"),
        ([FrameType.IDEMPOTENCY_CHUNK, 0, ["i", 1, True, None, -1]], "time must be a non-neg"),
        (
            [FrameType.IDEMPOTENCY_CHUNK, 0, ["i", 1, True, None, 0, "j", 1, True, None, False]],
            "time must",
        ),
        ([FrameType.SHARD_CHUNK, 0, ["k", None]], "must be strings"),
        ([FrameType.SHARD_CHUNK, 0, ["k"]], "flat list"),
        ([FrameType.SHARD_CHUNK, -1, []], "non-negative integer"),
    ],
)
def test_a_malformed_frame_is_refused_at_decode(items: list[Any], why: str) -> None:
    with pytest.raises(FrameError, match=why) as info:
        FrameCodec().feed(encode(items))
    assert FrameType(items[0]).name in str(info.value)


@pytest.mark.parametrize(
    ("items", "field"),
    [
        ([FrameType.ACK, -1, bytes(16), 0], "ACK field 1"),
        ([FrameType.ACK, 1, bytes(17), 0], "ACK field 2"),
        ([FrameType.ACK, 1, bytes(16), None], "ACK field 3"),
        ([FrameType.BATCH, "1", [], 0, [], 0], "BATCH field 1"),
        ([FrameType.BATCH, 1, ["k"], 0, [], 0], "BATCH field 2"),
        ([FrameType.BATCH, 1, [], None, [], 0], "BATCH field 3"),
        ([FrameType.BATCH, 1, [], 0, ["i", 1, True], 0], "BATCH field 4"),
    ],
)
def test_a_batch_or_an_ack_refused_names_its_field(items: list[Any], field: str) -> None:
    """The fields are checked in one pass; a bad one is still refused naming its field."""
    with pytest.raises(FrameError, match=f"^{field}: "):
        frame_from_wire(items)


def test_a_batch_with_one_bad_operation_is_refused_whole() -> None:
    ops: list[Any] = [f"key{i}" for i in range(100) for _ in (0, 1)]
    ops[150] = 12345  # a key in the middle of the batch
    with pytest.raises(FrameError, match="keys must be strings"):
        frame_from_wire([FrameType.BATCH, 1, ops, 0, [], 0])


@pytest.mark.parametrize("kind", [0, 21, 99, -1, 2**40])
def test_unknown_frame_type(kind: int) -> None:
    with pytest.raises(FrameError, match="unknown frame type"):
        FrameCodec().feed(encode([kind, "x"]))


@pytest.mark.parametrize(
    "payload",
    [
        msgpack.packb(5),
        msgpack.packb([]),
        msgpack.packb(["HELLO"]),
        msgpack.packb({"type": 1}),
        msgpack.packb([None, 1]),
        msgpack.packb([True, 1]),
        msgpack.packb([2, 1, {"k": "v"}]),  # no maps, ever
        b"\xc1",  # never used in msgpack
        b"",
        msgpack.packb([4, 1]) + msgpack.packb([4, 2]),  # two objects in one frame
        msgpack.packb([4, 1])[:-1],  # truncated inside the payload
    ],
)
def test_malformed_payload_with_valid_hash(payload: bytes) -> None:
    with pytest.raises(FrameError):
        FrameCodec().feed(raw_frame(payload))


# -- corruption ----------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(frame=frames, data=st.data())
def test_flipped_payload_byte_is_detected(frame: Frame, data: st.DataObject) -> None:
    raw = bytearray(encode(frame))
    index = data.draw(st.integers(HEADER_SIZE, len(raw) - 1), label="index")
    raw[index] ^= data.draw(st.integers(1, 255), label="mask")
    with pytest.raises(FrameError):
        feed_pieces([bytes(raw)])


@settings(max_examples=50, deadline=None)
@given(frame=frames, data=st.data())
def test_flipped_hash_byte_is_detected(frame: Frame, data: st.DataObject) -> None:
    raw = bytearray(encode(frame))
    index = data.draw(st.integers(4, HEADER_SIZE - 1), label="index")
    raw[index] ^= data.draw(st.integers(1, 255), label="mask")
    with pytest.raises(FrameError, match="hash"):
        FrameCodec().feed(bytes(raw))


def test_corrupted_frame_after_good_ones_is_detected() -> None:
    good = encode(Heartbeat(1))
    bad = bytearray(encode(Heartbeat(2)))
    bad[-1] ^= 0x01
    decoder = FrameCodec()
    assert decoder.feed(good) == [Heartbeat(1)]
    with pytest.raises(FrameError):
        decoder.feed(bytes(bad))


def test_length_over_max_frame() -> None:
    with pytest.raises(FrameError, match="exceeds"):
        FrameCodec().feed(header(MAX_FRAME + 1))  # rejected before any payload arrives
    with pytest.raises(FrameError):
        FrameCodec().feed(header(2**32 - 1))
    # At the limit it waits for the payload instead.
    assert FrameCodec().feed(header(MAX_FRAME)) == []


def test_incomplete_frame_waits() -> None:
    data = encode(Ack(7, 0, 0))
    decoder = FrameCodec()
    assert decoder.feed(data[: HEADER_SIZE - 1]) == []
    assert decoder.feed(data[HEADER_SIZE - 1 : -1]) == []
    assert decoder.feed(data[-1:] + data[:3]) == [Ack(7, 0, 0)]
    assert decoder.feed(data[3:]) == [Ack(7, 0, 0)]


def test_a_bad_frame_hands_back_the_good_frames_before_it():
    good = [encode(Heartbeat(n)) for n in range(3)]
    bad = bytearray(encode(Ack(7, 0, 0)))
    bad[-1] ^= 0x01
    with pytest.raises(FrameError) as info:
        FrameCodec().feed(b"".join(good) + bytes(bad))
    assert info.value.frames == [Heartbeat(n) for n in range(3)]


def test_a_malformed_frame_hands_back_the_good_frames_before_it():
    stream = encode(Heartbeat(1)) + encode([FrameType.BATCH, 1, ["k", 7], 0, [], 0])
    with pytest.raises(FrameError) as info:
        FrameCodec().feed(stream)
    assert info.value.frames == [Heartbeat(1)]


# -- limits: a frame is bounded before and while it is decoded --------------------------------
def test_a_frame_longer_than_the_limit_is_refused_before_its_payload_arrives() -> None:
    codec = FrameCodec()
    codec.receive(header(CONTROL_LIMIT.max_bytes + 1))
    with pytest.raises(FrameError, match="exceeds"):
        codec.next_frame(CONTROL_LIMIT)
    with pytest.raises(FrameError, match="already failed"):
        codec.next_frame(CONTROL_LIMIT)


def test_strings_and_arrays_are_bounded_while_decoding() -> None:
    limit = FrameLimit(max_bytes=1 << 20, max_items=10, max_text=100)
    with pytest.raises(FrameError, match="max_str_len"):
        FrameCodec().feed(encode(Batch(1, ["k", "v" * 101])), limit)
    with pytest.raises(FrameError, match="max_array_len"):
        FrameCodec().feed(encode(Batch(1, ["k", "v"] * 6)), limit)
    assert FrameCodec().feed(encode(Batch(1, ["k", "v" * 100] * 5)), limit)


def test_tiny_strings_cannot_blow_up_in_memory() -> None:
    """A frame of many empty strings is refused by its item count, whatever its size."""
    limits = frame_limits(
        64, 1024, batch_writes=100, batch_chars=10_000, chunk_pairs=8, chunk_chars=10_000
    )
    ops = [""] * 10_000
    with pytest.raises(FrameError, match="max_array_len"):
        FrameCodec().feed(encode(Batch(1, ops)), limits[FrameType.BATCH])


def test_control_frames_are_small_and_bulk_frames_fit_what_a_sender_builds() -> None:
    max_key, max_value, writes, chars = 64, 1000, 50, 5000
    limits = frame_limits(max_key, max_value, writes, chars, chunk_pairs=20, chunk_chars=chars)
    for kind, limit in limits.items():
        bulk = (FrameType.BATCH, FrameType.SHARD_CHUNK, FrameType.IDEMPOTENCY_CHUNK)
        if kind not in (*bulk, FrameType.HELLO):
            assert limit == CONTROL_LIMIT
    # A HELLO with every undo point the backup may offer fits its limit.
    points = tuple((2**63, 2**128 - 1, 2**63) for _ in range(MAX_UNDO_POINTS))
    hello = Hello("backup", True, 2**128 - 1, 2**63, 2**63, 2**64 - 1, points)
    assert FrameCodec().feed(encode(hello), limits[FrameType.HELLO]) == [hello]
    assert CONTROL_LIMIT.max_bytes <= 64 * 1024
    # The worst a sender with the same settings builds: as many 4-byte characters as
    # allowed, one write past the character bound.
    key, value = "\U0001f600" * (max_key // 4), "\U0001f600" * (max_value // 4)
    ops: list[str | None] = []
    used = 0
    while len(ops) < 2 * writes and used < chars:
        ops += [key, value]
        used += len(key) + len(value)
    frame = encode(Batch(2**63, ops))
    assert len(frame) - HEADER_SIZE <= limits[FrameType.BATCH].max_bytes
    assert FrameCodec().feed(frame, limits[FrameType.BATCH]) == [Batch(2**63, ops)]
    # Every write keyed, each a delete whose remembered reply holds a whole value.
    ident = "i" * 255
    deletes: list[str | None] = []
    keyed: list[object] = []
    used = 0
    while len(deletes) < 2 * writes and used < chars:
        deletes += [key, None]
        keyed += [ident, 2**64 - 1, True, value]
        used += len(key) + len(ident) + len(value)
    frame = encode(Batch(2**63, deletes, 2**63, keyed))
    assert len(frame) - HEADER_SIZE <= limits[FrameType.BATCH].max_bytes
    decoded = FrameCodec().feed(frame, limits[FrameType.BATCH])
    assert decoded == [Batch(2**63, deletes, 2**63, keyed)]
    # A transfer's idempotency chunk of as many such entries as a chunk takes.
    entries: list[object] = []
    used = count = 0
    while count < 20 and used < chars:
        entries += [ident[:250] + str(count), 2**64 - 1, False, value, 2**63]
        used += len(ident) + len(value)
        count += 1
    frame = encode(IdempotencyChunk(2**63, entries))
    limit = limits[FrameType.IDEMPOTENCY_CHUNK]
    assert len(frame) - HEADER_SIZE <= limit.max_bytes
    assert FrameCodec().feed(frame, limit) == [IdempotencyChunk(2**63, entries)]


# Entry items near each check's edges: keys of 0, 1 and MAX_KEY_CHARS (+1) characters,
# 64-bit bounds, bools that are ints, and values of every kind.
_EDGE_ITEMS = st.one_of(
    st.sampled_from(["", "k", "k" * wire.MAX_KEY_CHARS, "k" * (wire.MAX_KEY_CHARS + 1)]),
    st.sampled_from([0, 1, -1, (1 << 64) - 1, 1 << 64, True, False, None, 1.0, b"k"]),
    st.text(max_size=3),
)


@settings(max_examples=500)
@given(items=st.sampled_from([4, 5]), entries=st.lists(st.tuples(*[_EDGE_ITEMS] * 5), max_size=4))
def test_the_entries_check_finds_exactly_the_entries_at_fault(
    items: int, entries: list[tuple[Any, ...]]
) -> None:
    # Mostly valid entries, with a wrong item here and there.
    raw: list[Any] = []
    for n, entry in enumerate(entries):
        valid = [f"key{n}", n, n % 2 == 0, None if n % 3 else f"v{n}", n][:items]
        raw += [item if (n + i) % 3 == 0 else valid[i] for i, item in enumerate(entry[:items])]
    assert (wire._first_fault(raw, items) is None) == all(
        _valid_entry(raw[i : i + items]) for i in range(0, len(raw), items)
    )


def _valid_entry(entry: list[Any]) -> bool:
    """An entry as the wire format allows it, spelled out on its own."""
    key, print_, ok, value = entry[:4]
    return (
        isinstance(key, str)
        and 1 <= len(key) <= wire.MAX_KEY_CHARS
        and isinstance(print_, int)
        and not isinstance(print_, bool)
        and 0 <= print_ <= 2**64 - 1
        and isinstance(ok, bool)
        and (value is None or isinstance(value, str))
        and (len(entry) == 4 or (type(entry[4]) is int and entry[4] >= 0))
    )
