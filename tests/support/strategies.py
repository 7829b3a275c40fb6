"""Hypothesis strategies shared by the tests of the replication frames."""

from __future__ import annotations

from hypothesis import strategies as st

from pbkv.wire import (
    Ack,
    Batch,
    Fence,
    Fetch,
    Frame,
    Heartbeat,
    Hello,
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
checksums = st.integers(0, 2**128 - 1)
texts = st.text(max_size=20)
ops = st.lists(st.tuples(texts, st.one_of(st.none(), texts)), max_size=6).map(
    lambda pairs: [item for pair in pairs for item in pair]
)
pairs = st.lists(st.tuples(texts, texts), max_size=6).map(
    lambda found: [item for pair in found for item in pair]
)
frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(
        Hello,
        texts,
        st.booleans(),
        checksums,
        counts,
        counts,
        st.integers(0, 2**64 - 1),
        st.lists(st.tuples(counts, checksums, counts), max_size=4).map(tuple),
    ),
    st.builds(Rollback, counts, checksums, counts),
    st.builds(Batch, counts, ops),
    st.builds(Ack, counts),
    st.builds(Heartbeat, counts),
    st.builds(Fetch),
    st.builds(SnapshotBegin, counts, counts),
    st.builds(ShardChunk, counts, pairs),
    st.builds(ShardEnd, counts, checksums, counts),
    st.builds(SnapshotEnd, checksums, counts, counts),
    st.builds(Skip, checksums, counts, counts),
    st.builds(SyncAck, checksums),
    st.builds(SyncNack, texts),
    st.builds(Fence, texts),
)
