"""The primary's and the backup's replication cores, wired together by hand.

The cores are sans-I/O: they take events (a frame arrived, a timer fired, a
client request came in) and queue actions.  ``Link`` plays the driver for
both: it carries the bytes of every ``Send`` (encoded by the core, plain or
keyed) to the other core, opens and closes the channel, answers probes, pumps transfers and
collects the answers to client requests.  Time is a number the test moves.
Nothing here sleeps or touches a socket.
"""

from __future__ import annotations

import copy
import gc
import itertools
import logging
import random
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import pytest

from pbkv.actions import Send, SendToCandidate, Timer
from pbkv.backup import BackupCore
from pbkv.commands import (
    REPLICATION_FAILED,
    Command,
    Counted,
    Done,
    Dumped,
    KeyReused,
    Loaded,
    MemoryFull,
    Outcome,
    Refused,
)
from pbkv.config import Settings
from pbkv.core import BATCH_WRITES
from pbkv.idempotency import ENTRY_OVERHEAD
from pbkv.persist.log import Record, RecordKind
from pbkv.persist.log import State as DiskState
from pbkv.persist.table import batch_extra, batch_of
from pbkv.primary import PrimaryCore
from pbkv.roles import promoted
from pbkv.stages import Copy, Directive, ProtocolError, Role, Stage, State, plan
from pbkv.store import PAIR_OVERHEAD, ShardedStore, make_store, shard_of
from pbkv.wire import (
    Ack,
    Batch,
    Catchup,
    Frame,
    FrameCodec,
    FrameError,
    FrameType,
    ShardChunk,
    checksum_to_bytes,
    encode,
)
from tests.support.census import python_in_compiled_modules

SHARDS = 4
ROLES = ("primary", "backup")
PRIMARY_ADDRESS = "127.0.0.1:8080"

S = Stage
GET, INSERT, UPDATE, DELETE = Command.GET, Command.INSERT, Command.UPDATE, Command.DELETE
COUNT, DUMP = Command.COUNT, Command.DUMP
TICK, RETRY = Timer.TICK, Timer.RETRY

_TRANSITION = re.compile(
    r"^(primary|backup) stage (\w+) -> (\w+) \((.*)\) peer=(?:primary|backup)$", re.S
)


def make_settings(**overrides: Any) -> Settings:
    # One batch in flight keeps frame counts simple; the window has its own test.
    values: dict[str, Any] = {"shards": SHARDS, "transfer_chunk": 2, "batches_in_flight": 1}
    values.update(overrides)
    return Settings(**values)


def new_store() -> ShardedStore:
    return make_store("sharded", SHARDS)


def peer_of(role: str) -> str:
    return Role(role).peer


Core = PrimaryCore | BackupCore


class Link:
    """Both drivers at once: a FIFO byte channel between the two cores."""

    def __init__(self, caplog: pytest.LogCaptureFixture, settings: Settings) -> None:
        self.caplog = caplog
        self.settings = settings
        self.rng = random.Random(7)
        self.now = 0.0
        self.cores: dict[str, Core] = {}
        self.unreachable: set[str] = set()  # alive, but connecting to it fails
        self.primary_answers_probe: bool | None = None  # None: whether it runs
        self.connected = False
        # With a secret, the backup's number for the connection until it proved it.
        self.candidate: int | None = None
        self._channel_numbers = itertools.count(1)
        # Channels an attacker opened to the backup: what the backup sent on each.
        self.intruders: dict[int, list[Frame]] = {}
        # To each role: the bytes of one frame, and the frame (None: forged bytes).
        self.pipes: dict[str, deque[tuple[bytes, Frame | None]]] = {r: deque() for r in ROLES}
        self.timers: dict[str, dict[Timer, float]] = {role: {} for role in ROLES}
        # Faults the test switches on.
        self.paused: set[str] = set()  # frames to these roles wait in the pipe
        self.lossy: set[str] = set()  # frames from these roles vanish
        self.tamper: Callable[[str, Frame], Frame] | None = None
        self.corrupt: Callable[[str, Frame, bytes], bytes] | None = None
        self.manual_pump = False
        self.pumping: set[str] = set()
        # What happened.
        self.sent: dict[str, list[Frame]] = {role: [] for role in ROLES}
        self.received: dict[str, list[Frame]] = {role: [] for role in ROLES}
        self.closed_by: list[tuple[str, str]] = []
        self.timer_starts: list[tuple[str, Timer, float]] = []
        self.discarded: dict[str, list[int]] = {role: [] for role in ROLES}  # pairs per Discard
        self.responses: dict[Any, Outcome] = {}
        self.answer_order: list[Any] = []
        # With persistence: what each role asked to log, in order, with what it had sent
        # and the primary had answered by then (nothing that acknowledges may come first).
        self.persisted: dict[str, list[tuple[int, int, Record | DiskState]]] = {
            role: [] for role in ROLES
        }
        self._tokens = itertools.count(1)

    # -- processes ---------------------------------------------------------------------
    @property
    def primary(self) -> PrimaryCore:
        core = self.cores["primary"]
        assert isinstance(core, PrimaryCore)
        return core

    @property
    def backup(self) -> BackupCore:
        core = self.cores["backup"]
        assert isinstance(core, BackupCore)
        return core

    def start_primary(self, settings: Settings | None = None, epoch: int = 0) -> PrimaryCore:
        """A primary; ``epoch``: the coordinator's leader key it holds (0: no coordinator)."""
        core = PrimaryCore(
            settings or self.settings, new_store(), self.now, random.Random(self.rng.random())
        )
        if epoch:
            core.serve_epoch(self.now, epoch)
        self._start("primary", core)
        return core

    def start_backup(self, settings: Settings | None = None) -> BackupCore:
        core = BackupCore(
            settings or self.settings, new_store(), self.now, random.Random(self.rng.random())
        )
        self._start("backup", core)
        return core

    def _start(self, role: str, core: Core) -> None:
        assert role not in self.cores, f"the {role} is already running"
        self.cores[role] = core
        self.timers[role] = {}
        core.start(self.now)
        self.run()

    def kill(self, role: str) -> Core:
        """``kill -9``: the process and its memory are gone; the peer sees a reset."""
        core = self.cores.pop(role)
        core.take_actions()
        self.timers[role] = {}
        self.pumping.discard(role)
        if self.connected:
            self.reset(notify=(peer_of(role),), reason="connection reset by peer")
        self.run()
        return core

    # -- the channel -------------------------------------------------------------------
    def reset(self, notify: Iterable[str] = ROLES, reason: str = "connection reset") -> None:
        """The connection breaks; frames in flight are lost; ``notify`` learn of it."""
        self._disconnect()
        candidate = self.candidate
        self._disconnect()
        for role in notify:
            core = self.cores.get(role)
            if core is None:
                continue
            if role == "backup" and candidate is not None:
                self.backup.candidate_closed(self.now, candidate)
            else:
                core.channel_closed(self.now, reason)
        self.run()

    def _disconnect(self) -> None:
        self.connected = False
        self.candidate = None
        for role in ROLES:
            self.pipes[role].clear()

    def _close_from(self, closer: str, reason: str) -> None:
        """An orderly close: what the closer sent still arrives, then EOF."""
        other = peer_of(closer)
        pending = list(self.pipes[other])
        candidate = self.candidate
        self._disconnect()
        core = self.cores.get(other)
        if core is None:
            return
        if other == "backup" and candidate is not None:
            for data, _ in pending:
                self.backup.candidate_bytes(self.now, candidate, data)
            self.backup.candidate_closed(self.now, candidate)
            return
        for data, frame in pending:
            if frame is not None and core.channel_up:
                self.received[other].append(frame)
            core.bytes_received(self.now, data)
        core.channel_closed(self.now, f"{closer} closed the channel: {reason}")

    def _connect(self) -> None:
        primary = self.primary
        backup = self.cores.get("backup")
        if backup is None or "backup" in self.unreachable:
            primary.channel_failed(self.now, "connection refused")
            return
        if self.lossy:
            primary.channel_failed(self.now, "timed out")
            return
        # A new connection; the backup closes one it replaces before this one is used.
        self._disconnect()
        number = next(self._channel_numbers)
        backup.channel_opened(self.now, number)
        backup.drain(self.drivers["backup"])
        self.connected = True
        if number in backup.candidates:
            self.candidate = number
        primary.channel_opened(self.now)

    def _transmit(self, source: str, send: Send | SendToCandidate) -> None:
        frame, data = send.frame, send.data
        self.sent[source].append(copy.deepcopy(frame))
        if not self.connected or source in self.lossy:
            return
        if self.tamper is not None:
            assert self.cores[source].secret is None, "tampering needs plain frames"
            frame = self.tamper(source, copy.deepcopy(frame))
            data = encode(frame)
        if self.corrupt is not None:
            data = self.corrupt(source, frame, data)
        self.pipes[peer_of(source)].append((data, frame))

    def _deliver_one(self) -> bool:
        for role in ROLES:
            if role in self.paused or not self.pipes[role]:
                continue
            data, frame = self.pipes[role].popleft()
            core = self.cores[role]
            if role == "backup" and self.candidate is not None:
                self.backup.candidate_bytes(self.now, self.candidate, data)
                return True
            if frame is not None and core.channel_up:
                self.received[role].append(frame)
            # The core decodes (bounded by what its step accepts) and closes on garbage.
            core.bytes_received(self.now, data)
            return True
        return False

    def intrude(self) -> int:
        """An attacker opens a channel to the backup from the primary's address."""
        number = next(self._channel_numbers)
        self.intruders[number] = []
        self.backup.channel_opened(self.now, number)
        self.run()
        return number

    def intruder_sends(self, number: int, *frames: list[Any]) -> None:
        """Frames on an attacker's channel, through the backup's real codec."""
        self.backup.candidate_bytes(self.now, number, b"".join(map(encode, frames)))
        self.run()

    def inject(self, role: str, frame: list[Any], epoch: int = 0) -> None:
        """A frame from nowhere (a confused or malicious peer), through the real codec."""
        (decoded,) = FrameCodec().feed(encode(frame, epoch))
        self.cores[role].frame_received(self.now, decoded)
        self.run()

    # -- the driver loop ---------------------------------------------------------------
    @property
    def drivers(self) -> dict[str, RoleDriver]:
        return {role: RoleDriver(self, role) for role in ROLES}

    def run(self) -> None:
        """Carry out actions and deliver frames until nothing moves."""
        for _ in range(1_000_000):
            moved = False
            for role in ROLES:
                core = self.cores.get(role)
                if core is None:
                    continue
                driver = RoleDriver(self, role)
                while core.outbox:
                    moved = True
                    for action in core.take_actions():
                        if type(action) is SendToCandidate and action.candidate in self.intruders:
                            self.intruders[action.candidate].append(action.frame)
                        elif type(action) in (Send, SendToCandidate):  # the frame too
                            self._transmit(role, action)
                        else:
                            action.apply(driver)
            if not moved and not self._deliver_one():
                return
        raise AssertionError("the cores never went quiet")

    def pump(self, role: str, frames: int = 1) -> bool:
        """One step of a manual transfer; False once the sender is done."""
        more = self.cores[role].pump_transfer(self.now, frames)
        if not more:
            self.pumping.discard(role)
        self.run()
        return more

    def fire(self, role: str, timer: Timer) -> None:
        """``timer`` of ``role`` fires now (whether it was due or not)."""
        self.timers[role].pop(timer, None)
        self.cores[role].timer_fired(self.now, timer)
        self.run()

    def advance(self, seconds: float) -> None:
        """Move the clock, firing every timer that falls due on the way, in order."""
        end = self.now + seconds
        while True:
            due = [
                (when, role, timer)
                for role in ROLES
                if role in self.cores
                for timer, when in self.timers[role].items()
                if when <= end
            ]
            if not due:
                break
            when, role, timer = min(due, key=lambda d: (d[0], d[1], d[2].value))
            self.now = max(self.now, when)
            self.fire(role, timer)
        self.now = end

    # -- clients -----------------------------------------------------------------------
    def token(self) -> str:
        return f"w{next(self._tokens)}"

    def reply_to(self, token: Any) -> Callable[[Outcome], None]:
        def reply(outcome: Outcome) -> None:
            assert token not in self.responses, f"{token} answered twice"
            self.responses[token] = outcome
            self.answer_order.append(token)

        return reply

    def submit(
        self,
        token: Any,
        command: Command,
        key: str,
        value: str | None = None,
        ident: str | None = None,
    ) -> Any:
        """``ident``: the request's Idempotency-Key."""
        outcome = self.primary.submit(command, key, value, self.reply_to(token), ident)
        self.run()
        return outcome

    def flush(self) -> None:
        self.primary.flush(self.now)
        self.run()

    def write(
        self, command: Command, key: str, value: str | None = None, ident: str | None = None
    ) -> Outcome:
        """A write from start to answer (an immediate outcome or a Respond)."""
        token = self.token()
        outcome = self.submit(token, command, key, value, ident)
        if outcome is not None:
            return outcome
        self.flush()
        assert token in self.responses, "the write was not answered"
        return self.responses[token]

    def read(self, role: str, command: Command, key: str = "") -> Outcome:
        return self.cores[role].read(command, key)

    # -- what happened -----------------------------------------------------------------
    def transitions(self) -> list[tuple[str, Stage, Stage, str]]:
        """Every logged ``<role> stage A -> B (reason)`` line, in order."""
        found = []
        for record in self.caplog.records:
            match = _TRANSITION.match(record.getMessage())
            if record.name == "pbkv.core" and match:
                found.append((match[1], Stage(match[2]), Stage(match[3]), match[4]))
        return found

    def moves(self) -> list[tuple[str, Stage, Stage]]:
        return [(role, old, new) for role, old, new, _ in self.transitions()]

    def kinds(self, role: str, start: int = 0) -> list[FrameType]:
        return [frame.kind for frame in self.sent[role][start:]]

    def mark(self) -> dict[str, int]:
        """Where the frame logs stand now, to look only at what follows."""
        return {role: len(self.sent[role]) for role in ROLES}


class RoleDriver:
    """One role's side of the ``Link``: the ``actions.Driver`` its core drains into."""

    def __init__(self, link: Link, role: str) -> None:
        self.link, self.role = link, role

    def send(self, data: bytes) -> None:
        raise AssertionError("Link.run carries Send actions itself")

    def discard(self, shards: list[dict[str, str]]) -> None:
        self.link.discarded[self.role].append(sum(map(len, shards)))

    def start_timer(self, timer: Timer, delay: float) -> None:
        link = self.link
        link.timers[self.role][timer] = link.now + delay
        link.timer_starts.append((self.role, timer, delay))

    def close_channel(self, reason: str) -> None:
        link = self.link
        link.closed_by.append((self.role, reason))
        if self.role == "backup" and link.candidate is not None:
            return  # the channel a candidate replaces: the link's one connection is newer
        if link.connected and self.role in link.lossy:
            link._disconnect()  # not even the FIN gets through
        elif link.connected:
            link._close_from(self.role, reason)

    def send_to_candidate(self, candidate: int, data: bytes) -> None:
        raise AssertionError("Link.run carries SendToCandidate actions itself")

    def close_candidate(self, candidate: int, reason: str) -> None:
        link = self.link
        if link.candidate == candidate:
            self.close_channel(reason)
        else:
            link.closed_by.append((self.role, reason))  # an attacker's channel
            link.intruders.pop(candidate, None)

    def promote(self, candidate: int) -> None:
        link = self.link
        assert link.candidate == candidate, "only the link's channel proves the secret"
        link.candidate = None

    def connect(self) -> None:
        assert self.role == "primary", "only the primary opens the channel"
        self.link._connect()

    def probe(self) -> None:
        link = self.link
        answers = link.primary_answers_probe
        link.backup.probe_result(link.now, "primary" in link.cores if answers is None else answers)

    def pump_transfer(self) -> None:
        link = self.link
        if link.manual_pump:
            link.pumping.add(self.role)
        else:
            core = link.cores[self.role]
            while core.pump_transfer(link.now):
                pass

    def sync_changed(self) -> None:
        pass  # no leadership without a coordinator

    def persist(self, record: Record) -> None:
        link = self.link
        link.persisted[self.role].append((len(link.sent[self.role]), len(link.responses), record))

    def persist_all(self, state: DiskState) -> None:
        link = self.link
        link.persisted[self.role].append((len(link.sent[self.role]), len(link.responses), state))

    def flush_soon(self) -> None:
        """Writes are flushed when the test says so (``Link.flush``)."""


@pytest.fixture
def make_link(caplog: pytest.LogCaptureFixture) -> Callable[..., Link]:
    caplog.set_level(logging.INFO, logger="pbkv")

    def make(**settings: Any) -> Link:
        return Link(caplog, make_settings(**settings))

    return make


@pytest.fixture
def link(make_link: Callable[..., Link]) -> Link:
    return make_link()


# -- helpers ---------------------------------------------------------------------------


def keys_by_shard(count: int = 24, prefix: str = "key") -> dict[int, list[str]]:
    shards: dict[int, list[str]] = {shard: [] for shard in range(SHARDS)}
    for i in range(count):
        key = f"{prefix}{i}"
        shards[shard_of(key, SHARDS)].append(key)
    assert all(shards.values()), "every shard should hold some keys"
    return shards


