"""What a replication core asks of its driver, and the one way to carry it out.

The cores are sans-I/O: they queue these actions in ``outbox``; a driver
(``node.py`` for real sockets, the simulator and the core tests for theirs)
implements :class:`Driver` and hands the actions to :func:`carry_out`.

* ``Send(frame)``: write a frame on the replication channel.
* ``Connect()`` / ``Probe()``: open the channel to the backup / look whether
  the primary answers; the driver reports back with ``channel_opened`` /
  ``channel_failed`` or ``probe_result``.
* ``CloseChannel(reason)``: close it; the driver reports nothing more for it.
* ``StartTimer(name, delay)``: call ``timer_fired(name)`` after ``delay``
  (restarting a timer of the same name replaces it).
* ``Respond(reply, outcome)``: a client request queued earlier is answered:
  ``reply`` is the callable its driver passed to ``submit``.
* ``PumpTransfer()``: call ``pump_transfer()`` until it returns False,
  yielding to other work (and socket back-pressure) between calls.
* ``FlushSoon()``: call ``flush()`` once the events already waiting are
  handled (one turn of the event loop): every write submitted until then
  travels in the same batch.
* ``SecureChannel(send_key, receive_key)``: from now on, frames both ways are
  keyed (``wire.FrameCodec.secure``); frames sent before this action stay plain.
* ``Discard(shards)``: drop these dicts of pairs (a replaced copy of the data),
  one per turn of the event loop, so freeing millions of pairs never stalls it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from pbkv.commands import Outcome
from pbkv.wire import Frame


class Driver(Protocol):
    def send(self, frame: Frame) -> None: ...

    def connect(self) -> None: ...

    def probe(self) -> None: ...

    def close_channel(self, reason: str) -> None: ...

    def start_timer(self, name: str, delay: float) -> None: ...

    def pump_transfer(self) -> None: ...

    def flush_soon(self) -> None: ...

    def secure_channel(self, send_key: bytes, receive_key: bytes) -> None: ...

    def discard(self, shards: list[dict[str, str]]) -> None: ...


@dataclass(frozen=True, slots=True)
class Send:
    frame: Frame

    def apply(self, driver: Driver) -> None:
        driver.send(self.frame)


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
    name: str
    delay: float

    def apply(self, driver: Driver) -> None:
        driver.start_timer(self.name, self.delay)


@dataclass(frozen=True, slots=True)
class Respond:
    reply: Callable[[Outcome], None]
    outcome: Outcome

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


@dataclass(frozen=True, slots=True)
class SecureChannel:
    send_key: bytes = field(repr=False)
    receive_key: bytes = field(repr=False)

    def apply(self, driver: Driver) -> None:
        driver.secure_channel(self.send_key, self.receive_key)


@dataclass(frozen=True, slots=True)
class Discard:
    shards: list[dict[str, str]] = field(repr=False)

    def apply(self, driver: Driver) -> None:
        driver.discard(self.shards)


Action = (
    Send
    | Connect
    | Probe
    | CloseChannel
    | StartTimer
    | Respond
    | PumpTransfer
    | FlushSoon
    | SecureChannel
    | Discard
)


def carry_out(actions: Iterable[Action], driver: Driver) -> None:
    for action in actions:
        action.apply(driver)
