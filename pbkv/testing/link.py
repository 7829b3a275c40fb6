"""The simulated replication link: virtual time, processes that drive a core, channels.

What the deterministic simulations share (``pbkv.testing.sim``, two processes with
fixed roles; ``pbkv.testing.failover_sim``, members whose core changes with their
role): a :class:`Network` keeps virtual time and a queue of events, and carries
bytes over :class:`Channel` s (TCP connections: in order within one, each frame
after a drawn latency, silently black-holed once a partition ate some of them, a
close noticed by the peer unless the FIN is lost too). A :class:`Process` is one
server process as a core's driver (``actions.Driver``): its events run in its
current life only (a crash drops what was on its way), wait while it is paused,
and its timers, transfer pump and batch flushes are events on the same queue.

Subclasses say how a process connects, probes and reports a change of sync, and
what its clock reads; the network subclass says how long a frame takes and who
reaches whom.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from pbkv.actions import Timer
from pbkv.backup import BackupCore
from pbkv.primary import PrimaryCore

__all__ = ["Channel", "Network", "Process"]


@dataclass(eq=False)
class Channel:
    """One TCP connection between two processes (``ends``: the dialer, the listener)."""

    id: int
    ends: tuple[Process, Process]
    open_at: dict[Process, bool] = field(default_factory=dict)
    closed: bool = False
    black_holed: bool = False  # a partition ate some bytes: nothing more gets through
    last_delivery: dict[Process, float] = field(default_factory=dict)

    def peer(self, end: Process) -> Process:
        first, second = self.ends
        return second if end is first else first


class Network:
    """Virtual time, the event queue, and the channels' delivery."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()

    # -- scheduling ----------------------------------------------------------------
    def schedule(self, delay: float, event: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (self.now + delay, next(self._counter), event))

    def run_until(self, deadline: float, stop: Callable[[], bool] | None = None) -> bool:
        while self._queue and self._queue[0][0] <= deadline:
            when, _, event = heapq.heappop(self._queue)
            self.now = when
            self.before_event()
            event()
            if stop is not None and stop():
                return True
        self.now = max(self.now, deadline)
        return stop() if stop is not None else True

    def before_event(self) -> None:
        """Called with ``now`` set, before each event runs."""

    def tiny(self) -> float:
        return self.rng.uniform(0.0001, 0.002)

    # -- what a subclass decides -----------------------------------------------------
    def latency(self) -> float:
        raise NotImplementedError

    def reachable(self, a: Process, b: Process) -> bool:
        return True

    def trace(self, text: str) -> None:
        """A line of the run's trace (none by default)."""

    # -- channels --------------------------------------------------------------------
    def open_channel(self, dialer: Process, listener: Process, ident: int, timeout: float) -> None:
        """``dialer`` (a primary's core asked to connect) opens a channel to ``listener``:
        refused at once when it is down, timed out when it cannot be reached or is paused,
        closed during the upgrade when it is no backup; else both cores hear of it."""
        core = dialer.core
        if not listener.alive or not self.reachable(dialer, listener) or listener.paused:
            delay = 0.001 if not listener.alive else timeout
            reason = "refused" if not listener.alive else "timed out"

            def failed() -> None:
                if dialer.core is core:  # else the role changed meanwhile: moot
                    dialer.primary.channel_failed(dialer.clock(), reason)

            dialer.deliver(delay, failed)
            return
        channel = Channel(ident, (dialer, listener))

        def listener_accepts() -> None:
            if channel.closed:
                return
            core = listener.core
            if not isinstance(core, BackupCore):  # a member that leads takes no channel
                channel.closed = True
                return
            core.channel_opened(listener.clock(), channel.id)
            channel.open_at[listener] = True
            if channel.id in core.candidates:  # with a secret: it proves it first
                listener.candidates[channel.id] = channel
                listener.drain()
            else:
                listener.drain()  # closes the channel this one replaces
                listener.channel = channel

        def dialer_opens() -> None:
            if dialer.core is not core:
                self.close_channel(channel, dialer)  # the role changed meanwhile
                return
            if channel.closed or not channel.open_at.get(listener):
                dialer.primary.channel_failed(dialer.clock(), "upgrade failed")
                return
            dialer.channel = channel
            channel.open_at[dialer] = True
            dialer.primary.channel_opened(dialer.clock())

        first = self.latency()
        listener.deliver(first, listener_accepts)
        dialer.deliver(first + self.latency(), dialer_opens)

    def transmit(self, channel: Channel, sender: Process, data: bytes) -> None:
        """``sender`` writes ``data`` on ``channel``."""
        if channel.closed:
            return
        receiver = channel.peer(sender)
        if not self.reachable(sender, receiver):
            channel.black_holed = True
        if channel.black_holed:
            return
        self.deliver_on(channel, receiver, data)

    def deliver_on(self, channel: Channel, receiver: Process, data: bytes) -> None:
        """``data`` arrives at ``receiver`` on ``channel``, after what was sent before."""
        # TCP keeps order within a connection.
        at = max(self.now + self.latency(), channel.last_delivery.get(receiver, 0.0))
        channel.last_delivery[receiver] = at

        def arrive() -> None:
            if channel.closed:
                return
            if receiver.channel is channel:
                receiver.running.bytes_received(receiver.clock(), data)
            elif receiver.candidates.get(channel.id) is channel:
                receiver.backup.candidate_bytes(receiver.clock(), channel.id, data)

        receiver.deliver(at - self.now, arrive)

    def close_channel(self, channel: Channel, closer: Process) -> None:
        if channel.closed:
            return
        channel.closed = True
        other = channel.peer(closer)
        if channel.black_holed or not self.reachable(closer, other):
            return  # the FIN is lost too: the peer notices by silence
        at = max(self.now + self.latency(), channel.last_delivery.get(other, 0.0))

        def notice() -> None:
            if other.channel is channel:
                other.channel = None
                other.running.channel_closed(other.clock(), "connection closed by peer")
            elif other.candidates.get(channel.id) is channel:
                del other.candidates[channel.id]
                other.backup.candidate_closed(other.clock(), channel.id)

        other.deliver(at - self.now, notice)


