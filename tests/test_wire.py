"""Replication frames: encoding, incremental decoding and corruption detection."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from pbkv.wire import (
    HEADER_SIZE,
    MAX_FRAME,
    FrameDecoder,
    FrameError,
    FrameType,
    checksum_from_bytes,
    checksum_to_bytes,
    encode,
)

scalars = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**64 - 1),
    st.text(max_size=20),
    st.binary(max_size=20),
)
items = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=12)
frames = st.builds(
    lambda kind, rest: [kind, *rest],
    st.sampled_from(FrameType),
    st.lists(items, max_size=6),
)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


def feed_pieces(pieces: list[bytes]) -> list[list[Any]]:
    decoder = FrameDecoder()
    out: list[list[Any]] = []
    for piece in pieces:
        out.extend(decoder.feed(piece))
    assert decoder.feed(b"") == []  # nothing left over
    return out


def raw_frame(payload: bytes, length: int | None = None) -> bytes:
    """A frame with a correct hash around any payload."""
    size = len(payload) if length is None else length
    return struct.pack(">IQ", size, xxhash.xxh3_64_intdigest(payload)) + payload


def assert_same_frames(decoded: list[list[Any]], sent: list[list[Any]]) -> None:
    assert decoded == sent
    for frame in decoded:
        assert type(frame[0]) is FrameType


# -- round trips ---------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(frame=frames)
def test_round_trip_all_at_once(frame: list[Any]) -> None:
    data = encode(frame)
    assert len(data) > HEADER_SIZE
    assert_same_frames(feed_pieces([data]), [frame])


@settings(max_examples=40, deadline=None)
@given(frame=frames)
def test_round_trip_byte_by_byte(frame: list[Any]) -> None:
    data = encode(frame)
    decoder = FrameDecoder()
    for index in range(len(data) - 1):
        assert decoder.feed(data[index : index + 1]) == []
    assert_same_frames(decoder.feed(data[-1:]), [frame])


@settings(max_examples=60, deadline=None)
@given(sent=st.lists(frames, min_size=1, max_size=6), data=st.data())
def test_several_frames_random_chunking(sent: list[list[Any]], data: st.DataObject) -> None:
    stream = b"".join(encode(frame) for frame in sent)
    assert_same_frames(feed_pieces([stream]), sent)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts")
    assert_same_frames(feed_pieces(split_at(stream, cuts)), sent)


def test_tuples_and_types_survive() -> None:
    checksum = checksum_to_bytes(2**127 + 5)
    sent = (FrameType.SHARD_END, 3, checksum, 10)
    [frame] = FrameDecoder().feed(encode(sent))
    assert frame == [FrameType.SHARD_END, 3, checksum, 10]
    assert isinstance(frame[2], bytes)
    assert checksum_from_bytes(frame[2]) == 2**127 + 5


def test_text_and_bytes_stay_distinct() -> None:
    [frame] = FrameDecoder().feed(encode([FrameType.BATCH, "abc", b"abc", None, [""]]))
    assert frame == [FrameType.BATCH, "abc", b"abc", None, [""]]
    assert type(frame[1]) is str
    assert type(frame[2]) is bytes


# -- corruption ----------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(frame=frames, data=st.data())
def test_flipped_payload_byte_is_detected(frame: list[Any], data: st.DataObject) -> None:
    raw = bytearray(encode(frame))
    index = data.draw(st.integers(HEADER_SIZE, len(raw) - 1), label="index")
    raw[index] ^= data.draw(st.integers(1, 255), label="mask")
    with pytest.raises(FrameError):
        feed_pieces([bytes(raw)])


@settings(max_examples=50, deadline=None)
@given(frame=frames, data=st.data())
def test_flipped_hash_byte_is_detected(frame: list[Any], data: st.DataObject) -> None:
    raw = bytearray(encode(frame))
    index = data.draw(st.integers(4, HEADER_SIZE - 1), label="index")
    raw[index] ^= data.draw(st.integers(1, 255), label="mask")
    with pytest.raises(FrameError, match="hash"):
        FrameDecoder().feed(bytes(raw))


def test_corrupted_frame_after_good_ones_is_detected() -> None:
    good = encode([FrameType.HEARTBEAT, 1])
    bad = bytearray(encode([FrameType.HEARTBEAT, 2]))
    bad[-1] ^= 0x01
    decoder = FrameDecoder()
    assert decoder.feed(good) == [[FrameType.HEARTBEAT, 1]]
    with pytest.raises(FrameError):
        decoder.feed(bytes(bad))


def test_length_over_max_frame() -> None:
    header = struct.pack(">IQ", MAX_FRAME + 1, 0)
    with pytest.raises(FrameError, match="exceeds"):
        FrameDecoder().feed(header)  # rejected before any payload arrives
    with pytest.raises(FrameError):
        FrameDecoder().feed(struct.pack(">IQ", 2**32 - 1, 0))
    # At the limit it waits for the payload instead.
    assert FrameDecoder().feed(struct.pack(">IQ", MAX_FRAME, 0)) == []


@pytest.mark.parametrize("kind", [0, 14, 99, -1, 2**40])
def test_unknown_frame_type(kind: int) -> None:
    with pytest.raises(FrameError, match="unknown frame type"):
        FrameDecoder().feed(encode([kind, "x"]))


@pytest.mark.parametrize(
    "payload",
    [
        msgpack.packb(5),
        msgpack.packb([]),
        msgpack.packb(["HELLO"]),
        msgpack.packb({"type": 1}),
        msgpack.packb([None, 1]),
        b"\xc1",  # never used in msgpack
        b"",
        msgpack.packb([4, 1]) + msgpack.packb([4, 2]),  # two objects in one frame
        msgpack.packb([4, 1])[:-1],  # truncated inside the payload
    ],
)
def test_malformed_payload_with_valid_hash(payload: bytes) -> None:
    with pytest.raises(FrameError):
        FrameDecoder().feed(raw_frame(payload))


def test_incomplete_frame_waits() -> None:
    data = encode([FrameType.ACK, 7])
    decoder = FrameDecoder()
    assert decoder.feed(data[: HEADER_SIZE - 1]) == []
    assert decoder.feed(data[HEADER_SIZE - 1 : -1]) == []
    assert decoder.feed(data[-1:] + data[:3]) == [[FrameType.ACK, 7]]
    assert decoder.feed(data[3:]) == [[FrameType.ACK, 7]]


# -- checksums -----------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, 1, 2**64, 2**128 - 1])
def test_checksum_bytes_round_trip(value: int) -> None:
    raw = checksum_to_bytes(value)
    assert isinstance(raw, bytes)
    assert len(raw) == 16
    assert checksum_from_bytes(raw) == value


def test_checksum_bytes_are_big_endian() -> None:
    assert checksum_to_bytes(0) == bytes(16)
    assert checksum_to_bytes(1) == bytes(15) + b"\x01"
    assert checksum_to_bytes(2**128 - 1) == b"\xff" * 16


@settings(max_examples=100, deadline=None)
@given(value=st.integers(0, 2**128 - 1))
def test_checksum_bytes_round_trip_any(value: int) -> None:
    assert checksum_from_bytes(checksum_to_bytes(value)) == value


@pytest.mark.parametrize("raw", [b"", bytes(15), bytes(17), bytes(32), "0" * 16, None, 0, [0] * 16])
def test_checksum_from_bytes_rejects(raw: Any) -> None:
    with pytest.raises(FrameError, match="16 bytes"):
        checksum_from_bytes(raw)


def test_a_bad_frame_hands_back_the_good_frames_before_it():
    good = [encode([FrameType.HEARTBEAT, n]) for n in range(3)]
    bad = bytearray(encode([FrameType.ACK, 7]))
    bad[-1] ^= 0x01
    with pytest.raises(FrameError) as info:
        FrameDecoder().feed(b"".join(good) + bytes(bad))
    assert info.value.frames == [[FrameType.HEARTBEAT, n] for n in range(3)]
