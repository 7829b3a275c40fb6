"""The client vocabulary: the commands a server is asked and the outcomes it answers.

``http.py`` turns requests into commands and outcomes into replies; the
replication cores (``primary.py``, ``backup.py``) decide the outcomes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from pbkv.stages import Stage


class Command(enum.Enum):
    GET = "get"
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    COUNT = "countkey"
    DUMP = "dump"


WRITES = frozenset({Command.INSERT, Command.UPDATE, Command.DELETE})


# -- outcomes of a client request -------------------------------------------
@dataclass(frozen=True, slots=True)
class Done:
    """A logical result: ``ok`` is the course's "success"; ``value`` for get/delete."""

    ok: bool
    value: str | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    """The stage does not accept this request (HTTP 503)."""

    stage: Stage
    role: str
    primary: str | None = None  # set when a backup refuses a write


@dataclass(frozen=True, slots=True)
class ReplicationFailed:
    """The backup did not acknowledge; the write was rewound here."""


@dataclass(frozen=True, slots=True)
class Counted:
    count: int


@dataclass(frozen=True, slots=True)
class Dumped:
    pairs: list[tuple[str, str]]


Outcome = Done | Refused | ReplicationFailed | Counted | Dumped
REPLICATION_FAILED = ReplicationFailed()

# How a write queued in a core is answered: the driver's callable, called with the outcome.
Reply = Callable[[Outcome], None]
