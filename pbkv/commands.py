"""The client vocabulary: the commands a server is asked and the outcomes it answers.

``pbkv.http`` turns requests into commands and outcomes into replies; the
replication cores (``primary.py``, ``backup.py``) decide the outcomes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pbkv.stages import Stage


class Command(enum.Enum):
    GET = "get"
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    COUNT = "countkey"
    DUMP = "dump"

    # Members are singletons compared by identity: hashed by identity too, in C (Enum's
    # own __hash__ is Python code, and a request looks its command up several times).
    __hash__ = object.__hash__

    @property
    def is_read(self) -> bool:
        """Reads are answered from the store; every other command is a replicated write."""
        return self in _READS


_READS = frozenset({Command.GET, Command.COUNT, Command.DUMP})


# -- outcomes of a client request -------------------------------------------
@dataclass(frozen=True, slots=True)
class Done:
    """A logical result: ``ok`` is the course's "success"; ``value`` for get/delete."""

    ok: bool
    value: str | None = None

    def __init__(self, ok: bool, value: str | None = None) -> None:
        # Written out: compiled, it builds the object natively (see ``compiled.py``).
        object.__setattr__(self, "ok", ok)
        object.__setattr__(self, "value", value)


@dataclass(frozen=True, slots=True)
class Refused:
    """The stage does not accept this request (HTTP 503)."""

    stage: Stage
    role: str
    primary: str | None = None  # set when a backup refuses a write

    def __init__(self, stage: Stage, role: str, primary: str | None = None) -> None:
        object.__setattr__(self, "stage", stage)  # compiled: see ``compiled.py``
        object.__setattr__(self, "role", role)
        object.__setattr__(self, "primary", primary)


@dataclass(frozen=True, slots=True)
class ReplicationFailed:
    """The backup did not acknowledge; the write was rewound here."""


@dataclass(frozen=True, slots=True)
class MemoryFull:
    """``max_memory`` would be exceeded: the write is refused, nothing applied (HTTP 507)."""

    limit: int


@dataclass(frozen=True, slots=True)
class KeyReused:
    """The Idempotency-Key came with another request before: nothing applied (HTTP 422)."""


@dataclass(frozen=True, slots=True)
class DiskFailed:
    """This server's data folder cannot take the write (a full disk, a failed write or
    fsync).  ``applied`` false: refused before anything was applied (HTTP 507);
    true: applied in memory, but its record did not reach this server's disk, so it
    is not acknowledged (HTTP 503: it may or may not survive)."""

    reason: str
    applied: bool = False


@dataclass(frozen=True, slots=True)
class Loaded:
    """A chunk of a bulk load acknowledged: ``applied`` pairs written, ``skipped`` left
    as they were (keys that existed, in insert mode)."""

    applied: int
    skipped: int

    def __init__(self, applied: int, skipped: int) -> None:  # compiled: see ``compiled.py``
        object.__setattr__(self, "applied", applied)
        object.__setattr__(self, "skipped", skipped)


@dataclass(frozen=True, slots=True)
class Counted:
    count: int

    def __init__(self, count: int) -> None:  # compiled: see ``compiled.py``
        object.__setattr__(self, "count", count)


@dataclass(frozen=True, slots=True, eq=False)
class Dumped:
    """Every pair: a list, or a store that the HTTP layer streams a chunk at a time."""

    source: Any  # list[tuple[str, str]] or a store (pbkv.store)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        source = self.source
        return source if isinstance(source, list) else list(source.items())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dumped) and self.pairs == other.pairs


Outcome = (
    Done
    | Refused
    | ReplicationFailed
    | MemoryFull
    | DiskFailed
    | KeyReused
    | Counted
    | Dumped
    | Loaded
)
REPLICATION_FAILED = ReplicationFailed()
KEY_REUSED = KeyReused()

# How a write queued in a core is answered: the driver's callable, called with the outcome.
Reply = Callable[[Outcome], None]