def absent_key(shard: int) -> str:
    for i in itertools.count():
        key = f"absent{i}"
        if shard_of(key, SHARDS) == shard:
            return key
    raise AssertionError("unreachable")


DATA = {f"key{i}": f"value {i} & = é" for i in range(24)}


def in_sync_pair(link: Link, data: dict[str, str] | None = None) -> tuple[PrimaryCore, BackupCore]:
    """A backup, then a primary, both empty, brought in sync; then ``data`` written."""
    backup = link.start_backup()
    primary = link.start_primary()
    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    if data:
        tokens = []
        for key, value in data.items():
            token = link.token()
            assert link.submit(token, INSERT, key, value) is None
            tokens.append(token)
        link.flush()
        assert all(link.responses[token] == Done(True) for token in tokens)
    return primary, backup


def assert_same_data(primary: PrimaryCore, backup: BackupCore) -> None:
    assert primary.store.checksum == backup.store.checksum
    assert dict(primary.store.items()) == dict(backup.store.items())
    assert primary.seq == backup.seq


def in_sync_order(link: Link) -> list[str]:
    return [role for role, _, new in link.moves() if new is S.IN_SYNC]


# -- primary cold start ----------------------------------------------------------------


def test_primary_cold_start_refuses_everything(link: Link) -> None:
    primary = PrimaryCore(link.settings, new_store(), 0.0, random.Random(1))
    assert primary.stage is S.COLD_START
    for command in (GET, COUNT, DUMP):
        assert primary.read(command, "k") == Refused(S.COLD_START, "primary")
    assert primary.submit(INSERT, "k", "v", "t") == Refused(S.COLD_START, "primary")


def test_primary_cold_start_without_a_backup_waits_unconfirmed(link: Link) -> None:
    primary = link.start_primary()

    assert link.moves() == [("primary", S.COLD_START, S.BOOTSTRAPPING_SECONDARY)]
    assert "no backup" in link.transitions()[0][3]
    assert not primary.confirmed
    # Unconfirmed (possibly lost) data is not served: 503 for reads and writes.
    refused = Refused(S.BOOTSTRAPPING_SECONDARY, "primary")
    for command in (GET, COUNT, DUMP):
        assert link.read("primary", command, "k") == refused
    for command in (INSERT, UPDATE, DELETE):
        assert link.submit(link.token(), command, "k", "v") == refused
    assert link.kinds("primary") == []
    # It waits patiently: a retry is scheduled, it never starts a backup itself.
    assert ("primary", RETRY) in [(role, name) for role, name, _ in link.timer_starts]
    link.fire("primary", RETRY)
    assert primary.stage is S.BOOTSTRAPPING_SECONDARY


# -- both empty ------------------------------------------------------------------------


def test_both_empty_backup_first(link: Link) -> None:
    backup = link.start_backup()
    assert backup.stage is S.BOOTSTRAPPING_PRIMARY  # no primary answered the probe
    assert link.read("backup", COUNT) == Counted(0)

    primary = link.start_primary()

    assert link.moves() == [
        ("backup", S.COLD_START, S.BOOTSTRAPPING_PRIMARY),
        ("primary", S.COLD_START, S.BOOTSTRAPPING_SECONDARY),
        ("backup", S.BOOTSTRAPPING_PRIMARY, S.WARM_START),
        ("backup", S.WARM_START, S.IN_SYNC),
        ("primary", S.BOOTSTRAPPING_SECONDARY, S.IN_SYNC),
    ]
    assert in_sync_order(link) == ["backup", "primary"]
    assert primary.confirmed and backup.confirmed
    assert_same_data(primary, backup)
    assert link.kinds("primary") == [
        FrameType.HELLO,
        FrameType.SNAPSHOT_BEGIN,
        *[FrameType.SHARD_END] * SHARDS,
        FrameType.IDEMPOTENCY_CHUNK,
        FrameType.SNAPSHOT_END,
    ]
    assert link.kinds("backup") == [FrameType.HELLO, FrameType.SYNC_ACK]
    assert link.read("primary", COUNT) == Counted(0)
    assert link.write(INSERT, "k", "v") == Done(True)


def test_both_empty_primary_first(link: Link) -> None:
    primary = link.start_primary()  # nobody there yet
    backup = link.start_backup()  # finds the primary running
    assert backup.stage is S.WARM_START

    link.fire("primary", RETRY)

    assert link.moves() == [
        ("primary", S.COLD_START, S.BOOTSTRAPPING_SECONDARY),
        ("backup", S.COLD_START, S.WARM_START),
        ("backup", S.WARM_START, S.WARM_START),  # the primary's data starts arriving
        ("backup", S.WARM_START, S.IN_SYNC),
        ("primary", S.BOOTSTRAPPING_SECONDARY, S.IN_SYNC),
    ]
    assert_same_data(primary, backup)


# -- the backup's nudge ----------------------------------------------------------------


def retry_delays(link: Link) -> list[float]:
    return [
        delay for role, timer, delay in link.timer_starts if (role, timer) == ("primary", RETRY)
    ]


def test_a_nudge_makes_a_waiting_primary_connect_at_once(link: Link) -> None:
    primary = link.start_primary()
    for _ in range(8):  # no backup: the back-off grows to its ceiling
        link.fire("primary", RETRY)
    assert max(retry_delays(link)) >= link.settings.retry_max / 2
    backup = link.start_backup()  # finds the primary; the Link does not deliver the nudge
    assert backup.stage is S.WARM_START

    link.now += 0.01
    primary.backup_listening(link.now)
    link.run()

    # The pending retry is replaced by one due now, and the back-off starts over.
    assert retry_delays(link)[-1] == 0.0
    assert link.timers["primary"][RETRY] == link.now
    link.advance(0.0)
    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    link.reset()
    assert retry_delays(link)[-1] <= link.settings.retry_min


def test_a_nudge_changes_nothing_while_the_channel_is_up(link: Link) -> None:
    primary, backup = in_sync_pair(link)
    starts = len(link.timer_starts)
    primary.backup_listening(link.now)
    link.run()
    assert link.timer_starts[starts:] == []
    assert not primary.nudged
    assert primary.stage is S.IN_SYNC and primary.channel_up


def test_nudges_are_rate_limited(link: Link) -> None:
    primary = link.start_primary()
    for _ in range(6):
        link.fire("primary", RETRY)
    primary.backup_listening(link.now)
    link.run()
    link.fire("primary", RETRY)  # the attempt now: refused, nobody listens
    delays = len(retry_delays(link))
    # Forged nudges: at most one attempt brought forward per retry_min.
    for _ in range(100):
        link.now += link.settings.retry_min / 10
        primary.backup_listening(link.now)
        link.run()
    assert len(retry_delays(link)) - delays <= 10


def test_a_nudge_during_an_attempt_makes_the_next_retry_immediate(link: Link) -> None:
    primary = link.start_primary()
    for _ in range(8):
        link.fire("primary", RETRY)
    # The retry timer fires: the attempt is under way when the nudge comes.
    link.timers["primary"].pop(RETRY)
    primary.timer_fired(link.now, RETRY)
    primary.backup_listening(link.now)
    assert not any(type(action).__name__ == "StartTimer" for action in primary.outbox)
    link.run()  # the attempt: refused (the backup listened only after it started)
    assert retry_delays(link)[-1] == 0.0
    link.start_backup()
    link.advance(0.0)
    assert primary.stage is S.IN_SYNC


def test_a_standalone_primary_ignores_nudges(make_link) -> None:
    link = make_link(standalone=True)
    primary = link.start_primary()
    primary.backup_listening(link.now)
    link.run()
    assert link.timer_starts == []


def test_a_backup_started_in_bootstrapping_primary_skips_the_probe(make_link) -> None:
    link = make_link(backup_initial_stage="bootstrapping_primary")
    backup = link.start_backup()
    assert backup.stage is S.BOOTSTRAPPING_PRIMARY
    assert link.moves() == []
    link.start_primary()
    assert in_sync_order(link) == ["backup", "primary"]


# -- writes in sync --------------------------------------------------------------------


def test_group_commit_one_batch_and_nothing_visible_before_the_ack(link: Link) -> None:
    primary, backup = in_sync_pair(link)
    before = link.mark()
    link.paused.add("primary")  # the backup's ACK waits on the wire

    tokens = [link.token() for _ in range(50)]
    for i, token in enumerate(tokens):
        assert link.submit(token, INSERT, f"k{i}", f"v{i}") is None
    assert link.kinds("primary", before["primary"]) == []  # nothing sent before the flush
    link.flush()

    batches = [f for f in link.sent["primary"][before["primary"] :] if f.kind == FrameType.BATCH]
    assert len(batches) == 1
    seq, ops = batches[0].seq, batches[0].ops
    assert seq == primary.seq + 1
    assert ops == [item for i in range(50) for item in (f"k{i}", f"v{i}")]
    # The backup applied and acknowledged it; the ACK has not arrived.
    assert len(backup.store) == 50
    assert link.responses == {}
    assert link.read("primary", GET, "k0") == Done(False, "")
    assert link.read("primary", COUNT) == Counted(0)
    assert link.read("primary", DUMP) == Dumped([])

    link.paused.clear()
    link.run()

    assert [link.responses[token] for token in tokens] == [Done(True)] * 50
    assert link.answer_order == tokens
    assert link.read("primary", GET, "k7") == Done(True, "v7")
    assert link.read("primary", COUNT) == Counted(50)
    assert_same_data(primary, backup)
    assert primary.batches_sent == 1


@pytest.mark.parametrize("persistence", ["off", "everysec", "always"])
@pytest.mark.parametrize("window", [1, 2, 3])
def test_writes_queued_behind_the_window_go_in_the_next_batch(
    make_link: Callable[..., Link], window: int, persistence: str
) -> None:
    """With ``always`` each batch costs both servers an fsync: while one is in flight
    the next gathers every write until it is acknowledged (full batches fill the
    window, see below)."""
    link = make_link(batches_in_flight=window, persistence=persistence, data_dir="unused")
    primary, backup = in_sync_pair(link)
    sent_at_once = 1 if persistence == "always" else window
    before = link.mark()
    link.paused.add("primary")
    tokens = [link.token() for _ in range(11)]
    for i, token in enumerate(tokens):
        link.submit(token, INSERT, f"b{i}", str(i))
        link.flush()  # one batch per flush until the window is full
    assert link.kinds("primary", before["primary"]) == [FrameType.BATCH] * sent_at_once

    link.paused.clear()
    link.run()

    batches = [f for f in link.sent["primary"][before["primary"] :] if f.kind == FrameType.BATCH]
    assert _batch_sizes(link, before["primary"]) == [1] * sent_at_once + [11 - sent_at_once]
    assert [f.seq for f in batches] == list(range(batches[0].seq, batches[0].seq + len(batches)))
    assert all(link.responses[token] == Done(True) for token in tokens)
    assert link.answer_order == tokens
    assert_same_data(primary, backup)


