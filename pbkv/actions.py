"""What a replication core asks of its driver, and the one way to carry it out.

The cores are sans-I/O: they queue these actions in ``outbox``; a driver
(``node.py`` for real sockets, the simulator and the core tests for theirs)
implements :class:`Driver` and hands the actions to :func:`carry_out`.

* ``Send(data, frame)``: write ``data`` on the replication channel: ``frame``
  as the core encoded it (plain or keyed: the core holds the channel's codec);
  ``frame`` itself is there for observers (tests, traces), not to be encoded again.
* ``Connect()`` / ``Probe()``: open the channel to the backup / look whether
  the primary answers; the driver reports back with ``channel_opened`` /
  ``channel_failed`` or ``probe_result``.
* ``CloseChannel(reason)``: close it; the driver reports nothing more for it.
* ``StartTimer(timer, delay)``: call ``timer_fired(timer)`` after ``delay``
  (restarting the same timer replaces it); a core refuses a timer it never starts.
* ``Respond(reply, outcome)``: a client request queued earlier is answered:
  ``reply`` is the callable its driver passed to ``submit``.
* ``PumpTransfer()``: call ``pump_transfer()`` until it returns False,
  yielding to other work (and socket back-pressure) between calls.
* ``FlushSoon()``: call ``flush()`` once the events already waiting are
  handled (one turn of the event loop): every write submitted until then
  travels in the same batch.
* ``SendToCandidate(candidate, data, frame)`` / ``CloseCandidate(candidate, reason)``
  / ``Promote(candidate)``: a backup with a secret holds new channels apart until
  they prove it (``candidates.py``): write on candidate channel ``candidate`` (the
  number the driver gave ``channel_opened``), close it alone, or make it the
  channel (the core closed the one it replaces just before).  The driver reports
  the bytes of a candidate with ``candidate_bytes`` and its loss with
  ``candidate_closed``.
* ``Discard(shards)``: drop these dicts of pairs (a replaced copy of the data),
  one per turn of the event loop, so freeing millions of pairs never stalls it.
* ``Persist(record)`` / ``PersistAll(state)`` (only with ``persistence`` set): log
  this record (a batch applied, a rollback, a sync that kept the data), or write
  the whole store, which now holds data that replaces everything (a full
  transfer, a fetch, an empty start), as the new base at ``state``.  A driver
  that keeps no files ignores them; one that does must not let a client's
  reply or a backup's frame that follows them out before they are durable
  (with ``always``; see ``pbkv/persist/driver.py``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from pbkv.commands import Outcome
from pbkv.persist.log import Record, State
from pbkv.wire import Frame


class Timer(enum.Enum):
    TICK = "tick"  # both: heartbeats, and giving up on a silent peer
    RETRY = "retry"  # primary: connect to the backup again
    WAIT_PRIMARY = "wait_primary"  # backup: a primary that a probe found, or that left


class Driver(Protocol):
    def send(self, data: bytes) -> None: ...

    def connect(self) -> None: ...

    def probe(self) -> None: ...

    def close_channel(self, reason: str) -> None: ...

    def start_timer(self, timer: Timer, delay: float) -> None: ...

    def pump_transfer(self) -> None: ...

    def flush_soon(self) -> None: ...

    def discard(self, shards: list[dict[str, str]]) -> None: ...

    def send_to_candidate(self, candidate: int, data: bytes) -> None: ...

    def close_candidate(self, candidate: int, reason: str) -> None: ...

    def promote(self, candidate: int) -> None: ...

    def sync_changed(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes = field(repr=False)
    frame: Frame

    def __init__(self, data: bytes, frame: Frame) -> None:  # compiled: see ``compiled.py``
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "frame", frame)

    def apply(self, driver: Driver) -> None:
        driver.send(self.data)


@dataclass(frozen=True, slots=True)
class Connect:
    def apply(self, driver: Driver) -> None:
        driver.connect()


@dataclass(frozen=True, slots=True)
class Probe:
    def apply(self, driver: Driver) -> None:
        driver.probe()


@dataclass(frozen=True, slots=True)
class CloseChannel:
    reason: str

    def apply(self, driver: Driver) -> None:
        driver.close_channel(self.reason)


@dataclass(frozen=True, slots=True)
class StartTimer:
    timer: Timer
    delay: float

    def apply(self, driver: Driver) -> None:
        driver.start_timer(self.timer, self.delay)


@dataclass(frozen=True, slots=True)
class Respond:
    reply: Callable[[Outcome], None]
    outcome: Outcome

    def __init__(self, reply: Callable[[Outcome], None], outcome: Outcome) -> None:
        object.__setattr__(self, "reply", reply)  # compiled: see ``compiled.py``
        object.__setattr__(self, "outcome", outcome)

    def apply(self, driver: Driver) -> None:
        self.reply(self.outcome)


@dataclass(frozen=True, slots=True)
class PumpTransfer:
    def apply(self, driver: Driver) -> None:
        driver.pump_transfer()


@dataclass(frozen=True, slots=True)
class FlushSoon:
    def apply(self, driver: Driver) -> None:
        driver.flush_soon()


FLUSH_SOON = FlushSoon()  # it holds nothing: one serves every batch


@dataclass(frozen=True, slots=True)
class Discard:
    shards: list[dict[str, str]] = field(repr=False)

    def apply(self, driver: Driver) -> None:
        driver.discard(self.shards)


@dataclass(frozen=True, slots=True)
class SendToCandidate:
    candidate: int
    data: bytes = field(repr=False)
    frame: Frame

    def apply(self, driver: Driver) -> None:
        driver.send_to_candidate(self.candidate, self.data)


@dataclass(frozen=True, slots=True)
class CloseCandidate:
    candidate: int
    reason: str

    def apply(self, driver: Driver) -> None:
        driver.close_candidate(self.candidate, self.reason)


@dataclass(frozen=True, slots=True)
class Promote:
    candidate: int

    def apply(self, driver: Driver) -> None:
        driver.promote(self.candidate)


@dataclass(frozen=True, slots=True)
class SyncChanged:
    """Who is in sync changed: the primary's backup, or the backup's confirmed copy
    (with a coordinator, the driver tells the leadership; without one, nothing)."""

    def apply(self, driver: Driver) -> None:
        driver.sync_changed()


@dataclass(frozen=True, slots=True)
class Persist:
    record: Record = field(repr=False)

    def __init__(self, record: Record) -> None:  # compiled: see ``compiled.py``
        object.__setattr__(self, "record", record)

    def apply(self, driver: Driver) -> None:
        persist = getattr(driver, "persist", None)  # drivers without files: nothing
        if persist is not None:
            persist(self.record)


@dataclass(frozen=True, slots=True)
class PersistAll:
    state: State

    def apply(self, driver: Driver) -> None:
        persist_all = getattr(driver, "persist_all", None)
        if persist_all is not None:
            persist_all(self.state)


Action = (
    Send
    | Connect
    | Probe
    | CloseChannel
    | StartTimer
    | Respond
    | PumpTransfer
    | FlushSoon
    | Discard
    | SendToCandidate
    | CloseCandidate
    | Promote
    | SyncChanged
    | Persist
    | PersistAll
)


def carry_out(actions: Iterable[Action], driver: Driver) -> None:
    for action in actions:
        action.apply(driver)
