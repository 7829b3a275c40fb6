"""The stages of both roles, as data.

Two rules, as in h11's ``_state.py``:

1. Everything that decides which stage follows which lives in this file: the
   transition tables (``stage -> {event: next stage}``) and the acceptance
   table (``stage -> what reads and writes get``).  The replication cores in
   ``primary.py`` and ``backup.py`` only name events; ``StageMachine.fire``
   looks the next stage up and raises ``ProtocolError`` for an event that the
   current stage does not expect, instead of silently ignoring it.
2. No I/O and no clock here.  The README's stage diagram and tables are
   generated from these tables (``python -m pbkv.stages``), so they cannot drift.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


class Stage(enum.Enum):
    COLD_START = "cold_start"
    BOOTSTRAPPING_SECONDARY = "bootstrapping_secondary"  # primary only
    BOOTSTRAPPING_PRIMARY = "bootstrapping_primary"  # backup only
    WARM_START = "warm_start"
    IN_SYNC = "in_sync"


class Event(enum.Enum):
    # Primary: outcome of looking for the backup / of a handshake.
    BACKUP_UNREACHABLE = "backup_unreachable"
    BACKUP_HOLDS_DATA = "backup_holds_data"  # and we hold nothing confirmed
    BACKUP_NEEDS_DATA = "backup_needs_data"
    # Backup: outcome of looking for the primary.
    PRIMARY_RUNNING = "primary_running"
    PRIMARY_ABSENT = "primary_absent"
    # Either side.
    TRANSFER_STARTED = "transfer_started"  # the primary began sending its data
    SYNC_CONFIRMED = "sync_confirmed"  # checksums matched, mutual ack done
    TRANSFER_FAILED = "transfer_failed"
    PEER_LOST = "peer_lost"  # channel closed, silent or fenced


S, E = Stage, Event

PRIMARY_TRANSITIONS: dict[Stage, dict[Event, Stage]] = {
    S.COLD_START: {
        E.BACKUP_UNREACHABLE: S.BOOTSTRAPPING_SECONDARY,
        E.BACKUP_NEEDS_DATA: S.BOOTSTRAPPING_SECONDARY,
        E.BACKUP_HOLDS_DATA: S.WARM_START,
    },
    S.BOOTSTRAPPING_SECONDARY: {
        E.SYNC_CONFIRMED: S.IN_SYNC,
        E.TRANSFER_FAILED: S.BOOTSTRAPPING_SECONDARY,
        E.PEER_LOST: S.BOOTSTRAPPING_SECONDARY,
        # Only while our own (empty) data is unconfirmed: the backup's wins.
        E.BACKUP_HOLDS_DATA: S.WARM_START,
    },
    S.WARM_START: {
        E.SYNC_CONFIRMED: S.IN_SYNC,
        E.TRANSFER_FAILED: S.WARM_START,
        E.PEER_LOST: S.WARM_START,
        # The backup came back without data: the only full copy is gone.
        E.BACKUP_NEEDS_DATA: S.BOOTSTRAPPING_SECONDARY,
    },
    S.IN_SYNC: {
        E.PEER_LOST: S.BOOTSTRAPPING_SECONDARY,
    },
}

BACKUP_TRANSITIONS: dict[Stage, dict[Event, Stage]] = {
    S.COLD_START: {
        E.PRIMARY_RUNNING: S.WARM_START,
        E.PRIMARY_ABSENT: S.BOOTSTRAPPING_PRIMARY,
        E.TRANSFER_STARTED: S.WARM_START,
        E.PEER_LOST: S.BOOTSTRAPPING_PRIMARY,
    },
    S.BOOTSTRAPPING_PRIMARY: {
        E.SYNC_CONFIRMED: S.IN_SYNC,  # the primary fetched our data, or both matched
        E.TRANSFER_STARTED: S.WARM_START,  # a primary with newer data overwrites us
        E.TRANSFER_FAILED: S.BOOTSTRAPPING_PRIMARY,
        E.PEER_LOST: S.BOOTSTRAPPING_PRIMARY,
    },
    S.WARM_START: {
        E.TRANSFER_STARTED: S.WARM_START,
        E.SYNC_CONFIRMED: S.IN_SYNC,
        E.TRANSFER_FAILED: S.WARM_START,
        E.PEER_LOST: S.BOOTSTRAPPING_PRIMARY,
    },
    S.IN_SYNC: {
        E.PEER_LOST: S.BOOTSTRAPPING_PRIMARY,
    },
}

TRANSITIONS = {"primary": PRIMARY_TRANSITIONS, "backup": BACKUP_TRANSITIONS}


class ReadRule(enum.Enum):
    REFUSE = "refuse"
    SERVE = "serve"
    # Bootstrapping secondary: serve only data that a backup has confirmed
    # (a primary that restarted and found no backup may have lost writes).
    SERVE_IF_CONFIRMED = "serve if our data is confirmed"
    # Warm start: serve a key only when its whole shard has arrived, so the
    # answer, a miss included, is certainly right.
    SERVE_IF_SHARD_COMPLETE = "serve if the key's shard has arrived"


class WriteRule(enum.Enum):
    REFUSE = "refuse"
    REPLICATE = "apply after the backup acknowledges"
    REDIRECT = "refuse, naming the primary"


@dataclass(frozen=True, slots=True)
class Acceptance:
    reads: ReadRule
    writes: WriteRule


PRIMARY_ACCEPTANCE: dict[Stage, Acceptance] = {
    S.COLD_START: Acceptance(ReadRule.REFUSE, WriteRule.REFUSE),
    S.BOOTSTRAPPING_SECONDARY: Acceptance(ReadRule.SERVE_IF_CONFIRMED, WriteRule.REFUSE),
    S.WARM_START: Acceptance(ReadRule.SERVE_IF_SHARD_COMPLETE, WriteRule.REFUSE),
    S.IN_SYNC: Acceptance(ReadRule.SERVE, WriteRule.REPLICATE),
}

BACKUP_ACCEPTANCE: dict[Stage, Acceptance] = {
    S.COLD_START: Acceptance(ReadRule.REFUSE, WriteRule.REDIRECT),
    S.BOOTSTRAPPING_PRIMARY: Acceptance(ReadRule.SERVE, WriteRule.REDIRECT),
    S.WARM_START: Acceptance(ReadRule.REFUSE, WriteRule.REDIRECT),
    S.IN_SYNC: Acceptance(ReadRule.SERVE, WriteRule.REDIRECT),
}

ACCEPTANCE = {"primary": PRIMARY_ACCEPTANCE, "backup": BACKUP_ACCEPTANCE}


class ProtocolError(RuntimeError):
    """An event arrived that the current stage has no transition for."""


class StageMachine:
    """Holds the current stage of one role and fires transitions from the table.

    ``on_transition(old, new, reason)`` is called for every transition,
    self-transitions included (a failed attempt that starts over is news).
    """

    def __init__(
        self,
        role: str,
        initial: Stage,
        on_transition: Callable[[Stage, Stage, str], None] | None = None,
    ) -> None:
        self.role = role
        self.table = TRANSITIONS[role]
        if initial not in self.table:
            raise ValueError(f"{initial.value} is not a stage of the {role}")
        self.stage = initial
        self.acceptance = ACCEPTANCE[role][initial]
        self._on_transition = on_transition

    def can_fire(self, event: Event) -> bool:
        return event in self.table[self.stage]

    def fire(self, event: Event, reason: str) -> Stage:
        try:
            new = self.table[self.stage][event]
        except KeyError:
            raise ProtocolError(
                f"{self.role} in stage {self.stage.value} has no transition for {event.value}"
            ) from None
        old, self.stage = self.stage, new
        self.acceptance = ACCEPTANCE[self.role][new]
        if self._on_transition is not None:
            self._on_transition(old, new, reason)
        return new


def mermaid(role: str) -> str:
    """A state diagram of one role (self-transitions folded into the edge label)."""
    lines = ["```mermaid", "stateDiagram-v2", f"    [*] --> {Stage.COLD_START.value}"]
    edges: dict[tuple[Stage, Stage], list[str]] = {}
    for stage, table in TRANSITIONS[role].items():
        for event, new in table.items():
            edges.setdefault((stage, new), []).append(event.value)
    for (old, new), events in edges.items():
        lines.append(f"    {old.value} --> {new.value}: {', '.join(events)}")
    lines.append("```")
    return "\n".join(lines)


def describe() -> str:
    """Diagrams and markdown tables of both roles, for the README."""
    lines: list[str] = []
    for role in ("primary", "backup"):
        lines += [f"#### {role.capitalize()}", "", mermaid(role), ""]
        lines += ["| stage | event | next stage |", "| --- | --- | --- |"]
        for stage, edges in TRANSITIONS[role].items():
            for event, new in edges.items():
                lines.append(f"| {stage.value} | {event.value} | {new.value} |")
        lines += ["", "| stage | reads | writes |", "| --- | --- | --- |"]
        for stage, rule in ACCEPTANCE[role].items():
            lines.append(f"| {stage.value} | {rule.reads.value} | {rule.writes.value} |")
        lines.append("")
    return "\n".join(lines)


BEGIN_MARK = "<!-- stage tables: generated by `python -m pbkv.stages --readme README.md` -->"
END_MARK = "<!-- end of stage tables -->"


def with_tables(readme: str) -> str:
    """The README text with its generated section replaced by the current tables."""
    head, rest = readme.split(BEGIN_MARK, 1)
    _, tail = rest.split(END_MARK, 1)
    return f"{head}{BEGIN_MARK}\n{describe()}\n{END_MARK}{tail}"


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--readme":
        from pathlib import Path

        path = Path(sys.argv[2])
        path.write_text(with_tables(path.read_text()))
    else:
        print(describe())
