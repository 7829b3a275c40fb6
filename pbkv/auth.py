"""Channel authentication, without I/O: nonces, proofs, channel keys, keyed frames.

With a ``secret`` set, the two servers prove to each other that they hold it
before any replication frame counts, and the secret itself never travels:

1. primary -> backup: its fresh nonce ``nonce_p`` (``new_nonce()``);
2. backup -> primary: its fresh nonce ``nonce_b`` and
   ``proof(secret, "backup", nonce_p, nonce_b)``;
3. primary: ``verify_proof(...)`` on the backup's proof, then sends
   ``proof(secret, "primary", nonce_p, nonce_b)``; the backup verifies it.

A spare that follows a backup's stream (``follower.py``) opens its own channel with
the same steps under other labels (roles ``follower`` and ``source``, and keys of
their own), so a proof or a key of one kind of channel is worthless on the other.

A proof covers both nonces, so a recorded handshake is worthless once either
side picks a new nonce, and it names the role that made it, so a proof cannot
be reflected back to its maker.  After the proofs both ends call
``wire.FrameCodec.secure(*channel_keys(...).for_role(role))``: every later
frame carries a 16-byte HMAC-SHA256 tag in place of the xxh3 hash, under a key
per direction derived from the secret and both nonces, over an implicit
per-direction sequence number, so a frame altered, injected, replayed,
reordered or dropped on the wire fails like a corrupted one (``wire.FrameError``).
The frame MAC is HMAC-SHA256 rather than keyed BLAKE2b: on x86 with SHA
extensions it measured equal on a 3.6 KB batch and 2.4x faster on a 250 KB
transfer chunk.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

NONCE_BYTES = 32
PROOF_BYTES = 32  # HMAC-SHA256
KEY_BYTES = 32
ROLES = ("primary", "backup")
FOLLOW_ROLES = ("follower", "source")  # the follower opens, as the primary does

_PROOF_LABEL = {
    "primary": b"pbkv-proof-primary\x00",
    "backup": b"pbkv-proof-backup\x00",
    "follower": b"pbkv-proof-follower\x00",
    "source": b"pbkv-proof-source\x00",
}
_KEY_LABEL = {
    "primary": b"pbkv-key primary to backup\x01",
    "backup": b"pbkv-key backup to primary\x01",
}


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
    if role not in _PROOF_LABEL:
        raise AuthError(f"role must be one of {', '.join(_PROOF_LABEL)}, not {role!r}")
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


def follow_keys(secret: str | bytes, nonce_follower: bytes, nonce_source: bytes) -> ChannelKeys:
    """A follow channel's keys (as ``channel_keys``, under labels of their own): the
    follower plays the primary's part (it opens), the source the backup's."""
    salt = _check("nonce_follower", nonce_follower, NONCE_BYTES) + _check(
        "nonce_source", nonce_source, NONCE_BYTES
    )
    prk = hmac.new(salt, _secret_bytes(secret), hashlib.sha256).digest()
    return ChannelKeys(
        hmac.new(prk, b"pbkv-follow-key follower to source\x01", hashlib.sha256).digest(),
        hmac.new(prk, b"pbkv-follow-key source to follower\x01", hashlib.sha256).digest(),
    )
