"""Deterministic simulation of a primary and a backup (FoundationDB-style).

The real replication cores (``PrimaryCore``, ``BackupCore``) run against a
simulated clock and network: one seed draws every delay, client request and
fault, so a run is reproducible bit for bit.  Faults: crashes that lose the
process's memory and restarts, pauses (SIGSTOP), partitions that silently
black-hole the channel, closed connections, delays that reorder frames of an
old connection after a new one, and (rarely) a frame delivered twice.
Clients talk to the primary; their history is checked for linearizability,
together with the final content of both servers once the faults stop and the
pair is in sync again.  Some seeds set a ``max_memory`` that the data reaches:
a write refused for it must never become visible.

The other clients' inserts go half the time as one-pair bulk load chunks in insert
mode (``submit_pairs``): sent without a lookup, written where the key is absent
when the batch is applied on each server, answered with the pairs written.

Half the clients send every write with an ``Idempotency-Key`` and retry it, with
back-off until a deadline, through lost replies, "replication failed", stage
refusals, crashes and rewinds (as the Python clients do): all the attempts of
one key are one operation in the history, from the first call to the answer
that ended them.  Every write, keyed or not, must be applied at most once on the
primary (each value is written once, each key enters the primary's idempotency
table once), and both copies' tables must be equal at the end.

Some seeds run with persistence (``always`` or ``everysec``): each server keeps
its records and bases in a simulated folder (``pbkv.testing.simdisk``), a crashed
server restarts from it, and the nemesis may cut the power of both servers at
once: each keeps only what an fsync covered.  After each power loss the key's
value the pair serves again must be one a write could have left there no earlier
than the loss window before it (``POWER_LOSS_WINDOW``: nothing with ``always``,
about a second with ``everysec``), and the history must be linearizable with
that recovered content set, key by key, at the loss (a ``restore``).

Run many seeds: ``python -m pbkv.testing.sim --seeds 1000``; replay one with
its log: ``python -m pbkv.testing.sim --seed 42 --verbose``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import logging
import random
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pbkv.backup import BackupCore
from pbkv.commands import (
    Command,
    Done,
    KeyReused,
    Loaded,
    MemoryFull,
    Outcome,
    Refused,
    ReplicationFailed,
    Reply,
)
from pbkv.config import Settings
from pbkv.persist.log import Record
from pbkv.persist.log import State as DiskState
from pbkv.primary import PrimaryCore
from pbkv.stages import Role, Stage, WriteRule
from pbkv.store import PAIR_OVERHEAD, make_store
from pbkv.testing.linearizability import Operation, Result, check
from pbkv.testing.link import Channel, Network, Process
from pbkv.testing.simdisk import EVERYSEC, FSYNC_SECONDS, SimDisk

log = logging.getLogger(__name__)

ROLES = tuple(Role)
PRIMARY, BACKUP = Role.PRIMARY, Role.BACKUP
REPLICATE = WriteRule.REPLICATE
DUPLICATE_RATE = 0.01  # share of frames a faulty network delivers twice
CORRUPT_RATE = 0.002  # share of frames a faulty network delivers with a byte flipped
# With a secret set, an attacker on the path: the share of frames after which it splices
# in bytes recorded on an earlier connection (reordered across connections, replayed).
REPLAY_RATE = 0.002
RECORDED = 32  # the last bytes sent each way that the attacker keeps
# A seed without an undo record: every resync after a fault is a full transfer.
NO_UNDO_RATE = 0.25
KEYS = tuple(f"k{i}" for i in range(6))
# A seed with a memory limit: room for about half the keys, so writes are refused.
MEMORY_LIMIT_RATE = 0.25
MEMORY_LIMIT = 3 * (PAIR_OVERHEAD + 8)
# A keyed client's attempt with no answer by then is given up (and retried); the
# operation is given up (indeterminate) once its next attempt would start past its
# deadline.  Back-off doubles from RETRY_FIRST.
ATTEMPT_TIMEOUT = 1.5
# The share of keyed writes' replies lost on the way (the client's connection died
# with the reply in it), while faults last.
LOST_REPLY_RATE = 0.1
RETRY_DEADLINE = 5.0
# A seed with persistence, ``always`` or ``everysec`` (half each).
PERSISTENCE_RATE = 0.3
RESUMED = 0.05  # a power loss waits this long after a resume (its deferred fsync ends)
# After a power loss, the acknowledged writes that may be gone: those answered this
# long before it or later (``everysec``: an fsync a second; the margin is the fsync's).
POWER_LOSS_WINDOW = {"always": 0.0, "everysec": EVERYSEC + FSYNC_SECONDS[1] + 0.01}
RETRY_FIRST = 0.05
COMMANDS = {
    "get": Command.GET,
    "insert": Command.INSERT,
    "update": Command.UPDATE,
    "delete": Command.DELETE,
}


def sim_settings(store: str = "sharded", window: int = 2, secret: str | None = None) -> Settings:
    return Settings(
        secret=secret,
        primary="p",
        backup="b",
        port=1,
        store=store,
        shards=4,
        transfer_chunk=2,
        ack_timeout=1.0,
        heartbeat_interval=0.1,
        peer_timeout=0.6,
        retry_min=0.05,
        retry_max=0.4,
        batches_in_flight=window,
    )


class SimNode(Process):
    """The primary's or the backup's process: its role never changes."""

    def __init__(self, sim: Simulation, role: Role) -> None:
        super().__init__(sim)
        self.sim = sim
        self.role = role
        settings = sim.settings
        self.disk = (
            SimDisk(settings.persistence, str(role), random.Random(sim.rng.getrandbits(64)))
            if settings.persistent
            else None
        )

    @property
    def label(self) -> str:
        return str(self.role)

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        sim = self.sim
        store = make_store(sim.settings.store, sim.settings.shards)
        rng = random.Random(sim.rng.getrandbits(64))
        core_class = PrimaryCore if self.role is PRIMARY else BackupCore
        core = self.core = core_class(sim.settings, store, sim.now, rng)
        self.reset_driver()
        if self.disk is not None:  # as ``Node._recover``: before anything is served
            handler = core.batch_recovered_handler()
            state = self.disk.recover(store, core.disk_state(), handler, self.deliver)
            if state is not None:
                core.recovered_from(state)
        if self.role is PRIMARY:
            sim.count_applications(store)  # what it applies from now on
        core.start(sim.now)
        self.drain()

    def crash(self, power_loss: bool = False) -> None:
        sim = self.sim
        if isinstance(self.core, PrimaryCore):
            sim.replays += self.core.writes_replayed
            sim.divergences += self.core.backup_diverged
        if self.core is not None:
            sim.entries_replaced += self.core.store.idempotency.replaced
        if self.disk is not None:
            if power_loss:
                self.disk.power_loss()
            else:
                self.disk.crash()
        super().crash()

    def drained(self) -> None:
        self.sim.note_sync()

    # -- actions.Driver ----------------------------------------------------------
    def connect(self) -> None:
        self.sim.connect()

    def probe(self) -> None:
        self.sim.probe()

    def sync_changed(self) -> None:
        pass  # no leadership without a coordinator

    def send(self, data: bytes) -> None:
        disk, channel = self.disk, self.channel
        if disk is not None and disk.holding and self.role is BACKUP and channel is not None:
            # As ``Node.send``: an ACK (or a SYNC_ACK) says the data is here: on disk first.
            disk.hold(lambda: self.sim.transmit(channel, self, data))
        else:
            super().send(data)

    def persist(self, record: Record) -> None:
        if self.disk is not None:
            self.disk.persist(record)

    def persist_all(self, state: DiskState) -> None:
        if self.disk is not None:
            self.disk.persist_all(state, self.running.store)

    def submit(
        self, command: Command, key: str, value: str | None, reply: Reply, ident: str | None = None
    ) -> Outcome | None:
        """A write at the primary, as ``Node.submit`` passes it with persistence: with
        ``always`` its reply waits until its batch is durable, and so does a retry's
        answered from the table while records wait for their fsync."""
        disk = self.disk
        reply = self._durable(reply)
        outcome = self.primary.submit(command, key, value, reply, ident)
        if outcome is not None and ident is not None and disk is not None and disk.holding:
            reply(outcome)
            return None
        return outcome

    def submit_pairs(self, pairs: list[str], reply: Reply) -> Outcome | None:
        """A bulk load chunk in insert mode at the primary, as ``Node.submit_pairs``."""
        return self.primary.submit_pairs(pairs, False, self._durable(reply))

    def _durable(self, reply: Reply) -> Reply:
        """``reply``, held with ``always`` until the records before it are durable."""
        disk = self.disk
        return disk.durable(reply) if disk is not None and disk.always else reply


@dataclass
class _Attempts:
    """Where one keyed write's attempts stand."""

    done: bool = False
    attempt: int = 0
    maybe: bool = False  # an attempt was lost or rewound: it may have been applied
    backoff: float = RETRY_FIRST


