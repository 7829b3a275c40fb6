"""The replies a connection owes, in request order, and the requests that wait
for the writes before them.

Requests on one connection are answered in the order they came (pipelining),
even when a write is answered later than a read behind it: each request takes
its place in the queue when it is read, and a reply goes out only once every
reply before it has.  They are also carried out in that order: a read (or a
status) read behind a write of its connection still unanswered waits, as a
``HeldRequest``, until that write's outcome is known, so it sees the write (as a
Redis pipeline runs in order); what is read behind a held request waits too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from pbkv.limits import DumpStream


class HeldRequest(NamedTuple):
    """A request routed but not yet carried out: it waits for its connection's
    earlier writes."""

    is_write: bool  # a write goes once the requests before it went; a read once
    # every write before it is answered too
    size: int  # its bytes counted in guard.pending_bytes (key and value)
    run: Callable[[], None]  # carry it out


class PendingReply:
    """One request's place in the queue."""

    __slots__ = ("data", "stream", "close", "target")

    def __init__(self, close: bool, target: bytes | None = None) -> None:
        # The reply, or its head when a stream follows; None until it is known.
        self.data: bytes | None = None
        # The rest of the reply, produced as the client reads it (a large dump).
        self.stream: DumpStream | None = None
        self.close = close  # close the connection once it is sent
        # The request's target, for a redirect to the primary (None: not kept).
        self.target = target


def ready_bytes(replies: Iterable[PendingReply]) -> int:
    """Bytes of the replies that are known but wait behind one still being worked on."""
    return sum(len(reply.data) for reply in replies if reply.data is not None)
