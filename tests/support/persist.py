"""Helpers for the tests of the persistence files: awkward texts and small logs."""

from __future__ import annotations

from pathlib import Path

from hypothesis import strategies as st

from pbkv.persist.framing import MAGIC_SIZE
from pbkv.persist.log import LogWriter, Record

# Characters that break naive formats: line ends, NUL, emoji, the empty string.
AWKWARD = ["", "\r\n", "\0", "😀", "a=b&c", " ", "\xff", "\n"]
texts = st.one_of(st.sampled_from(AWKWARD), st.text(max_size=12))
keys = st.one_of(st.sampled_from(AWKWARD[1:]), st.text(min_size=1, max_size=12))
ops_lists = st.lists(st.tuples(keys, st.one_of(st.none(), texts)), min_size=1, max_size=5).map(
    lambda found: [item for pair in found for item in pair]
)


def batches(history: int, ops: list[list[str | None]], first_seq: int = 1) -> list[Record]:
    return [Record.batch(history, first_seq + i, 0, o) for i, o in enumerate(ops)]


def write_log(path: Path, records: list[Record]) -> list[int]:
    """Write a log of ``records``; returns each record's offset, then the file's end."""
    writer = LogWriter.create(path)
    offsets = [MAGIC_SIZE]
    for record in records:
        offsets.append(writer.append(record))
    writer.sync()
    writer.close()
    return offsets
