"""Between a member's leadership and its replication core: the pure glue.

A member's driver (``pbkv.member`` against etcd and asyncio, the failover
simulation against the etcd model on virtual time) does the same things between
:class:`pbkv.leadership.Leadership` and whichever core holds the store, and they
live here so that both do them alike:

- the **gate**: a member answers a client only while the leadership says it may
  serve (:meth:`Membership.may_serve`), and the primary's core acknowledges a
  write its backup acknowledged only with the leadership's leave
  (:meth:`Membership.authority`, the core's ``authority``);
- the **news from the core** as leadership events: a primary's in-sync backup,
  as ``BackupInSync`` / ``BackupLost`` each time it changes
  (:meth:`Membership.replication_events`); anyone else's copy, as
  ``CopyChanged`` each time it changes (:meth:`Membership.copy_events`);
- **feeding** the leadership: events raised while its actions are carried out (a
  role change tells it about the copy) queue behind the one being handled
  (:meth:`Membership.feed`);
- **which member the primary brings in sync** (:meth:`Membership.choose_backup`):
  the one tried least since a backup last came in sync, the recorded one first.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable

from pbkv.backup import BackupCore
from pbkv.leadership import (
    Action,
    BackupInSync,
    BackupLost,
    CopyChanged,
    Event,
    Holding,
    Leadership,
    Role,
    Started,
    address_of,
)
from pbkv.primary import PrimaryCore

__all__ = ["Membership", "holding_of", "parse_address"]

Core = PrimaryCore | BackupCore


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (a member's address, as its name and the settings give it)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"an address is HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def holding_of(core: Core) -> Holding:
    """What ``core``'s store holds, as the leadership sees it.  A copy recovered from
    this member's own disk counts as complete: it is the copy the member held when it
    stopped (it acknowledged no batch before logging it, and a restarted member keeps
    its name only with the data it wrote: ``Persistence.member_run_id``)."""
    return Holding(core.confirmed or core.recovered, core.copy_epoch, core.history, core.seq)


class Membership:
    """One member's glue; ``carry_out`` does what the leadership's actions say."""

    def __init__(
        self, leadership: Leadership, name: str, carry_out: Callable[[Action], None]
    ) -> None:
        self.leadership = leadership
        self.name = name
        self._carry_out = carry_out
        self._reported_backup: str | None = None
        self._reported_holding: Holding | None = None
        self._events: collections.deque[Event] = collections.deque()
        self._handling = False
        # Connection attempts per member since a backup last came in sync.
        self._tries: collections.Counter[tuple[str, int]] = collections.Counter()

    # -- the gate ------------------------------------------------------------------------
    def may_serve(self, now: float) -> bool:
        """Whether this member may answer a client (reads and writes) now."""
        return self.leadership.may_serve(now)

    def authority(self, now: float, backup: str) -> bool:
        """Whether a write ``backup`` acknowledged may be acknowledged (the primary's core)."""
        return self.leadership.may_acknowledge(now, backup)

    # -- feeding the leadership -------------------------------------------------------------
    def started(self, now: float, core: Core) -> Started:
        """The first event, with what ``core``'s store holds."""
        holding = self._reported_holding = holding_of(core)
        return Started(now, self.name, holding)

    def feed(self, event: Event) -> bool:
        """Hand ``event`` to the leadership and carry out what it says; events fed while
        doing so queue behind it. True when this call handled them (the caller then
        does what follows a change: flush held writes, plan the next tick); False when
        ``event`` was queued behind one being handled."""
        self._events.append(event)
        if self._handling:
            return False
        self._handling = True
        try:
            while self._events:
                for action in self.leadership.handle(self._events.popleft()):
                    self._carry_out(action)
        finally:
            self._handling = False
        return True

    # -- news from the core -------------------------------------------------------------------
    def replication_events(self, core: Core, now: float) -> list[Event]:
        """The core's news (its ``SyncChanged``): on a primary, the in-sync backup that
        changed; on anyone else, the copy (see :meth:`copy_events`)."""
        if not isinstance(core, PrimaryCore):
            return self.copy_events(core, now)
        backup = core.in_sync_backup
        if backup is not None:
            self._tries.clear()
        if backup == self._reported_backup:
            return []
        events: list[Event] = []
        previous, self._reported_backup = self._reported_backup, backup
        if previous is not None:
            events.append(BackupLost(now, previous))
        if backup is not None:
            events.append(BackupInSync(now, backup))
        return events

    def copy_events(self, core: Core, now: float) -> list[Event]:
        """``CopyChanged`` if what ``core``'s store holds changed since last said."""
        holding = holding_of(core)
        if holding == self._reported_holding:
            return []
        self._reported_holding = holding
        return [CopyChanged(now, holding)]

    def role_changed(self) -> None:
        """Promoted or fenced: the new primary (or none) has no backup in sync yet."""
        self._reported_backup = None

    # -- the primary's choice of backup ---------------------------------------------------------
    def follow_target(self) -> str | None:
        """The member a spare follows (``follower.py``): the backup recorded in sync
        under the epoch of the primary we follow (None: no spare, or nobody to follow)."""
        leadership = self.leadership
        leader, record = leadership.leader, leadership.record
        if leadership.role is not Role.SPARE or leader is None or record is None:
            return None
        backup = record.backup
        if backup is None or record.epoch != leader.epoch or backup in (leader.member, self.name):
            return None
        return address_of(backup)

    def choose_backup(
        self,
        own: tuple[str, int],
        registered_members: list[str],
        followers: frozenset[str] = frozenset(),
    ) -> tuple[str, int] | None:
        """The member the primary connects to next, of those registered in etcd (None:
        no other is).

        The one tried least often since a backup last came in sync; among those the
        recorded backup first (its copy is likely whole: a skip or a rollback rather
        than a transfer), then the others in the order they registered. So a
        recorded backup that cannot be reached (a partition) is left for a spare
        after one attempt. Then the ``followers`` (member names) that followed this
        member's copy while it was a backup: they catch up by the batches they lack."""
        registered: list[tuple[str, int]] = []
        for member in registered_members:
            with contextlib.suppress(ValueError):
                parsed = parse_address(address_of(member))
                if parsed != own and parsed not in registered:
                    registered.append(parsed)
        if not registered:
            return None
        recorded: tuple[str, int] | None = None
        record = self.leadership.record
        if record is not None and record.backup is not None:
            with contextlib.suppress(ValueError):
                recorded = parse_address(address_of(record.backup))
        followed: set[tuple[str, int]] = set()
        for member in followers:
            with contextlib.suppress(ValueError):
                followed.add(parse_address(address_of(member)))
        tries = self._tries
        choice = min(
            registered,
            key=lambda address: (tries[address], address != recorded, address not in followed),
        )
        tries[choice] += 1
        return choice