@dataclass
class PowerLoss:
    """Both servers lost power at ``at``.  What they came back with, key by key: the
    primary's value of the key (None: absent) when it first served a request on it
    again (a read, a write accepted; reads of the shards a warm start completed come
    before the rest) or when the pair was first in sync again, and when that was."""

    at: float
    contents: dict[str, str | None] = field(default_factory=dict)
    served_again: dict[str, float] = field(default_factory=dict)

    @property
    def known(self) -> bool:
        return len(self.contents) == len(KEYS)

    def note(self, key: str, value: str | None, now: float) -> None:
        if key not in self.contents:
            self.contents[key] = value
            self.served_again[key] = now


@dataclass(frozen=True, slots=True)
class _Setting:
    """Something that set a key: a write that took effect or may have, a restore."""

    state: str | None  # the key's value after it (None: absent)
    call: float
    end: float  # when it had certainly taken effect (inf: maybe never)
    acknowledged: float | None  # when the server answered success (None: it did not)


def lost_beyond_window(
    operations: list[Operation],
    answered: list[float | None],
    losses: list[PowerLoss],
    window: float,
) -> str | None:
    """What was lost by a power loss that it may not lose, or None.

    A key's content after the loss at T must be one that some write (or the restore
    of an earlier loss, or the empty start) left there, unless it was overwritten by
    a write acknowledged before T - ``window`` that certainly followed it (called
    after it ended): such a write, and everything acknowledged before it, was on
    disk.  With ``always`` the window is 0: nothing acknowledged may go."""
    for number, loss in enumerate(losses):
        by_key: dict[str, list[_Setting]] = {}
        for earlier in losses[:number]:
            for key, value in earlier.contents.items():
                back = earlier.served_again[key]
                by_key.setdefault(key, []).append(_Setting(value, earlier.at, back, back))
        for op, acknowledged in zip(operations, answered, strict=True):
            if op.kind in ("get", "restore") or op.ok is False or op.call >= loss.at:
                continue
            state = op.value if op.kind != "delete" else None
            end = op.ret if op.ok and op.ret is not None else float("inf")
            by_key.setdefault(op.key, []).append(
                _Setting(state, op.call, end, acknowledged if op.ok else None)
            )
        for key in KEYS:
            writes = [_Setting(None, float("-inf"), float("-inf"), None), *by_key.get(key, [])]
            # Those certainly on disk: answered before the window.
            before = loss.at - window
            kept = [s for s in writes if s.acknowledged is not None and s.acknowledged < before]
            found = loss.contents.get(key)
            leaves = [s for s in writes if s.state == found]
            if any(all(k.call <= s.end for k in kept) for s in leaves):
                continue
            if not leaves:
                return (
                    f"after the power loss at {loss.at:.3f} key {key!r} holds {found!r}, "
                    "which no write left there"
                )
            last = max(kept, key=lambda k: k.acknowledged or 0.0)
            return (
                f"after the power loss at {loss.at:.3f} key {key!r} holds {found!r}, but a "
                f"write of {last.state!r} acknowledged at {last.acknowledged or 0.0:.3f} "
                f"(over {window:.3f}s before the loss) followed every write that leaves it"
            )
    return None


