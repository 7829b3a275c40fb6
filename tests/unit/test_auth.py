"""Channel authentication (pbkv/auth.py): proofs, keys and keyed frames, without I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pbkv import auth
from pbkv.wire import Ack, Batch, Frame, FrameCodec, FrameError, FrameType, Heartbeat, encode
from tests.support.strategies import frames as typed_frames

SECRET = "correct horse battery staple".replace(" ", "-")

frames_strategy = st.lists(typed_frames, min_size=1, max_size=8)


class End:
    """One side of a handshake, as the wiring in the cores will play it."""

    def __init__(self, role: str, secret: str) -> None:
        self.role = role
        self.secret = secret
        self.nonce = auth.new_nonce()


def handshake(
    secret_primary: str = SECRET, secret_backup: str = SECRET
) -> tuple[bytes, bytes, bytes, bool, bool]:
    """(nonce_p, nonce_b, primary's proof, backup verified, primary verified)."""
    primary, backup = End("primary", secret_primary), End("backup", secret_backup)
    backup_proof = auth.proof(backup.secret, "backup", primary.nonce, backup.nonce)
    primary_trusts = auth.verify_proof(
        primary.secret, "backup", primary.nonce, backup.nonce, backup_proof
    )
    primary_proof = auth.proof(primary.secret, "primary", primary.nonce, backup.nonce)
    backup_trusts = auth.verify_proof(
        backup.secret, "primary", primary.nonce, backup.nonce, primary_proof
    )
    return primary.nonce, backup.nonce, primary_proof, primary_trusts, backup_trusts


def secured_pair(secret: str = SECRET) -> tuple[FrameCodec, FrameCodec]:
    nonce_p, nonce_b = auth.new_nonce(), auth.new_nonce()
    keys = auth.channel_keys(secret, nonce_p, nonce_b)
    primary, backup = FrameCodec(), FrameCodec()
    primary.secure(*keys.for_role("primary"))
    backup.secure(*keys.for_role("backup"))
    return primary, backup


# -- proofs ------------------------------------------------------------------------------------
def test_nonces_are_fresh_and_full_length() -> None:
    nonces = {auth.new_nonce() for _ in range(1000)}
    assert len(nonces) == 1000
    assert {len(n) for n in nonces} == {auth.NONCE_BYTES}


def test_same_secret_both_sides_verify() -> None:
    *_, primary_trusts, backup_trusts = handshake()
    assert primary_trusts and backup_trusts


def test_different_secrets_never_verify() -> None:
    *_, primary_trusts, backup_trusts = handshake(SECRET, SECRET + "x")
    assert not primary_trusts and not backup_trusts


def test_recorded_handshake_cannot_be_replayed_against_a_new_nonce() -> None:
    """An eavesdropper replays the primary's recorded proof; the backup picked a new nonce."""
    nonce_p, _old_nonce_b, recorded_proof, *_ = handshake()
    new_nonce_b = auth.new_nonce()
    assert not auth.verify_proof(SECRET, "primary", nonce_p, new_nonce_b, recorded_proof)
    # Nor with the attacker's own nonce in place of the primary's.
    assert not auth.verify_proof(SECRET, "primary", auth.new_nonce(), new_nonce_b, recorded_proof)


def test_a_proof_cannot_be_reflected_to_its_maker() -> None:
    """The backup's own proof, sent back to it as the primary's, fails."""
    nonce_p, nonce_b = auth.new_nonce(), auth.new_nonce()
    backup_proof = auth.proof(SECRET, "backup", nonce_p, nonce_b)
    assert auth.verify_proof(SECRET, "backup", nonce_p, nonce_b, backup_proof)
    assert not auth.verify_proof(SECRET, "primary", nonce_p, nonce_b, backup_proof)
    # Swapping the nonces (the attacker echoes the backup's nonce as its own) fails too.
    assert not auth.verify_proof(SECRET, "backup", nonce_b, nonce_p, backup_proof)


@given(st.one_of(st.none(), st.integers(), st.text(), st.binary(max_size=64)))
def test_malformed_proofs_are_false_not_errors(received: object) -> None:
    nonce_p, nonce_b = auth.new_nonce(), auth.new_nonce()
    assert not auth.verify_proof(SECRET, "primary", nonce_p, nonce_b, received)


@pytest.mark.parametrize("bad", [b"", b"short", b"x" * 33, "text" * 8, None])
def test_malformed_nonces_are_refused(bad: object) -> None:
    with pytest.raises(auth.AuthError):
        auth.proof(SECRET, "primary", bad, auth.new_nonce())  # type: ignore[arg-type]
    with pytest.raises(auth.AuthError):
        auth.channel_keys(SECRET, auth.new_nonce(), bad)  # type: ignore[arg-type]
    with pytest.raises(auth.AuthError):
        auth.proof(SECRET, "witness", auth.new_nonce(), auth.new_nonce())


# -- keys --------------------------------------------------------------------------------------
def test_channel_keys_differ_per_direction_channel_and_secret() -> None:
    nonce_p, nonce_b = auth.new_nonce(), auth.new_nonce()
    keys = auth.channel_keys(SECRET, nonce_p, nonce_b)
    assert keys == auth.channel_keys(SECRET, nonce_p, nonce_b)
    assert keys.primary_to_backup != keys.backup_to_primary
    assert keys != auth.channel_keys(SECRET, nonce_p, auth.new_nonce())
    assert keys != auth.channel_keys(SECRET + "x", nonce_p, nonce_b)
    assert {len(keys.primary_to_backup), len(keys.backup_to_primary)} == {auth.KEY_BYTES}
    assert keys.for_role("primary") == keys.for_role("backup")[::-1]
    assert SECRET.encode() not in keys.primary_to_backup + keys.backup_to_primary
    assert "hidden" in repr(keys) and keys.primary_to_backup.hex() not in repr(keys)


# -- keyed frames (wire.FrameCodec after secure) --------------------------------------------
@given(frames_strategy, st.integers(1, 64))
def test_keyed_frames_round_trip_in_any_split(frames: list[Frame], piece: int) -> None:
    primary, backup = secured_pair()
    data = b"".join(primary.encode(frame) for frame in frames)
    received = []
    for start in range(0, len(data), piece):
        received += backup.feed(data[start : start + piece])
    assert received == frames


@given(frames_strategy, st.data())
def test_any_flipped_bit_is_rejected(frames: list[Frame], data: st.DataObject) -> None:
    primary, backup = secured_pair()
    encoded = [primary.encode(frame) for frame in frames]
    length_bytes = set()
    offset = 0
    for chunk in encoded:
        length_bytes.update(range(offset, offset + 4))
        offset += len(chunk)
    wire = bytearray(b"".join(encoded))
    position = data.draw(st.integers(0, len(wire) - 1))
    wire[position] ^= 1 << data.draw(st.integers(0, 7))
    try:
        got = backup.feed(bytes(wire))
        failed = False
    except FrameError as exc:
        got, failed = exc.frames, True
    # Only frames before the altered one come out, unaltered.
    assert got == frames[: len(got)] and len(got) < len(frames)
    # A flipped length may leave the decoder waiting for bytes that never come (the
    # peer timeout ends that channel); any other flipped bit fails at once.
    assert failed or position in length_bytes


def test_replayed_frame_is_rejected() -> None:
    primary, backup = secured_pair()
    batch = primary.encode(Batch(1, ["k", "v"]))
    assert backup.feed(batch) == [Batch(1, ["k", "v"])]
    with pytest.raises(FrameError, match="authentication failed"):
        backup.feed(batch)


def test_reordered_or_dropped_frames_are_rejected() -> None:
    primary, backup = secured_pair()
    first = primary.encode(Ack(1, 0, 0))
    second = primary.encode(Ack(2, 0, 0))
    with pytest.raises(FrameError):
        backup.feed(second + first)
    primary, backup = secured_pair()
    primary.encode(Ack(1, 0, 0))  # sent, lost on the way
    with pytest.raises(FrameError):
        backup.feed(primary.encode(Ack(2, 0, 0)))


def test_injected_frames_are_rejected() -> None:
    """A forged BATCH: plain (xxh3), keyed with another channel's key, or reflected back."""
    primary, backup = secured_pair()
    forged = Batch(1, ["k", "forged"])
    with pytest.raises(FrameError):
        backup.feed(encode(forged) + encode(Heartbeat(1)))  # more follows
    other_primary, _ = secured_pair()
    _, backup = secured_pair()
    with pytest.raises(FrameError):
        backup.feed(other_primary.encode(forged))
    # A frame the backup itself sent, reflected to it, fails: each direction has its key.
    primary, backup = secured_pair()
    with pytest.raises(FrameError):
        backup.feed(backup.encode(Ack(1, 0, 0)))


def test_good_frames_before_a_bad_one_are_kept_and_the_decoder_stays_failed() -> None:
    primary, backup = secured_pair()
    good = primary.encode(Ack(1, 0, 0))
    bad = bytearray(primary.encode(Ack(2, 0, 0)))
    bad[-1] ^= 1
    with pytest.raises(FrameError) as caught:
        backup.feed(good + bytes(bad))
    assert caught.value.frames == [Ack(1, 0, 0)]
    with pytest.raises(FrameError):
        backup.feed(primary.encode(Ack(3, 0, 0)))


def test_oversized_length_is_rejected_before_buffering() -> None:
    _, backup = secured_pair()
    with pytest.raises(FrameError, match="exceeds"):
        backup.feed(b"\xff\xff\xff\xff" + b"\0" * 16)


def test_switch_from_plain_to_keyed_between_two_frames_of_one_read() -> None:
    """The handshake's last plain frame and the first keyed ones arrive in one read."""
    nonce_p, nonce_b = auth.new_nonce(), auth.new_nonce()
    keys = auth.channel_keys(SECRET, nonce_p, nonce_b)
    primary, backup = FrameCodec(), FrameCodec()
    proof = auth.proof(SECRET, "primary", nonce_p, nonce_b)
    wire = primary.encode([FrameType.AUTH_PROOF, proof])
    primary.secure(*keys.for_role("primary"))
    assert primary.secured
    wire += primary.encode(Batch(1, ["k", "v"]))
    backup.receive(wire)
    first = backup.next_frame()
    assert first is not None and first.kind is FrameType.AUTH_PROOF
    backup.secure(*keys.for_role("backup"))
    assert backup.next_frame() == Batch(1, ["k", "v"])
    assert backup.next_frame() is None
    with pytest.raises(FrameError):
        backup.secure(*keys.for_role("backup"))
    # And back: the backup's keyed reply decodes on the primary.
    assert primary.feed(backup.encode(Ack(1, 0, 0))) == [Ack(1, 0, 0)]


def test_plain_mode_is_the_wire_format() -> None:
    codec = FrameCodec()
    frame = Heartbeat(7)
    assert codec.encode(frame) == encode(frame)
    assert codec.feed(encode(frame) + encode(frame)[:5]) == [frame]
    bad = bytearray(encode(frame))
    bad[-1] ^= 1
    with pytest.raises(FrameError, match="hash mismatch"):
        FrameCodec().feed(bytes(bad))
