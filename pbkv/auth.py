"""Channel authentication, without I/O: nonces, proofs, channel keys, keyed frames.

With a ``secret`` set, the two servers prove to each other that they hold it
before any replication frame counts, and the secret itself never travels:

1. primary -> backup: its fresh nonce ``nonce_p`` (``new_nonce()``);
2. backup -> primary: its fresh nonce ``nonce_b`` and
   ``proof(secret, "backup", nonce_p, nonce_b)``;
3. primary: ``verify_proof(...)`` on the backup's proof, then sends
   ``proof(secret, "primary", nonce_p, nonce_b)``; the backup verifies it.

A proof covers both nonces, so a recorded handshake is worthless once either
side picks a new nonce, and it names the role that made it, so a proof cannot
be reflected back to its maker.  After the proofs both ends call
``ChannelCodec.secure(*channel_keys(...).for_role(role))``: every later frame
carries a 16-byte HMAC-SHA256 tag in place of the xxh3 hash, under a key per
direction derived from the secret and both nonces, over an implicit per-direction
sequence number, so a frame altered, injected, replayed, reordered or dropped on
the wire fails like a corrupted one (``wire.FrameError``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from pbkv.wire import HEADER_SIZE, MAX_FRAME, FrameDecoder, FrameError, FrameType, encode

NONCE_BYTES = 32
PROOF_BYTES = 32  # HMAC-SHA256
KEY_BYTES = 32
TAG_BYTES = 16
ROLES = ("primary", "backup")

_PROOF_LABEL = {"primary": b"pbkv-proof-primary\x00", "backup": b"pbkv-proof-backup\x00"}
_KEY_LABEL = {
    "primary": b"pbkv-key primary to backup\x01",
    "backup": b"pbkv-key backup to primary\x01",
}
_KEYED_HEADER = struct.Struct(">I16s")  # length, tag
KEYED_HEADER_SIZE = _KEYED_HEADER.size
_SEQ = struct.Struct(">Q")


class AuthError(ValueError):
    """A handshake value is malformed (wrong type or length)."""


def new_nonce() -> bytes:
    """A fresh random nonce: one per side and per channel, never reused."""
    return secrets.token_bytes(NONCE_BYTES)


def _secret_bytes(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def _check(name: str, value: Any, size: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise AuthError(f"{name} must be {size} bytes")
    return value


def proof(secret: str | bytes, role: str, nonce_primary: bytes, nonce_backup: bytes) -> bytes:
    """What ``role`` sends to show it holds ``secret``, bound to this channel's nonces."""
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    message = (
        _PROOF_LABEL[role]
        + _check("nonce_primary", nonce_primary, NONCE_BYTES)
        + _check("nonce_backup", nonce_backup, NONCE_BYTES)
    )
    return hmac.new(_secret_bytes(secret), message, hashlib.sha256).digest()


def verify_proof(
    secret: str | bytes, role: str, nonce_primary: bytes, nonce_backup: bytes, received: Any
) -> bool:
    """True when ``received`` is ``role``'s proof for these nonces (constant time).

    Anything malformed (not bytes, wrong length) is simply false.
    """
    if not isinstance(received, bytes) or len(received) != PROOF_BYTES:
        return False
    expected = proof(secret, role, nonce_primary, nonce_backup)
    return hmac.compare_digest(expected, received)


@dataclass(frozen=True, slots=True)
class ChannelKeys:
    """One key per direction of one channel; never logged."""

    primary_to_backup: bytes
    backup_to_primary: bytes

    def __repr__(self) -> str:
        return "ChannelKeys(<hidden>)"

    def for_role(self, role: str) -> tuple[bytes, bytes]:
        """(send key, receive key) of the end playing ``role``."""
        if role == "primary":
            return self.primary_to_backup, self.backup_to_primary
        if role == "backup":
            return self.backup_to_primary, self.primary_to_backup
        raise AuthError(f"role must be one of {', '.join(ROLES)}, not {role!r}")


def channel_keys(secret: str | bytes, nonce_primary: bytes, nonce_backup: bytes) -> ChannelKeys:
    """HKDF (RFC 5869) with HMAC-SHA256: the nonces are the salt, one block per direction."""
    salt = _check("nonce_primary", nonce_primary, NONCE_BYTES) + _check(
        "nonce_backup", nonce_backup, NONCE_BYTES
    )
    prk = hmac.new(salt, _secret_bytes(secret), hashlib.sha256).digest()
    keys = {
        role: hmac.new(prk, label, hashlib.sha256).digest() for role, label in _KEY_LABEL.items()
    }
    return ChannelKeys(keys["primary"], keys["backup"])


