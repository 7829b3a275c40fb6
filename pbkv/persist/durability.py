"""Which appended records are durable, and how long each waited: no I/O, no clock.

Records are numbered as they are appended (1, 2, ...).  An fsync covers the records
appended *before it started*: one appended while it runs waits for the next.  So
``started`` returns the number of the last record the fsync covers, and ``finished``
says that number is durable.  Whatever acknowledges data remembers the number of
the last record appended when it was held (``appended``), and may go out once
``covers`` it.

The ages give the window a power cut could take: a record not yet durable was
appended at some time; once an fsync that covers it finishes, its wait is known.
Only the oldest record not yet covered by a started fsync needs remembering (one
per fsync under way, as fsyncs may overlap with the synchronous ones), since the
records after it waited less.
"""

from __future__ import annotations

from collections import deque


class Durability:
    """The records appended and made durable so far, with their waits (seconds)."""

    def __init__(self) -> None:
        self.appended = 0  # the number of the last record appended
        self.synced = 0  # every record up to this one is durable
        self.longest_wait = 0.0  # the longest a record waited to become durable
        # (number, time) of the first record appended after each fsync started.
        self._oldest: deque[tuple[int, float]] = deque()
        self._segment_open = False  # the last entry of ``_oldest`` takes more records

    def append(self, now: float) -> int:
        """A record was appended at ``now``; returns its number."""
        self.appended += 1
        if not self._segment_open:
            self._oldest.append((self.appended, now))
            self._segment_open = True
        return self.appended

    def started(self) -> int:
        """An fsync starts: it covers the records up to the number returned."""
        self._segment_open = False
        return self.appended

    def finished(self, covered: int, now: float) -> None:
        """An fsync that covered the records up to ``covered`` succeeded at ``now``."""
        oldest = self._oldest
        while oldest and oldest[0][0] <= covered:
            _, appended_at = oldest.popleft()
            self.longest_wait = max(self.longest_wait, now - appended_at)
        self.synced = max(self.synced, covered)

    def all_durable(self, now: float) -> None:
        """Everything appended so far is durable (a synchronous fsync, or a new base
        that holds it all)."""
        self.finished(self.started(), now)

    def covers(self, number: int) -> bool:
        return number <= self.synced

    @property
    def pending(self) -> bool:
        """Some record appended is not durable yet."""
        return self.appended > self.synced

    def unsynced_age(self, now: float) -> float:
        """How long the oldest record not yet durable has waited (0: none)."""
        return now - self._oldest[0][1] if self._oldest else 0.0

    def largest_window(self, now: float) -> float:
        """The longest any record was (or is) not durable: what a power cut could take."""
        return max(self.longest_wait, self.unsynced_age(now))