def _batch_sizes(link: Link, since: int) -> list[int]:
    return [len(f.ops) // 2 for f in link.sent["primary"][since:] if f.kind == FrameType.BATCH]


def test_with_always_full_batches_still_fill_the_window(
    make_link: Callable[..., Link],
) -> None:
    link = make_link(batches_in_flight=2, persistence="always", data_dir="unused")
    primary, backup = in_sync_pair(link)
    before = link.mark()
    link.paused.add("primary")
    tokens = [link.token() for _ in range(1 + BATCH_WRITES + 5)]
    for i, token in enumerate(tokens):
        link.submit(token, INSERT, f"f{i}", "v")
        link.flush()
        if i == BATCH_WRITES:  # the second batch went out as it filled, the first in flight
            assert link.kinds("primary", before["primary"]) == [FrameType.BATCH] * 2

    link.paused.clear()
    link.run()

    assert _batch_sizes(link, before["primary"]) == [1, BATCH_WRITES, 5]
    assert all(link.responses[token] == Done(True) for token in tokens)
    assert_same_data(primary, backup)


def test_replicated_writes_run_no_python_of_the_compiled_modules(
    make_link: Callable[..., Link],
) -> None:
    """The census of ``test_request_path.py``, of writes replicated in batches: the
    primary queues, sends and answers them, the backup applies and acknowledges them."""
    link = make_link(batches_in_flight=2)
    primary, backup = in_sync_pair(link)
    link.write(INSERT, "warm", "up")  # first calls (imports, caches) first
    with python_in_compiled_modules() as seen:
        for round_ in range(10):
            tokens = []
            for i in range(8):
                for command in (INSERT, UPDATE, DELETE):  # each depends on the one before
                    token = link.token()
                    ident = f"id-{round_}-{i}-{command.value}" if i % 2 else None
                    assert link.submit(token, command, f"k{round_}-{i}", f"v{i}", ident) is None
                    tokens.append(token)
            link.flush()
            assert all(getattr(link.responses[token], "ok", False) for token in tokens)
    assert len(primary.store) == len(backup.store) == 1
    assert_same_data(primary, backup)
    assert seen == {}


def test_logical_outcomes_of_writes(link: Link) -> None:
    primary, backup = in_sync_pair(link, {"a": "1", "b": "2"})
    sent = len(link.sent["primary"])

    # Failures that depend only on acknowledged state are answered at once.
    assert link.write(INSERT, "a", "x") == Done(False)
    assert link.write(UPDATE, "missing", "x") == Done(False)
    assert link.write(DELETE, "missing") == Done(False, "")
    assert len(link.sent["primary"]) == sent  # nothing replicated for them

    assert link.write(UPDATE, "a", "10") == Done(True)
    assert link.write(DELETE, "b") == Done(True, "2")
    assert link.write(INSERT, "c", "") == Done(True)  # empty values are values

    assert dict(primary.store.items()) == {"a": "10", "c": ""}
    assert link.read("primary", GET, "b") == Done(False, "")
    assert link.read("primary", GET, "c") == Done(True, "")
    assert_same_data(primary, backup)


def test_a_logical_failure_behind_a_write_in_flight_waits_for_its_ack(link: Link) -> None:
    primary, backup = in_sync_pair(link)
    link.paused.add("primary")
    first, second, third = link.token(), link.token(), link.token()
    link.submit(first, INSERT, "k", "1")
    link.flush()

    assert link.submit(second, INSERT, "k", "2") is None  # key exists, but not yet for sure
    assert link.submit(third, DELETE, "k") is None  # succeeds only if the insert does
    assert link.responses == {}
    link.flush()
    assert link.responses == {}

    link.paused.clear()
    link.run()

    assert link.responses == {first: Done(True), second: Done(False), third: Done(True, "1")}
    assert link.answer_order == [first, second, third]
    assert link.read("primary", GET, "k") == Done(False, "")
    assert_same_data(primary, backup)


def test_a_logical_failure_in_the_same_batch_is_answered_with_it(link: Link) -> None:
    in_sync_pair(link)
    first, second = link.token(), link.token()
    link.submit(first, INSERT, "k", "1")
    assert link.submit(second, UPDATE, "gone", "x") == Done(False)
    assert link.submit(second, INSERT, "k", "2") is None
    link.flush()
    assert link.responses == {first: Done(True), second: Done(False)}
    assert link.answer_order == [first, second]


def test_a_logical_failure_behind_a_failed_batch_is_answered_replication_failed(
    link: Link,
) -> None:
    primary, _ = in_sync_pair(link)
    link.paused.add("primary")
    first, second = link.token(), link.token()
    link.submit(first, INSERT, "k", "1")
    link.flush()
    link.submit(second, INSERT, "k", "2")

    link.reset(notify=("primary",))

    assert link.responses == {first: REPLICATION_FAILED, second: REPLICATION_FAILED}
    assert "k" not in primary.store


# -- failures in sync: rewind ----------------------------------------------------------


def time_out_a_batch(link: Link) -> tuple[PrimaryCore, BackupCore, list[str], int]:
    """In sync with {a, b}; a batch the backup applies but whose ACK is lost times out."""
    primary, backup = in_sync_pair(link, {"a": "1", "b": "2"})
    before = primary.store.checksum
    link.lossy.add("backup")
    in_flight = [link.token(), link.token()]
    link.submit(in_flight[0], INSERT, "c", "3")
    link.submit(in_flight[1], UPDATE, "a", "new")
    link.flush()
    queued = [link.token(), link.token()]
    link.submit(queued[0], DELETE, "b")
    link.submit(queued[1], INSERT, "d", "4")
    link.flush()
    assert link.responses.keys().isdisjoint(in_flight + queued)
    assert backup.store.get("c") == "3"  # the backup applied it; its ACK is lost

    link.now += link.settings.ack_timeout - 0.01
    link.fire("primary", TICK)
    assert primary.stage is S.IN_SYNC  # not yet
    link.now += 0.02
    link.fire("primary", TICK)
    return primary, backup, in_flight + queued, before


def test_ack_timeout_rewinds_fences_and_bootstraps_again(make_link) -> None:
    link = make_link(ack_timeout=0.5)
    primary, backup, tokens, before = time_out_a_batch(link)

    assert [link.responses[token] for token in tokens] == [REPLICATION_FAILED] * 4
    assert primary.store.checksum == before
    assert dict(primary.store.items()) == {"a": "1", "b": "2"}
    assert primary.overlay == {} and not primary.in_flight
    assert primary.writes_rewound == 4
    # Seed: "try to kill the backup", then bootstrap again after a back-off.
    kinds = link.kinds("primary")
    assert kinds[-1] is FrameType.FENCE
    assert kinds.count(FrameType.BATCH) == 2  # the data, then the batch that timed out
    assert link.closed_by[0][0] == "primary"
    assert primary.stage is S.BOOTSTRAPPING_SECONDARY
    assert link.moves()[-2:] == [
        ("primary", S.IN_SYNC, S.BOOTSTRAPPING_SECONDARY),
        ("backup", S.IN_SYNC, S.BOOTSTRAPPING_PRIMARY),  # the fence
    ]
    assert RETRY in link.timers["primary"]
    # Its data is confirmed: it serves reads, still refuses writes.
    assert primary.confirmed
    assert link.read("primary", GET, "a") == Done(True, "1")
    assert link.read("primary", GET, "c") == Done(False, "")
    assert link.write(INSERT, "e", "5") == Refused(S.BOOTSTRAPPING_SECONDARY, "primary")
    # The fenced backup keeps what it has, confirmed.
    assert backup.confirmed and backup.store.get("c") == "3"


def test_a_backup_ahead_by_a_rewound_batch_rolls_it_back_without_a_transfer(make_link) -> None:
    link = make_link(ack_timeout=0.5)
    primary, backup, _, _ = time_out_a_batch(link)
    assert backup.seq == primary.seq + 1 and backup.store.get("c") == "3"
    link.lossy.clear()
    mark = link.mark()
    full = (primary.resyncs_full, backup.resyncs_full)  # the first sync was one

    link.fire("primary", RETRY)

    sent = link.kinds("primary", mark["primary"]) + link.kinds("backup", mark["backup"])
    assert FrameType.ROLLBACK in sent
    assert {FrameType.SNAPSHOT_BEGIN, FrameType.SHARD_CHUNK, FrameType.FETCH}.isdisjoint(sent)
    assert dict(backup.store.items()) == {"a": "1", "b": "2"}  # the rewound write is gone
    assert_same_data(primary, backup)
    assert (primary.resyncs_partial, backup.resyncs_partial) == (1, 1)
    assert (primary.resyncs_full, backup.resyncs_full) == full
    assert link.moves()[-2:] == [
        ("backup", S.BOOTSTRAPPING_PRIMARY, S.IN_SYNC),
        ("primary", S.BOOTSTRAPPING_SECONDARY, S.IN_SYNC),
    ]
    assert "rolled back 1 batches" in link.transitions()[-2][3]
    assert link.write(INSERT, "c", "again") == Done(True)  # sequence numbers agree
    assert_same_data(primary, backup)


def test_a_backup_holding_a_rewound_batch_never_overwrites_the_live_primary(make_link) -> None:
    link = make_link(ack_timeout=0.5, undo_bytes=0)  # no undo record: a full transfer
    primary, backup, _, _ = time_out_a_batch(link)
    assert backup.store.checksum != primary.store.checksum
    link.lossy.clear()
    mark = link.mark()

    link.fire("primary", RETRY)

    assert FrameType.SNAPSHOT_BEGIN in link.kinds("primary", mark["primary"])
    assert FrameType.SNAPSHOT_BEGIN not in link.kinds("backup", mark["backup"])
    assert FrameType.FETCH not in link.kinds("primary", mark["primary"])
    assert dict(backup.store.items()) == {"a": "1", "b": "2"}
    assert_same_data(primary, backup)
    assert link.moves()[-3:] == [
        ("backup", S.BOOTSTRAPPING_PRIMARY, S.WARM_START),
        ("backup", S.WARM_START, S.IN_SYNC),
        ("primary", S.BOOTSTRAPPING_SECONDARY, S.IN_SYNC),
    ]
    # The sequence numbers agree again: the next batch is accepted.
    assert link.write(INSERT, "c", "again") == Done(True)
    assert_same_data(primary, backup)


def test_channel_closed_at_the_primary_rewinds(link: Link) -> None:
    primary, backup = in_sync_pair(link, {"a": "1"})
    link.paused.add("primary")
    tokens = [link.token(), link.token()]
    link.submit(tokens[0], UPDATE, "a", "2")
    link.flush()
    link.submit(tokens[1], INSERT, "b", "3")

    link.reset(notify=("primary",), reason="connection reset")

    assert [link.responses[token] for token in tokens] == [REPLICATION_FAILED] * 2
    assert dict(primary.store.items()) == {"a": "1"}
    assert primary.stage is S.BOOTSTRAPPING_SECONDARY
    assert link.transitions()[-1][3] == "connection reset"
    assert RETRY in link.timers["primary"]
    assert link.read("primary", GET, "a") == Done(True, "1")

    # The backup never heard of the break and applied the update.
    assert backup.stage is S.IN_SYNC and backup.store.get("a") == "2"
    link.paused.clear()
    link.fire("primary", RETRY)
    # The new connection replaces the old one; the primary's data wins.
    assert ("backup", S.IN_SYNC, S.BOOTSTRAPPING_PRIMARY) in link.moves()
    assert in_sync_order(link)[-2:] == ["backup", "primary"]
    assert dict(backup.store.items()) == {"a": "1"}
    assert_same_data(primary, backup)


def test_news_of_sync_comes_after_the_other_actions_queued_with_it(link: Link) -> None:
    """On ``SyncChanged`` a member's driver may switch cores (pbkv.roles): every other
    action of the old core (the retry timer, the replies) must be carried out first."""
    primary, _ = in_sync_pair(link, {"a": "1"})
    link.paused.add("primary")
    link.submit(link.token(), UPDATE, "a", "2")
    link.flush()
    primary.channel_closed(link.now, "connection reset")
    actions = [type(action).__name__ for action in primary.take_actions()]
    assert actions[-1] == "SyncChanged"
    assert {"Respond", "StartTimer"} <= set(actions[:-1])


def test_channel_closed_at_the_backup_keeps_its_data(link: Link) -> None:
    primary, backup = in_sync_pair(link, DATA)
    checksum = backup.store.checksum

    link.reset(notify=("backup",), reason="connection reset")

    assert backup.stage is S.BOOTSTRAPPING_PRIMARY
    assert link.moves()[-1] == ("backup", S.IN_SYNC, S.BOOTSTRAPPING_PRIMARY)
    assert backup.confirmed
    assert backup.store.checksum == checksum
    assert link.read("backup", GET, "key3") == Done(True, DATA["key3"])
    assert link.read("backup", COUNT) == Counted(len(DATA))
    assert primary.stage is S.IN_SYNC  # the primary has not noticed yet


def test_a_byte_corrupted_on_the_wire_closes_the_channel(link: Link) -> None:
    primary, backup = in_sync_pair(link, {"a": "1"})

    def flip(source: str, frame: Frame, data: bytes) -> bytes:
        if frame.kind != FrameType.BATCH:
            return data
        return data[:-1] + bytes([data[-1] ^ 0x01])

    link.corrupt = flip
    assert link.write(UPDATE, "a", "2") == REPLICATION_FAILED

    assert backup.store.get("a") == "1" and primary.store.get("a") == "1"
    assert (primary.stage, backup.stage) == (S.BOOTSTRAPPING_SECONDARY, S.BOOTSTRAPPING_PRIMARY)
    link.corrupt = None
    mark = link.mark()
    link.fire("primary", RETRY)
    assert FrameType.SKIP in link.kinds("primary", mark["primary"])  # same data on both
    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)


# -- restarts: the newest confirmed data wins ------------------------------------------


def test_a_primary_fetching_the_backups_copy_answers_a_retry_only_once_it_is_ours(
    link: Link,
) -> None:
    """A retry of a write the fetched copy remembers is refused (retried later) while the
    copy arrives, every shard included: it is not ours until the sync is confirmed (with
    persistence, our disk still holds our older copy, which a power loss of both would
    bring back without the write).  Then it is answered from the table."""
    _, backup = in_sync_pair(link, {"key": "value"})
    assert link.write(INSERT, "kept", "x", ident="retry-me") == Done(True)
    link.kill("primary")
    link.manual_pump = True
    primary = link.start_primary()
    assert primary.stage is S.WARM_START
    while primary.stage is S.WARM_START:
        outcome = link.submit(link.token(), INSERT, "kept", "x", ident="retry-me")
        assert outcome == Refused(S.WARM_START, "primary")
        assert link.pump("backup", 1) or primary.stage is S.IN_SYNC
    assert link.write(INSERT, "kept", "x", ident="retry-me") == Done(True)
    assert primary.writes_replayed == 1 and backup.store.get("kept") == "x"


def test_restarted_empty_primary_fetches_the_backups_data(link: Link) -> None:
    by_shard = keys_by_shard()
    data = {key: f"v-{key}" for keys in by_shard.values() for key in keys}
    _, backup = in_sync_pair(link, data)
    link.kill("primary")
    assert backup.stage is S.BOOTSTRAPPING_PRIMARY and backup.confirmed
    backup_seq = backup.seq
    link.manual_pump = True

    primary = link.start_primary()  # empty

    assert primary.stage is S.WARM_START
    assert link.moves()[-1] == ("primary", S.COLD_START, S.WARM_START)
    assert FrameType.FETCH in link.kinds("primary")
    assert link.pumping == {"backup"}

    refused = Refused(S.WARM_START, "primary")
    complete: set[int] = set()
    partial_seen = False
    while primary.stage is S.WARM_START:
        assert link.submit(link.token(), INSERT, "new", "x") == refused
        for shard, keys in by_shard.items():
            for key in [*keys, absent_key(shard)]:
                outcome = link.read("primary", GET, key)
                if shard not in complete:
                    assert outcome == refused, (key, shard, complete)
                elif key in data:
                    assert outcome == Done(True, data[key])
                else:
                    assert outcome == Done(False, "")  # a miss is certain here
        if len(complete) < SHARDS:
            assert link.read("primary", COUNT) == refused
            assert link.read("primary", DUMP) == refused
            partial_seen |= len(complete) > 0
        else:
            assert link.read("primary", COUNT) == Counted(len(data))
        assert link.pump("backup", 1) or primary.stage is S.IN_SYNC
        complete |= {f.shard for f in link.received["primary"] if f.kind == FrameType.SHARD_END}

    assert partial_seen
    assert in_sync_order(link)[-2:] == ["backup", "primary"]
    assert link.moves()[-2:] == [
        ("backup", S.BOOTSTRAPPING_PRIMARY, S.IN_SYNC),
        ("primary", S.WARM_START, S.IN_SYNC),
    ]
    assert FrameType.SYNC_ACK in link.kinds("primary")
    assert primary.confirmed
    assert_same_data(primary, backup)
    assert primary.seq == backup_seq
    assert dict(primary.store.items()) == data
    progress = [m for r in link.caplog.records if "shard" in (m := r.getMessage())]
    assert progress[-1] == (
        f"primary transfer from backup: shard {SHARDS}/{SHARDS} verified, "
        f"{len(data)}/{len(data)} pairs"
    )
    assert len(progress) >= SHARDS
    assert link.write(INSERT, "new", "x") == Done(True)
    assert_same_data(primary, backup)


def test_restarted_primary_that_found_no_backup_fetches_once_it_appears(link: Link) -> None:
    _, backup = in_sync_pair(link, DATA)
    link.kill("primary")
    link.unreachable.add("backup")

    primary = link.start_primary()
    assert primary.stage is S.BOOTSTRAPPING_SECONDARY and not primary.confirmed
    # Its empty store is not the truth: a miss would be wrong.
    assert link.read("primary", GET, "key1") == Refused(S.BOOTSTRAPPING_SECONDARY, "primary")

    link.unreachable.clear()
    link.fire("primary", RETRY)

    assert ("primary", S.BOOTSTRAPPING_SECONDARY, S.WARM_START) in link.moves()
    assert primary.stage is S.IN_SYNC
    assert dict(primary.store.items()) == DATA
    assert_same_data(primary, backup)


def test_restarted_empty_backup_receives_the_live_primarys_data(link: Link) -> None:
    primary, _ = in_sync_pair(link, DATA)
    link.kill("backup")
    assert primary.stage is S.BOOTSTRAPPING_SECONDARY
    assert link.read("primary", GET, "key2") == Done(True, DATA["key2"])  # confirmed data

    backup = link.start_backup()  # empty; the primary answers its probe
    assert backup.stage is S.WARM_START
    mark = link.mark()
    link.fire("primary", RETRY)

    assert FrameType.SNAPSHOT_BEGIN in link.kinds("primary", mark["primary"])
    assert FrameType.FETCH not in link.kinds("primary", mark["primary"])
    assert link.moves()[-3:] == [
        ("backup", S.WARM_START, S.WARM_START),
        ("backup", S.WARM_START, S.IN_SYNC),
        ("primary", S.BOOTSTRAPPING_SECONDARY, S.IN_SYNC),
    ]
    assert dict(primary.store.items()) == DATA
    assert_same_data(primary, backup)
    assert link.write(DELETE, "key0") == Done(True, DATA["key0"])
    assert_same_data(primary, backup)


def test_same_data_on_both_sides_skips_the_transfer(link: Link) -> None:
    primary, backup = in_sync_pair(link, DATA)
    seq = primary.seq
    link.reset()
    assert (primary.stage, backup.stage) == (S.BOOTSTRAPPING_SECONDARY, S.BOOTSTRAPPING_PRIMARY)
    mark = link.mark()

    link.fire("primary", RETRY)

    sent = link.kinds("primary", mark["primary"]) + link.kinds("backup", mark["backup"])
    assert FrameType.SKIP in sent
    transfer = {FrameType.SNAPSHOT_BEGIN, FrameType.SHARD_CHUNK, FrameType.SNAPSHOT_END}
    assert transfer.isdisjoint(sent)
    assert in_sync_order(link)[-2:] == ["backup", "primary"]
    assert_same_data(primary, backup)
    assert primary.seq == seq
    assert link.write(UPDATE, "key5", "changed") == Done(True)
    assert_same_data(primary, backup)
    # The log says the data already matched, not that it was sent.
    reason = link.transitions()[-1][3]
    assert reason == f"{len(DATA)} pairs already matched on the backup, checksums match"
    assert "sent" not in reason


def test_status_shows_each_sides_handshake_step(link: Link) -> None:
    backup = link.start_backup()
    assert backup.status(link.now)["handshake"] == "none"
    link.manual_pump = True
    primary = link.start_primary()
    assert primary.status(link.now)["handshake"] == "await_sync_ack"  # our data goes out
    assert backup.status(link.now)["handshake"] == "await_directive"
    link.pump("primary", 1)  # SNAPSHOT_BEGIN
    assert backup.status(link.now)["handshake"] == "receive_snapshot"
    while link.pump("primary", 1):
        pass
    assert primary.status(link.now)["handshake"] == "streaming"
    assert backup.status(link.now)["handshake"] == "streaming"
    link.reset()
    assert primary.status(link.now)["handshake"] == "none"


@pytest.mark.parametrize("bug", [KeyError, ProtocolError])
def test_a_bug_in_a_handler_is_not_reported_as_a_malformed_frame(
    link: Link, monkeypatch: pytest.MonkeyPatch, bug: type[Exception]
) -> None:
    primary, backup = in_sync_pair(link, {"a": "1"})

    def broken(frame: Any) -> None:
        raise bug("a bug")

    monkeypatch.setitem(backup.handlers, FrameType.BATCH, broken)
    with pytest.raises(bug, match="a bug"):
        link.write(UPDATE, "a", "2")
    assert backup.channel_up  # not closed as if the primary had sent garbage


# -- corrupted transfers ---------------------------------------------------------------


def corrupt_once(source_role: str) -> Callable[[str, Frame], Frame]:
    """Alter the first value of the first SHARD_CHUNK that ``source_role`` sends."""
    done = []

    def tamper(source: str, frame: Frame) -> Frame:
        if source == source_role and type(frame) is ShardChunk and not done:
            frame.pairs[1] += "!"
            done.append(frame)
        return frame

    return tamper


def test_a_corrupted_transfer_to_the_backup_is_refused_and_retried(link: Link) -> None:
    primary, _ = in_sync_pair(link, DATA)
    link.kill("backup")
    backup = link.start_backup()
    link.tamper = corrupt_once("primary")

    link.fire("primary", RETRY)

    assert FrameType.SYNC_NACK in link.kinds("backup")
    assert any(role == "backup" for role, _ in link.closed_by)
    failed = [t for t in link.transitions() if t[0] == "backup" and "failed" in t[3]]
    assert failed and failed[-1][1:3] == (S.WARM_START, S.WARM_START)
    assert "transfer from primary failed" in failed[-1][3]
    assert backup.transfers_failed == 1 and not backup.confirmed
    assert primary.transfers_failed == 1
    assert primary.stage is S.BOOTSTRAPPING_SECONDARY
    assert backup.stage is S.WARM_START

    link.tamper = None
    link.fire("primary", RETRY)

    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    assert dict(backup.store.items()) == DATA
    assert_same_data(primary, backup)