class Process:
    """One server process driving a replication core on a :class:`Network`."""

    def __init__(self, network: Network) -> None:
        self.network = network
        self.core: PrimaryCore | BackupCore | None = None
        self.life = 0  # bumps on every crash: events of an earlier life are dropped
        self.paused = False
        self.deferred: list[Callable[[], None]] = []
        self.timers: dict[Timer, int] = {}
        self._timer_numbers = itertools.count(1)
        self.channel: Channel | None = None
        # A backup with a secret: channels still proving it, by their id.
        self.candidates: dict[int, Channel] = {}
        self.pumping = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"

    @property
    def label(self) -> str:
        return hex(id(self))

    @property
    def alive(self) -> bool:
        return self.core is not None

    @property
    def running(self) -> PrimaryCore | BackupCore:
        """The core of a process that is up (events reach only those)."""
        assert self.core is not None, f"{self.label} is down"
        return self.core

    @property
    def primary(self) -> PrimaryCore:
        core = self.running
        assert isinstance(core, PrimaryCore)
        return core

    @property
    def backup(self) -> BackupCore:
        core = self.running
        assert isinstance(core, BackupCore)
        return core

    def clock(self) -> float:
        """What the process's monotonic clock reads now."""
        return self.network.now

    # -- lifecycle -------------------------------------------------------------------
    def reset_driver(self) -> None:
        """A new process: no timers, channels or transfer of the previous one."""
        self.timers.clear()
        self.channel = None
        self.candidates.clear()
        self.pumping = False

    def crash(self) -> None:
        network = self.network
        network.trace(f"{self.label} crashes")
        self.core = None
        self.life += 1
        self.paused = False
        self.deferred.clear()
        if self.channel is not None:
            network.close_channel(self.channel, self)
            self.channel = None
        for candidate in self.candidates.values():
            network.close_channel(candidate, self)
        self.candidates.clear()

    def pause(self) -> None:
        self.network.trace(f"{self.label} paused")
        self.paused = True

    def resume(self) -> None:
        self.network.trace(f"{self.label} resumed")
        self.paused = False
        deferred, self.deferred = self.deferred, []
        for event in deferred:
            event()

    # -- event delivery ----------------------------------------------------------------
    def deliver(self, delay: float, event: Callable[[], None]) -> None:
        """Run ``event`` on this process after ``delay``, in this life only."""
        life = self.life

        def run() -> None:
            if self.life != life or self.core is None:
                return
            if self.paused:
                self.deferred.append(run)
                return
            event()
            self.drain()

        self.network.schedule(delay, run)

    def drain(self) -> None:
        core = self.core
        if core is not None:
            core.drain(self)
        self.drained()

    def drained(self) -> None:
        """After each event's actions were carried out."""

    # -- actions.Driver ------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        if self.channel is not None:
            self.network.transmit(self.channel, self, data)

    def discard(self, shards: list[dict[str, str]]) -> None:
        shards.clear()  # simulated time: freeing costs nothing here

    def start_timer(self, timer: Timer, delay: float) -> None:
        generation = self.timers[timer] = next(self._timer_numbers)

        def fire() -> None:
            if self.timers.get(timer) == generation:
                self.running.timer_fired(self.clock(), timer)

        self.deliver(delay, fire)

    def close_channel(self, reason: str) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            self.network.close_channel(channel, self)

    def send_to_candidate(self, candidate: int, data: bytes) -> None:
        channel = self.candidates.get(candidate)
        if channel is not None:
            self.network.transmit(channel, self, data)

    def close_candidate(self, candidate: int, reason: str) -> None:
        channel = self.candidates.pop(candidate, None)
        if channel is not None:
            self.network.close_channel(channel, self)

    def promote(self, candidate: int) -> None:
        channel = self.candidates.pop(candidate, None)
        if channel is not None:
            self.channel = channel

    def pump_transfer(self) -> None:
        if not self.pumping:
            self.pumping = True
            self.deliver(self.network.tiny(), self.pump)

    def flush_soon(self) -> None:
        self.deliver(self.network.tiny(), self.flush)

    def pump(self) -> None:
        more = self.running.pump_transfer(self.clock(), 3)
        if more:
            self.deliver(self.network.tiny(), self.pump)
        else:
            self.pumping = False

    def flush(self) -> None:
        self.primary.flush(self.clock())

    def connect(self) -> None:
        raise NotImplementedError

    def probe(self) -> None:
        raise NotImplementedError

    def sync_changed(self) -> None:
        raise NotImplementedError
