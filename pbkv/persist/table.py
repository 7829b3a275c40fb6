"""The idempotency table on disk: in a base's extra section, and in each batch
record's ``extra``, so a server restarted from its folder remembers the same
Idempotency-Keys (and forgets the same ones) as it would have in memory.

* A base holds the whole table as it stood when the base was started:
  ``[clock, [key, fingerprint, ok, value, made, ...]]`` (the entries oldest
  first, as a transfer carries them).
* A batch record holds what the batch did to the table: the batch's time and
  its entries ``[time, [key, fingerprint, ok, value, ...]]`` (as the wire
  carries them).  Replayed with ``IdempotencyTable.apply``, it expires and
  evicts exactly what it did when it was first applied.

A base may be taken a little after its state (the batches of the same turn of
the event loop already applied); replaying such a batch on it adds entries it
holds already, identical ones, so the table ends the same.  An empty ``extra``
(a record of an older version, or a base without a table) changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from pbkv.idempotency import BATCH_ITEMS, DIGEST, TRANSFER_ITEMS, IdempotencyTable
from pbkv.persist.framing import PersistError

_packb: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack
# A batch without keyed writes: its time only (the common case, kept cheap).
_EMPTY: list[Any] = []


class TableDamage(PersistError):
    """An extra section that verified (its checksum matched) but is not a table."""


def batch_extra(time: int, keyed: list[Any] | None) -> bytes:
    """What a batch record keeps of a batch's effect on the table."""
    return _packb([time, keyed or _EMPTY])


def base_extra(table: IdempotencyTable) -> bytes:
    """The whole table, for a base."""
    flat: list[Any] = []
    for key, entry in table.entries.items():
        flat += (key, *entry[:DIGEST])
    return _packb([table.clock, flat])


def _decode(data: bytes, items: int, what: str) -> tuple[int, list[Any]]:
    try:
        decoded = msgpack.unpackb(data, raw=False, use_list=True, max_map_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types
        raise TableDamage(f"undecodable idempotency {what}: {exc}") from None
    if type(decoded) is not list or len(decoded) != 2:
        raise TableDamage(f"an idempotency {what} is [time, entries]")
    time, flat = decoded
    if type(time) is not int or time < 0 or type(flat) is not list or len(flat) % items:
        raise TableDamage(f"an idempotency {what} is [time, entries of {items} items]")
    for i in range(0, len(flat), items):
        key, fingerprint, ok, value = flat[i : i + 4]
        if (
            type(key) is not str
            or type(fingerprint) is not int
            or type(ok) is not bool
            or not (value is None or type(value) is str)
            or (items == TRANSFER_ITEMS and type(flat[i + 4]) is not int)
        ):
            raise TableDamage(f"an idempotency {what} holds a malformed entry")
    return time, flat


def load_base(table: IdempotencyTable, extra: bytes) -> None:
    """Fill ``table`` (empty) from a base's extra section."""
    if extra:
        clock, flat = _decode(extra, TRANSFER_ITEMS, "table")
        table.load(clock, flat)


def replay_batch(table: IdempotencyTable, extra: bytes) -> None:
    """Apply a batch record's extra to ``table``, as the batch was applied."""
    if extra:
        time, keyed = _decode(extra, BATCH_ITEMS, "batch")
        table.apply(time, keyed)


def batch_of(extra: bytes) -> tuple[int, list[Any]]:
    """A batch record's (time, keyed entries); (0, []) for none."""
    if not extra:
        return 0, []
    return _decode(extra, BATCH_ITEMS, "batch")
