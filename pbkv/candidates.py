"""A backup's new replication channels that have yet to prove the secret (sans-I/O).

With a secret set, a channel counts only once the primary proved it holds the
secret.  Anyone able to bind the primary's address can open one, so a new
channel must not cost the one that serves: until its proof holds it is a
*candidate*, with its own codec, nonces and handshake step (the backup's
``AWAIT_CHALLENGE`` and ``AWAIT_PROOF`` of ``stages.py``), and the live channel
keeps replicating meanwhile.  A candidate whose proof holds replaces the live
channel; one that fails, or has not proved itself within its deadline, is
closed alone.  At most ``MAX_CANDIDATES`` are in flight: a newer one closes the
oldest, so a flood of connections holds a bounded amount of memory and cannot
keep the real primary's reconnection waiting (its proof takes two round trips).

Without a secret there are no candidates: the address check is the proof
(protected mode), and a new channel from the primary's address replaces the
live one at once.
"""

from __future__ import annotations

from pbkv import auth
from pbkv.stages import Handshake, Role, Step
from pbkv.text import UNPROVEN_PEER_TEXT_CHARS, printable
from pbkv.wire import (
    AuthChallenge,
    AuthFailed,
    AuthProof,
    AuthResponse,
    Frame,
    FrameCodec,
    FrameType,
)

MAX_CANDIDATES = 8  # new channels proving the secret at once; a newer one closes the oldest


class Unproven(Exception):
    """The candidate failed to prove the secret: close it (``reason`` says why)."""

    def __init__(self, reason: str, tell_peer: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tell_peer = tell_peer  # send AUTH_FAILED first (not to a peer that refused us)


class Candidate:
    """One new channel on a backup with a secret: the backup's half of the
    challenge-response of ``auth.py``, on the channel's own codec, along the
    backup's handshake table."""

    def __init__(self, ident: int, secret: str, now: float) -> None:
        self.id = ident
        self.secret = secret
        self.opened_at = now
        self.codec = FrameCodec()
        self.handshake = Handshake(Role.BACKUP)
        self.handshake.opened(authenticate=True)
        self.nonces: dict[Role, bytes] = {}

    @property
    def step(self) -> Step:
        return self.handshake.step

    @property
    def proven(self) -> bool:
        return self.handshake.step is Step.AWAIT_HELLO

    def handle(self, frame: Frame) -> Frame | None:
        """One frame from the newcomer: the frame to answer with, or None once its
        proof holds (the codec is then keyed, the step ``AWAIT_HELLO``: the channel
        may replace the live one).  Raises ``Unproven``."""
        kind = frame.kind
        if not self.handshake.accepts(kind):
            raise Unproven(f"unexpected {kind.name} in handshake step {self.step.value}")
        if kind is FrameType.AUTH_CHALLENGE:
            assert isinstance(frame, AuthChallenge)
            self.nonces[Role.PRIMARY] = frame.nonce
            self.nonces[Role.BACKUP] = auth.new_nonce()
            proof = auth.proof(self.secret, Role.BACKUP, frame.nonce, self.nonces[Role.BACKUP])
            self.handshake.advance(kind, Step.AWAIT_PROOF)
            return AuthResponse(self.nonces[Role.BACKUP], proof)
        if kind is FrameType.AUTH_PROOF:
            assert isinstance(frame, AuthProof)
            primary, backup = self.nonces[Role.PRIMARY], self.nonces[Role.BACKUP]
            if not auth.verify_proof(self.secret, Role.PRIMARY, primary, backup, frame.proof):
                raise Unproven(
                    "the primary's proof does not match the backup's secret "
                    "(are both secrets the same?)"
                )
            keys = auth.channel_keys(self.secret, primary, backup)
            self.codec.secure(*keys.for_role(Role.BACKUP))
            self.handshake.advance(kind, Step.AWAIT_HELLO)
            return None
        if kind is FrameType.AUTH_FAILED:
            assert isinstance(frame, AuthFailed)
            said = printable(frame.reason, UNPROVEN_PEER_TEXT_CHARS)
            raise Unproven(f"the primary refused authentication: {said}", tell_peer=False)
        # A HELLO before any proof (the table's only other entry).
        raise Unproven("the backup has a secret set: the primary sent a HELLO without proving it")