def test_a_corrupted_transfer_to_the_primary_is_refused_and_retried(link: Link) -> None:
    _, backup = in_sync_pair(link, DATA)
    link.kill("primary")
    link.tamper = corrupt_once("backup")

    primary = link.start_primary()

    assert FrameType.SYNC_NACK in link.kinds("primary")
    assert any(role == "primary" for role, _ in link.closed_by)
    retried = [t for t in link.transitions() if t[0] == "primary" and t[1] is t[2]]
    assert retried and retried[-1][1] is S.WARM_START
    assert "transfer from backup failed" in retried[-1][3]
    assert primary.stage is S.WARM_START and not primary.confirmed
    assert backup.stage is S.BOOTSTRAPPING_PRIMARY and backup.confirmed
    assert dict(backup.store.items()) == DATA  # the sender's data is untouched

    link.tamper = None
    link.fire("primary", RETRY)

    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    assert dict(primary.store.items()) == DATA
    assert_same_data(primary, backup)


# -- heartbeats and silence ------------------------------------------------------------


def test_an_idle_channel_carries_heartbeats_and_stays_in_sync(link: Link) -> None:
    primary, backup = in_sync_pair(link)
    mark = link.mark()

    link.advance(link.settings.heartbeat_interval)

    assert link.kinds("primary", mark["primary"]) == [FrameType.HEARTBEAT]
    assert link.kinds("backup", mark["backup"]) == [FrameType.HEARTBEAT]

    link.advance(5 * link.settings.peer_timeout)
    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    assert link.closed_by == []
    assert link.kinds("primary", mark["primary"]).count(FrameType.HEARTBEAT) > 10


def test_a_busy_channel_needs_no_heartbeat(link: Link) -> None:
    in_sync_pair(link)
    link.advance(link.settings.heartbeat_interval * 0.5)
    link.write(INSERT, "k", "v")
    mark = link.mark()
    link.advance(link.settings.heartbeat_interval * 0.5)  # the tick, just after a batch
    assert FrameType.HEARTBEAT not in link.kinds("primary", mark["primary"])


def test_a_silent_peer_is_given_up_on_both_sides_and_the_pair_recovers(link: Link) -> None:
    primary, backup = in_sync_pair(link, {"a": "1"})
    before = len(link.transitions())
    link.lossy.update(ROLES)  # a silent partition: nothing gets through, not even a FIN

    link.advance(link.settings.peer_timeout - link.settings.heartbeat_interval)
    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    link.advance(2 * link.settings.heartbeat_interval)

    assert primary.stage is S.BOOTSTRAPPING_SECONDARY
    assert backup.stage is S.BOOTSTRAPPING_PRIMARY
    assert {role for role, _ in link.closed_by} == {"primary", "backup"}
    assert not primary.channel_up and not backup.channel_up
    lost = link.transitions()[before:]
    assert sorted(t[:3] for t in lost) == [
        ("backup", S.IN_SYNC, S.BOOTSTRAPPING_PRIMARY),
        ("primary", S.IN_SYNC, S.BOOTSTRAPPING_SECONDARY),
    ]
    assert all("silent" in reason for *_, reason in lost)
    assert backup.confirmed and backup.store.get("a") == "1"

    # Reconnecting fails while the partition lasts, without new transitions.
    link.advance(5 * link.settings.retry_max)
    assert len(link.transitions()) == before + 2
    assert primary.stage is S.BOOTSTRAPPING_SECONDARY

    link.lossy.clear()  # the partition heals
    link.advance(link.settings.retry_max + link.settings.heartbeat_interval)
    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    assert FrameType.SKIP in link.kinds("primary")
    assert link.write(INSERT, "b", "2") == Done(True)
    assert_same_data(primary, backup)


# -- the backup alone ------------------------------------------------------------------


def test_the_backup_refuses_client_writes_in_every_stage_naming_the_primary(link: Link) -> None:
    settings = make_settings(primary="10.1.2.3", port=9000)
    backup = BackupCore(settings, new_store(), 0.0, random.Random(1))

    def refusal(stage: Stage) -> Refused:
        return Refused(stage, "backup", primary="10.1.2.3:9000")

    assert backup.submit(INSERT, "k", "v", "t") == refusal(S.COLD_START)
    assert backup.read(GET, "k") == Refused(S.COLD_START, "backup")

    link.settings = settings
    backup = link.start_backup()
    assert backup.stage is S.BOOTSTRAPPING_PRIMARY
    assert backup.submit(UPDATE, "k", "v", "t") == refusal(S.BOOTSTRAPPING_PRIMARY)
    assert backup.read(GET, "k") == Done(False, "")

    primary = link.start_primary()
    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    assert link.write(INSERT, "k", "v") == Done(True)
    for command in (INSERT, UPDATE, DELETE):
        assert backup.submit(command, "k", "w", "t") == refusal(S.IN_SYNC)
    assert backup.store.get("k") == "v"
    assert backup.read(GET, "k") == Done(True, "v")
    assert backup.read(DUMP) == Dumped([("k", "v")])


def test_the_default_backup_refusal_names_the_default_primary(link: Link) -> None:
    backup = link.start_backup()
    assert backup.submit(DELETE, "k", None, "t") == Refused(
        S.BOOTSTRAPPING_PRIMARY, "backup", primary=PRIMARY_ADDRESS
    )


def test_a_backup_in_warm_start_without_a_primary_gives_up_after_peer_timeout(
    link: Link,
) -> None:
    link.primary_answers_probe = True  # a primary answers the probe, then never connects
    backup = link.start_backup()
    assert backup.stage is S.WARM_START
    assert backup.read(GET, "k") == Refused(S.WARM_START, "backup")

    link.advance(link.settings.peer_timeout - link.settings.heartbeat_interval)
    assert backup.stage is S.WARM_START
    link.advance(2 * link.settings.heartbeat_interval)

    assert backup.stage is S.BOOTSTRAPPING_PRIMARY
    assert link.moves() == [
        ("backup", S.COLD_START, S.WARM_START),
        ("backup", S.WARM_START, S.BOOTSTRAPPING_PRIMARY),
    ]
    assert "no primary" in link.transitions()[-1][3]


# -- unexpected frames close the channel -----------------------------------------------


def test_a_batch_while_the_backup_is_in_warm_start_closes_the_channel(link: Link) -> None:
    primary, _ = in_sync_pair(link, DATA)
    link.kill("backup")
    backup = link.start_backup()
    link.manual_pump = True
    link.fire("primary", RETRY)  # hellos exchanged; the transfer waits to be pumped
    link.pump("primary", 2)  # SNAPSHOT_BEGIN and a first chunk
    assert backup.stage is S.WARM_START and backup.channel_up

    link.inject("backup", [FrameType.BATCH, primary.seq + 1, ["intruder", "x"], 0, [], 0])

    assert link.closed_by[-1][0] == "backup"
    assert link.closed_by[-1][1] == "unexpected BATCH in handshake step receive_snapshot"
    assert "intruder" not in backup.store
    assert not backup.channel_up
    assert primary.stage is S.BOOTSTRAPPING_SECONDARY  # saw the channel close


def test_an_ack_for_the_wrong_batch_closes_the_channel(link: Link) -> None:
    primary, backup = in_sync_pair(link, {"a": "1"})
    link.paused.add("primary")
    token = link.token()
    link.submit(token, UPDATE, "a", "2")
    link.flush()

    link.inject("primary", [FrameType.ACK, primary.in_flight[0].seq + 7, bytes(16), 0])

    assert link.closed_by[-1][0] == "primary"
    assert "unexpected batch" in link.closed_by[-1][1]
    assert link.responses[token] == REPLICATION_FAILED
    assert primary.store.get("a") == "1"
    assert primary.stage is S.BOOTSTRAPPING_SECONDARY
    assert backup.stage is S.BOOTSTRAPPING_PRIMARY


@pytest.mark.parametrize(
    ("role", "frame"),
    [
        ("primary", [FrameType.ACK, 1, bytes(16), 0]),  # nothing in flight
        ("primary", [FrameType.HELLO, "backup", True, bytes(16), 0, 0, 7, [], 0, "", False]),
        ("primary", [FrameType.SYNC_ACK, bytes(16)]),
        ("primary", [FrameType.SHARD_CHUNK, 0, ["k", "v"]]),
        ("backup", [FrameType.BATCH, 99, ["k", "v"], 0, [], 0]),  # out of order
        ("backup", [FrameType.SKIP, bytes(16), 0, 0]),
        ("backup", [FrameType.FETCH]),
        ("backup", [FrameType.SNAPSHOT_BEGIN, SHARDS, 1]),
        ("backup", [FrameType.SYNC_ACK, bytes(16)]),
        ("backup", [FrameType.HELLO, "primary", True, bytes(16), 0, 0, 7, [], 0, "", False]),
    ],
    ids=lambda v: v if isinstance(v, str) else FrameType(v[0]).name,
)
def test_an_unexpected_frame_in_sync_closes_the_channel(
    link: Link, role: str, frame: list[Any]
) -> None:
    primary, backup = in_sync_pair(link, {"a": "1"})
    checksums = (primary.store.checksum, backup.store.checksum)

    link.inject(role, frame)

    assert link.closed_by and link.closed_by[0][0] == role
    assert (primary.stage, backup.stage) == (S.BOOTSTRAPPING_SECONDARY, S.BOOTSTRAPPING_PRIMARY)
    assert (primary.store.checksum, backup.store.checksum) == checksums
    assert primary.confirmed and backup.confirmed


@pytest.mark.parametrize(
    ("role", "frame"),
    [
        ("backup", [FrameType.BATCH, "not a number"]),
        ("backup", [FrameType.BATCH, 2, ["k", "v", 7, "v"], 0, [], 0]),  # an integer key mid-batch
        ("backup", [FrameType.BATCH, 2, ["k", 7], 0, [], 0]),
        ("primary", [FrameType.ACK, "1", bytes(16), 0]),
        ("primary", [FrameType.HELLO, "backup"]),
    ],
    ids=lambda v: v if isinstance(v, str) else FrameType(v[0]).name,
)
def test_a_malformed_frame_is_refused_whole_before_any_handler_runs(
    link: Link, role: str, frame: list[Any]
) -> None:
    primary, backup = in_sync_pair(link, {"a": "1"})
    before = {r: (c.store.checksum, c.seq, c.stage) for r, c in link.cores.items()}
    with pytest.raises(FrameError):
        FrameCodec().feed(encode(frame))
    # The driver closes a channel that carries a bad frame: both sides lose it.
    link.pipes[role].append((encode(frame), None))
    link.run()

    assert not primary.channel_up and not backup.channel_up
    assert backup.store.get("k") is None and "k" not in backup.store
    for r, core in link.cores.items():
        assert (core.store.checksum, core.seq) == before[r][:2]


def test_a_fetch_from_a_backup_without_confirmed_data_is_refused(link: Link) -> None:
    backup = link.start_backup()
    assert not backup.confirmed
    backup.channel_opened(link.now)
    link.inject("backup", [FrameType.HELLO, "primary", False, bytes(16), 0, 0, 7, [], 0, "", False])
    assert link.kinds("backup") == [FrameType.HELLO]
    moves = len(link.moves())

    link.inject("backup", [FrameType.FETCH])

    assert link.kinds("backup")[-1] is FrameType.SYNC_NACK
    assert link.closed_by[-1][0] == "backup"
    # One failed transfer: counted once, one event (not peer_lost and transfer_failed).
    assert link.moves()[moves:] == [("backup", S.BOOTSTRAPPING_PRIMARY, S.BOOTSTRAPPING_PRIMARY)]
    assert link.transitions()[-1][3] == "fetch asked of a backup without confirmed data"
    assert backup.transfers_failed == 1
    assert not backup.channel_up


# -- standalone ------------------------------------------------------------------------


# -- epochs: a member refuses anything from a lower epoch than the highest it has seen --


def epoch_pair(
    link: Link, epoch: int, data: dict[str, str] | None = None
) -> tuple[PrimaryCore, BackupCore]:
    """``in_sync_pair`` under a primary of ``epoch`` (a coordinator's leader key)."""
    backup = link.start_backup()
    primary = link.start_primary(epoch=epoch)
    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    for key, value in (data or {}).items():
        assert link.write(INSERT, key, value) == Done(True)
    return primary, backup


def test_without_a_coordinator_everything_is_epoch_0(link: Link) -> None:
    primary, backup = in_sync_pair(link, DATA)
    for core in (primary, backup):
        assert (core.epoch, core.epoch_seen, core.copy_epoch) == (0, 0, 0)
        status = core.status(link.now)
        assert (status["epoch"], status["epoch_seen"], status["copy_epoch"]) == (0, 0, 0)
    assert {frame.epoch for role in ROLES for frame in link.sent[role]} == {0}
    assert primary.status(link.now)["stale"] is False


def test_equal_epochs_sync_and_replicate_as_without_one(link: Link) -> None:
    primary, backup = epoch_pair(link, 7, DATA)
    assert_same_data(primary, backup)
    for core in (primary, backup):
        assert (core.epoch, core.epoch_seen, core.copy_epoch) == (7, 7, 7)
    # Every frame either side sent carries the epoch; heartbeats before the HELLOs aside,
    # the backup's first frames are under the epoch it adopted from the primary's HELLO.
    assert {frame.epoch for frame in link.sent["primary"]} == {7}
    assert {frame.epoch for frame in link.sent["backup"]} == {7}
    # A lost link and a reconnection under the same epoch: skip, as ever.
    link.reset()
    mark = link.mark()
    link.fire("primary", RETRY)
    assert FrameType.SKIP in link.kinds("primary", mark["primary"])
    assert link.write(UPDATE, "key1", "later") == Done(True)
    assert_same_data(primary, backup)


@pytest.mark.parametrize(("epoch", "applied"), [(4, False), (7, True), (9, False)])
def test_a_batch_of_another_epoch_than_the_channels_is_refused_and_not_applied(
    link: Link, epoch: int, applied: bool
) -> None:
    primary, backup = epoch_pair(link, 7, {"a": "1"})
    seq, checksum = backup.seq, backup.store.checksum

    link.inject("backup", [FrameType.BATCH, seq + 1, ["intruder", "x"], 0, [], 0], epoch=epoch)

    assert ("intruder" in backup.store) is applied
    if applied:  # the control: the same batch under the channel's epoch is applied
        assert backup.seq == seq + 1  # (and acknowledged: the primary never sent it)
        return
    assert (backup.seq, backup.store.checksum) == (seq, checksum)
    assert not backup.channel_up and link.closed_by[-1][0] == "backup"
    # A lower epoch is a stale primary; a higher one ends a channel of the lower epoch.
    reason = "epoch 4 < 7 seen" if epoch < 7 else "epoch 7 < 9 seen"
    assert link.closed_by[-1][1] == reason
    assert backup.epoch_seen == max(7, epoch) and backup.confirmed


def test_a_hello_of_a_lower_epoch_is_refused_and_ours_tells_the_primary(link: Link) -> None:
    _, backup = epoch_pair(link, 7, DATA)
    link.kill("primary")
    kept = dict(backup.store.items())
    backup.channel_opened(link.now)
    mark = link.mark()

    link.inject(
        "backup", [FrameType.HELLO, "primary", True, bytes(16), 0, 0, 7, [], 0, "", False], epoch=4
    )

    assert link.closed_by[-1] == ("backup", "epoch 4 < 7 seen")
    assert not backup.channel_up and backup.step.value == "none"
    # Our HELLO (under epoch 7) goes out before the close: the primary learns it is stale.
    assert [(f.kind, f.epoch) for f in link.sent["backup"][mark["backup"] :]] == [
        (FrameType.HELLO, 7)
    ]
    assert dict(backup.store.items()) == kept and backup.confirmed
    assert backup.epoch_seen == 7


def test_a_stale_primary_changes_nothing_on_the_backup_and_steps_down(link: Link) -> None:
    """The old primary of epoch 4 comes back to a backup that has seen epoch 7."""
    backup = link.start_backup()
    backup.epoch_observed(link.now, 7)
    mark = link.mark()

    primary = link.start_primary(epoch=4)

    assert link.kinds("primary", mark["primary"]) == [FrameType.HELLO]  # and nothing more
    assert link.kinds("backup", mark["backup"]) == [FrameType.HELLO]
    assert ("backup", "epoch 4 < 7 seen") in link.closed_by
    assert primary.stale and primary.epoch_seen == 7 and primary.status(link.now)["stale"]
    assert not primary.confirmed and primary.stage is S.BOOTSTRAPPING_SECONDARY
    assert backup.stage is S.BOOTSTRAPPING_PRIMARY
    # A stale primary does not try again (the driver fences it): once the retry set
    # before it knew fires, nothing more is scheduled.
    mark = link.mark()
    link.advance(10 * link.settings.retry_max)
    assert link.kinds("primary", mark["primary"]) == []
    assert RETRY not in link.timers["primary"] and not primary.channel_up
    # And a channel that opens all the same (a connection under way) carries nothing.
    primary.channel_opened(link.now)
    link.run()
    assert link.kinds("primary", mark["primary"]) == []
    assert link.closed_by[-1] == ("primary", "epoch 4 < 7 seen")


def test_with_a_secret_epochs_count_from_the_authenticated_hello(make_link) -> None:
    link = make_link(secret="s3cret")
    primary, backup = epoch_pair(link, 7, DATA)
    assert backup.epoch == 7 and backup.copy_epoch == 7
    # The backup's proof went out before it knew the primary's epoch: proofs are not
    # held to it.
    response = next(f for f in link.sent["backup"] if f.kind is FrameType.AUTH_RESPONSE)
    assert response.epoch == 0
    link.kill("primary")
    backup.epoch_observed(link.now, 9)

    primary = link.start_primary(epoch=7)

    assert primary.stale and primary.epoch_seen == 9
    assert ("backup", "epoch 7 < 9 seen") in link.closed_by
    assert dict(backup.store.items()) == DATA and backup.copy_epoch == 7


