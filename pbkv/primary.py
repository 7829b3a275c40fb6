"""The primary's replication core (sans-I/O).

Writes are group-committed.  A write is validated against the committed store
plus the writes still in flight (the *overlay*), queued, and sent to the
backup in the next batch; only when the backup acknowledges that batch is it
applied to the store and answered.  Reads see the store alone, so no read
ever returns a value the backup has not acknowledged.  If the backup fails,
every queued and in-flight write is rewound (the overlay is dropped, newest
first) and answered "replication failed".

A logical failure that depends on a write still in flight (insert of a key
whose insert is pending, say) is not answered at once: it waits in the queue
behind that write, so a failure is never reported for a state that is later
rewound.

Who wins a handshake is ``stages.plan``: this core carries the plan out.
"""

from __future__ import annotations

import itertools
import logging
import operator
import random
from collections import deque
from collections.abc import Callable
from typing import Any

from pbkv import auth
from pbkv.actions import FLUSH_SOON, Connect, Respond, StartTimer, Timer
from pbkv.catchup import AppliedRecord
from pbkv.commands import (
    KEY_REUSED,
    REPLICATION_FAILED,
    Command,
    Done,
    Loaded,
    Outcome,
    Refused,
    Reply,
)
from pbkv.config import Settings
from pbkv.core import (
    BATCH_CHARS,
    BATCH_WRITES,
    DONE,
    MISS,
    ReplicationCore,
    growth,
)
from pbkv.idempotency import (
    BATCH_ITEMS,
    ENTRY_OVERHEAD,
    FINGERPRINT,
    OK,
    VALUE,
    TableClock,
    fingerprint,
)
from pbkv.persist.log import State as DiskState
from pbkv.stages import (
    Copy,
    Directive,
    Event,
    Plan,
    Role,
    Stage,
    State,
    Step,
    WriteRule,
    plan,
)
from pbkv.store import PAIR_OVERHEAD, ShardedStore, without_pairs
from pbkv.transfer import SnapshotReceiver, TransferError
from pbkv.wire import (
    Ack,
    AuthChallenge,
    AuthProof,
    AuthResponse,
    Catchup,
    Fence,
    Fetch,
    FrameType,
    Hello,
    Rollback,
    Skip,
    SnapshotBegin,
    SnapshotEnd,
    SyncAck,
    SyncNack,
)
from pbkv.wire import (
    Batch as BatchFrame,
)

log = logging.getLogger(__name__)


# From this many ops on (a bulk load's batch), its overlay entries go in C loops.
_WHOLE_BATCH_OPS = 256


class Layer:
    """A load chunk in flight (see ``PrimaryCore.layers``): the seq of its batch, its
    pairs, and their {key: value}, built when first asked (a load alone never asks:
    only a write of another request, or an upsert chunk, meanwhile)."""

    __slots__ = ("seq", "pairs", "_writes")

    def __init__(self, seq: int, pairs: list[str], writes: dict[str, str] | None) -> None:
        self.seq = seq
        self.pairs = pairs
        self._writes = writes

    def writes(self) -> dict[str, str]:
        """{key: value}; a key given twice keeps its first pair, as the batch does."""
        if self._writes is None:
            pairs = self.pairs
            self._writes = dict(zip(pairs[-2::-2], pairs[::-2], strict=True))  # last first
        return self._writes


def _forget_batch(overlay: dict[str, tuple[str | None, int]], keys: list[Any], seq: int) -> None:
    """Drop the overlay entries batch ``seq`` made (an entry of a later batch stays)."""
    popped = list(map(overlay.pop, keys, itertools.repeat(None)))
    if set(map(operator.itemgetter(1), filter(None, popped))) - {seq}:
        for key, pending in zip(keys, popped, strict=True):
            if pending is not None and pending[1] != seq:
                overlay[key] = pending  # a later write of that key: still in flight


class Batch:
    """Writes that travel together: queued, then in flight until acknowledged."""

    __slots__ = (
        "seq", "ops", "entries", "chars", "grows", "sent_at", "deadline", "keyed", "time",
        "absent", "new_shards", "chunks", "layers", "layered_ops",
    )  # fmt: skip

    def __init__(self) -> None:  # a plain class: compiled, built natively (``compiled.py``)
        self.seq = 0
        self.ops: list[Any] = []  # key, value-or-None, key, ...
        self.entries: list[tuple[Reply, Outcome]] = []  # reply, answer
        self.chars = 0  # of the keys and values in ops: a batch's frame stays bounded
        self.grows = 0  # bytes its writes add to the store (counted in pending_write_bytes)
        self.sent_at = 0.0
        self.deadline = 0.0
        # The idempotency entries of its keyed writes (key, fingerprint, ok, value, ...),
        # and the table time it carries (set when it is sent).
        self.keyed: list[Any] = []
        self.time = 0
        # Bulk load chunks at the start of ops, their pairs written where the key holds
        # no value when the batch is applied (``absent`` pairs, on both servers): the
        # shard of each of their keys, and each chunk's entry and pairs, answered with
        # what was written (``add_absent``).
        self.absent = 0
        self.new_shards: list[int] = []
        self.chunks: list[tuple[int, int]] = []
        # The load chunks it carries as layers (see ``PrimaryCore.layers``), and the
        # ops they hold.
        self.layers = 0
        self.layered_ops = 0

    def full(self) -> bool:
        return (
            len(self.ops) >= 2 * BATCH_WRITES
            or len(self.keyed) >= 4 * BATCH_WRITES
            or self.chars >= BATCH_CHARS
        )


