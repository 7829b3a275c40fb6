"""Text from outside made safe to log or to put in a header.

One escaping for every place a peer's or a client's words reach a log line or
a reply header (the HTTP refusals, the reasons a replication peer gives):
printable ASCII only, so no CR/LF can forge a line or split a header and no
ANSI escape reaches a terminal.
"""

from __future__ import annotations


def printable(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, then with Python escapes (``\\n``,
    ``\\x1b``, ``\\xe9``, ``\\u043a``, ``\\\\``) for everything but printable ASCII."""
    return text[:limit].encode("unicode_escape").decode("ascii")


# How much of a replication peer's own words (the reason of an AUTH_FAILED, SYNC_NACK
# or FENCE, a role it claims) reaches our log: once it proved who it is, and before.
PEER_TEXT_CHARS = 300
UNPROVEN_PEER_TEXT_CHARS = 120  # our own reasons fit: the longest is 82