def test_epoch_observed_drops_a_channel_of_a_lower_epoch_at_once(link: Link) -> None:
    primary, backup = epoch_pair(link, 3, DATA)
    backup.epoch_observed(link.now, 3)  # the channel's own epoch: nothing happens
    backup.epoch_observed(link.now, 2)
    assert backup.channel_up and backup.epoch_seen == 3

    backup.epoch_observed(link.now, 5)
    link.run()

    assert link.closed_by[-1] == ("backup", "epoch 3 < 5 seen")
    assert not backup.channel_up and not primary.channel_up
    assert (backup.epoch, backup.epoch_seen, backup.copy_epoch) == (5, 5, 3)
    assert backup.confirmed and dict(backup.store.items()) == DATA
    # The old primary comes back: refused (its HELLO is of epoch 3), and it steps down.
    link.fire("primary", RETRY)
    assert primary.stale and not backup.channel_up
    assert dict(backup.store.items()) == DATA


def test_a_primary_that_observes_a_newer_epoch_is_stale_and_loses_its_channel(
    link: Link,
) -> None:
    primary, backup = epoch_pair(link, 3, DATA)
    assert not primary.stale

    primary.epoch_observed(link.now, 5)
    link.run()

    assert primary.stale and link.closed_by[-1] == ("primary", "epoch 3 < 5 seen")
    assert primary.stage is S.BOOTSTRAPPING_SECONDARY
    assert isinstance(link.write(INSERT, "late", "x"), Refused)
    link.fire("primary", RETRY)
    assert not primary.channel_up  # no new channel under the old epoch


def test_a_frame_of_a_newer_epoch_from_the_backup_makes_the_primary_stale(link: Link) -> None:
    primary, _ = epoch_pair(link, 3, {"a": "1"})

    link.inject("primary", [FrameType.HEARTBEAT, 0], epoch=9)

    assert primary.stale and primary.epoch_seen == 9
    assert link.closed_by[-1] == ("primary", "epoch 3 < 9 seen")


def test_a_primary_that_meets_a_copy_of_a_newer_epoch_is_stale_and_sends_nothing(
    link: Link,
) -> None:
    """The HELLO's own epoch is the primary's, but its copy is of a newer one (a backup
    whose bookkeeping is wrong, or a forged HELLO): ``plan`` says STALE."""
    primary = link.start_primary(epoch=4)
    primary.channel_opened(link.now)
    link.run()  # our HELLO
    mark = link.mark()

    link.inject(
        "primary", [FrameType.HELLO, "backup", True, bytes(16), 0, 0, 7, [], 6, "", False], epoch=4
    )

    assert link.kinds("primary", mark["primary"]) == []  # no SKIP, SEND, FETCH, ROLLBACK
    assert link.closed_by[-1] == (
        "primary",
        "stale: the backup's copy is of epoch 6 > our 4: a newer primary exists",
    )
    assert primary.stale and primary.epoch_seen == 6 and not primary.confirmed


def test_a_new_primary_of_a_newer_epoch_fetches_the_backups_copy(link: Link) -> None:
    """A fresh primary of epoch 5 meets the copy confirmed under epoch 3: it takes it,
    and both copies are epoch 5's from then on."""
    _, backup = epoch_pair(link, 3, DATA)
    link.kill("primary")

    primary = link.start_primary(epoch=5)

    assert "newer epoch (3 > our copy's 0)" in " ".join(r for *_, r in link.transitions())
    assert FrameType.FETCH in link.kinds("primary")
    assert dict(primary.store.items()) == DATA and primary.stage is S.IN_SYNC
    for core in (primary, backup):
        assert (core.epoch, core.epoch_seen, core.copy_epoch) == (5, 5, 5)
    assert link.write(INSERT, "new", "x") == Done(True)
    assert_same_data(primary, backup)


def test_serve_epoch_ends_a_channel_of_the_old_epoch(link: Link) -> None:
    primary, backup = epoch_pair(link, 3, DATA)

    primary.serve_epoch(link.now, 8)
    link.run()

    assert ("primary", "the primary now serves epoch 8, not 3") in link.closed_by
    # It reconnects under the new epoch; the backup adopts it and the copy is epoch 8's.
    link.fire("primary", RETRY)
    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    assert (backup.epoch_seen, backup.copy_epoch, primary.copy_epoch) == (8, 8, 8)


def test_a_standalone_primary_answers_writes_at_once(make_link) -> None:
    link = make_link(standalone=True)
    primary = link.start_primary()

    assert primary.stage is S.IN_SYNC and primary.confirmed
    assert link.moves() == []
    assert link.timer_starts == []
    assert link.submit("t1", INSERT, "k", "v") == Done(True)
    assert link.submit("t2", INSERT, "k", "w") == Done(False)
    assert link.submit("t3", UPDATE, "k", "w") == Done(True)
    assert link.submit("t4", UPDATE, "nope", "w") == Done(False)
    assert link.read("primary", GET, "k") == Done(True, "w")
    assert link.submit("t5", DELETE, "k") == Done(True, "w")
    assert link.submit("t6", DELETE, "k") == Done(False, "")
    link.flush()
    assert link.sent["primary"] == [] and link.responses == {}
    assert len(primary.store) == 0
    # Load chunks too: insert mode leaves a key that holds a value, upsert writes it.
    assert primary.submit_pairs(["a", "1", "b", "2"], False, link.reply_to("t7")) == Loaded(2, 0)
    assert primary.submit_pairs(["a", "x", "c", "3"], False, link.reply_to("t8")) == Loaded(1, 1)
    assert primary.submit_pairs(["a", "y", "d", "4"], True, link.reply_to("t9")) == Loaded(2, 0)
    assert dict(primary.store.items()) == {"a": "y", "b": "2", "c": "3", "d": "4"}


# -- regressions -----------------------------------------------------------------------


def test_a_backup_keeps_its_confirmed_copy_until_a_replacement_has_fully_arrived(
    make_link,
) -> None:
    link = make_link(ack_timeout=0.5, undo_bytes=0)
    primary, backup, _, _ = time_out_a_batch(link)  # the backup now holds a rewound batch
    acknowledged = dict(primary.store.items())
    link.lossy.clear()
    link.manual_pump = True
    link.fire("primary", RETRY)  # the primary's data wins: it starts sending
    link.pump("primary", 1)  # SNAPSHOT_BEGIN arrives
    assert backup.stage is S.WARM_START

    link.kill("primary")  # kill -9 mid-transfer; only the primary is down
    link.manual_pump = False
    primary = link.start_primary()  # restarts empty

    # Every acknowledged write still exists: the primary got them from the backup
    # (plus, indeterminately, the rewound batch), never an empty database.
    assert primary.stage is S.IN_SYNC
    for key, value in acknowledged.items():
        if key != "a":  # "a" was updated by the rewound batch: indeterminate
            assert link.read("primary", GET, key) == Done(True, value)


def test_status_reports_uptime_from_the_time_asked_even_without_timers() -> None:
    store = make_store("sharded", SHARDS)
    primary = PrimaryCore(make_settings(standalone=True), store, now=100.0)
    primary.start(100.0)  # a standalone primary sets no timers
    assert primary.status(112.5)["uptime"] == 12.5


# -- authentication (a secret set) --------------------------------------------------------


def test_with_one_secret_the_pair_authenticates_then_syncs_on_keyed_frames(make_link) -> None:
    link = make_link(secret="s3cret")
    primary, backup = in_sync_pair(link, DATA)
    assert link.primary.codec is not None and link.primary.codec.secured
    assert link.backup.codec is not None and link.backup.codec.secured
    assert link.kinds("primary")[:2] == [FrameType.AUTH_CHALLENGE, FrameType.AUTH_PROOF]
    assert link.kinds("backup")[0] is FrameType.AUTH_RESPONSE
    assert link.write(UPDATE, "key1", "x") == Done(True)
    assert_same_data(primary, backup)


@pytest.mark.parametrize(
    ("primary_secret", "backup_secret", "primary_says", "backup_says"),
    [
        ("one", "two", "backup's proof does not match", "refused authentication"),
        ("one", None, "backup has no secret set", "backup has no secret set"),
        (None, "two", "sent a HELLO without proving it", "sent a HELLO without proving it"),
    ],
)
def test_a_pair_whose_secrets_differ_never_syncs_and_both_logs_say_why(
    make_link, primary_secret, backup_secret, primary_says, backup_says
) -> None:
    link = make_link()
    link.start_backup(make_settings(secret=backup_secret))
    link.start_primary(make_settings(secret=primary_secret))
    for _ in range(3):
        link.fire("primary", RETRY)
    primary, backup = link.primary, link.backup
    assert primary.stage is S.BOOTSTRAPPING_SECONDARY and not primary.confirmed
    assert backup.stage is S.BOOTSTRAPPING_PRIMARY
    assert FrameType.HELLO not in link.kinds("backup")  # nothing about our data was said
    messages = [r.getMessage() for r in link.caplog.records]
    assert any(m.startswith("primary") and primary_says in m for m in messages), messages
    assert any(m.startswith("backup") and backup_says in m for m in messages), messages


def test_a_forged_hello_before_the_proofs_is_refused(make_link) -> None:
    link = make_link(secret="s3cret")
    primary, backup = in_sync_pair(link, DATA)
    link.kill("primary")
    checksum = backup.store.checksum
    intruder = link.intrude()  # an outsider connects
    frames = link.intruders[intruder]
    link.intruder_sends(
        intruder, [FrameType.HELLO, "primary", True, bytes(16), 0, 0, 7, [], 0, "", False]
    )

    assert intruder not in backup.candidates and not backup.channel_up
    assert "without proving it" in link.closed_by[-1][1]
    assert backup.store.checksum == checksum and backup.confirmed
    assert [frame.kind for frame in frames] == [FrameType.AUTH_FAILED]


def test_a_recorded_proof_is_worthless_on_a_new_channel(make_link) -> None:
    link = make_link(secret="s3cret")
    in_sync_pair(link)
    recorded = next(f for f in link.sent["primary"] if f.kind is FrameType.AUTH_PROOF)
    backup = link.backup
    link.kill("primary")
    intruder = link.intrude()
    link.intruder_sends(intruder, [FrameType.AUTH_CHALLENGE, bytes(32)])  # the attacker's nonce
    link.intruder_sends(intruder, recorded.to_wire())  # replayed: the backup's nonce is new

    assert intruder not in backup.candidates and not backup.channel_up
    assert "does not match" in link.closed_by[-1][1]


# -- a new channel proves the secret before it replaces the live one -------------------


def serving(link: Link, primary: PrimaryCore, backup: BackupCore) -> None:
    """The live channel still replicates: a write goes through, both sides agree."""
    assert backup.channel_up and backup.stage is S.IN_SYNC and primary.stage is S.IN_SYNC
    assert link.write(INSERT, f"probe{link.token()}", "x") == Done(True)
    assert_same_data(primary, backup)


@pytest.mark.parametrize(
    ("frames", "why"),
    [
        (
            [[FrameType.HELLO, "primary", True, bytes(16), 0, 0, 7, [], 0, "", False]],
            "without proving it",
        ),
        ([[FrameType.AUTH_CHALLENGE, bytes(32)], [FrameType.AUTH_PROOF, bytes(32)]], "match"),
        (
            [[FrameType.AUTH_CHALLENGE, bytes(32)], [FrameType.BATCH, 9, ["k", "v"], 0, [], 0]],
            "BATCH",
        ),
        ([[FrameType.FENCE, "go away"]], "unexpected FENCE"),
        (
            [
                [FrameType.AUTH_CHALLENGE, bytes(32)],
                [FrameType.AUTH_FAILED, "\r\nCRITICAL\x1b[31m"],
            ],
            "refused authentication: \\r\\nCRITICAL\\x1b[31m",
        ),
    ],
)
def test_an_unproven_channel_is_closed_alone_and_the_live_one_serves_on(
    make_link, frames, why
) -> None:
    link = make_link(secret="s3cret")
    primary, backup = in_sync_pair(link, DATA)
    intruder = link.intrude()
    serving(link, primary, backup)  # an open candidate changes nothing
    link.intruder_sends(intruder, *frames)

    assert intruder not in backup.candidates
    assert why in link.closed_by[-1][1]
    assert "\r" not in link.closed_by[-1][1] and "\x1b" not in link.closed_by[-1][1]
    assert backup.candidates_refused == 1
    assert link.closed_by[:-1] == []  # nothing else was closed
    serving(link, primary, backup)


def test_garbage_on_a_candidate_closes_it_alone(make_link) -> None:
    link = make_link(secret="s3cret")
    primary, backup = in_sync_pair(link, DATA)
    intruder = link.intrude()
    backup.candidate_bytes(link.now, intruder, b"GET / HTTP/1.1\r\n\r\n" * 10)
    link.run()
    assert intruder not in backup.candidates and "bad frame" in link.closed_by[-1][1]
    serving(link, primary, backup)


def test_candidates_are_bounded_and_the_oldest_closes_first(make_link) -> None:
    from pbkv.candidates import MAX_CANDIDATES

    link = make_link(secret="s3cret")
    primary, backup = in_sync_pair(link, DATA)
    flood = [link.intrude() for _ in range(3 * MAX_CANDIDATES)]
    assert list(backup.candidates) == flood[-MAX_CANDIDATES:]
    assert backup.candidates_refused == 2 * MAX_CANDIDATES
    serving(link, primary, backup)


def test_a_candidate_that_does_not_prove_itself_in_time_is_closed(make_link) -> None:
    link = make_link(secret="s3cret")
    primary, backup = in_sync_pair(link, DATA)
    intruder = link.intrude()
    link.advance(link.settings.peer_timeout / 2)
    assert intruder in backup.candidates
    link.advance(link.settings.peer_timeout)  # heartbeats keep the live channel up
    assert intruder not in backup.candidates
    assert "no proof within" in link.closed_by[-1][1]
    serving(link, primary, backup)


def test_the_primarys_new_channel_replaces_the_live_one_once_its_proof_holds(
    make_link,
) -> None:
    link = make_link(secret="s3cret")
    primary, backup = in_sync_pair(link, DATA)
    attackers = [link.intrude() for _ in range(3)]
    # The primary lost the channel (the backup did not notice) and connects again.
    link.paused.add("backup")
    link.reset(notify=("primary",))
    assert backup.channel_up  # the old channel, as far as the backup knows
    link.paused.clear()
    link.fire("primary", RETRY)

    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    assert link.candidate is None and backup.codec is not None and backup.codec.secured
    assert any("replaced by a new connection" in why for _, why in link.closed_by)
    assert set(backup.candidates) == set(attackers)  # the attackers' wait on, alone
    serving(link, primary, backup)


def test_no_heartbeat_goes_out_before_the_proofs(make_link) -> None:
    link = make_link(secret="s3cret")
    link.start_backup()
    link.paused.add("backup")  # the challenge waits in the pipe
    link.start_primary()
    mark = link.mark()
    link.advance(5 * link.settings.heartbeat_interval)
    assert FrameType.HEARTBEAT not in link.kinds("primary", mark["primary"])
    link.paused.clear()
    link.run()
    assert link.primary.stage is S.IN_SYNC


def test_a_confirmed_backup_serves_its_kept_copy_while_a_new_one_arrives_or_fails(
    make_link,
) -> None:
    link = make_link(ack_timeout=0.5, undo_bytes=0)
    primary, backup, _, _ = time_out_a_batch(link)  # the backup's copy differs: a transfer
    kept = dict(backup.store.items())
    link.lossy.clear()
    link.manual_pump = True
    link.fire("primary", RETRY)
    link.pump("primary", 1)  # SNAPSHOT_BEGIN: the replacement starts
    assert backup.stage is S.WARM_START and backup.confirmed
    key = next(iter(kept))
    assert link.read("backup", GET, key) == Done(True, kept[key])
    link.reset()  # the transfer is cut: listen again, still serving the kept copy
    assert backup.stage is S.WARM_START
    assert link.read("backup", COUNT) == Counted(len(kept))
    link.manual_pump = False
    link.fire("primary", RETRY)  # the primary sends again, all of it this time
    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    assert_same_data(primary, backup)


# -- partial resynchronization -------------------------------------------------------------


def lose_acks_of_batches(link: Link, batches: int) -> tuple[PrimaryCore, BackupCore]:
    """In sync with DATA; the backup applies ``batches`` more whose ACKs are lost, the
    primary times them out (rewinds, fences) and reconnects when the link is back."""
    primary, backup = in_sync_pair(link, DATA)
    link.lossy.add("backup")
    for i in range(batches):
        link.submit(link.token(), UPDATE, f"key{i}", f"lost {i}")
        link.submit(link.token(), INSERT, f"new{i}", "lost")
        link.flush()
    assert backup.seq == primary.seq + batches
    link.now += link.settings.ack_timeout + 0.01
    link.fire("primary", TICK)
    assert primary.stage is S.BOOTSTRAPPING_SECONDARY
    link.lossy.clear()
    return primary, backup