class FrameMac:
    """HMAC-SHA256 over (sequence number, payload), truncated to 16-byte tags.

    Chosen over keyed BLAKE2b by measurement on x86 with SHA extensions: equal on
    a 3.6 KB batch (7 us), 2.4x faster on a 250 KB transfer chunk (206 vs 498 us).
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = _check("key", key, KEY_BYTES)

    def tag(self, seq: int, payload: bytes) -> bytes:
        return hmac.digest(self._key, _SEQ.pack(seq) + payload, "sha256")[:TAG_BYTES]


_packb = msgpack.Packer(use_bin_type=True).pack


def _to_frame(payload: bytes) -> list[Any]:
    """The same checks as ``wire.FrameDecoder`` once the bytes are known to be genuine."""
    try:
        frame = msgpack.unpackb(payload, raw=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameError(f"undecodable frame: {exc}") from None
    if not isinstance(frame, list) or not frame or not isinstance(frame[0], int):
        raise FrameError("a frame must be a non-empty array starting with its type")
    try:
        frame[0] = FrameType(frame[0])
    except ValueError:
        raise FrameError(f"unknown frame type {frame[0]}") from None
    return frame


class MacCodec:
    """Keyed frames of one direction pair: ``length u32 | tag 16 bytes | payload``.

    The tag is ``FrameMac(key).tag(seq, payload)``; ``seq`` counts the frames
    sent (or received) in that direction from 0 and never travels, so a
    replayed, reordered, dropped or injected frame fails its tag.  After a
    ``FrameError`` the decoder is spent: the channel must close.
    """

    def __init__(self, send_key: bytes, receive_key: bytes, buffered: bytes = b"") -> None:
        self._send_mac = FrameMac(send_key)
        self._receive_mac = FrameMac(receive_key)
        self.sent = 0
        self.received = 0
        self._buffer = bytearray(buffered)
        self._broken = False

    def encode(self, frame: list[Any] | tuple[Any, ...]) -> bytes:
        payload = _packb(frame)
        tag = self._send_mac.tag(self.sent, payload)
        self.sent += 1
        return _KEYED_HEADER.pack(len(payload), tag) + payload

    def receive(self, data: bytes) -> None:
        """Buffer bytes; ``next_frame`` takes frames out one at a time."""
        self._buffer += data

    def next_frame(self) -> list[Any] | None:
        """The next verified frame, or None until more bytes arrive."""
        if self._broken:
            raise FrameError("the channel already failed")
        buffer = self._buffer
        if len(buffer) < KEYED_HEADER_SIZE:
            return None
        length, tag = _KEYED_HEADER.unpack_from(buffer)
        if length > MAX_FRAME:
            self._broken = True
            raise FrameError(f"frame length {length} exceeds {MAX_FRAME}")
        end = KEYED_HEADER_SIZE + length
        if len(buffer) < end:
            return None
        payload = bytes(buffer[KEYED_HEADER_SIZE:end])
        if not hmac.compare_digest(self._receive_mac.tag(self.received, payload), tag):
            self._broken = True
            raise FrameError("frame authentication failed (altered, injected or replayed)")
        del buffer[:end]
        self.received += 1
        try:
            return _to_frame(payload)
        except FrameError:
            self._broken = True
            raise

    def feed(self, data: bytes) -> list[list[Any]]:
        """Like ``wire.FrameDecoder.feed``: every complete frame; a bad one raises
        ``FrameError`` carrying the good frames before it."""
        self.receive(data)
        frames: list[list[Any]] = []
        try:
            while (frame := self.next_frame()) is not None:
                frames.append(frame)
        except FrameError as exc:
            raise FrameError(str(exc), frames) from None
        return frames


class _PlainFrames:
    """``wire`` frames one at a time, so a switch to keyed frames can fall between two."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def next_frame(self) -> list[Any] | None:
        buffer = self.buffer
        if len(buffer) < HEADER_SIZE:
            return None
        length = int.from_bytes(buffer[:4], "big")
        if length > MAX_FRAME:
            raise FrameError(f"frame length {length} exceeds {MAX_FRAME}")
        end = HEADER_SIZE + length
        if len(buffer) < end:
            return None
        # The plain decoder holds the one definition of a plain frame.
        frames = FrameDecoder().feed(bytes(buffer[:end]))
        del buffer[:end]
        return frames[0]


class ChannelCodec:
    """Both directions of one channel end: plain ``wire`` frames until ``secure``,
    keyed frames (``MacCodec``) from then on.

    The driver takes frames out with ``next_frame`` one at a time and carries out
    what each one caused before taking the next: the frame that completes the
    handshake is followed, in the same read, by frames already keyed.  Each end
    calls ``secure`` right after the last plain frame it sends *and* receives (in
    the handshake above: after the primary's proof was sent, respectively received
    and verified; the backup sends nothing between its proof and that point).
    """

    def __init__(self) -> None:
        self._plain: _PlainFrames | None = _PlainFrames()
        self._keyed: MacCodec | None = None

    @property
    def secured(self) -> bool:
        return self._keyed is not None

    def secure(self, send_key: bytes, receive_key: bytes) -> None:
        if self._keyed is not None:
            raise AuthError("the channel is already secured")
        assert self._plain is not None
        self._keyed = MacCodec(send_key, receive_key, bytes(self._plain.buffer))
        self._plain = None

    def encode(self, frame: list[Any] | tuple[Any, ...]) -> bytes:
        if self._keyed is not None:
            return self._keyed.encode(frame)
        return encode(frame)

    def receive(self, data: bytes) -> None:
        if self._keyed is not None:
            self._keyed.receive(data)
        else:
            assert self._plain is not None
            self._plain.buffer += data

    def next_frame(self) -> list[Any] | None:
        if self._keyed is not None:
            return self._keyed.next_frame()
        assert self._plain is not None
        return self._plain.next_frame()

    def feed(self, data: bytes) -> list[list[Any]]:
        """Every complete frame in the current mode (for a channel that never switches
        within one read); a bad frame raises ``FrameError`` with the good ones before it."""
        self.receive(data)
        frames: list[list[Any]] = []
        try:
            while (frame := self.next_frame()) is not None:
                frames.append(frame)
        except FrameError as exc:
            raise FrameError(str(exc), frames) from None
        return frames
