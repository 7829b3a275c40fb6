"""The primary's record of the batches it applied last (Redis's replication backlog).

A member behind the primary in the same history (a spare that followed the old
backup, or an old primary that fenced itself) is brought in sync by the batches
it lacks instead of a full transfer: ``stages.plan`` chooses ``CATCHUP`` when this
record holds every batch after the member's seq *and* the state it recorded at
that seq (checksum and count) is exactly the member's.  Then our batches lead from
the member's data to ours, which the member checks against our checksum and count
at the end (nothing is trusted from the sender).

Each entry is one applied batch (its ops, table time and idempotency entries) and
the state before it; the record keeps the state after the last one too, and offers
itself (``states``) only while that is the store's current state: data changed in
any other way (a fetch, an empty start) cannot be reached by its batches.
Bounded by bytes (``undo_bytes``, the backup's undo setting: the same history of
batches, kept on the other side) and by ``MAX_BATCHES``.  A promoted backup starts
it from its undo record, which holds exactly those batches (``roles.promoted``).

An entry keeps its ops and idempotency entries as tuples: tuples of strings,
numbers and None are untracked by the garbage collector once it has seen them,
where lists are traversed item by item in each full collection.  The record holds
up to ``undo_bytes`` of ops (hundreds of thousands of strings), and a full
collection that walked them all stalled the event loop for tens of milliseconds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pbkv.stages import State

__all__ = ["MAX_BATCHES", "Applied", "AppliedRecord"]

MAX_BATCHES = 4096
ENTRY_OVERHEAD = 100  # bytes an entry costs beyond its text, roughly (as the undo record)


@dataclass(frozen=True, slots=True)
class Applied:
    """One applied batch and the state of the data before it."""

    seq: int
    ops: tuple[str | None, ...]
    time: int
    keyed: tuple[Any, ...]
    checksum_before: int
    count_before: int
    size: int

    def __init__(  # compiled: see ``compiled.py``
        self,
        seq: int,
        ops: tuple[str | None, ...],
        time: int,
        keyed: tuple[Any, ...],
        checksum_before: int,
        count_before: int,
        size: int,
    ) -> None:
        object.__setattr__(self, "seq", seq)
        object.__setattr__(self, "ops", ops)
        object.__setattr__(self, "time", time)
        object.__setattr__(self, "keyed", keyed)
        object.__setattr__(self, "checksum_before", checksum_before)
        object.__setattr__(self, "count_before", count_before)
        object.__setattr__(self, "size", size)

    @property
    def before(self) -> State:
        return State(self.seq - 1, self.checksum_before, self.count_before)


def batch_size(ops: Sequence[str | None], keyed: Sequence[Any], chars: int | None = None) -> int:
    """Bytes a batch holds, roughly; ``chars``: its text's length, when known."""
    if chars is None:
        chars = sum(len(item) for item in ops if item is not None)
        chars += sum(len(item) for item in keyed if isinstance(item, str))
    return chars + ENTRY_OVERHEAD * (1 + len(ops) // 2 + len(keyed) // 4)


class AppliedRecord:
    """The last batches applied, oldest first, within ``max_bytes`` and ``max_batches``."""

    def __init__(self, max_bytes: int, max_batches: int = MAX_BATCHES) -> None:
        self.max_bytes = max_bytes
        self.max_batches = max_batches
        self.entries: deque[Applied] = deque()
        self.size = 0
        self.last: State | None = None  # the state after the last entry

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()
        self.size = 0
        self.last = None

    def applied(
        self,
        seq: int,
        ops: Sequence[str | None],
        time: int,
        keyed: Sequence[Any],
        checksum_before: int,
        count_before: int,
        after: State,
        chars: int | None = None,
    ) -> None:
        """Batch ``seq`` led from (``checksum_before``, ``count_before``) to ``after``
        (``chars``: the length of its text, when the caller knows it)."""
        if not self.max_bytes:
            return
        entries = self.entries
        last = self.last
        if last is None or (last.seq, last.checksum, last.count) != (
            seq - 1,
            checksum_before,
            count_before,
        ):
            self.clear()  # not where the last one left the data: it cannot lead here
        size = batch_size(ops, keyed, chars)
        # Copied into tuples: kept out of the garbage collector's work (see the module).
        entry = Applied(seq, tuple(ops), time, tuple(keyed), checksum_before, count_before, size)
        entries.append(entry)
        self.size += entry.size
        self.last = after
        while entries and (self.size > self.max_bytes or len(entries) > self.max_batches):
            self.size -= entries.popleft().size

    def extend(self, batches: list[Applied], after: State) -> None:
        """Consecutive ``batches`` of which the last led to ``after``."""
        for index, entry in enumerate(batches):
            then = batches[index + 1].before if index + 1 < len(batches) else after
            self.applied(
                entry.seq,
                entry.ops,
                entry.time,
                entry.keyed,
                entry.checksum_before,
                entry.count_before,
                then,
            )

    def states(self, current: State) -> tuple[State, ...]:
        """The states the record leads on from to ``current`` (the store's now): none
        unless its last batch left the data exactly there."""
        if self.last != current:
            return ()
        return tuple(entry.before for entry in self.entries)

    def after(self, seq: int) -> list[Applied]:
        """The batches after ``seq`` (the caller checked that the record covers it)."""
        return [entry for entry in self.entries if entry.seq > seq]