def test_every_batch_in_flight_is_rolled_back_newest_first(make_link) -> None:
    link = make_link(batches_in_flight=3)
    primary, backup = lose_acks_of_batches(link, 3)
    mark = link.mark()

    link.fire("primary", RETRY)

    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    sent = link.kinds("primary", mark["primary"]) + link.kinds("backup", mark["backup"])
    assert FrameType.ROLLBACK in sent and FrameType.SNAPSHOT_BEGIN not in sent
    assert dict(backup.store.items()) == DATA  # every write of the three batches undone
    assert_same_data(primary, backup)
    assert any(
        "partial: the backup rolls back 3 batches" in r.getMessage() for r in link.caplog.records
    )
    assert backup.undo_points() == ()  # the record starts again after a sync
    assert link.write(UPDATE, "key1", "after") == Done(True)
    assert_same_data(primary, backup)


def _another_history(backup: BackupCore, seq: int) -> None:
    backup.history ^= 1


def _undo_record_lost(backup: BackupCore, seq: int) -> None:
    while backup.undo[0].seq <= seq + 1:  # the record no longer reaches back to seq
        backup.undo.popleft()


def _recorded_state_differs(backup: BackupCore, seq: int) -> None:
    next(u for u in backup.undo if u.seq == seq + 1).checksum_before ^= 1


def _undo_record_wrong(backup: BackupCore, seq: int) -> None:
    last = backup.undo[-1]
    last.olds = ("not what it was", *last.olds[1:])


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (_another_history, "another history"),
        (_undo_record_lost, "undo record is too short"),
        (_recorded_state_differs, "differs from ours"),
        (_undo_record_wrong, "but the data is not the primary's"),  # refused, then full
    ],
    ids=["history", "record-too-short", "state-differs", "rollback-misses"],
)
def test_every_other_case_falls_back_to_a_full_transfer(make_link, damage, why) -> None:
    link = make_link(batches_in_flight=2)
    primary, backup = lose_acks_of_batches(link, 2)
    damage(backup, primary.seq)
    full = primary.resyncs_full

    link.fire("primary", RETRY)
    link.fire("primary", RETRY)  # after a refused rollback, the next attempt

    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    assert primary.resyncs_full == full + 1
    assert dict(backup.store.items()) == DATA
    assert_same_data(primary, backup)
    assert any(why in r.getMessage() for r in link.caplog.records), why


def test_without_an_undo_record_every_resync_is_full(make_link) -> None:
    link = make_link(undo_bytes=0)
    primary, backup = lose_acks_of_batches(link, 1)
    link.fire("primary", RETRY)
    assert (primary.resyncs_partial, primary.resyncs_full) == (0, 2)
    assert_same_data(primary, backup)


def test_a_full_resync_refills_the_backups_store_and_hands_the_old_pairs_over(make_link):
    link = make_link(undo_bytes=0)
    primary, backup = lose_acks_of_batches(link, 1)
    store, held = backup.store, len(backup.store)  # DATA and the batch that was lost
    link.fire("primary", RETRY)
    assert backup.store is store  # a dump under way goes on from the next shard
    assert dict(store.items()) == DATA
    assert link.discarded["backup"][-1] == held  # for the driver to free, a shard a turn
    assert link.discarded["primary"] == []


def test_a_copy_received_in_part_is_handed_over_too(link: Link) -> None:
    primary, _ = in_sync_pair(link, DATA)
    link.kill("backup")
    backup = link.start_backup()
    link.manual_pump = True
    link.fire("primary", RETRY)
    link.pump("primary", frames=2)  # SNAPSHOT_BEGIN and one chunk of pairs
    received = len(backup.receiver.store)
    assert received > 0
    link.kill("primary")
    assert link.discarded["backup"][-1] == received
    assert len(backup.store) == 0  # its own copy, empty: a fresh backup


def test_the_undo_record_is_bounded_by_bytes(make_link) -> None:
    link = make_link(undo_bytes=600)
    primary, backup = in_sync_pair(link)
    for i in range(20):
        assert link.write(INSERT, f"k{i}", "v" * 50) == Done(True)
    assert 0 < len(backup.undo) < 20
    assert backup.undo_size <= 600
    assert [seq for seq, _, _ in backup.undo_points()] == list(
        range(backup.seq - len(backup.undo), backup.seq)
    )


def test_the_undo_record_holds_nothing_the_garbage_collector_walks_item_by_item(
    make_link,
) -> None:
    link = make_link()
    primary, backup = in_sync_pair(link, {"a": "1"})
    assert link.write(UPDATE, "a", "2") == Done(True)
    assert link.write(DELETE, "a") == Done(True, "2")
    gc.collect()  # a tuple of strings and None is untracked once a collection saw it
    kept = [part for entry in backup.undo for part in (entry.ops, entry.olds)]
    assert kept[-2:] == [("a", None), ("2",)]
    assert not any(gc.is_tracked(part) for part in kept)
    for entry in primary.applied_record.entries:
        assert not gc.is_tracked(entry.ops) and not gc.is_tracked(entry.keyed)


@pytest.mark.pure_python
def test_catches_rolling_back_one_batch_too_few(make_link, monkeypatch) -> None:
    original = BackupCore._undo_batches
    monkeypatch.setattr(BackupCore, "_undo_batches", lambda self, steps: original(self, steps[1:]))
    with pytest.raises(AssertionError):
        test_every_batch_in_flight_is_rolled_back_newest_first(make_link)


@pytest.mark.pure_python
def test_catches_skipping_the_checksum_comparison_after_a_rollback(make_link, monkeypatch) -> None:
    monkeypatch.setattr(BackupCore, "_holds", lambda self, checksum, count: True)
    with pytest.raises(AssertionError):
        test_every_other_case_falls_back_to_a_full_transfer(
            make_link, _undo_record_wrong, "but the data is not the primary's"
        )


# -- a dishonest primary: the backup checks every directive against its own copy -------


def dishonest_primary(link: Link) -> tuple[BackupCore, dict[str, str], int]:
    """A backup in sync with several batches in its undo record; then its primary is
    gone and a channel from the primary's address says it is a confirmed primary of the
    same history, at the backup's seq (whatever it proposes next is a lie)."""
    primary, backup = in_sync_pair(link, DATA)
    for i in range(3):
        assert link.write(UPDATE, f"key{i}", f"later {i}") == Done(True)
    assert len(backup.undo) == 4  # the load, then three updates
    link.kill("primary")
    kept, checksum = dict(backup.store.items()), backup.store.checksum
    backup.channel_opened(link.now)
    hello = [FrameType.HELLO, "primary", True, checksum_to_bytes(checksum)]
    link.inject("backup", [*hello, len(kept), backup.seq, backup.history, [], 0, "", False])
    assert backup.step.value == "await_directive"
    return backup, kept, checksum


def refused_and_kept(link: Link, backup: BackupCore, kept: dict[str, str], why: str) -> None:
    assert link.kinds("backup")[-1] is FrameType.SYNC_NACK
    assert why in link.sent["backup"][-1].reason
    assert not backup.channel_up and backup.transfers_failed == 1
    assert dict(backup.store.items()) == kept and backup.confirmed


def test_a_skip_whose_checksum_differs_from_the_backups_copy_is_refused(make_link) -> None:
    link = make_link()
    backup, kept, checksum = dishonest_primary(link)
    seq, lie = backup.seq, checksum_to_bytes(checksum ^ 1)
    link.inject("backup", [FrameType.SKIP, lie, len(kept), seq + 5])
    refused_and_kept(link, backup, kept, "skip proposed but the data differs")
    assert backup.seq == seq
    assert backup.stage is S.BOOTSTRAPPING_PRIMARY


def test_a_skip_with_the_right_checksum_but_another_count_is_refused(make_link) -> None:
    link = make_link()
    backup, kept, checksum = dishonest_primary(link)
    link.inject("backup", [FrameType.SKIP, checksum_to_bytes(checksum), len(kept) + 1, 0])
    refused_and_kept(link, backup, kept, "skip proposed but the data differs")


def test_a_rollback_to_a_seq_the_backup_has_no_record_of_is_refused(make_link) -> None:
    link = make_link()
    backup, kept, checksum = dishonest_primary(link)
    seq = backup.seq
    link.inject("backup", [FrameType.ROLLBACK, seq + 10, checksum_to_bytes(checksum), 0])
    refused_and_kept(link, backup, kept, f"cannot roll back to seq {seq + 10}")
    assert backup.seq == seq


def test_a_rollback_to_a_recorded_seq_but_a_state_it_never_held_is_refused(make_link) -> None:
    """The seq is in the undo record, the checksum the primary claims for it is not what
    undoing reaches: the backup undoes, compares, redoes, refuses."""
    link = make_link()
    backup, kept, checksum = dishonest_primary(link)
    seq, (target, _, count) = backup.seq, backup.undo_points()[0]
    link.inject("backup", [FrameType.ROLLBACK, target, checksum_to_bytes(checksum ^ 7), count])
    refused_and_kept(link, backup, kept, "but the data is not the primary's")
    assert backup.seq == seq and backup.store.checksum == checksum


@pytest.mark.pure_python
def test_catches_a_backup_that_skips_without_comparing_its_copy(make_link, monkeypatch) -> None:
    import pbkv.backup
    from pbkv.stages import Directive, refusal

    def no_comparison_on_skip(directive, target, ours, theirs):
        return None if directive is Directive.SKIP else refusal(directive, target, ours, theirs)

    monkeypatch.setattr(pbkv.backup, "refusal", no_comparison_on_skip)
    with pytest.raises(AssertionError):
        test_a_skip_whose_checksum_differs_from_the_backups_copy_is_refused(make_link)


# -- every acknowledgement says what the backup holds ------------------------------------


def test_an_ack_carries_the_backups_checksum_and_count_after_the_batch(link: Link) -> None:
    primary, backup = in_sync_pair(link, DATA)
    assert link.write(INSERT, "new", "v") == Done(True)
    ack = link.sent["backup"][-1]
    assert isinstance(ack, Ack) and ack.seq == backup.seq == primary.seq
    assert (ack.checksum, ack.count) == (primary.store.checksum, len(primary.store))
    assert primary.backup_diverged == 0


def test_a_backup_whose_copy_went_astray_is_found_at_the_next_batch_and_sent_ours(
    link: Link,
) -> None:
    """The batch's writes are in both copies and answered so; the channel closes (the
    writes after it are rewound) and the handshake sends the primary's copy whole."""
    primary, backup = in_sync_pair(link, DATA)
    backup.store.write("key3", "went astray")  # what no batch did: a bug, bad memory
    closed = len(link.closed_by)
    link.paused.add("primary")  # its ACK waits
    first, second = link.token(), link.token()
    assert link.submit(first, INSERT, "new", "v") is None
    link.flush()
    assert link.submit(second, INSERT, "after", "v") is None  # behind it
    link.flush()
    assert second not in link.responses
    link.paused.clear()
    link.run()

    assert link.responses[first] == Done(True)
    assert link.responses[second] == REPLICATION_FAILED
    assert primary.store.get("new") == "v" and primary.store.get("after") is None
    assert primary.backup_diverged == 1
    assert primary.status(link.now)["backup_diverged"] == 1
    reason = f"the backup's copy differs from ours after batch {primary.seq}"
    assert link.closed_by[closed] == ("primary", reason)
    assert "its copy went astray" in link.caplog.text
    full = primary.resyncs_full
    link.fire("primary", RETRY)
    assert primary.resyncs_full == full + 1
    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    assert backup.store.get("key3") == DATA["key3"] and backup.store.get("new") == "v"
    assert_same_data(primary, backup)
    assert link.write(INSERT, "later", "v") == Done(True)
    assert primary.backup_diverged == 1


# -- max_memory, timers ----------------------------------------------------------------


def test_a_write_past_max_memory_is_refused_and_nothing_of_it_is_sent(make_link) -> None:
    limit = 2 * (PAIR_OVERHEAD + len("key0") + 10)
    link = make_link(max_memory=limit)
    primary, backup = in_sync_pair(link, {"key0": "v" * 10, "key1": "v" * 10})
    assert primary.store.memory_bytes <= limit
    mark = link.mark()

    assert link.write(INSERT, "key2", "v") == MemoryFull(limit)
    assert link.write(UPDATE, "key0", "v" * 11) == MemoryFull(limit)  # it grows
    assert link.kinds("primary", mark["primary"]) == []
    assert "key2" not in primary.store and "key2" not in backup.store

    assert link.write(UPDATE, "key0", "v" * 10) == Done(True)  # no growth
    assert link.write(UPDATE, "key0", "short") == Done(True)  # shrinking always passes
    assert link.write(INSERT, "key1", "v" * 99) == Done(False)  # exists: grows nothing
    assert link.write(DELETE, "key1") == Done(True, "v" * 10)
    assert link.write(INSERT, "key2", "v") == Done(True)  # room again
    assert_same_data(primary, backup)


def test_the_memory_limit_comes_before_the_backups_redirect(make_link) -> None:
    link = make_link(max_memory=1)
    link.start_backup()
    refused = link.backup.submit(INSERT, "k", "v", link.reply_to("t"))
    assert refused == MemoryFull(1)
    assert isinstance(link.backup.submit(DELETE, "k", None, link.reply_to("t")), Refused)


def test_writes_not_yet_acknowledged_count_toward_max_memory(make_link) -> None:
    size = PAIR_OVERHEAD + len("k0") + 100
    link = make_link(max_memory=3 * size, batches_in_flight=2)
    primary, backup = in_sync_pair(link)
    link.paused.add("primary")  # the backup's ACKs wait on the wire
    tokens = [link.token() for _ in range(5)]
    # Two in flight, one queued behind the full window: the fourth would pass the limit.
    outcomes = []
    for i, token in enumerate(tokens):
        outcomes.append(link.submit(token, INSERT, f"k{i}", "v" * 100))
        link.flush()
    assert outcomes == [None, None, None, MemoryFull(3 * size), MemoryFull(3 * size)]
    assert primary.store.memory_bytes == 0
    assert primary.pending_write_bytes == 3 * size
    assert primary.status(link.now)["pending_write_bytes"] == 3 * size
    # Growth is counted against the value in flight, not the acknowledged one.
    assert link.submit(link.token(), UPDATE, "k0", "v" * 101) == MemoryFull(3 * size)
    shrink = link.token()
    assert link.submit(shrink, UPDATE, "k0", "v" * 10) is None  # shrinking passes
    assert link.submit(link.token(), INSERT, "k0", "v" * 500) is None  # exists: no growth
    assert primary.pending_write_bytes == 3 * size

    link.paused.clear()
    link.run()
    assert primary.pending_write_bytes == 0
    assert primary.store.memory_bytes == 3 * size - 90
    assert link.responses[shrink] == Done(True)
    assert link.write(INSERT, "k9", "v") == MemoryFull(3 * size)  # the store is full now
    assert_same_data(primary, backup)


def test_a_rewind_gives_back_the_pending_bytes(make_link) -> None:
    link = make_link(max_memory=10_000)
    primary, _ = in_sync_pair(link)
    link.paused.add("primary")
    link.submit(link.token(), INSERT, "a", "v" * 1000)
    link.flush()
    link.submit(link.token(), INSERT, "b", "v" * 1000)  # queued behind the window
    assert primary.pending_write_bytes == 2 * (PAIR_OVERHEAD + 1001)
    link.kill("backup")
    assert primary.pending_write_bytes == 0
    assert primary.store.memory_bytes == 0


@pytest.mark.parametrize(("role", "timer"), [("primary", Timer.WAIT_PRIMARY), ("backup", RETRY)])
def test_a_timer_the_role_never_starts_is_an_error(link: Link, role: str, timer: Timer) -> None:
    in_sync_pair(link)
    with pytest.raises(ValueError, match=f"starts no {timer.value} timer"):
        link.cores[role].timer_fired(link.now, timer)


# -- safe retries: the idempotency table is replicated state ----------------------------


def tables(*cores: Core) -> list[list[tuple[Any, ...]]]:
    return [[(k, *e[:4]) for k, e in core.store.idempotency.entries.items()] for core in cores]


def test_a_keyed_write_is_applied_once_and_its_reply_replicated(link: Link) -> None:
    primary, backup = in_sync_pair(link, {"a": "1"})
    assert link.write(INSERT, "k", "v", ident="id-1") == Done(True)
    assert link.write(DELETE, "a", ident="id-2") == Done(True, "1")
    # A logical failure is remembered too, and travels in a batch of its own.
    seq = primary.seq
    assert link.write(INSERT, "k", "other", ident="id-3") == Done(False)
    assert primary.seq == seq + 1
    first, second = tables(primary, backup)
    assert [entry[0] for entry in first] == ["id-1", "id-2", "id-3"]
    assert first == second
    assert_same_data(primary, backup)
    seq, sent = primary.seq, primary.batches_sent

    # Retries: the same replies, nothing applied, nothing sent.
    assert link.write(INSERT, "k", "v", ident="id-1") == Done(True)
    assert link.write(DELETE, "a", ident="id-2") == Done(True, "1")
    assert link.write(INSERT, "k", "other", ident="id-3") == Done(False)
    assert (primary.seq, primary.batches_sent) == (seq, sent)
    # The same key with another request: refused, nothing changes.
    assert link.write(INSERT, "k2", "v", ident="id-1") == KeyReused()
    assert link.write(DELETE, "k", ident="id-1") == KeyReused()
    assert "k2" not in primary.store and primary.store.get("k") == "v"
    # Without a key, as before: no entry.
    assert link.write(INSERT, "k", "v") == Done(False)
    assert len(primary.store.idempotency) == 3
    assert_same_data(primary, backup)


