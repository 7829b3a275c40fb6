"""The idempotency table: the remembered replies of writes sent with an
``Idempotency-Key`` (the IETF httpapi draft's header, as Stripe's API uses it).

A write with a key is applied once and its reply remembered here, under the key,
with a fingerprint of the request (command, key, value): a retry with the same key
and the same request gets that reply without being applied again; the same key with
another request is refused.  As MIT 6.824's and Raft's client sessions do, the table
is part of the replicated state, not of one process: it lives with the store
(``store.idempotency``), so it moves with the store from one core to the other when a
role changes, its checksum is part of the store's (so every handshake and transfer
that compares checksums compares it too), each replication batch carries the entries
its writes add, a full transfer carries the whole table after the shards, and the
backup's undo record undoes what a batch did to it.

**Time.**  Entries expire ``ttl`` milliseconds after they were made, and the table
holds at most ``capacity`` of them (the oldest go first).  So that both copies drop
exactly the same entries, the table has no clock of its own: its time is the time
the primary stamps on each batch (``clock``, in milliseconds), and entries are
dropped only when a batch is applied, on both copies alike.  The primary's table
time goes on from the time of the last batch applied by the elapsed time of its own
clock (``TableClock``), so a new primary after a failover continues it, whatever its
host's clock says.  An entry made by a batch has that batch's time, and batch times
never decrease: the entries are kept in the order they were made, which is also the
order in which they expire.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter, xor
from typing import Any, Final

import xxhash

# An Idempotency-Key header's value: 1 to this many printable ASCII characters.
MAX_KEY_CHARS = 255
DEFAULT_CAPACITY = 100_000
DEFAULT_TTL = 3600.0  # seconds

# Approximate bytes an entry costs beyond its key's and reply's characters: the
# entry object (with its digest), the ordered dict's node and slot, two str headers.
ENTRY_OVERHEAD = 300
# Items per entry: in a batch (key, fingerprint, ok, value) and in a transfer (+ time).
BATCH_ITEMS = 4
TRANSFER_ITEMS = 5

_MASK = (1 << 128) - 1
_MASK64 = (1 << 64) - 1
# A batch of this many entries or more is added in C-level passes over all of them,
# a smaller one entry by entry (the passes' own cost would outweigh what they save).
_IN_BULK = 8
_SOME_SEED = 2  # in an entry's seed: a reply with a value (never in ``made << 2 ^ ok``)


def fingerprint(command: str, key: str, value: str | None) -> int:
    """What identifies a request, for 'the same key with another request'."""
    if value is None:
        return _digest64(b"%b\xff%b" % (command.encode(), key.encode()))
    return _digest64(b"%b\xff%b\xff%b" % (command.encode(), key.encode(), value.encode()))


_digest64 = xxhash.xxh3_64_intdigest


def valid_key(text: str) -> bool:
    """1 to MAX_KEY_CHARS printable ASCII characters (no space or control)."""
    return (
        0 < len(text) <= MAX_KEY_CHARS and text.isascii() and text.isprintable() and " " not in text
    )


# One remembered reply: (fingerprint, ok, value, made, digest): the request's
# fingerprint, the course's ``success`` and the value a delete returned, the table
# time (ms) of the batch that made it, and its share of the table's checksum (kept:
# dropping it needs it again).  A plain tuple of numbers and strings, which the
# garbage collector stops tracking: a table of many entries costs its full
# collections nothing.
Entry = tuple[int, bool, str | None, int, int]
FINGERPRINT: Final = 0
OK: Final = 1
VALUE: Final = 2
MADE: Final = 3
DIGEST: Final = 4

_digest = xxhash.xxh3_128_intdigest
_DIGEST_OF = itemgetter(DIGEST)
_VALUE_OF = itemgetter(VALUE)
_KEY_OF = itemgetter(0)  # of a (key, entry) pair
_ENTRY_OF = itemgetter(1)


def _entry_digest(key: str, fingerprint: int, ok: bool, value: str | None, made: int) -> int:
    """An entry's share of the table's checksum: over every field, the key's included.
    The numbers go in as the hash's seed, the strings as its input: no text is
    formatted (an entry is made on both servers; ``apply`` makes a batch's in bulk)."""
    seed = (fingerprint ^ (made << 2) ^ ok) & _MASK64
    if value is None:
        return _digest(key.encode(), seed)
    return _digest(b"%b\xff%b" % (key.encode(), value.encode()), seed ^ _SOME_SEED)


def _entry(key: str, fingerprint: int, ok: bool, value: str | None, made: int) -> Entry:
    """An entry with its checksum share."""
    return (fingerprint, ok, value, made, _entry_digest(key, fingerprint, ok, value, made))


def _sizes(keys: list[str], values: Iterable[str | None]) -> int:
    """What entries of these keys and reply values count for, in ``max_memory``."""
    return len(keys) * ENTRY_OVERHEAD + sum(map(len, keys)) + sum(map(len, filter(None, values)))


def entry_size(key: str, value: str | None) -> int:
    """The bytes an entry counts for, in ``max_memory``."""
    return len(key) + (0 if value is None else len(value)) + ENTRY_OVERHEAD


@dataclass(slots=True)
class TableUndo:
    """What undoes one batch's changes to the table."""

    clock: int  # the table's time before the batch
    added: list[str]  # keys the batch made, in order
    dropped: list[tuple[str, Entry]]  # entries it expired or evicted, oldest first
    size: int  # bytes, roughly, this record holds

    def __init__(  # compiled: see ``compiled.py``
        self, clock: int, added: list[str], dropped: list[tuple[str, Entry]], size: int
    ) -> None:
        self.clock = clock
        self.added = added
        self.dropped = dropped
        self.size = size


class IdempotencyTable:
    """Key -> remembered reply, oldest first; with a running checksum and memory count."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, ttl: float = DEFAULT_TTL) -> None:
        self.capacity = capacity
        self.ttl_ms = int(ttl * 1000)
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.clock = 0  # the time of the last batch applied (ms)
        self.checksum = 0
        self.memory = 0
        # Entries that replaced one of the same key: never, in a consistent history (a
        # key is replayed while it is held); the simulation checks it stays 0.
        self.replaced = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def empty_like(self) -> IdempotencyTable:
        table = IdempotencyTable(self.capacity)
        table.ttl_ms = self.ttl_ms
        return table

    def copy(self) -> IdempotencyTable:
        """The entries and the time as of now (their tuples are shared: never changed)."""
        table = self.empty_like()
        table.entries = self.entries.copy()
        table.clock, table.checksum, table.memory = self.clock, self.checksum, self.memory
        return table

    def clear(self) -> None:
        self.entries = OrderedDict()
        self.clock = 0
        self.checksum = 0
        self.memory = 0

    # -- changes ---------------------------------------------------------------------------
    def _add(self, key: str, entry: Entry) -> None:
        old = self.entries.pop(key, None)
        if old is not None:  # never in a consistent history; kept exact all the same
            self._forget(key, old)
            self.replaced += 1
        self.entries[key] = entry
        self.checksum = (self.checksum + entry[DIGEST]) & _MASK
        self.memory += entry_size(key, entry[VALUE])

    def _forget(self, key: str, entry: Entry) -> None:
        self.checksum = (self.checksum - entry[DIGEST]) & _MASK
        self.memory -= entry_size(key, entry[VALUE])

    def _drop_oldest(self) -> tuple[str, Entry]:
        key, entry = self.entries.popitem(last=False)
        self._forget(key, entry)
        return key, entry

    def apply(self, time: int, keyed: list[Any], record: bool = False) -> TableUndo | None:
        """One batch: the time moves to ``time``, entries older than the ttl go, the
        batch's entries (key, fingerprint, ok, value, ...) come in, and the oldest go
        past ``capacity``.  With ``record``, returns what undoes it (None: nothing
        changed)."""
        entries = self.entries
        before = self.clock
        if time > before:
            self.clock = time
        if not entries and not keyed:
            return TableUndo(before, [], [], 0) if record and time > before else None
        dropped: list[tuple[str, Entry]] = []
        horizon = self.clock - self.ttl_ms
        while entries:
            oldest = next(iter(entries.values()))
            if oldest[MADE] > horizon:
                break
            dropped.append(self._drop_oldest())
        added: list[str] = keyed[0::BATCH_ITEMS]
        if (
            len(added) < _IN_BULK
            or len(set(added)) != len(added)
            or not entries.keys().isdisjoint(added)
        ):
            self._add_one_by_one(keyed)  # a small batch, or one that replaces an entry
        else:  # the batch's entries made and counted in C-level passes
            values = keyed[3::BATCH_ITEMS]
            made = self.clock
            prints, oks = keyed[1::BATCH_ITEMS], keyed[2::BATCH_ITEMS]
            if values.count(None) == len(values):  # no reply holds a value: each is hashed
                # with its numbers as the seed, as _entry does, without a Python call
                seeds = map(xor, map(xor, prints, repeat((made << 2) & _MASK64)), oks)
                digests = list(map(_digest, map(str.encode, added), seeds))
            else:
                digests = list(map(_entry_digest, added, prints, oks, values, repeat(made)))
            news = zip(prints, oks, values, repeat(made, len(added)), digests, strict=True)
            entries.update(zip(added, news, strict=True))
            self.checksum = (self.checksum + sum(digests)) & _MASK
            self.memory += _sizes(added, values)
        over = len(entries) - self.capacity
        if over == 1:  # the oldest goes (a full table drops one per write)
            dropped.append(self._drop_oldest())
        elif over > 1:
            evicted = list(map(entries.popitem, repeat(False, over)))
            evicted_entries = list(map(_ENTRY_OF, evicted))
            self.checksum = (self.checksum - sum(map(_DIGEST_OF, evicted_entries))) & _MASK
            self.memory -= _sizes(list(map(_KEY_OF, evicted)), map(_VALUE_OF, evicted_entries))
            dropped += evicted
        if not record:
            return None
        # Roughly: the undo record holds references to entries the table held anyway.
        size = 100 * (len(added) + len(dropped)) + ENTRY_OVERHEAD * len(dropped)
        return TableUndo(before, added, dropped, size)

    def _add_one_by_one(self, keyed: list[Any]) -> None:
        """A batch's entries, one at a time (a small batch, or one where an entry
        replaces another of its key: never in a consistent history)."""
        entries, made = self.entries, self.clock
        for i in range(0, len(keyed), BATCH_ITEMS):
            key = keyed[i]
            entry = _entry(key, keyed[i + 1], keyed[i + 2], keyed[i + 3], made)
            if key in entries:
                self._add(key, entry)
                continue
            entries[key] = entry
            self.checksum = (self.checksum + entry[DIGEST]) & _MASK
            self.memory += entry_size(key, entry[VALUE])

    def undo(self, change: TableUndo) -> None:
        """Reverse ``apply``: its entries go, those it dropped come back in front."""
        entries = self.entries
        for key in reversed(change.added):
            entry = entries.pop(key, None)
            if entry is not None:
                self._forget(key, entry)
        made = set(change.added)
        for key, entry in reversed(change.dropped):
            if key in made:
                continue  # made and evicted by the same batch: absent before it
            self._add(key, entry)
            entries.move_to_end(key, last=False)
        self.clock = change.clock

    # -- transfers -------------------------------------------------------------------------
    def chunks(self, size: int, max_chars: int) -> Iterator[list[Any]]:
        """The entries, oldest first, as flat lists (key, fingerprint, ok, value, made)
        of at most ``size`` entries or about ``max_chars`` characters; at least one
        list, so that the clock travels with an empty table too."""
        chunk: list[Any] = []
        chars = count = 0
        for key, entry in self.entries.items():
            value = entry[VALUE]
            chunk += (key, *entry[:DIGEST])
            count += 1
            chars += len(key) + (0 if value is None else len(value))
            if count >= size or chars >= max_chars:
                yield chunk
                chunk, chars, count = [], 0, 0
        if chunk or not self.entries:
            yield chunk

    def load(self, clock: int, flat: list[Any]) -> None:
        """Entries received in a transfer (after those received before them)."""
        if clock > self.clock:
            self.clock = clock
        for i in range(0, len(flat), TRANSFER_ITEMS):
            key = flat[i]
            self._add(key, _entry(key, flat[i + 1], flat[i + 2], flat[i + 3], flat[i + 4]))

    def take_from(self, other: IdempotencyTable) -> None:
        """Hold ``other``'s entries in place of ours, leaving ``other`` empty."""
        self.entries, self.clock = other.entries, other.clock
        self.checksum, self.memory = other.checksum, other.memory
        other.clear()


class TableClock:
    """The primary's table time: the time of the last batch applied, moved on by the
    elapsed time of this process's own clock since ``anchor`` (seconds in, ms out)."""

    def __init__(self, table_ms: int, now: float) -> None:
        self.anchor(table_ms, now)

    def anchor(self, table_ms: int, now: float) -> None:
        self._base = table_ms
        self._since = now

    def time(self, table_ms: int, now: float) -> int:
        moved = self._base + int((now - self._since) * 1000)
        return moved if moved > table_ms else table_ms