class PrimaryCore(ReplicationCore):
    role = Role.PRIMARY

    def __init__(
        self,
        settings: Settings,
        store: ShardedStore,
        now: float,
        rng: random.Random | None = None,
        initial: Stage | None = None,
    ) -> None:
        self.standalone = settings.standalone
        if initial is None:
            initial = Stage.IN_SYNC if self.standalone else Stage.COLD_START
        super().__init__(settings, store, initial, now, rng)
        # With a coordinator: whether a write that backup ``member`` acknowledged may be
        # acknowledged at ``now`` (the leadership's answer: our lease holds and etcd
        # records that member as our in-sync backup). None: always (the seed's pair).
        self.authority: Callable[[float, str], bool] | None = None
        self.overlay: dict[str, tuple[str | None, int]] = {}
        # Load chunks in flight as layers, oldest first, not as overlay entries: each
        # dropped whole at its ack.  Their pairs are written only where the key holds
        # no value (see ``_layered``); a layer's keys are not in the overlay when it
        # comes (nor in another layer, in upsert mode), and a later write of one goes
        # to the overlay, which is therefore read first.
        self.layers: deque[Layer] = deque()
        # Keyed writes not yet acknowledged: Idempotency-Key -> (fingerprint, the batch
        # that carries it, its outcome); a retry meanwhile is answered with that batch.
        self.keyed: dict[str, tuple[int, Batch, Outcome]] = {}
        # The table time this primary stamps on its batches (see ``idempotency.py``).
        self.table_clock = TableClock(store.idempotency.clock, now)
        self.writes_replayed = 0  # retries answered with a remembered reply (or joined)
        self.keys_reused = 0  # keys that came with another request: refused (422)
        # Writes not yet sent, oldest batch first; the last one takes new writes.
        self.queued: deque[Batch] = deque([Batch()])
        self.flush_pending = False
        # Batches sent and not yet acknowledged, oldest first (acks come in order).
        self.in_flight: deque[Batch] = deque()
        self.window = settings.batches_in_flight
        # With ``always`` each batch costs an fsync on each server, in series, and the
        # disk is the limit: a batch that can still take writes waits while another
        # is in flight, so the writes that come meanwhile share its fsyncs (full
        # batches, such as a load's, still fill the window).
        self.fill_before_sending = settings.persistence == "always"
        self.sent_seq = 0
        self.plan: Plan | None = None  # what this channel's handshake decided
        # The batches applied last, to bring a member behind us in sync (``catchup.py``).
        self.applied_record = AppliedRecord(settings.undo_bytes)
        self.catchups_sent = 0
        self.writes_rewound = 0
        self.batches_sent = 0
        # Acknowledged batches: how many, their writes, and the sum of round trips.
        self.batches_acked = 0
        # Acknowledgements whose copy was not ours after the batch (a bug, or memory gone
        # bad): each closed the channel, and the handshake sent our copy whole.
        self.backup_diverged = 0
        self.writes_replicated = 0
        self.ack_seconds_total = 0.0
        # Retrying: whether a retry timer is set (otherwise an attempt is under way, or
        # the channel is up), and the backup's nudges (see ``backup_listening``).
        self.retry_pending = False
        self.nudged = False
        self.last_nudge = float("-inf")
        self.handlers.update(
            {
                FrameType.HELLO: self._hello,
                FrameType.ACK: self._batch_acked,
                FrameType.SNAPSHOT_BEGIN: self._transfer_frame,
                FrameType.SHARD_CHUNK: self._transfer_frame,
                FrameType.SHARD_END: self._transfer_frame,
                FrameType.IDEMPOTENCY_CHUNK: self._transfer_frame,
                FrameType.SNAPSHOT_END: self._transfer_frame,
                FrameType.SYNC_ACK: self._sync_ack,
                FrameType.AUTH_RESPONSE: self._auth_response,
            }
        )

    # -- lifecycle ---------------------------------------------------------------
    def start(self, now: float) -> None:
        self.now = now
        if self.standalone:
            self.confirmed = True
            log.info("primary standalone: answering writes without a backup")
            return
        self.outbox.append(Connect())
        self.start_tick()

    def timer_fired(self, now: float, timer: Timer) -> None:
        if timer is Timer.RETRY:
            self.now = now
            self.retry_pending = False
            if not self.channel_up and not self.standalone and not self.stale:
                self.outbox.append(Connect())
            return
        super().timer_fired(now, timer)

    @property
    def in_sync_backup(self) -> str | None:
        """The member name of the backup we are in sync with (None: none)."""
        hello = self.peer_hello
        if self.channel_up and self.stage is Stage.IN_SYNC and hello is not None:
            return hello.member
        return None

    def authorised(self, now: float) -> bool:
        """Whether writes the backup acknowledges may be acknowledged now (see ``authority``)."""
        authority = self.authority
        if authority is None:
            return True
        backup = self.in_sync_backup
        return backup is not None and authority(now, backup)

    def step_down(self, reason: str) -> None:
        """Stop acting as primary: the channel goes, and every write not yet
        acknowledged is answered "replication failed"."""
        self.lose_channel(reason)
        self._rewind(reason)

    def visible(self, key: str) -> str | None:
        pending = self.pending(key)
        return self.store.get(key) if pending is None else pending[0]

    def pending(self, key: str) -> tuple[str | None, int] | None:
        """The newest write of ``key`` in flight or queued (value, seq), if any."""
        pending = self.overlay.get(key)
        if pending is None and self.layers:
            return self._layered(key)
        return pending

    def _layered(self, key: str) -> tuple[str, int] | None:
        """The layer write of ``key`` that takes effect, if any.  A layer's pair is
        written only where its key holds no value, so of the layers that hold the key
        the oldest writes it, unless the store holds it: no other write of it was in
        flight when those layers came, and later ones go to the overlay (read first),
        so what the store holds now is there when they apply."""
        for layer in self.layers:  # oldest first
            value = layer.writes().get(key)
            if value is not None:
                return None if key in self.store else (value, layer.seq)
        return None

    # -- epochs ------------------------------------------------------------------
    @property
    def stale(self) -> bool:
        """A newer primary exists: we must step down (the driver fences on it)."""
        return self.epoch < self.epoch_seen

    def serve_epoch(self, now: float, epoch: int) -> None:
        """We hold the coordinator's leader key of ``epoch``: act under it from now on.
        A channel lives in one epoch: one opened under another goes."""
        self.now = now
        old = self.epoch
        if epoch == old:
            return
        self.epoch = epoch
        log.info("primary serves epoch %d (before: %d)", epoch, old)
        self.epoch_observed(now, epoch)
        if self.channel_up:
            self.lose_channel(f"the primary now serves epoch {epoch}, not {old}")

    def channel_epoch(self) -> int | None:
        return self.epoch

    def on_epoch_seen(self, epoch: int) -> None:
        if self.stale:
            log.warning(
                "primary is stale: it serves epoch %d, and epoch %d exists: a newer primary "
                "exists, this one steps down",
                self.epoch,
                epoch,
            )

    def schedule_retry(self) -> None:
        # A nudge during the attempt that just failed: the next one at once.
        delay = 0.0 if self.nudged else self.backoff.next_delay()
        self.nudged = False
        self.retry_pending = True
        self.outbox.append(StartTimer(Timer.RETRY, delay))

    def backup_listening(self, now: float) -> None:
        """The backup says it listens (its start-up probe sends this nudge).

        Waiting to retry, perhaps for a back-off grown to ``retry_max``: connect
        now, and start the back-off over.  Anyone may send a nudge, so it only
        brings a connection attempt forward: never while the channel is up, at
        most one per ``retry_min``, and the attempt itself proves the backup as
        every attempt does.  During an attempt (it may have been refused just
        before the backup listened), the retry after it is at once.
        """
        self.now = now
        if self.standalone or self.channel_up or now - self.last_nudge < self.settings.retry_min:
            return
        self.last_nudge = now
        self.backoff.reset()
        if self.retry_pending:
            self.outbox.append(StartTimer(Timer.RETRY, 0.0))  # replaces the pending one
        else:
            self.nudged = True

    def channel_opened(self, now: float) -> None:
        self.opened(now)
        if self.stale:  # a channel opened before we learned it: nothing goes out on it
            self.lose_channel(f"epoch {self.epoch} < {self.epoch_seen} seen")
            return
        if self.secret is None:
            self.send(self.hello_frame())
        else:
            self.nonces[Role.PRIMARY] = auth.new_nonce()
            self.send(AuthChallenge(self.nonces[Role.PRIMARY]))

    def channel_failed(self, now: float, reason: str) -> None:
        """Connecting to the backup did not work."""
        self.now = now
        self.fire(Event.BACKUP_UNREACHABLE, f"no backup: {reason}")
        self.schedule_retry()

    def on_channel_lost(self, reason: str) -> None:
        if self.stage is Stage.IN_SYNC:
            self.note_sync_changed()
        self.plan = None
        self._rewind(reason)
        self.schedule_retry()

    def tick(self) -> None:
        if self.in_flight and self.now > self.in_flight[0].deadline:
            # Seed: "try to kill the backup", then bootstrap a new one.
            if self.channel_up:
                self.send(Fence("acknowledgement timed out"))
            self.lose_channel(f"backup did not acknowledge batch {self.in_flight[0].seq} in time")
        super().tick()

    # -- client requests ---------------------------------------------------------
    def submit(
        self,
        command: Command,
        key: str,
        value: str | None,
        reply: Reply,
        idempotency: str | None = None,
    ) -> Outcome | None:
        """A write: an outcome now, or None when ``Respond(reply, ...)`` follows.
        ``idempotency``: the request's Idempotency-Key (see ``_submit_keyed``)."""
        if idempotency is not None:
            return self._submit_keyed(command, key, value, reply, idempotency)
        pending = self.overlay.get(key)
        if pending is None and self.layers:
            pending = self._layered(key)
        current = self.store.get(key) if pending is None else pending[0]
        # Checked against the store plus every write not yet acknowledged.
        grow = 0 if value is None else growth(command, key, value, current)
        if self.max_memory:
            full = self.over_memory(grow)
            if full is not None:
                return full
        if self.machine.acceptance.writes is not WriteRule.REPLICATE:
            return Refused(self.stage, self.role)
        if command is Command.INSERT:
            ok, new, outcome = current is None, value, DONE[current is None]
        elif command is Command.UPDATE:
            ok, new, outcome = current is not None, value, DONE[current is not None]
        else:
            ok, new = current is not None, None
            outcome = Done(True, current) if ok else MISS
        if self.standalone:
            if ok:
                self.store.write(key, new)
            return outcome
        if not ok and pending is None:
            return outcome
        queued = self.queued[-1]
        if ok:
            if queued.full():
                queued = Batch()
                self.queued.append(queued)
            queued.ops.append(key)
            queued.ops.append(new)
            queued.chars += len(key) + (0 if new is None else len(new))
            queued.grows += grow
            self.pending_write_bytes += grow
            self.overlay[key] = (new, self.sent_seq + len(self.queued))
        # else: it depends on a write in flight: answer after that is acknowledged.
        queued.entries.append((reply, outcome))
        if not self.flush_pending:
            # Everything submitted before the driver calls flush shares one batch.
            self.flush_pending = True
            self.outbox.append(FLUSH_SOON)
        return None

    def submit_pairs(self, pairs: list[str], upsert: bool, reply: Reply) -> Outcome | None:
        """A chunk of a bulk load (key, value, key, value, ...; at most ``BATCH_WRITES``
        pairs, closed past ``BATCH_CHARS`` characters as a batch is): every pair it
        writes travels in one batch, so the chunk is applied whole or not at all on
        both servers.  Insert mode (``upsert`` false) leaves a key that holds a value
        (or that an earlier pair of the chunk wrote) as it is, counted as skipped.
        An outcome now (a refusal: nothing applied), or None when ``Respond(reply,
        Loaded(...))`` follows once the backup acknowledged the batch."""
        if self.machine.acceptance.writes is not WriteRule.REPLICATE:
            return Refused(self.stage, self.role)
        keys = pairs[0::2]
        chars = sum(map(len, pairs))
        grows = chars + PAIR_OVERHEAD * len(keys)  # every key new: the most it adds
        layered = False  # whether the chunk travels as a layer
        writes: dict[str, str] | None = None  # the layer's {key: value}, when known now
        shards: list[int] = []
        stored: list[str | None] | None = None
        if (
            not upsert
            and self.overlay.keys().isdisjoint(keys)
            and (not self.max_memory or self.over_memory(grows) is None)
        ):
            # Insert mode, no key with a write in flight outside a load chunk (a load's
            # common case): the chunk travels as it is, a layer, each pair written
            # where its key holds no value when the batch is applied.  Neither the
            # store nor the other layers are looked at now: the write looks each key
            # up anyway, on both servers, and a key written by an earlier pair (of this
            # chunk or an earlier one) is then taken.
            shards = self.store.shards_of(keys)
            layered = True
        else:
            # An upsert chunk must write every pair: it is a layer only when no key is
            # given twice, holds a value, or has a write in flight.
            fresh = dict(zip(keys, pairs[1::2], strict=True))
            if (
                len(fresh) == len(keys)
                and self.overlay.keys().isdisjoint(fresh)
                and all(map(fresh.keys().isdisjoint, map(Layer.writes, self.layers)))
            ):
                stored, shards = self.store.lookup(keys)
                if stored.count(None) == len(stored):
                    layered, writes = True, fresh
        if layered:
            ops: list[str | None] = pairs  # type: ignore[assignment]  # str is a str | None
            skipped = 0
        else:
            if stored is None:
                stored, _ = self.store.lookup(keys)
            pendings = list(map(self.pending if self.layers else self.overlay.get, keys))
            ops, grows, skipped, chars = self._chunk_writes(pairs, stored, pendings, upsert)
        if self.max_memory:
            full = self.over_memory(grows)
            if full is not None:
                return full
        outcome = Loaded(len(ops) // 2, skipped)
        if self.standalone:
            if not layered:
                self.store.apply(ops)
                return outcome
            left = len(self.store.add_absent(ops, shards))
            return Loaded(len(keys) - left, left)
        queued = self.queued[-1]
        if (
            ops
            and queued.ops
            and (
                queued.keyed
                or len(queued.ops) + len(ops) > 2 * BATCH_WRITES
                or queued.chars + chars > BATCH_CHARS
                # A layer joins only a batch of layers: they are its first pairs.
                or (layered and 2 * queued.absent != len(queued.ops))
            )
        ):
            queued = Batch()
            self.queued.append(queued)
        if ops:
            queued.ops += ops
            queued.chars += chars
            queued.grows += grows
            self.pending_write_bytes += grows
            seq = self.sent_seq + len(self.queued)
            if layered:
                queued.chunks.append((len(queued.entries), len(keys)))
                queued.absent += len(keys)
                queued.new_shards += shards
                self.layers.append(Layer(seq, pairs, writes))
                queued.layers += 1
                queued.layered_ops += len(ops)
            else:
                entries = zip(ops[1::2], itertools.repeat(seq))
                self.overlay.update(zip(ops[0::2], entries, strict=True))  # type: ignore[arg-type]
        # (With nothing to write it is answered after the batches before it.)
        queued.entries.append((reply, outcome))
        if not self.flush_pending:
            self.flush_pending = True
            self.outbox.append(FLUSH_SOON)
        return None

    @staticmethod
    def _chunk_writes(
        pairs: list[str],
        stored: list[str | None],
        pendings: list[tuple[str | None, int] | None],
        upsert: bool,
    ) -> tuple[list[str | None], int, int, int]:
        """The writes of a load chunk whose keys are not all new, pair by pair: (ops,
        bytes they add, pairs skipped, characters)."""
        ops: list[str | None] = []
        add = ops.append
        taken: set[str] = set()  # insert mode: keys this chunk writes
        grows = skipped = chars = 0
        for i in range(0, len(pairs), 2):
            key, value = pairs[i], pairs[i + 1]
            pending = pendings[i >> 1]
            current = stored[i >> 1] if pending is None else pending[0]
            if upsert:
                if current is None:
                    grows += len(key) + len(value) + PAIR_OVERHEAD
                elif len(value) > len(current):
                    grows += len(value) - len(current)
            elif current is not None or key in taken:
                skipped += 1
                continue
            else:
                taken.add(key)
                grows += len(key) + len(value) + PAIR_OVERHEAD
            add(key)
            add(value)
            chars += len(key) + len(value)
        return ops, grows, skipped, chars

    def remembers(self, ident: str) -> bool:
        """Whether a write with Idempotency-Key ``ident`` is in flight or remembered."""
        return ident in self.keyed or self.store.idempotency.get(ident) is not None

    def _submit_keyed(
        self, command: Command, key: str, value: str | None, reply: Reply, ident: str
    ) -> Outcome | None:
        """A write with an Idempotency-Key: a key seen before with this request gets its
        reply (once its write is acknowledged, if it is still in flight), with another
        request a refusal; a new one is a write whose reply is remembered, replicated
        with it: even a logical failure travels in a batch and is answered once the
        backup acknowledged it."""
        print_ = fingerprint(command._value_, key, value)
        waiting = self.keyed.get(ident)
        if waiting is not None:
            if waiting[0] != print_:
                self.keys_reused += 1
                return KEY_REUSED
            self.writes_replayed += 1
            waiting[1].entries.append((reply, waiting[2]))
            return None
        table = self.store.idempotency
        remembered = table.get(ident)
        if remembered is not None:
            if remembered[FINGERPRINT] != print_:
                self.keys_reused += 1
                return KEY_REUSED
            # Acknowledged state, served when a read of it would be, and only from a copy
            # that is ours: one a warm start is fetching becomes ours (and, with
            # persistence, reaches our disk) once its sync is confirmed.  Until then a
            # power loss of both could bring back our older copy without the write.
            if not (self.confirmed and self.may_read(Command.COUNT, "")):
                return Refused(self.stage, self.role)
            self.writes_replayed += 1
            return Done(remembered[OK], remembered[VALUE])
        pending = self.pending(key)
        current = self.store.get(key) if pending is None else pending[0]
        grow = 0 if value is None else growth(command, key, value, current)
        if command is Command.INSERT:
            ok, new, outcome = current is None, value, DONE[current is None]
        elif command is Command.UPDATE:
            ok, new, outcome = current is not None, value, DONE[current is not None]
        else:
            ok, new = current is not None, None
            outcome = Done(True, current) if ok else MISS
        reply_value = outcome.value
        remembers = ENTRY_OVERHEAD + len(ident) + (0 if reply_value is None else len(reply_value))
        if self.max_memory and grow:  # what adds no pair passes, as without a key
            full = self.over_memory(grow + remembers)
            if full is not None:
                return full
        if self.machine.acceptance.writes is not WriteRule.REPLICATE:
            return Refused(self.stage, self.role)
        if self.standalone:
            if ok:
                self.store.write(key, new)
            entry = [ident, print_, outcome.ok, outcome.value]
            table.apply(self.table_clock.time(table.clock, self.now), entry)
            return outcome
        queued = self.queued[-1]
        if queued.full():
            queued = Batch()
            self.queued.append(queued)
        if ok:
            queued.ops.append(key)
            queued.ops.append(new)
            queued.chars += len(key) + (0 if new is None else len(new))
            self.overlay[key] = (new, self.sent_seq + len(self.queued))
        queued.keyed += (ident, print_, outcome.ok, reply_value)
        queued.chars += remembers - ENTRY_OVERHEAD  # the key's and the reply's characters
        grow += remembers
        queued.grows += grow
        self.pending_write_bytes += grow
        queued.entries.append((reply, outcome))
        self.keyed[ident] = (print_, queued, outcome)
        if not self.flush_pending:
            self.flush_pending = True
            self.outbox.append(FLUSH_SOON)
        return None

    def recovered_from(self, state: DiskState) -> None:
        super().recovered_from(state)
        self.sent_seq = state.seq

    def flush(self, now: float) -> None:
        """Send queued batches while the window has room."""
        self.now = now
        self.flush_pending = False
        if not self.authorised(now):
            return  # held until the leadership allows it (the driver flushes then)
        queued = self.queued
        while len(self.in_flight) < self.window and queued[0].entries:
            if self.in_flight and self.fill_before_sending and self._can_grow(queued):
                break  # sent once the batch in flight is acknowledged (or it fills)
            batch = queued.popleft()
            if not queued:
                queued.append(Batch())
            if not batch.ops and not batch.keyed:
                # Only answers that wait for earlier batches: answer them with the last.
                if self.in_flight:
                    self.in_flight[-1].entries.extend(batch.entries)
                else:
                    self._answer(batch)
                continue
            self.sent_seq += 1
            batch.seq = self.sent_seq
            batch.sent_at = now
            batch.deadline = now + self.settings.ack_timeout
            batch.time = self.table_clock.time(self.store.idempotency.clock, now)
            self.in_flight.append(batch)
            self.batches_sent += 1
            self.send(
                BatchFrame(
                    batch.seq, batch.ops, batch.time, batch.keyed, batch.absent, epoch=self.epoch
                )
            )

    @staticmethod
    def _can_grow(queued: deque[Batch]) -> bool:
        """Whether the next batch to send still takes writes (and has some to send)."""
        batch = queued[0]
        return len(queued) == 1 and not batch.full() and bool(batch.ops or batch.keyed)

    def _answer(self, batch: Batch) -> None:
        outbox = self.outbox
        for reply, outcome in batch.entries:
            outbox.append(Respond(reply, outcome))

    def _batch_acked(self, frame: Ack) -> Step:
        seq = frame.seq
        if not self.in_flight or seq != self.in_flight[0].seq:
            self.lose_channel(f"acknowledgement for unexpected batch {seq}")
            return Step.NONE
        if not self.authorised(self.now):
            # Our lease may be over, or etcd does not name this backup: acknowledge
            # nothing, apply nothing (a read could see it); the writes are rewound.
            self.lose_channel(f"batch {seq} acknowledged, but this primary may not acknowledge now")
            return Step.NONE
        batch = self.in_flight.popleft()
        ops, overlay = batch.ops, self.overlay
        store = self.store
        checksum_before, count_before = store.checksum, len(store)
        written = ops  # what the batch wrote: its pairs but those left as they were
        if batch.absent:
            left = store.add_absent(ops, batch.new_shards)
            if len(ops) > 2 * batch.absent:
                store.apply(ops[2 * batch.absent :])
            if left:
                written = without_pairs(ops, left)
                self._count_left(batch, left)
        else:
            store.apply(ops)
        keyed = batch.keyed
        store.idempotency.apply(batch.time, keyed)  # as the backup did: both expire alike
        after = State(seq, store.checksum, len(store))
        self._record_applied(batch, written, checksum_before, count_before, after)
        if keyed:  # no longer in flight (a C-level pass: a batch may hold hundreds)
            deque(map(self.keyed.pop, keyed[0::BATCH_ITEMS], itertools.repeat(None)), maxlen=0)
        self.pending_write_bytes -= batch.grows
        for _ in range(batch.layers):  # the oldest layers are this batch's
            self.layers.popleft()
        if batch.layered_ops == len(ops):
            pass  # none of its writes is in the overlay
        elif len(ops) < _WHOLE_BATCH_OPS:
            for key in ops[0::2]:
                pending = overlay.get(key)
                if pending is not None and pending[1] == seq:
                    del overlay[key]
        else:
            _forget_batch(overlay, ops[0::2], seq)
        self.seq = seq
        # Before the answers: they wait for it to be durable.
        self.persist_batch(seq, written, batch.time, keyed)
        self.batches_acked += 1
        self.writes_replicated += len(written) // 2
        self.ack_seconds_total += self.now - batch.sent_at
        self._answer(batch)
        if (frame.checksum, frame.count) != (after.checksum, after.count):
            # Its writes are in both copies (answered as such), but the backup's copy is
            # not ours: nothing more goes to it until a handshake has made it ours again
            # (the copies differ, so ours is sent whole).
            self.backup_diverged += 1
            log.error(
                "primary: after batch %d the backup holds %d pairs, checksum %032x; we hold "
                "%d, %032x: its copy went astray peer=backup",
                seq,
                frame.count,
                frame.checksum,
                after.count,
                after.checksum,
            )
            self.lose_channel(f"the backup's copy differs from ours after batch {seq}")
            return Step.NONE
        self.flush(self.now)
        return Step.STREAMING

    @staticmethod
    def _count_left(batch: Batch, left: list[int]) -> None:
        """Answer each load chunk of ``batch`` with the pairs it wrote and those it
        left (``left``: their numbers among the batch's pairs)."""
        entries = batch.entries
        first = 0
        for entry, pairs in batch.chunks:
            skipped = sum(1 for number in left if first <= number < first + pairs)
            entries[entry] = (entries[entry][0], Loaded(pairs - skipped, skipped))
            first += pairs

    def _record_applied(
        self,
        batch: Batch,
        written: list[Any],
        checksum_before: int,
        count_before: int,
        after: State,
    ) -> None:
        """Keep the batch just applied (the pairs it wrote) for a member that lags
        (``catchup.py``)."""
        self.applied_record.applied(
            batch.seq,
            written,
            batch.time,
            batch.keyed,
            checksum_before,
            count_before,
            after,
            batch.chars,
        )

    def _rewind(self, reason: str) -> None:
        """Fail every write not yet acknowledged; the store never saw them."""
        batches = [*self.in_flight, *self.queued]
        failed = sum(len(b.entries) for b in batches)
        if failed:
            self.writes_rewound += failed
            log.warning("primary rewound %d writes (%s) peer=backup", failed, reason)
        for batch in batches:
            for reply, _ in batch.entries:
                self.outbox.append(Respond(reply, REPLICATION_FAILED))
        self.in_flight.clear()
        self.queued = deque([Batch()])
        self.overlay.clear()
        self.layers.clear()
        self.keyed.clear()
        self.pending_write_bytes = 0
        self.sent_seq = self.seq

    # -- the handshake -------------------------------------------------------------
    def _auth_response(self, frame: AuthResponse) -> Step:
        self.nonces[Role.BACKUP] = frame.nonce
        if not self.peer_proof_holds(frame.proof):
            return self.refuse_authentication(
                "the backup's proof does not match the primary's secret "
                "(are both secrets the same?)"
            )
        self.send(AuthProof(self.proof()))
        self.authenticated()
        self.send(self.hello_frame())
        return Step.AWAIT_HELLO

    def _hello(self, frame: Hello) -> Step:
        if frame.role != Role.BACKUP:
            self.lose_channel(
                f"peer says it is the {self.peer_text(frame.role)}, expected the backup"
            )
            return Step.NONE
        self.peer_hello = frame
        self.peer_seq = frame.seq
        theirs = Copy.of(frame)
        decided = self.plan = plan(self.own_copy(), theirs)
        directive, reason = decided.directive, decided.reason
        store = self.store
        if directive is Directive.STALE:
            self.lose_channel(f"stale: {reason}")
            self.epoch_observed(self.now, max(theirs.serving, theirs.epoch))
            return Step.NONE
        if directive is Directive.SKIP:
            log.info("%s: skipping transfer", reason)
            self.send(Skip(frame.checksum, frame.count, self.seq))
        elif directive is Directive.ROLLBACK:
            if not self.confirmed:  # a copy recovered from disk: the backup undoes batches
                self.fire(Event.BACKUP_NEEDS_DATA, reason)
            log.info("primary resync: partial: %s", reason)
            self.send(Rollback(self.seq, store.checksum, len(store)))
        elif directive is Directive.CATCHUP:
            log.info("primary resync: partial: %s", reason)
            self._send_catchup(theirs)
        elif directive is Directive.SEND:
            if not self.confirmed:  # a copy recovered from disk: the backup needs it
                self.fire(Event.BACKUP_NEEDS_DATA, reason)
            log.info("primary resync: full transfer: %s", reason)
            self.start_sending_snapshot()
        elif directive is Directive.FETCH:
            self.recovered = False  # the store is refilled from the backup's
            self.applied_record.clear()
            self.fire(Event.BACKUP_HOLDS_DATA, reason)
            self.receiver = SnapshotReceiver(store)
            self.complete_shards = self.receiver.complete_shards
            self.send(Fetch())
            return Step.RECEIVE_SNAPSHOT
        else:
            if len(store):
                log.warning(
                    "primary discards %d unconfirmed pairs: the backup holds no data", len(store)
                )
                store.clear()
            self.applied_record.clear()
            self.confirmed = True
            self.fire(Event.BACKUP_NEEDS_DATA, reason)
            self.start_sending_snapshot()
        return Step.AWAIT_SYNC_ACK

    def _refused_by_peer(self, frame: SyncNack) -> Step:
        if self.plan is not None and self.plan.directive is Directive.CATCHUP:
            self.applied_record.clear()  # it did not lead there: never offer it again
        return super()._refused_by_peer(frame)

    def record_states(self) -> tuple[State, ...]:
        store = self.store
        return self.applied_record.states(State(self.seq, store.checksum, len(store)))

    def _send_catchup(self, theirs: Copy) -> None:
        """The CATCHUP directive and the recorded batches after the backup's seq (the
        plan checked that the record covers them): bounded by ``undo_bytes``."""
        store = self.store
        self.send(
            Catchup(theirs.seq, theirs.checksum, theirs.count, self.seq, store.checksum, len(store))
        )
        for entry in self.applied_record.after(theirs.seq):
            ops, keyed = list(entry.ops), list(entry.keyed)  # the record keeps tuples
            self.send(BatchFrame(entry.seq, ops, entry.time, keyed, epoch=self.epoch))
        self.catchups_sent += 1

    def _transfer_frame(self, frame: Any) -> Step:
        receiver = self.receiver
        assert receiver is not None
        if type(frame) is SnapshotBegin:
            log.info("primary warm start: receiving %d pairs from the backup", frame.count)
        try:
            checksum = self.receive_transfer_frame(frame)
        except TransferError as exc:
            self.fail_transfer(f"transfer from backup failed: {exc}")
            return Step.NONE
        self.complete_shards = receiver.complete_shards
        if checksum is None:
            return Step.RECEIVE_SNAPSHOT
        assert type(frame) is SnapshotEnd
        hello = self.peer_hello
        assert hello is not None
        if checksum != hello.checksum or len(self.store) != hello.count:
            # A backup takes no writes: what it sends is what its hello announced.
            self.fail_transfer("the backup sent other data than its hello announced")
            return Step.NONE
        self.seq = self.sent_seq = receiver.seq
        self.send(SyncAck(checksum))
        return Step.AWAIT_FINAL_ACK

    def _sync_ack(self, frame: SyncAck) -> Step:
        if frame.checksum != self.store.checksum:
            self.fail_transfer("backup acknowledged a different checksum")
            return Step.NONE
        self.confirmed = True
        self.copy_epoch = self.epoch  # our data is now this epoch's
        self.receiver = None
        # The table time goes on from our copy's (a fetched one's may be ahead of ours).
        clock = self.table_clock
        clock.anchor(clock.time(self.store.idempotency.clock, self.now), self.now)
        self.transfers_completed += 1
        self.backoff.reset()
        decided, hello = self.plan, self.peer_hello
        assert decided is not None and hello is not None, "a SYNC_ACK comes only after the hello"
        self.note_resync(decided.directive.resync, hello)
        self.persist_synced(decided.directive in (Directive.FETCH, Directive.START_EMPTY))
        how = decided.directive.value
        self.fire(
            Event.SYNC_CONFIRMED, f"{len(self.store)} pairs {how} the backup, checksums match"
        )
        self.note_sync_changed()
        return Step.STREAMING

    def status(self, now: float) -> dict[str, Any]:
        status = super().status(now)
        status.update(
            standalone=self.standalone,
            stale=self.stale,
            lag=self.sent_seq - self.seq,
            writes_queued=sum(len(b.entries) for b in self.queued),
            writes_in_flight=sum(len(b.entries) for b in self.in_flight),
            writes_rewound=self.writes_rewound,
            writes_replayed=self.writes_replayed,
            idempotency_keys_reused=self.keys_reused,
            batches_sent=self.batches_sent,
            batches_acked=self.batches_acked,
            backup_diverged=self.backup_diverged,
            catchups_sent=self.catchups_sent,
            catchup_record_batches=len(self.applied_record),
            writes_replicated=self.writes_replicated,
            ack_seconds_total=round(self.ack_seconds_total, 6),
            # Group commit at work: writes per batch, and the mean acknowledgement time.
            writes_per_batch=round(self.writes_replicated / max(1, self.batches_acked), 2),
            ack_ms_mean=round(1000 * self.ack_seconds_total / max(1, self.batches_acked), 3),
        )
        return status