def test_a_retry_while_the_first_is_in_flight_waits_for_its_outcome(link: Link) -> None:
    primary, backup = in_sync_pair(link)
    first, retry, other = link.token(), link.token(), link.token()
    assert link.submit(first, INSERT, "k", "v", "id-1") is None
    assert link.submit(retry, INSERT, "k", "v", "id-1") is None
    assert link.submit(other, INSERT, "k", "x", "id-1") == KeyReused()
    assert first not in link.responses and retry not in link.responses
    link.flush()
    assert link.responses[first] == link.responses[retry] == Done(True)
    assert primary.writes_replicated == 1 and backup.batches_applied == 1
    assert primary.keyed == {}


def test_a_rewound_keyed_write_fails_with_its_waiting_retry_and_is_rolled_back(
    make_link: Callable[..., Link],
) -> None:
    link = make_link(ack_timeout=0.5)
    primary, backup = in_sync_pair(link, {"a": "1"})
    before = tables(primary)[0]
    link.lossy.add("backup")
    first, retry = link.token(), link.token()
    link.submit(first, UPDATE, "a", "2", "id-1")
    link.flush()
    link.submit(retry, UPDATE, "a", "2", "id-1")
    assert "id-1" in backup.store.idempotency.entries  # applied there; its ACK is lost
    link.now += 0.6
    link.fire("primary", TICK)
    assert link.responses[first] == link.responses[retry] == REPLICATION_FAILED
    assert primary.keyed == {} and tables(primary)[0] == before
    link.lossy.clear()
    mark = link.mark()

    link.fire("primary", RETRY)

    assert FrameType.ROLLBACK in link.kinds("primary", mark["primary"])
    assert tables(backup) == [before]  # the entry went with the batch
    assert_same_data(primary, backup)
    # The client's next retry applies it, once.
    assert link.write(UPDATE, "a", "2", ident="id-1") == Done(True)
    assert link.write(UPDATE, "a", "2", ident="id-1") == Done(True)
    assert primary.writes_replicated == 2  # {a}, then the retry; the rewound one not
    assert tables(primary) == tables(backup)


@pytest.mark.parametrize("restart", ["backup", "primary"])
def test_a_full_transfer_carries_the_table_both_ways(make_link, restart: str) -> None:
    link = make_link(undo_bytes=0)
    primary, backup = in_sync_pair(link, {"a": "1"})
    for i in range(5):
        assert link.write(INSERT, f"k{i}", "v", ident=f"id-{i}") == Done(True)
    assert link.write(DELETE, "a", ident="id-del") == Done(True, "1")
    expected = tables(primary)[0]
    clock = primary.store.idempotency.clock

    link.kill(restart)  # kill -9: its copy, table included, is gone
    if restart == "backup":
        backup = link.start_backup()  # empty: the primary sends its data
        link.fire("primary", RETRY)
    else:
        primary = link.start_primary()  # empty: it warm-starts from the backup's copy

    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    assert tables(primary, backup) == [expected, expected]
    assert primary.store.idempotency.clock == backup.store.idempotency.clock == clock
    assert_same_data(primary, backup)
    # The retry after the restart gets the original reply; the write is not applied again.
    assert link.write(DELETE, "a", ident="id-del") == Done(True, "1")
    assert link.write(INSERT, "k0", "v", ident="id-0") == Done(True)
    assert link.write(INSERT, "k0", "v", ident="new") == Done(False)


def test_entries_expire_alike_on_both_copies_on_the_primarys_time(make_link) -> None:
    link = make_link(idempotency_ttl=1.0, idempotency_keys=3)
    primary, backup = in_sync_pair(link)
    assert link.write(INSERT, "a", "1", ident="old") == Done(True)
    link.now += 0.6
    for ident in ("b", "c"):
        assert link.write(INSERT, ident, "1", ident=ident) == Done(True)
    link.now += 0.6  # "old" is 1.2 s old, but nothing expires without a batch
    assert "old" in primary.store.idempotency.entries
    assert link.write(INSERT, "d", "1") == Done(True)  # any batch carries the time
    assert list(primary.store.idempotency.entries) == ["b", "c"]
    assert tables(primary) == tables(backup)
    for ident in ("e", "f"):
        assert link.write(INSERT, ident, "1", ident=ident) == Done(True)
    assert list(primary.store.idempotency.entries) == ["c", "e", "f"]  # at most 3
    assert tables(primary) == tables(backup)
    assert_same_data(primary, backup)
    # An expired key is a new one.
    assert link.write(INSERT, "a", "1", ident="old") == Done(False)


def test_remembered_replies_count_in_max_memory(make_link) -> None:
    limit = PAIR_OVERHEAD + ENTRY_OVERHEAD + 50
    link = make_link(max_memory=limit)
    primary, _ = in_sync_pair(link)
    assert link.write(INSERT, "k", "v", ident="i" * 200) == MemoryFull(limit)
    assert link.write(INSERT, "k", "v", ident="short") == Done(True)
    assert primary.store.memory_bytes > PAIR_OVERHEAD + 2


def test_the_backup_says_how_long_the_last_full_transfer_took(link: Link) -> None:
    primary, _ = in_sync_pair(link, DATA)
    link.kill("backup")
    backup = link.start_backup()
    link.manual_pump = True
    link.fire("primary", RETRY)
    link.pump("primary", frames=1)  # SNAPSHOT_BEGIN: the clock starts
    link.now += 1.5
    while link.pump("primary", frames=2):
        pass
    link.manual_pump = False
    assert backup.stage is S.IN_SYNC
    assert backup.status(link.now)["last_transfer_seconds"] == 1.5


# -- persistence: what the cores ask to log, and recovered copies ----------------------

PERSISTENT = {"persistence": "always", "data_dir": "unused-by-the-cores"}


def logged(link: Link, role: str) -> list[Record | DiskState]:
    return [entry for _, _, entry in link.persisted[role]]


def test_every_batch_is_logged_before_what_acknowledges_it(make_link) -> None:
    link = make_link(**PERSISTENT)
    primary, backup = in_sync_pair(link)
    # The empty start replaced both copies: a new base on each, before the SYNC_ACK.
    assert logged(link, "primary") == [DiskState(primary.history, 0, 0)]
    assert logged(link, "backup") == [DiskState(backup.history, 0, 0)]
    sent_before, _, _ = link.persisted["backup"][0]
    assert FrameType.SYNC_ACK not in link.kinds("backup")[:sent_before]
    assert FrameType.SYNC_ACK in link.kinds("backup")[sent_before:]

    assert link.write(INSERT, "a", "1") == Done(True)
    assert link.write(DELETE, "a") == Done(True, "1")
    batches = [
        Record.batch(primary.history, 1, 0, ["a", "1"]),
        Record.batch(primary.history, 2, 0, ["a", None]),
    ]
    # Each record carries its batch's table time (and keyed entries: none here), the
    # same on both copies.
    for role in ("primary", "backup"):
        records = logged(link, role)[1:]
        assert [replace(record, extra=b"") for record in records] == batches
        assert [batch_of(record.extra)[1] for record in records] == [[], []]
    assert logged(link, "primary")[1:] == logged(link, "backup")[1:]
    # The backup logged each batch before its ACK; the primary before answering it.
    for sent_before, _, record in link.persisted["backup"][1:]:
        assert isinstance(record, Record)
        acks = [f.seq for f in link.sent["backup"][:sent_before] if f.kind is FrameType.ACK]
        assert record.seq not in acks
    answered = [answered for _, answered, _ in link.persisted["primary"][1:]]
    assert answered == [0, 1]  # the first write's answer came after its record


def test_without_persistence_the_cores_log_nothing(link: Link) -> None:
    in_sync_pair(link, DATA)
    assert link.persisted == {"primary": [], "backup": []}


def test_a_rollback_is_logged_then_a_mark(make_link) -> None:
    link = make_link(**PERSISTENT)
    primary, backup = in_sync_pair(link, {"k": "v"})
    link.lossy.add("backup")  # the ACK of the next batch is lost: the primary rewinds it
    token = link.token()
    assert link.submit(token, UPDATE, "k", "lost") is None
    link.flush()
    link.now += 10
    link.fire("primary", Timer.TICK)
    link.lossy.clear()
    link.fire("primary", RETRY)
    assert primary.stage is S.IN_SYNC and backup.store.get("k") == "v"
    records = [r for r in logged(link, "backup") if isinstance(r, Record)]
    kinds = [r.kind for r in records]
    assert kinds[-3:] == [RecordKind.BATCH, RecordKind.ROLLBACK, RecordKind.MARK]
    assert records[-2].seq == records[-1].seq == primary.seq
    # The primary kept its data: a mark of the state both now share, no new base.
    assert logged(link, "primary")[-1] == Record.mark(DiskState(primary.history, primary.seq, 0))


def recovered(
    link: Link, role: str, data: dict[str, str], history: int, seq: int, start: bool = True
) -> Core:
    """A core as the node builds it after loading its data folder (``persist/driver.py``);
    without ``start``, not started yet (the caller adds recovered batches first)."""
    store = new_store()
    for key, value in data.items():
        store.write(key, value)
    settings = make_settings(**PERSISTENT)
    rng = random.Random(link.rng.random())
    core: Core
    if role == "primary":
        core = PrimaryCore(settings, store, link.now, rng)
    else:
        core = BackupCore(settings, store, link.now, rng)
    core.recovered_from(DiskState(history, seq))
    if start:
        link._start(role, core)
    return core


def test_a_recovered_primary_sends_its_copy_to_an_empty_backup(make_link) -> None:
    link = make_link(**PERSISTENT)
    link.unreachable.add("backup")
    primary = recovered(link, "primary", DATA, history=11, seq=9)
    assert primary.stage is S.BOOTSTRAPPING_SECONDARY and primary.recovered
    # Not confirmed: it may have lost the last writes of its peer's copy.
    assert link.read("primary", GET, "key1") == Refused(S.BOOTSTRAPPING_SECONDARY, "primary")
    link.unreachable.clear()
    backup = link.start_backup()
    link.fire("primary", RETRY)
    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    assert dict(backup.store.items()) == DATA and not primary.recovered
    assert_same_data(primary, backup)
    assert "the backup holds no confirmed or recovered copy" in link.caplog.text


def test_an_empty_primary_fetches_a_recovered_backups_copy(make_link) -> None:
    link = make_link(**PERSISTENT)
    backup = recovered(link, "backup", DATA, history=11, seq=9)
    primary = link.start_primary()
    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    assert dict(primary.store.items()) == DATA and primary.seq == 9
    # The primary's store was replaced: a new base; the backup's kept: a mark.
    assert logged(link, "primary")[-1] == DiskState(primary.history, 9, 0)
    assert logged(link, "backup")[-1] == Record.mark(DiskState(backup.history, 9, 0))


@pytest.mark.parametrize("newer", ["primary", "backup"])
def test_of_two_recovered_copies_of_one_history_the_primarys_wins(make_link, newer: str) -> None:
    """The backup's extra batches were never acknowledged (the primary logs a batch
    once the backup acknowledged it): the primary's copy wins, as a live one does.
    Without an undo record reaching the primary's seq, the backup is sent it whole."""
    link = make_link(**PERSISTENT)
    old, new = dict(DATA), {**DATA, "key1": "newer", "extra": "x"}
    seqs = {"primary": 5, "backup": 5}
    seqs[newer] = 7
    backup = recovered(link, "backup", new if newer == "backup" else old, 11, seqs["backup"])
    primary = recovered(link, "primary", new if newer == "primary" else old, 11, seqs["primary"])
    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    won = new if newer == "primary" else old
    assert dict(primary.store.items()) == won == dict(backup.store.items())
    assert primary.seq == backup.seq == seqs["primary"]
    assert primary.resyncs_full == 1
    if newer == "backup":
        assert "batches beyond ours were never acknowledged, and it cannot roll" in link.caplog.text


def test_a_recovered_backup_rolls_back_the_batches_its_primary_never_logged(make_link) -> None:
    """Both restarted from disk, the backup's log holding two batches after the last
    sync that the primary's lacks: it undoes them (its undo record rebuilt from its
    log at start, the idempotency entries included), no transfer."""
    link = make_link(**PERSISTENT)
    backup = recovered(link, "backup", DATA, 11, 5, start=False)
    assert isinstance(backup, BackupCore)
    keyed = ["ident-1", 42, True, None]
    backup.recovered_batch(Record.batch(11, 6, 0, ["key1", "tentative"], batch_extra(10, [])))
    backup.recovered_batch(Record.batch(11, 7, 0, ["extra", "x"], batch_extra(20, keyed)))
    backup.seq = 7
    assert [u.seq for u in backup.undo] == [6, 7] and backup.store.idempotency.get("ident-1")
    link._start("backup", backup)
    primary = recovered(link, "primary", DATA, 11, 5)
    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    assert dict(primary.store.items()) == DATA == dict(backup.store.items())
    assert primary.seq == backup.seq == 5 and backup.store.idempotency.get("ident-1") is None
    assert (primary.resyncs_partial, primary.resyncs_full) == (1, 0)
    assert_same_data(primary, backup)
    assert "batches beyond ours were never acknowledged: it rolls them back" in link.caplog.text
    rollback, mark = logged(link, "backup")[-2:]
    assert rollback == Record.rollback(DiskState(11, 5, 0))
    assert mark == Record.mark(DiskState(backup.history, 5, 0))


@pytest.mark.parametrize("behind", [0, 1])
def test_a_recovered_backup_is_caught_up_before_its_probe_answers(
    make_link, monkeypatch, behind: int
) -> None:
    """The backup restarted from its disk alone (the primary lives on) and the primary
    reaches it before its probe answers: caught up from cold start, it is then in sync."""
    link = make_link(**PERSISTENT)
    link.start_backup()
    primary = link.start_primary()
    assert link.write(INSERT, "key1", "one") == Done(True)
    for number in range(behind):  # batches its disk lacks (a copy recovered from older files)
        assert link.write(INSERT, f"more{number}", "x") == Done(True)
    link.kill("backup")
    monkeypatch.setattr(RoleDriver, "probe", lambda self: None)  # it never answers
    backup = recovered(link, "backup", {"key1": "one"}, primary.history, 1)
    assert backup.stage is S.COLD_START
    link.fire("primary", RETRY)
    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    assert ("backup", S.COLD_START, S.WARM_START) in link.moves()
    assert primary.resyncs_partial == 1
    assert_same_data(primary, backup)


# -- bulk load chunks (PrimaryCore.submit_pairs) ------------------------------------------
def load_chunk(link: Link, pairs: list[str], upsert: bool = False) -> Outcome:
    """A load chunk from start to answer."""
    token = link.token()
    outcome = link.primary.submit_pairs(pairs, upsert, link.reply_to(token))
    link.run()
    if outcome is not None:
        return outcome
    link.flush()
    assert token in link.responses, "the chunk was not answered"
    return link.responses[token]


def test_a_load_chunk_travels_in_one_batch_and_is_answered_after_its_ack(link: Link) -> None:
    primary, backup = in_sync_pair(link)
    before = link.mark()
    link.paused.add("primary")  # the backup's ACK waits on the wire
    token = link.token()
    pairs = [item for i in range(100) for item in (f"k{i}", f"v{i}")]
    assert primary.submit_pairs(pairs, False, link.reply_to(token)) is None
    link.flush()
    batches = [f for f in link.sent["primary"][before["primary"] :] if f.kind == FrameType.BATCH]
    assert [f.ops for f in batches] == [pairs]
    assert link.responses == {} and link.read("primary", COUNT) == Counted(0)
    assert link.read("primary", GET, "k1") == Done(False, "")  # not visible before the ACK
    link.paused.clear()
    link.run()
    assert link.responses[token] == Loaded(100, 0)
    assert_same_data(primary, backup)


def test_insert_mode_skips_existing_keys_and_repeats_upsert_overwrites(link: Link) -> None:
    primary, backup = in_sync_pair(link, {"a": "old"})
    assert load_chunk(link, ["a", "new", "b", "1", "b", "2"]) == Loaded(1, 2)
    assert dict(primary.store.items()) == {"a": "old", "b": "1"}
    assert load_chunk(link, ["a", "new", "c", "", "c", "3"], upsert=True) == Loaded(3, 0)
    assert dict(primary.store.items()) == {"a": "new", "b": "1", "c": "3"}
    assert load_chunk(link, ["a", "x", "b", "y"]) == Loaded(0, 2)  # nothing to send
    assert_same_data(primary, backup)


def test_a_load_chunk_sees_writes_still_in_flight(link: Link) -> None:
    primary, backup = in_sync_pair(link)
    link.paused.add("primary")
    first = link.token()
    assert link.submit(first, INSERT, "k", "from insert") is None
    link.flush()  # in flight, not acknowledged
    second = link.token()
    assert primary.submit_pairs(["k", "loaded", "n", "1"], False, link.reply_to(second)) is None
    link.paused.clear()
    link.run()
    link.flush()
    assert link.responses[first] == Done(True)
    assert link.responses[second] == Loaded(1, 1)
    assert link.answer_order == [first, second]
    assert dict(primary.store.items()) == {"k": "from insert", "n": "1"}
    assert_same_data(primary, backup)