@dataclass
class RunResult:
    seed: int
    ok: bool | None
    explanation: str = ""
    operations: int = 0
    faults: list[str] = field(default_factory=list)
    converged: bool = True

    forced_persistence: str | None = None  # the mode the run was told to use

    def replay_command(self) -> str:
        forced = self.forced_persistence
        option = f" --persistence {forced}" if forced else ""
        return f"python -m pbkv.testing.sim --seed {self.seed}{option} --verbose"


class Simulation(Network):
    """One seeded run: clients, nemesis, convergence, checks."""

    def __init__(
        self,
        seed: int,
        *,
        clients: int = 4,
        duration: float = 8.0,
        faults: bool = True,
        settings: Settings | None = None,
        trace: Callable[[str], None] | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__(random.Random(seed))
        self.seed = seed
        # Half the seeds authenticate the channel (drawn aside, so as not to move the rest).
        secret = "sim-secret" if random.Random(seed ^ 0x5EC2E7).random() < 0.5 else None
        self.settings = settings or sim_settings(
            self.rng.choice(("sharded", "hash")), self.rng.choice((1, 2, 3)), secret
        )
        if settings is None and random.Random(seed ^ 0x3E3).random() < MEMORY_LIMIT_RATE:
            self.settings = dataclasses.replace(self.settings, max_memory=MEMORY_LIMIT)
        if settings is None and random.Random(seed ^ 0x0DD0).random() < NO_UNDO_RATE:
            self.settings = dataclasses.replace(self.settings, undo_bytes=0)
        if settings is None and random.Random(seed ^ 0xD15C).random() < PERSISTENCE_RATE:
            mode = random.Random(seed ^ 0xF5C).choice(("always", "everysec"))
            self.settings = dataclasses.replace(self.settings, persistence=mode, data_dir="sim")
        self.forced_persistence = overrides.get("persistence")
        if overrides.get("persistence", "off") != "off":
            overrides.setdefault("data_dir", "sim")  # named, never opened: the disk is simulated
        if overrides:  # e.g. undo_bytes=0: every resync a full transfer
            self.settings = dataclasses.replace(self.settings, **overrides)
        self.nodes = {role: SimNode(self, role) for role in ROLES}
        for node in self.nodes.values():
            if node.disk is not None:
                node.disk.on_write = self.written
        self.partitioned = False
        self.channel_ids = itertools.count(1)
        self.clients = clients
        self.duration = duration
        self.faults_enabled = faults
        self.synced_lives: dict[Role, int] = {}
        self.operations: list[Operation] = []
        # How often the primary applied each value and made each idempotency entry
        # (all lives): more than once is a write applied twice.
        self.values_applied: dict[str, int] = {}
        self.keys_applied: dict[str, int] = {}
        self.violations: list[str] = []  # what the clients saw that must never happen
        self.open_operations = 0  # called, not yet ended (a keyed one may be retrying)
        self.retried = 0  # keyed operations that took more than one attempt
        self.replays = 0  # retries the primary answered with a remembered reply (all lives)
        # ACKs whose checksum was not the primary's after the batch (all lives): never,
        # when both cores are right.
        self.divergences = 0
        self.entries_replaced = 0  # idempotency entries that replaced one of the same key
        # Values of writes refused for max_memory: none may ever be read or kept.
        self.refused_values: set[str] = set()
        self.fault_log: list[str] = []
        self._values = itertools.count()
        # Which inserts go as load chunks, drawn aside (so as not to move the rest).
        self._loads = random.Random(seed ^ 0x10AD)
        self._trace = trace
        # What an attacker on the path recorded: (connection, bytes) each way, and the
        # first bytes the primary sent on each connection (a handshake to replay).
        self.recorded: dict[Role, deque[tuple[int, bytes]]] = {
            role: deque(maxlen=RECORDED) for role in ROLES
        }
        self.openings: deque[tuple[int, list[bytes]]] = deque(maxlen=4)
        self.intruders = 0  # channels the attacker opened to the backup
        self.power_losses: list[PowerLoss] = []
        self.power_cut_armed = False
        self.last_resume = float("-inf")
        # When the server answered each operation of ``operations`` (None: no answer).
        self.answered: list[float | None] = []

    def latency(self) -> float:
        # Mostly fast, sometimes slow: slow frames reorder old connections' traffic.
        # A slow frame is a fault: without faults, the network keeps within the
        # peer timeout (a heartbeat and a slow frame could otherwise exceed it).
        if self.rng.random() < 0.05 and self.faults_enabled:
            return self.rng.uniform(0.05, 0.5)
        return self.rng.uniform(0.0002, 0.005)

    def trace(self, text: str) -> None:
        if self._trace is not None:
            self._trace(f"[{self.now:9.4f}] {text}")

    # -- network -------------------------------------------------------------------
    def reachable(self, a: Process | None = None, b: Process | None = None) -> bool:
        return not self.partitioned

    def connect(self) -> None:
        """The primary opens a channel to the backup."""
        primary, backup = self.nodes[PRIMARY], self.nodes[BACKUP]
        self.open_channel(primary, backup, next(self.channel_ids), self.settings.peer_timeout)

    def transmit(self, channel: Channel, sender_node: Process, data: bytes) -> None:
        """With faults: frames corrupted, duplicated, or (with a secret) replayed."""
        assert isinstance(sender_node, SimNode)
        sender, receiver = sender_node.role, channel.peer(sender_node)
        receiver_role = sender.peer
        if channel.closed:
            return
        if not self.reachable():
            channel.black_holed = True
        if channel.black_holed:
            return
        faulty = self.faults_enabled and self.now < self.duration  # faults stop at the end
        if sender is PRIMARY and channel.id > 0:
            if not self.openings or self.openings[-1][0] != channel.id:
                self.openings.append((channel.id, []))
            first = self.openings[-1][1]
            if len(first) < 3:
                first.append(data)
        if faulty and self.rng.random() < CORRUPT_RATE:
            # A byte flipped on the way: the frame's hash (or MAC) must catch it.
            self.trace(f"corrupting a frame {sender} -> {receiver_role}")
            data = _flip_a_byte(data, self.rng)
        self.recorded[sender].append((channel.id, data))
        self.deliver_on(channel, receiver, data)
        if faulty and self.rng.random() < DUPLICATE_RATE:
            # Not TCP's doing, but a faulty middlebox's: the cores must refuse a
            # repeated frame (a batch applied twice, an ack for the wrong batch);
            # on a keyed channel, its MAC fails.
            self.trace(f"duplicating a frame {sender} -> {receiver_role}")
            self.deliver_on(channel, receiver, data)
        if faulty and self.settings.secret is not None and self.rng.random() < REPLAY_RATE:
            # An attacker on the path splices in bytes of an earlier connection: its keys
            # and frame counter differ, so the MAC fails and the channel closes.
            older = [data for ident, data in self.recorded[sender] if ident != channel.id]
            if older:
                self.trace(f"replaying an older connection's frame {sender} -> {receiver_role}")
                self.deliver_on(channel, receiver, self.rng.choice(older))

    def intrude(self) -> None:
        """With a secret: someone on the primary's address opens a channel to the backup
        and replays a recorded handshake of the primary's.  The backup's nonce is new, so
        the proof fails; the live channel must not notice."""
        backup = self.nodes[BACKUP]
        if not backup.alive or backup.paused or not self.openings:
            return
        recorded = self.rng.choice(self.openings)[1]
        self.intruders += 1
        # The primary never sees it: its own numbers.
        channel = Channel(-self.intruders, (self.nodes[PRIMARY], backup))
        self.fault(f"intruder replays a handshake on channel {channel.id}")
        core = backup.backup
        core.channel_opened(self.now, channel.id)
        channel.open_at[backup] = True
        backup.candidates[channel.id] = channel
        backup.drain()
        for data in recorded:
            self.deliver_on(channel, backup, data)

    def probe(self) -> None:
        primary, backup = self.nodes[PRIMARY], self.nodes[BACKUP]
        running = primary.alive and self.reachable()
        backup.deliver(self.latency(), lambda: backup.backup.probe_result(self.now, running))

    # -- clients -----------------------------------------------------------------------
    def count_applications(self, store: Any) -> None:
        """Count what the primary applies to ``store`` and its idempotency table."""
        apply, table_apply = store.apply, store.idempotency.apply
        values, keys = self.values_applied, self.keys_applied

        def counting(ops: list[str | None]) -> None:
            for value in ops[1::2]:
                if value is not None:
                    values[value] = values.get(value, 0) + 1
            apply(ops)

        def counting_keys(time: int, keyed: list[Any], record: bool = False) -> Any:
            for ident in keyed[0::4]:
                keys[ident] = keys.get(ident, 0) + 1
            return table_apply(time, keyed, record)

        add_absent = store.add_absent

        def counting_absent(ops: list[str | None], indices: list[int]) -> list[int]:
            left: list[int] = add_absent(ops, indices)
            for number in range(len(indices)):
                value = ops[2 * number + 1]
                if number not in left and value is not None:
                    values[value] = values.get(value, 0) + 1
            return left

        store.apply = counting
        store.add_absent = counting_absent
        store.idempotency.apply = counting_keys

    def client_loop(self, client: int) -> None:
        if self.now >= self.duration:
            return
        kind = self.rng.choice(("get", "get", "insert", "update", "delete"))
        command = COMMANDS[kind]
        key = self.rng.choice(KEYS)
        value = f"v{next(self._values)}" if kind in ("insert", "update") else None
        if client % 2 == 0 and kind != "get":
            self.keyed_write(client, kind, key, value)
            return
        loaded = kind == "insert" and self._loads.random() < 0.5  # as a load chunk
        call = self.now
        primary = self.nodes[PRIMARY]
        state = {"done": False}

        def finish(
            ok: bool | None, output: str | None, record: bool = True, served: float | None = None
        ) -> None:
            if state["done"]:
                return
            state["done"] = True
            if record:
                ret = self.now if ok is not None else None
                if ok is None and kind == "get":
                    record = False
                if record:
                    self.record(Operation(client, kind, key, value, call, ret, ok, output), served)
            self.schedule(self.rng.uniform(0.001, 0.05), lambda: self.client_loop(client))

        def answer(outcome: Outcome) -> None:
            delay = self.latency()
            served = self.now
            if isinstance(outcome, Done):
                # ``served``: when the server answered (with ``always``, after the fsync).
                self.schedule(delay, lambda: finish(outcome.ok, outcome.value, served=served))
            elif isinstance(outcome, Loaded):  # the insert's answer: written or skipped
                assert outcome.applied + outcome.skipped == 1, outcome
                ok = outcome.applied == 1
                self.schedule(delay, lambda: finish(ok, None, served=served))
            elif isinstance(outcome, Refused):
                # Applied nowhere and observed nothing: not part of the history.
                self.schedule(delay, lambda: finish(None, None, record=False))
            elif isinstance(outcome, MemoryFull):
                # Refused for the memory limit: applied nowhere either.
                assert value is not None, "only a write that adds data is refused"
                self.refused_values.add(value)
                self.schedule(delay, lambda: finish(None, None, record=False))
            elif isinstance(outcome, ReplicationFailed):
                self.schedule(delay, lambda: finish(None, None))
            else:
                raise AssertionError(f"unexpected outcome {outcome!r}")

        def at_primary() -> None:
            core = primary.primary
            self.note_served(core, key)
            if command.is_read:
                answer(core.read(command, key))
                return
            if loaded:
                assert value is not None
                outcome = primary.submit_pairs([key, value], answer)
            else:
                outcome = primary.submit(command, key, value, answer)
            if outcome is not None:
                answer(outcome)

        if primary.alive:
            primary.deliver(self.latency(), at_primary)
        # A request with no reply (crash, pause) times out: indeterminate.
        self.schedule(3.0, lambda: finish(None, None))

    def keyed_write(self, client: int, kind: str, key: str, value: str | None) -> None:
        """A write with an Idempotency-Key, retried as the Python clients do: after a
        lost reply, "replication failed" or a stage refusal, with back-off, until
        ``RETRY_DEADLINE``.  All its attempts are one operation."""
        command = COMMANDS[kind]
        ident = f"c{client}.{next(self._values)}"
        call = self.now
        primary = self.nodes[PRIMARY]
        self.open_operations += 1
        state = _Attempts()

        def finish(
            ok: bool | None, output: str | None, record: bool = True, served: float | None = None
        ) -> None:
            state.done = True
            self.open_operations -= 1
            if record:
                ret = self.now if ok is not None else None
                self.record(Operation(client, kind, key, value, call, ret, ok, output), served)
                if any(call < loss.at for loss in self.power_losses):
                    # Attempts on both sides of a power loss: one before it may have been
                    # applied and lost with its table entry, and the retry applied again.
                    self.record(Operation(client, kind, key, value, call, None, None), None)
            self.schedule(self.rng.uniform(0.001, 0.05), lambda: self.client_loop(client))

        def attempt() -> None:
            state.attempt += 1
            number = state.attempt
            if number > 1:
                self.trace(f"client {client} retries {ident} (attempt {number})")

            def answer(outcome: Outcome) -> None:
                faulty = self.faults_enabled and self.now < self.duration
                if faulty and self.rng.random() < LOST_REPLY_RATE:
                    self.trace(f"the reply to {ident} (attempt {number}) is lost")
                    return
                served = self.now
                self.schedule(self.latency(), lambda: ended(number, outcome, served))

            def at_primary() -> None:
                self.note_served(primary.primary, key)
                outcome = primary.submit(command, key, value, answer, ident)
                if outcome is not None:
                    answer(outcome)

            if primary.alive:
                primary.deliver(self.latency(), at_primary)
            self.schedule(ATTEMPT_TIMEOUT, lambda: ended(number, None))

        def ended(number: int, outcome: Outcome | None, served: float | None = None) -> None:
            if state.done or number != state.attempt:
                return  # a later attempt is under way: its answer counts
            if isinstance(outcome, Done):
                self.retried += number > 1
                finish(outcome.ok, outcome.value, served=served)
                return
            if isinstance(outcome, KeyReused):
                self.violations.append(f"{ident}: the same request refused as another one")
                finish(None, None)
                return
            if isinstance(outcome, MemoryFull) and not state.maybe:
                assert value is not None, "only a write that adds data is refused"
                self.refused_values.add(value)
                finish(None, None, record=False)  # no attempt was applied anywhere
                return
            if not isinstance(outcome, Refused):
                state.maybe = True  # lost or rewound: it may have been applied
            delay = state.backoff * self.rng.uniform(0.5, 1.0)
            state.backoff = min(0.5, 2 * state.backoff)
            if self.now + delay > call + RETRY_DEADLINE:
                # Given up: indeterminate, or nothing if every attempt was refused.
                finish(None, None, record=state.maybe)
                return
            self.schedule(delay, attempt)

        attempt()

    # -- nemesis -------------------------------------------------------------------------
    def note_sync(self) -> None:
        """Remember which lives of the two processes were last in sync together."""
        if self.in_sync() and self.awaiting_restore():
            store = self.nodes[PRIMARY].running.store
            for key in KEYS:
                self.power_losses[-1].note(key, store.get(key), self.now)
        if self.in_sync():
            self.synced_lives = {role: node.life for role, node in self.nodes.items()}

    def holds_every_acknowledged_write(self, role: Role) -> bool:
        """The oracle that keeps the two servers from being "both down".

        A process that took part in the last in-sync period and has not crashed
        since must hold every acknowledged write.  This does not ask the cores
        (a core that wrongly thinks its data is stale must not hide the bug).
        """
        node = self.nodes[role]
        return node.alive and self.synced_lives.get(role) == node.life

    def nemesis(self) -> None:
        if self.now >= self.duration:
            return
        primary, backup = self.nodes[PRIMARY], self.nodes[BACKUP]
        choice = self.rng.random()
        if choice < 0.25:
            # Crash one server, never both: only when the other holds every acknowledged write.
            role = self.rng.choice(ROLES)
            other = role.peer
            node = self.nodes[role]
            if node.alive and self.holds_every_acknowledged_write(other):
                self.fault(f"crash {role}")
                node.crash()
                self.schedule(self.rng.uniform(0.1, 2.0), lambda: self.restart(node))
        elif choice < 0.45:
            node = self.rng.choice((primary, backup))
            if node.alive and not node.paused:
                self.fault(f"pause {node.role}")
                node.pause()
                self.schedule(self.rng.uniform(0.05, 2.5), lambda: self.resume(node))
        elif choice < 0.65:
            if not self.partitioned:
                self.fault("partition")
                self.partitioned = True
                self.schedule(self.rng.uniform(0.1, 2.5), self.heal)
        elif choice < 0.72 and self.settings.secret is not None:
            self.intrude()
        elif choice < 0.8:
            # Close the channel from one side (a reset connection).
            node = self.rng.choice((primary, backup))
            if node.alive and node.channel is not None and not node.paused:
                self.fault(f"{node.role} connection reset")
                channel, node.channel = node.channel, None
                self.close_channel(channel, node)
                node.running.channel_closed(self.now, "connection reset")
                node.drain()
        elif choice < 0.9 and self.settings.persistent:
            # Aimed at a write: the power goes within an fsync's time after the next
            # record or base either server writes (or in half a second).
            self.power_cut_armed = True
            self.schedule(0.5, self.power_cut_if_armed)
        self.schedule(self.rng.uniform(0.2, 1.5), self.nemesis)

    def written(self) -> None:
        """A server wrote a record or a base."""
        if self.power_cut_armed:
            self.power_cut_armed = False
            self.schedule(self.rng.uniform(0.0, FSYNC_SECONDS[1]), self.power_cut)

    def power_cut_if_armed(self) -> None:
        if self.power_cut_armed:
            self.power_cut_armed = False
            self.power_cut()

    def power_cut(self) -> None:
        """Both machines lose power, if both processes run (a paused one's fsyncs wait
        with it: the loss window is about running time), the faults last, and what the
        last loss left is known (the pair served it since)."""
        running = all(node.alive and not node.paused for node in self.nodes.values())
        recent = self.now - self.last_resume <= RESUMED
        if running and not recent and self.now < self.duration and not self.awaiting_restore():
            self.power_loss()

    def power_loss(self) -> None:
        self.fault("power loss: both servers")
        self.power_losses.append(PowerLoss(self.now))
        for node in self.nodes.values():
            node.crash(power_loss=True)
            self.schedule(self.rng.uniform(0.1, 2.0), functools.partial(self.restart, node))
        # A write lost with the power may be applied again by its retry: count afresh.
        self.values_applied.clear()
        self.keys_applied.clear()

    def awaiting_restore(self) -> bool:
        return bool(self.power_losses) and not self.power_losses[-1].known

    def note_served(self, core: PrimaryCore, key: str) -> None:
        """A request on ``key`` reaches the primary: if it serves it, the key's value
        now is what the last power loss left of it (unless known already)."""
        serves = core.may_read(Command.GET, key) or core.machine.acceptance.writes is REPLICATE
        if self.awaiting_restore() and serves:
            self.power_losses[-1].note(key, core.store.get(key), self.now)

    def record(self, operation: Operation, served: float | None) -> None:
        self.operations.append(operation)
        self.answered.append(served if operation.ok is not None else None)

    def fault(self, text: str) -> None:
        self.fault_log.append(f"{self.now:.3f} {text}")
        self.trace(f"nemesis: {text}")

    def restart(self, node: SimNode) -> None:
        if not node.alive:
            self.fault(f"restart {node.role}")
            node.start()

    def resume(self, node: SimNode) -> None:
        if node.paused:
            self.fault(f"resume {node.role}")
            self.last_resume = self.now
            node.resume()

    def heal(self) -> None:
        if self.partitioned:
            self.fault("heal")
            self.partitioned = False

    # -- the run ---------------------------------------------------------------------------
    def in_sync(self) -> bool:
        return all(
            n.core is not None and not n.paused and n.core.stage is Stage.IN_SYNC
            for n in self.nodes.values()
        )

    def run(self) -> RunResult:
        order = list(ROLES)
        self.rng.shuffle(order)
        first, second = (self.nodes[r] for r in order)
        first.start()
        self.schedule(self.rng.uniform(0.0, 1.0), second.start)
        for client in range(self.clients):
            self.schedule(self.rng.uniform(0.5, 1.5), functools.partial(self.client_loop, client))
        if self.faults_enabled:
            self.schedule(self.rng.uniform(0.5, 2.0), self.nemesis)
        self.run_until(self.duration)
        # Faults stop; everything comes back.
        self.heal()
        for node in self.nodes.values():
            self.resume(node)
            self.restart(node)
        converged = self.run_until(self.duration + 30.0, self.in_sync)
        # Let answers in flight arrive (clients stopped issuing at ``duration``), and
        # keyed writes finish retrying.
        self.run_until(self.now + 5.0)
        self.run_until(self.now + 2 * RETRY_DEADLINE, lambda: self.open_operations == 0)
        last = self.nodes[PRIMARY].core
        if isinstance(last, PrimaryCore):
            self.replays += last.writes_replayed
            self.divergences += last.backup_diverged
        result = RunResult(self.seed, True, operations=len(self.operations), faults=self.fault_log)
        if self.forced_persistence != "off":
            result.forced_persistence = self.forced_persistence
        if not converged or not self.in_sync():
            result.ok = False
            result.converged = False
            stages = {
                r: (n.core.stage.value if n.core is not None else "down")
                for r, n in self.nodes.items()
            }
            result.explanation = f"the pair did not return to in sync: {stages}"
            return result
        primary_store = self.nodes[PRIMARY].running.store
        backup_store = self.nodes[BACKUP].running.store
        primary = dict(primary_store.items())
        backup = dict(backup_store.items())
        if primary != backup:
            result.ok = False
            result.explanation = (
                f"primary and backup differ after sync: primary {primary} backup {backup}"
            )
            return result
        tables = [
            {ident: entry[:4] for ident, entry in table.entries.items()}
            for table in (primary_store.idempotency, backup_store.idempotency)
        ]
        if tables[0] != tables[1]:
            only = sorted(set(tables[0].items()) ^ set(tables[1].items()))[:4]
            result.ok = False
            result.explanation = f"the idempotency tables differ after sync: {only}"
            return result
        if self.divergences:
            result.ok = False
            result.explanation = (
                f"the backup's copy was not the primary's after a batch, {self.divergences} "
                "times (its ACK's checksum)"
            )
            return result
        twice = sorted(
            [v for v, n in self.values_applied.items() if n > 1]
            + [k for k, n in self.keys_applied.items() if n > 1]
        )
        self.entries_replaced += primary_store.idempotency.replaced
        self.entries_replaced += backup_store.idempotency.replaced
        if self.entries_replaced:
            twice.append(f"{self.entries_replaced} idempotency entries made twice on a copy")
        if twice or self.violations:
            result.ok = False
            result.explanation = f"writes applied twice: {twice[:5]} {self.violations[:3]}"
            return result
        seen = {op.output for op in self.operations} | set(primary.values())
        visible = sorted(v for v in seen if v in self.refused_values)
        if visible:
            result.ok = False
            result.explanation = f"writes refused for max_memory became visible: {visible}"
            return result
        for loss in self.power_losses:
            assert loss.known, "the pair is in sync again"
        window = POWER_LOSS_WINDOW.get(self.settings.persistence, 0.0)
        lost = lost_beyond_window(self.operations, self.answered, self.power_losses, window)
        if lost is not None:
            result.ok = False
            result.explanation = lost
            return result
        restores = [
            Operation(-1, "restore", key, value, loss.at, loss.served_again[key], True)
            for loss in self.power_losses
            for key, value in loss.contents.items()
        ]
        verdict: Result = check(self.operations + restores, final=primary, timeout=20.0)
        result.ok = verdict.ok
        result.explanation = verdict.explanation
        return result


def _flip_a_byte(data: bytes, rng: random.Random) -> bytes:
    flipped = bytearray(data)
    flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
    return bytes(flipped)


def run_seed(seed: int, **options: Any) -> RunResult:
    return Simulation(seed, **options).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, help="run this one seed")
    parser.add_argument("--seeds", type=int, default=200, help="how many seeds to run")
    parser.add_argument("--first", type=int, default=0, help="first seed of the range")
    parser.add_argument("--duration", type=float, default=8.0, help="simulated seconds of load")
    parser.add_argument("--verbose", action="store_true", help="print the trace and core logs")
    parser.add_argument(
        "--persistence",
        choices=("always", "everysec"),
        help="every seed with this mode (default: three seeds in ten, either mode)",
    )
    args = parser.parse_args(argv)
    forced = {"persistence": args.persistence} if args.persistence else {}
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    else:
        logging.getLogger("pbkv").setLevel(logging.ERROR)
    seeds = [args.seed] if args.seed is not None else range(args.first, args.first + args.seeds)
    started = time.monotonic()
    failures = 0
    operations = 0
    for seed in seeds:
        trace = print if args.verbose else None
        result = run_seed(seed, duration=args.duration, trace=trace, **forced)
        operations += result.operations
        if result.ok is not True:
            failures += 1
            print(f"seed {seed} FAILED: {result.explanation}")
            print(f"  faults: {'; '.join(result.faults)}")
            print(f"  replay: {result.replay_command()}")
    elapsed = time.monotonic() - started
    print(
        f"{len(seeds)} seeds, {operations} operations, {failures} failed, {elapsed:.1f}s",
        file=sys.stderr,
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
