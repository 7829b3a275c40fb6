"""Hypothesis strategies shared by the tests of the replication frames."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import strategies as st

from pbkv.config import MAX_SHARDS
from pbkv.wire import (
    Ack,
    Batch,
    Fence,
    Fetch,
    Frame,
    Heartbeat,
    Hello,
    IdempotencyChunk,
    Rollback,
    ShardChunk,
    ShardEnd,
    Skip,
    SnapshotBegin,
    SnapshotEnd,
    SyncAck,
    SyncNack,
)

counts = st.integers(0, 2**63)
shard_counts = st.integers(1, MAX_SHARDS)
shards = st.integers(0, MAX_SHARDS - 1)
checksums = st.integers(0, 2**128 - 1)
epochs = st.one_of(st.just(0), st.integers(0, 2**64 - 1))
texts = st.text(max_size=20)
ops = st.lists(st.tuples(texts, st.one_of(st.none(), texts)), max_size=6).map(
    lambda pairs: [item for pair in pairs for item in pair]
)
# Idempotency entries, flat: key, fingerprint, ok, value-or-None (+ time made).
_entry = st.tuples(
    st.text(min_size=1, max_size=20), st.integers(0, 2**64 - 1), st.booleans(), st.none() | texts
)
keyed = st.lists(_entry, max_size=4).map(lambda found: [item for entry in found for item in entry])
transferred = st.lists(st.tuples(_entry, counts), max_size=4).map(
    lambda found: [item for entry, made in found for item in (*entry, made)]
)
pairs = st.lists(st.tuples(texts, texts), max_size=6).map(
    lambda found: [item for pair in found for item in pair]
)
fields: st.SearchStrategy[Frame] = st.one_of(
    st.builds(
        Hello,
        texts,
        st.booleans(),
        checksums,
        counts,
        counts,
        st.integers(0, 2**64 - 1),
        st.lists(st.tuples(counts, checksums, counts), max_size=4).map(tuple),
        epochs,
        texts,  # the member's name
        st.booleans(),  # recovered from disk
    ),
    st.builds(Rollback, counts, checksums, counts),
    st.builds(Batch, counts, ops, counts, keyed),
    st.builds(IdempotencyChunk, counts, transferred),
    st.builds(Ack, counts, checksums, counts),
    st.builds(Heartbeat, counts),
    st.builds(Fetch),
    st.builds(SnapshotBegin, shard_counts, counts),
    st.builds(ShardChunk, shards, pairs),
    st.builds(ShardEnd, shards, checksums, counts),
    st.builds(SnapshotEnd, checksums, counts, counts),
    st.builds(Skip, checksums, counts, counts),
    st.builds(SyncAck, checksums),
    st.builds(SyncNack, texts),
    st.builds(Fence, texts),
)
# Every frame travels under an epoch (in its header).
frames: st.SearchStrategy[Frame] = st.builds(
    lambda frame, epoch: replace(frame, epoch=epoch), fields, epochs
)
