"""Writes with an Idempotency-Key over raw HTTP, and the retries of them that must get
their first replies back (the real-process tests of safe retries share them)."""

from __future__ import annotations

from tests.support.raw_http import exchange, request


def keyed(op: str, body: str, ident: str) -> bytes:
    """A ``POST /kv/<op>`` with ``body`` and ``Idempotency-Key: <ident>``."""
    return request("POST", f"/kv/{op}", body.encode(), headers=(f"Idempotency-Key: {ident}",))


def write_three(address: tuple[str, int]) -> None:
    """Insert "k" (key ins-1), insert "gone" (ins-2), then delete "gone" (del-1)."""
    assert exchange(address, keyed("insert", "key=k&value=v", "ins-1")).json == {"success": "true"}
    assert exchange(address, keyed("insert", "key=gone&value=old", "ins-2")).status == 200
    deleted = exchange(address, keyed("delete", "key=gone", "del-1"))
    assert deleted.json == {"success": "true", "value": "old"}


def retry_them(address: tuple[str, int]) -> None:
    """The retries of ``write_three``'s: the first replies, nothing applied again (not
    "key exists", not "missing"); the same key with another request is refused."""
    assert exchange(address, keyed("insert", "key=k&value=v", "ins-1")).json == {"success": "true"}
    again = exchange(address, keyed("delete", "key=gone", "del-1"))
    assert again.json == {"success": "true", "value": "old"}
    assert exchange(address, keyed("update", "key=k&value=other", "ins-1")).status == 422