def test_writes_and_later_chunks_see_a_load_chunk_of_new_keys_in_flight(link: Link) -> None:
    primary, backup = in_sync_pair(link)
    link.paused.add("primary")
    tokens = [link.token() for _ in range(5)]
    submit = primary.submit_pairs
    assert submit(["k", "loaded", "n", "1"], False, link.reply_to(tokens[0])) is None
    link.flush()  # in flight, as a layer of its own
    assert [layer.seq for layer in primary.layers] == [primary.in_flight[0].seq]
    assert primary.overlay == {} and primary.visible("k") == "loaded"
    assert link.read("primary", GET, "k") == Done(False, "")  # not acknowledged yet
    assert link.submit(tokens[1], INSERT, "k", "again") is None  # waits: "k" is taken
    assert link.submit(tokens[2], UPDATE, "n", "2") is None  # the overlay, read first
    assert primary.visible("n") == "2"
    assert submit(["k", "x", "n", "y", "m", "3"], False, link.reply_to(tokens[3])) is None
    assert submit(["p", "4", "q", "5"], False, link.reply_to(tokens[4])) is None
    assert len(primary.layers) == 2  # the chunk of new keys only: "k" and "n" were taken
    link.paused.clear()
    link.run()
    link.flush()
    link.run()
    assert [link.responses[t] for t in tokens] == [
        Loaded(2, 0),
        Done(False),
        Done(True),
        Loaded(1, 2),
        Loaded(2, 0),
    ]
    assert dict(primary.store.items()) == {"k": "loaded", "n": "2", "m": "3", "p": "4", "q": "5"}
    assert not primary.layers and primary.overlay == {}
    assert_same_data(primary, backup)


def test_an_insert_chunk_is_sent_as_it_is_and_leaves_keys_that_hold_a_value(make_link) -> None:
    link = make_link(**PERSISTENT)
    primary, backup = in_sync_pair(link, {"a": "old", "c": "kept"})
    tap = backup.tap = Tap()
    before = link.mark()
    link.paused.add("primary")  # the ACK waits: both chunks join one batch
    first, second = link.token(), link.token()
    assert primary.submit_pairs(["a", "new", "b", "1"], False, link.reply_to(first)) is None
    assert primary.submit_pairs(["x", "2", "c", "3"], False, link.reply_to(second)) is None
    assert primary.visible("a") == "old" and primary.visible("b") == "1"
    link.flush()
    # Not looked up first: every pair travels, each written only where its key is absent.
    sent = [f for f in link.sent["primary"][before["primary"] :] if f.kind == FrameType.BATCH]
    assert [(f.ops, f.absent) for f in sent] == [(["a", "new", "b", "1", "x", "2", "c", "3"], 4)]
    link.paused.clear()
    link.run()
    assert (link.responses[first], link.responses[second]) == (Loaded(1, 1), Loaded(1, 1))
    assert dict(primary.store.items()) == {"a": "old", "b": "1", "c": "kept", "x": "2"}
    assert_same_data(primary, backup)
    # What each records, and what a member that lags is sent, is the pairs written.
    written = ["b", "1", "x", "2"]
    assert list(primary.applied_record.entries[-1].ops) == written
    assert (list(backup.undo[-1].ops), list(backup.undo[-1].olds)) == (written, [None, None])
    seq = primary.seq
    assert [r.ops for r in logged(link, "primary") if getattr(r, "seq", 0) == seq] == [written]
    assert [r.ops for r in logged(link, "backup") if getattr(r, "seq", 0) == seq] == [written]
    assert [(f.seq, f.ops, f.absent) for f in tap.frames] == [(seq, written, 0)]  # to followers


def test_writes_meanwhile_see_a_key_an_insert_chunk_in_flight_leaves(link: Link) -> None:
    primary, backup = in_sync_pair(link, {"a": "old"})
    link.paused.add("primary")
    tokens = [link.token() for _ in range(4)]
    assert primary.submit_pairs(["a", "new", "b", "1"], False, link.reply_to(tokens[0])) is None
    link.flush()
    assert primary.pending("a") is None and primary.pending("b") == ("1", primary.sent_seq)
    assert link.submit(tokens[1], INSERT, "a", "again") == Done(False)  # "a" holds "old"
    assert link.submit(tokens[2], UPDATE, "a", "updated") is None  # after the chunk
    assert primary.submit_pairs(["a", "x", "c", "2"], False, link.reply_to(tokens[3])) is None
    link.paused.clear()
    link.run()
    link.flush()
    link.run()
    assert [link.responses[t] for t in (tokens[0], tokens[2], tokens[3])] == [
        Loaded(1, 1),
        Done(True),
        Loaded(1, 1),
    ]
    assert dict(primary.store.items()) == {"a": "updated", "b": "1", "c": "2"}
    assert_same_data(primary, backup)


def test_insert_chunks_in_flight_may_share_keys_and_the_first_pair_wins(link: Link) -> None:
    primary, backup = in_sync_pair(link, {"held": "old"})
    link.paused.add("primary")
    tokens = [link.token() for _ in range(4)]
    submit = primary.submit_pairs
    assert submit(["k", "first", "held", "x"], False, link.reply_to(tokens[0])) is None
    link.flush()
    second = ["k", "second", "m", "1", "held", "y", "m", "again"]
    assert submit(second, False, link.reply_to(tokens[1])) is None
    assert len(primary.layers) == 2  # not looked at against the first, nor itself
    assert primary.pending("k") == ("first", primary.layers[0].seq)
    assert primary.pending("m") == ("1", primary.layers[1].seq)  # a key's first pair
    assert primary.visible("k") == "first"
    assert primary.pending("held") is None and primary.visible("held") == "old"
    assert link.submit(tokens[2], INSERT, "k", "third") is None  # answered in its turn
    # Upsert mode writes every pair: a key in a layer sends it pair by pair.
    assert submit(["k", "fourth"], True, link.reply_to(tokens[3])) is None
    assert len(primary.layers) == 2 and primary.pending("k") == ("fourth", primary.sent_seq + 1)
    link.paused.clear()
    link.run()
    link.flush()
    link.run()
    assert [link.responses[t] for t in tokens] == [
        Loaded(1, 1),
        Loaded(1, 3),
        Done(False),
        Loaded(1, 0),
    ]
    assert dict(primary.store.items()) == {"held": "old", "k": "fourth", "m": "1"}
    assert not primary.layers and primary.overlay == {}
    assert_same_data(primary, backup)


@pytest.mark.parametrize(
    ("ops", "absent", "why"),
    [
        (["k", "v"], 2, "batch 2: 2 pairs written where absent, of 1"),
        (["k", None], 1, "batch 2: a pair written where absent deletes"),
    ],
)
def test_a_batch_whose_absent_pairs_cannot_apply_closes_the_channel(link, ops, absent, why) -> None:
    primary, backup = in_sync_pair(link, {"a": "1"})
    link.inject("backup", [FrameType.BATCH, primary.seq + 1, ops, 0, [], absent])
    assert link.closed_by[-1] == ("backup", why)
    assert "k" not in backup.store and backup.seq == primary.seq


def test_a_load_chunk_past_max_memory_is_refused_whole(make_link: Callable[..., Link]) -> None:
    link = make_link(max_memory=2 * PAIR_OVERHEAD + 10)
    primary, backup = in_sync_pair(link)
    assert load_chunk(link, ["a", "1", "b", "2", "c", "3"]) == MemoryFull(2 * PAIR_OVERHEAD + 10)
    assert len(primary.store) == 0 and primary.overlay == {}
    assert load_chunk(link, ["a", "1"]) == Loaded(1, 0)
    assert_same_data(primary, backup)


def test_a_load_chunk_lost_with_the_backup_is_rewound_whole(link: Link) -> None:
    primary, backup = in_sync_pair(link, {"kept": "1"})
    link.paused.add("primary")
    token = link.token()
    pairs = [item for i in range(300) for item in (f"k{i}", "v")]
    assert primary.submit_pairs(pairs, False, link.reply_to(token)) is None
    link.flush()
    link.reset()
    assert link.responses[token] == REPLICATION_FAILED
    assert dict(primary.store.items()) == {"kept": "1"} and primary.overlay == {}
    assert not primary.layers


def test_a_backup_refuses_load_chunks_and_a_cold_primary_too(link: Link) -> None:
    primary = link.start_primary()
    assert primary.stage is not S.IN_SYNC
    assert isinstance(primary.submit_pairs(["a", "1"], False, link.reply_to("x")), Refused)


def test_a_full_batch_takes_no_load_chunk(link: Link) -> None:
    primary, backup = in_sync_pair(link)
    link.paused.add("primary")
    for i in range(3):
        pairs = [item for j in range(BATCH_WRITES // 2 + 1) for item in (f"c{i}-{j}", "v")]
        assert primary.submit_pairs(pairs, False, link.reply_to(i)) is None
    assert [len(batch.ops) // 2 for batch in primary.queued] == [BATCH_WRITES // 2 + 1] * 3
    link.paused.clear()
    link.flush()
    link.run()
    assert [link.responses[i] for i in range(3)] == [Loaded(BATCH_WRITES // 2 + 1, 0)] * 3


# -- catching up (a partial resync forward) --------------------------------------------


def copy_of(core: Core) -> tuple[ShardedStore, int, int]:
    """A copy of ``core``'s data as of now (its store, seq and history)."""
    store = new_store()
    for key, value in core.store.items():
        store.put(key, value)
    return store, core.seq, core.history


def start_behind(link: Link, held: tuple[ShardedStore, int, int], confirmed: bool) -> BackupCore:
    """A backup that holds ``held`` (a copy of the primary's history, as a spare that
    followed the old backup holds)."""
    store, seq, history = held
    core = BackupCore(link.settings, store, link.now, random.Random(3))
    core.seq, core.history, core.confirmed = seq, history, confirmed
    link._start("backup", core)
    return core


@pytest.mark.parametrize("confirmed", [False, True])
def test_a_backup_behind_in_the_same_history_catches_up_by_the_batches_it_lacks(
    link: Link, confirmed: bool
) -> None:
    primary, backup = in_sync_pair(link, {"a": "1"})
    behind = copy_of(backup)
    assert link.write(INSERT, "b", "2") == Done(True)
    assert link.write(UPDATE, "a", "3") == Done(True)
    link.kill("backup")
    full, partial = primary.resyncs_full, primary.resyncs_partial
    mark = link.mark()

    backup = start_behind(link, behind, confirmed)
    link.fire("primary", RETRY)

    sent = link.kinds("primary", mark["primary"])
    assert FrameType.CATCHUP in sent and FrameType.SNAPSHOT_BEGIN not in sent
    assert sent.count(FrameType.BATCH) == 2
    assert FrameType.ACK not in link.kinds("backup", mark["backup"])  # the SYNC_ACK says it
    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    assert_same_data(primary, backup)
    assert backup.confirmed and backup.catchups == 1 and primary.catchups_sent == 1
    assert (primary.resyncs_full, primary.resyncs_partial) == (full, partial + 1)
    assert backup.history == primary.history  # a partial resync keeps the history
    assert "caught up to seq" in link.transitions()[-2][3]
    assert link.write(INSERT, "c", "4") == Done(True)  # sequence numbers agree
    assert_same_data(primary, backup)


def test_a_backup_behind_with_other_data_at_its_seq_receives_a_full_transfer(link: Link) -> None:
    primary, backup = in_sync_pair(link, {"a": "1"})
    store, seq, history = copy_of(backup)
    store.put("stray", "x")  # not the primary's data at that seq
    assert link.write(INSERT, "b", "2") == Done(True)
    link.kill("backup")
    mark = link.mark()

    backup = start_behind(link, (store, seq, history), confirmed=False)
    link.fire("primary", RETRY)

    sent = link.kinds("primary", mark["primary"])
    assert FrameType.CATCHUP not in sent and FrameType.SNAPSHOT_BEGIN in sent
    assert_same_data(primary, backup)
    assert "differs from ours then" in link.caplog.text


def test_a_backup_behind_the_primarys_record_receives_a_full_transfer(make_link) -> None:
    link = make_link(undo_bytes=0)  # no record: every resync of a copy behind is full
    primary, backup = in_sync_pair(link, {"a": "1"})
    behind = copy_of(backup)
    assert link.write(INSERT, "b", "2") == Done(True)
    link.kill("backup")
    mark = link.mark()

    backup = start_behind(link, behind, confirmed=False)
    link.fire("primary", RETRY)

    sent = link.kinds("primary", mark["primary"])
    assert FrameType.CATCHUP not in sent and FrameType.SNAPSHOT_BEGIN in sent
    assert_same_data(primary, backup)


def test_a_catchup_that_does_not_reach_the_primarys_state_is_refused_and_not_offered_again(
    link: Link,
) -> None:
    primary, backup = in_sync_pair(link, {"a": "1"})
    behind = copy_of(backup)
    assert link.write(INSERT, "b", "2") == Done(True)
    link.kill("backup")

    def forge(source: str, frame: Frame) -> Frame:  # a batch altered on its way
        if source == "primary" and isinstance(frame, Batch):
            return Batch(frame.seq, ["b", "forged"], frame.time, frame.keyed)
        return frame

    link.tamper = forge
    backup = start_behind(link, behind, confirmed=False)
    link.fire("primary", RETRY)

    assert backup.stage is not S.IN_SYNC and not backup.confirmed
    assert "the data is not the primary's" in backup.last_transfer_error
    assert len(primary.applied_record) == 0  # the next attempt sends the data whole
    link.tamper = None
    mark = link.mark()
    link.fire("primary", RETRY)
    assert FrameType.SNAPSHOT_BEGIN in link.kinds("primary", mark["primary"])
    assert_same_data(primary, backup)


def test_a_catchup_from_another_state_than_the_backups_is_refused(link: Link) -> None:
    primary, backup = in_sync_pair(link, {"a": "1"})
    behind = copy_of(backup)
    assert link.write(INSERT, "b", "2") == Done(True)
    link.kill("backup")

    def lie(source: str, frame: Frame) -> Frame:
        if isinstance(frame, Catchup):
            return replace(frame, checksum=frame.checksum ^ 1)
        return frame

    link.tamper = lie
    backup = start_behind(link, behind, confirmed=False)
    store_before = dict(backup.store.items())
    link.fire("primary", RETRY)

    assert "cannot catch up from seq" in backup.last_transfer_error
    assert dict(backup.store.items()) == store_before  # nothing applied
    assert backup.stage is not S.IN_SYNC


def test_a_promoted_backup_catches_up_a_copy_behind_it_from_its_undo_record(link: Link) -> None:
    primary, backup = in_sync_pair(link, {"a": "1"})
    behind = State(backup.seq, backup.store.checksum, len(backup.store))
    assert link.write(INSERT, "b", "2") == Done(True)
    assert link.write(DELETE, "a") == Done(True, "1")
    assert len(backup.undo) == 3  # every batch since the sync

    new = promoted(backup, link.now, epoch=5)

    assert behind in new.record_states()
    assert new.record_states()[-1].seq == new.seq - 1
    ours = new.own_copy()
    theirs = Copy(False, backup.history, behind.seq, behind.checksum, behind.count)
    assert plan(ours, theirs).directive is Directive.CATCHUP
    new.store.put("z", "outside any batch")  # data changed otherwise: no catch-up
    assert new.record_states() == ()


class Tap:
    """Hears what a backup tells its followers (``following.py``)."""

    def __init__(self) -> None:
        self.heard: list[Any] = []
        self.frames: list[Batch] = []

    def applied(self, frame: Batch) -> None:
        self.heard.append(frame.seq)
        self.frames.append(frame)

    def reset(self, reason: str) -> None:
        self.heard.append(reason)


def test_a_backup_tells_its_followers_of_each_batch_after_its_ack_and_of_each_sync(
    make_link,
) -> None:
    link = make_link(ack_timeout=0.5)
    primary, backup = in_sync_pair(link, {"a": "1"})
    tap = backup.tap = Tap()
    mark = link.mark()
    assert link.write(INSERT, "b", "2") == Done(True)
    assert tap.heard == [backup.seq]
    assert FrameType.ACK in link.kinds("backup", mark["backup"])

    link.reset()  # the pair syncs again (a skip): the stream heard so far ends there
    link.fire("primary", RETRY)
    assert tap.heard[-1] == "the backup's data changed by a sync"


def test_a_member_holding_the_primarys_very_data_unconfirmed_is_caught_up_by_no_batch(
    link: Link,
) -> None:
    """A spare that followed the backup up to its last batch: nothing to send, and no
    full transfer either."""
    primary, backup = in_sync_pair(link, {"a": "1", "b": "2"})
    same = copy_of(backup)
    link.kill("backup")
    mark = link.mark()

    backup = start_behind(link, same, confirmed=False)
    link.fire("primary", RETRY)

    sent = link.kinds("primary", mark["primary"])
    assert FrameType.CATCHUP in sent and FrameType.SNAPSHOT_BEGIN not in sent
    assert FrameType.BATCH not in sent
    assert (primary.stage, backup.stage) == (S.IN_SYNC, S.IN_SYNC)
    assert backup.confirmed and backup.catchups == 1
    assert link.write(INSERT, "c", "3") == Done(True)
    assert_same_data(primary, backup)
