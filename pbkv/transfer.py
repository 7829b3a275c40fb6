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
from typing import Any

from pbkv.store import ShardedStore, pair_checksum, shard_of
from pbkv.wire import FrameType, checksum_from_bytes, checksum_to_bytes

# The frames of a full transfer, in the order they come.
TRANSFER_FRAMES = frozenset(
    {
        FrameType.SNAPSHOT_BEGIN,
        FrameType.SHARD_CHUNK,
        FrameType.SHARD_END,
        FrameType.SNAPSHOT_END,
    }
)


class TransferError(Exception):
    """The transfer is wrong (checksum, count or order); start over."""


def _flatten(pairs: list[tuple[str, str]]) -> list[str]:
    flat: list[str] = []
    for key, value in pairs:
        flat.append(key)
        flat.append(value)
    return flat


class SnapshotSender:
    def __init__(self, store: ShardedStore, chunk_size: int, seq: int) -> None:
        self._frames = self._generate(store, chunk_size, seq)
        self.done = False
        self.pairs_sent = 0
        self.total = len(store)

    def _generate(self, store: ShardedStore, chunk_size: int, seq: int) -> Iterator[list[Any]]:
        yield [FrameType.SNAPSHOT_BEGIN, store.shard_count, len(store)]
        for shard in range(store.shard_count):
            for chunk in store.shard_chunks(shard, chunk_size):
                self.pairs_sent += len(chunk)
                yield [FrameType.SHARD_CHUNK, shard, _flatten(chunk)]
            yield [
                FrameType.SHARD_END,
                shard,
                checksum_to_bytes(store.shard_checksum(shard)),
                store.shard_len(shard),
            ]
        yield [FrameType.SNAPSHOT_END, checksum_to_bytes(store.checksum), len(store), seq]

    def next_frames(self, limit: int) -> list[list[Any]]:
        """Up to ``limit`` frames; ``done`` turns true after the last one."""
        frames: list[list[Any]] = []
        while not self.done and len(frames) < limit:
            frame = next(self._frames)
            frames.append(frame)
            self.done = frame[0] is FrameType.SNAPSHOT_END
        return frames


class SnapshotReceiver:
    """Feed it SNAPSHOT_BEGIN ... SNAPSHOT_END; it raises ``TransferError``."""

    def __init__(self, store: ShardedStore) -> None:
        self.store = store
        self.complete_shards: set[int] = set()
        self.finished = False
        self.seq = 0
        self.expected_total = 0
        self.received = 0
        self.sender_shards = 0
        self._same_layout = False
        self._running = [0]  # per sender shard, when the layouts differ
        self._counts = [0]  # pairs per sender shard, when the layouts differ

    def begin(self, frame: list[Any]) -> None:
        _, shards, total = frame
        if not isinstance(shards, int) or shards < 1 or not isinstance(total, int):
            raise TransferError("malformed SNAPSHOT_BEGIN")
        self.sender_shards = shards
        self.expected_total = total
        self._same_layout = shards == self.store.shard_count
        self._running = [0] * shards
        self._counts = [0] * shards
        self.store.clear()

    def chunk(self, frame: list[Any]) -> None:
        _, shard, flat = frame
        self._check_shard(shard)
        if not isinstance(flat, list) or len(flat) % 2:
            raise TransferError("malformed SHARD_CHUNK")
        pairs = list(zip(flat[0::2], flat[1::2], strict=True))
        sender_shards = self.sender_shards
        for key, value in pairs:
            if not isinstance(key, str) or not isinstance(value, str):
                raise TransferError("keys and values must be strings")
            # A key in a shard it does not belong to would pass every checksum (they
            # are sums) yet sit where no lookup finds it: refuse it.
            if sender_shards > 1 and shard_of(key, sender_shards) != shard:
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

    def shard_end(self, frame: list[Any]) -> None:
        _, shard, raw_checksum, count = frame
        self._check_shard(shard)
        expected = checksum_from_bytes(raw_checksum)
        if self._same_layout:
            actual = self.store.shard_checksum(shard)
            actual_count = self.store.shard_len(shard)
            if actual_count != count:
                raise TransferError(f"shard {shard}: {actual_count} pairs, sender had {count}")
        else:
            actual = self._running[shard] % (1 << 128)
            if self._counts[shard] != count:
                raise TransferError(
                    f"shard {shard}: {self._counts[shard]} pairs, sender had {count}"
                )
        if actual != expected:
            raise TransferError(f"shard {shard}: checksum mismatch")
        if self._same_layout:
            self.complete_shards.add(shard)

    def end(self, frame: list[Any]) -> int:
        """Verify the whole database; returns its checksum."""
        _, raw_checksum, count, seq = frame
        expected = checksum_from_bytes(raw_checksum)
        if len(self.store) != count or self.received != count or self.expected_total != count:
            raise TransferError(f"received {len(self.store)} pairs, sender had {count}")
        if self.store.checksum != expected:
            raise TransferError("database checksum mismatch")
        self.finished = True
        self.complete_shards = set(range(self.store.shard_count))
        self.seq = seq if isinstance(seq, int) else 0
        return expected

    def feed(self, frame: list[Any]) -> int | None:
        """Dispatch one transfer frame; returns the checksum once verified."""
        kind = frame[0]
        try:
            if kind == FrameType.SHARD_CHUNK:
                self.chunk(frame)
            elif kind == FrameType.SHARD_END:
                self.shard_end(frame)
            elif kind == FrameType.SNAPSHOT_BEGIN:
                self.begin(frame)
            elif kind == FrameType.SNAPSHOT_END:
                return self.end(frame)
            else:
                raise TransferError(f"unexpected {kind.name} during a transfer")
        except (ValueError, TypeError) as exc:
            raise TransferError(f"malformed transfer frame: {exc}") from None
        return None

    def _check_shard(self, shard: Any) -> None:
        if not isinstance(shard, int) or not 0 <= shard < self.sender_shards:
            raise TransferError(f"shard number {shard!r} out of range")
