"""Full database transfer, both directions, without I/O.

``SnapshotSender`` turns a store into frames a few at a time, so the driver
can yield to the event loop (and to socket back-pressure) between calls and
reads never stall behind a large transfer.  ``SnapshotReceiver`` loads those
frames into a store and verifies every shard's checksum as it completes, then
the whole database's; every key must belong to the shard it arrives in.  The
checksums it compares are computed from the pairs it actually stored, never
taken from the sender.  Both sides must not write to the store meanwhile: the
stages that transfer refuse client writes.
"""

from __future__ import annotations

from collections.abc import Iterator

from pbkv.config import MAX_SHARDS
from pbkv.store import ShardedStore, pair_checksum, shard_of
from pbkv.wire import Frame, IdempotencyChunk, ShardChunk, ShardEnd, SnapshotBegin, SnapshotEnd


class TransferError(Exception):
    """The transfer is wrong (checksum, count or order); start over."""


def _flatten(pairs: list[tuple[str, str]]) -> list[str]:
    flat: list[str] = []
    for key, value in pairs:
        flat.append(key)
        flat.append(value)
    return flat


class SnapshotSender:
    def __init__(
        self, store: ShardedStore, chunk_size: int, seq: int, chunk_chars: int = 1 << 62
    ) -> None:
        self._chunk_chars = chunk_chars
        self._frames = self._generate(store, chunk_size, seq)
        self.done = False
        self.total = len(store)

    def _generate(self, store: ShardedStore, chunk_size: int, seq: int) -> Iterator[Frame]:
        yield SnapshotBegin(store.shard_count, len(store))
        for shard in range(store.shard_count):
            for chunk in store.shard_chunks(shard, chunk_size, self._chunk_chars):
                yield ShardChunk(shard, _flatten(chunk))
            yield ShardEnd(shard, store.shard_checksum(shard), store.shard_len(shard))
        table = store.idempotency
        for entries in table.chunks(chunk_size, self._chunk_chars):
            yield IdempotencyChunk(table.clock, entries)
        yield SnapshotEnd(store.checksum, len(store), seq)

    def next_frames(self, limit: int) -> list[Frame]:
        """Up to ``limit`` frames; ``done`` turns true after the last one."""
        frames: list[Frame] = []
        while not self.done and len(frames) < limit:
            frame = next(self._frames)
            frames.append(frame)
            self.done = type(frame) is SnapshotEnd
        return frames


class SnapshotReceiver:
    """Feed it SNAPSHOT_BEGIN ... SNAPSHOT_END, in order; it raises ``TransferError``.

    It loads into ``store`` (a fresh one on the backup, so its own copy
    survives a failed transfer) and trusts nothing the sender claims: every
    count and checksum is computed here and compared.
    """

    def __init__(self, store: ShardedStore) -> None:
        self.store = store
        self.complete_shards: set[int] = set()
        self.seq = 0
        self.expected_total = 0
        self.received = 0
        self.sender_shards = 0
        self._begun = False
        self._same_layout = False
        self._running = [0]  # per sender shard, when the layouts differ
        self._counts = [0]  # pairs per sender shard, when the layouts differ
        self.idempotency_received = False  # at least one IDEMPOTENCY_CHUNK arrived

    def begin(self, frame: SnapshotBegin) -> None:
        if self._begun:
            raise TransferError("a second SNAPSHOT_BEGIN")
        if not 1 <= frame.shards <= MAX_SHARDS:  # wire.py refuses it first; built by hand here
            raise TransferError(f"a snapshot has 1 to {MAX_SHARDS} shards, not {frame.shards}")
        self._begun = True
        self.sender_shards = frame.shards
        self.expected_total = frame.count
        self._same_layout = frame.shards == self.store.shard_count
        self._running = [0] * frame.shards
        self._counts = [0] * frame.shards
        self.store.clear()

    def chunk(self, frame: ShardChunk) -> None:
        shard = self._check_shard(frame.shard)
        flat = frame.pairs
        pairs = list(zip(flat[0::2], flat[1::2], strict=True))
        sender_shards = self.sender_shards
        if sender_shards > 1:
            # A key in a shard it does not belong to would pass every checksum (they
            # are sums) yet sit where no lookup finds it: refuse it.
            for key in flat[0::2]:
                if shard_of(key, sender_shards) != shard:
                    raise TransferError(
                        f"shard {shard}: holds a key of shard {shard_of(key, sender_shards)}"
                    )
        self.received += len(pairs)
        if self._same_layout:
            self.store.load_chunk(shard, pairs)
        else:
            total = self._running[shard]
            for key, value in pairs:
                self.store.put(key, value)
                total += pair_checksum(key, value)
            self._running[shard] = total
            self._counts[shard] += len(pairs)

    def shard_end(self, frame: ShardEnd) -> None:
        shard = self._check_shard(frame.shard)
        if self._same_layout:
            actual = self.store.shard_checksum(shard)
            actual_count = self.store.shard_len(shard)
        else:
            actual = self._running[shard] % (1 << 128)
            actual_count = self._counts[shard]
        if actual_count != frame.count:
            raise TransferError(f"shard {shard}: {actual_count} pairs, sender had {frame.count}")
        if actual != frame.checksum:
            raise TransferError(f"shard {shard}: checksum mismatch")
        if self._same_layout:
            self.complete_shards.add(shard)

    def idempotency_chunk(self, frame: IdempotencyChunk) -> None:
        if not self._begun:
            raise TransferError("idempotency entries before SNAPSHOT_BEGIN")
        table = self.store.idempotency
        known = table.entries
        keys = frame.entries[0::5]
        if any(key in known for key in keys) or len(set(keys)) != len(keys):
            raise TransferError("an idempotency key sent twice")
        table.load(frame.clock, frame.entries)
        self.idempotency_received = True

    def end(self, frame: SnapshotEnd) -> int:
        """Verify the whole database, its idempotency table included; returns its checksum."""
        if not self._begun:
            raise TransferError("SNAPSHOT_END before SNAPSHOT_BEGIN")
        if not self.idempotency_received:
            raise TransferError("SNAPSHOT_END before the idempotency table")
        count = frame.count
        if len(self.store) != count or self.received != count or self.expected_total != count:
            raise TransferError(f"received {len(self.store)} pairs, sender had {count}")
        if self.store.checksum != frame.checksum:
            raise TransferError("database checksum mismatch")
        self.complete_shards = set(range(self.store.shard_count))
        self.seq = frame.seq
        return frame.checksum

    def feed(self, frame: Frame) -> int | None:
        """Take one transfer frame; returns the checksum once all is verified."""
        if type(frame) is ShardChunk:
            self.chunk(frame)
        elif type(frame) is ShardEnd:
            self.shard_end(frame)
        elif type(frame) is SnapshotBegin:
            self.begin(frame)
        elif type(frame) is IdempotencyChunk:
            self.idempotency_chunk(frame)
        elif type(frame) is SnapshotEnd:
            return self.end(frame)
        else:
            raise TransferError(f"unexpected {frame.kind.name} during a transfer")
        return None

    def _check_shard(self, shard: int) -> int:
        if not self._begun:
            raise TransferError("shard data before SNAPSHOT_BEGIN")
        if not shard < self.sender_shards:
            raise TransferError(f"shard number {shard} out of range")
        return shard
