"""The record log: round trips, torn tails versus damage, and the size bound."""

from __future__ import annotations

import os
import resource
import signal
import struct
import tempfile
import tracemalloc
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbkv.persist.framing import MAGIC_SIZE, Damage, TornTail, write_all
from pbkv.persist.log import (
    LOG_MAGIC,
    LogWriteError,
    LogWriter,
    Record,
    RecordError,
    RecordKind,
    State,
    decode_record,
    read_records,
    scan_log,
    truncate_torn_tail,
)
from tests.support.persist import batches, ops_lists, write_log

HISTORY = 0xABCDEF0123456789


def records_of(path: Path, max_record: int = 1 << 20) -> list[Record]:
    return [record for _, _, record in read_records(path, max_record)]


@settings(max_examples=60, deadline=None)
@given(st.lists(ops_lists, min_size=1, max_size=8), st.integers(0, 2**64 - 1), st.binary())
def test_batches_round_trip(ops: list[list[str | None]], epoch: int, extra: bytes) -> None:
    records = [Record.batch(HISTORY, seq, epoch, o, extra) for seq, o in enumerate(ops, start=1)]
    records.append(Record.mark(State(1, 2, epoch)))
    records.append(Record.rollback(State(1, 1, epoch)))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "incr.1.log"
        offsets = write_log(path, records)
        assert offsets[-1] == path.stat().st_size
        assert records_of(path) == records
        found = list(read_records(path))
        assert [(start, end) for start, end, _ in found] == list(
            zip(offsets, offsets[1:], strict=False)
        )


def test_reading_resumes_from_a_record_boundary(tmp_path: Path) -> None:
    records = batches(HISTORY, [["k", "v"], ["k", None], ["\r\n", "😀"]])
    offsets = write_log(tmp_path / "log", records)
    assert [r for _, _, r in read_records(tmp_path / "log", offset=offsets[1])] == records[1:]


def test_the_writer_reports_the_size_and_syncs_only_what_is_new(tmp_path: Path) -> None:
    writer = LogWriter.create(tmp_path / "log")
    assert writer.size == MAGIC_SIZE and not writer.dirty
    size = writer.append(Record.batch(HISTORY, 1, 0, ["a", "b"]))
    assert size == writer.size == (tmp_path / "log").stat().st_size
    assert writer.dirty
    writer.sync()
    assert not writer.dirty and writer.synced_size == size
    writer.close()
    reopened = LogWriter.open(tmp_path / "log")
    assert reopened.size == size
    reopened.close()


def test_a_sync_job_covers_only_what_was_appended_before_it(tmp_path: Path) -> None:
    writer = LogWriter.create(tmp_path / "log")
    first = writer.append(Record.batch(HISTORY, 1, 0, ["a", "b"]))
    job = writer.sync_job()
    assert job is not None and job.size == first
    writer.append(Record.batch(HISTORY, 2, 0, ["c", "d"]))  # while it would run
    writer.close()  # the job has its own descriptor: a replaced log may be closed
    job.run()
    job.done()
    assert writer.synced_size == first and writer.dirty  # the second is not covered
    other = LogWriter.create(tmp_path / "other")
    assert other.sync_job() is None  # nothing to sync
    other.close()


def _log_of_three(tmp_path: Path) -> tuple[Path, bytes, list[int]]:
    path = tmp_path / "log"
    offsets = write_log(path, batches(HISTORY, [["a", "1"], ["b", None, "c", ""], ["😀", "\0"]]))
    return path, path.read_bytes(), offsets


def test_a_cut_anywhere_is_a_torn_tail_at_the_record_it_falls_in(tmp_path: Path) -> None:
    path, data, offsets = _log_of_three(tmp_path)
    for cut in range(MAGIC_SIZE, len(data)):
        path.write_bytes(data[:cut])
        kept = sum(1 for end in offsets[1:] if end <= cut)
        scan = scan_log(path)
        if cut in offsets:  # a cut between records is a shorter, clean log
            assert scan.problem is None and scan.records == kept
            continue
        assert isinstance(scan.problem, TornTail), cut
        assert scan.problem.offset == offsets[kept] == scan.good_end
        assert scan.problem.path == path
        assert scan.records == kept
        torn = truncate_torn_tail(path)
        assert torn is not None and torn.offset == offsets[kept]
        assert path.read_bytes() == data[: offsets[kept]]
        assert records_of(path) == records_of_prefix(data, kept, tmp_path)


def records_of_prefix(data: bytes, count: int, tmp_path: Path) -> list[Record]:
    reference = tmp_path / "reference"
    reference.write_bytes(data)
    return records_of(reference)[:count]


def test_a_cut_log_takes_appends_after_the_cut(tmp_path: Path) -> None:
    path, data, offsets = _log_of_three(tmp_path)
    path.write_bytes(data[: offsets[3] - 1])
    truncate_torn_tail(path)
    writer = LogWriter.open(path)
    writer.append(Record.batch(HISTORY, 3, 0, ["again", "x"]))
    writer.close()
    assert [r.ops for r in records_of(path)][-1] == ["again", "x"]


def test_a_zero_filled_tail_is_torn(tmp_path: Path) -> None:
    """A file the filesystem extended but whose data never reached the disk."""
    path, data, offsets = _log_of_three(tmp_path)
    for zeros in (1, 15, 16, 17, 5000):
        path.write_bytes(data + bytes(zeros))
        problem = scan_log(path).problem
        assert isinstance(problem, TornTail) and problem.offset == offsets[-1]
    path.write_bytes(data + bytes(40) + b"\1")  # not all zeros: not a torn write
    problem = scan_log(path).problem
    assert isinstance(problem, Damage) and problem.offset == offsets[-1]


def _flip(data: bytes, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


def _record_holding(offsets: list[int], byte: int) -> int:
    """The offset of the record holding ``byte`` (0: the magic)."""
    if byte < MAGIC_SIZE:
        return 0
    return max(offset for offset in offsets[:-1] if offset <= byte)


def test_a_flipped_bit_anywhere_is_damage_at_its_record(tmp_path: Path) -> None:
    """Every bit of a whole log, the last record included: a complete record that
    does not verify is damage, never a torn tail (the header's CRC catches any
    one-bit change of the length, so no flip reads as a record cut short)."""
    path, data, offsets = _log_of_three(tmp_path)
    for bit in range(len(data) * 8):
        path.write_bytes(_flip(data, bit))
        problem = scan_log(path).problem
        assert isinstance(problem, Damage), bit
        assert problem.offset == _record_holding(offsets, bit // 8), bit
        with pytest.raises(Damage):
            truncate_torn_tail(path)
        assert path.read_bytes() == _flip(data, bit)  # refused: nothing cut


@settings(max_examples=80, deadline=None)
@given(st.lists(ops_lists, min_size=1, max_size=6), st.data())
def test_flipped_bits_in_random_logs(ops: list[list[str | None]], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "log"
        offsets = write_log(path, batches(HISTORY, ops))
        content = path.read_bytes()
        bit = data.draw(st.integers(0, len(content) * 8 - 1))
        path.write_bytes(_flip(content, bit))
        problem = scan_log(path).problem
        assert isinstance(problem, Damage)
        assert problem.offset == _record_holding(offsets, bit // 8)
        assert str(path) in str(problem) and f"offset {problem.offset}" in str(problem)


def _header(length: int) -> bytes:
    return struct.pack(">IIQ", length, zlib.crc32(struct.pack(">I", length)), 0)


@pytest.mark.parametrize("more_data", [True, False])
def test_a_length_over_the_maximum_is_refused_before_reading(
    tmp_path: Path, more_data: bool
) -> None:
    path, data, offsets = _log_of_three(tmp_path)
    declared = 8 * 1024 * 1024  # and present, when ``more_data``: a reader could read it all
    path.write_bytes(data + _header(declared) + (b"x" * (declared + 100) if more_data else b""))
    tracemalloc.start()
    try:
        problem = scan_log(path, max_record=1 << 20).problem
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(problem, Damage) and problem.offset == offsets[-1]
    assert "over the maximum" in problem.reason
    assert peak < 1 << 20  # the 8 MiB were never read


def test_records_that_do_not_decode_are_damage(tmp_path: Path) -> None:
    from pbkv.persist.framing import encode_frame

    path, data, offsets = _log_of_three(tmp_path)
    for payload in (b"\xc1", b"\x93\x01\x02\x03", b"\x96\x07\x00\x00\x00\x90\xc4\x00"):
        path.write_bytes(data + encode_frame(payload))
        problem = scan_log(path).problem
        assert isinstance(problem, Damage) and problem.offset == offsets[-1], payload
    path.write_bytes(b"NOTALOG!" + data[MAGIC_SIZE:])
    problem = scan_log(path).problem
    assert isinstance(problem, Damage) and problem.offset == 0


@pytest.mark.parametrize(
    ("ops", "reason"),
    [
        (["k", "v", 7, "v"], "keys must be strings"),
        (["k", "v", None, "v"], "keys must be strings"),
        (["k", 7], "values must be strings or null"),
        (["k", b"v"], "values must be strings or null"),
        (["k", None, "l", ""], None),
    ],
)
def test_a_record_of_other_than_strings_does_not_decode(
    ops: list[object], reason: str | None
) -> None:
    import msgpack

    payload = msgpack.packb([RecordKind.BATCH, 1, 2, 0, ops, b""], use_bin_type=True)
    if reason is None:
        assert decode_record(payload).ops == ops
    else:
        with pytest.raises(RecordError, match=reason):
            decode_record(payload)


@pytest.mark.parametrize("raw_kind", [0, 4, -1, True, "1", 1.0, None])
def test_a_record_of_an_unknown_kind_does_not_decode(raw_kind: object) -> None:
    import msgpack

    payload = msgpack.packb([raw_kind, 1, 2, 0, [], b""], use_bin_type=True)
    with pytest.raises(RecordError, match="unknown record kind"):
        decode_record(payload)
    for kind in RecordKind:  # and every known one does
        payload = msgpack.packb([int(kind), 1, 2, 0, [], b""], use_bin_type=True)
        assert decode_record(payload).kind is kind


def test_a_failed_append_is_cut_back_off_the_file(tmp_path: Path) -> None:
    """A write that fails half way (here: the file size limit) leaves no partial record."""
    writer = LogWriter.create(tmp_path / "log")
    writer.append(Record.batch(HISTORY, 1, 0, ["a", "b"]))
    size = writer.size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))
    try:
        with pytest.raises(LogWriteError, match="append failed"):
            writer.append(Record.batch(HISTORY, 2, 0, ["big", "x" * 10_000]))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert (tmp_path / "log").stat().st_size == size == writer.size
    assert writer.broken is None
    writer.append(Record.batch(HISTORY, 2, 0, ["small", "y"]))
    writer.close()
    assert [r.seq for r in records_of(tmp_path / "log")] == [1, 2]


def test_a_writer_that_cannot_cut_a_failed_append_is_broken() -> None:
    fd = os.open("/dev/full", os.O_WRONLY)
    writer = LogWriter(Path("/dev/full"), fd, 0)
    with pytest.raises(LogWriteError):
        writer.append(Record.batch(HISTORY, 1, 0, ["a", "b"]))
    assert writer.broken is not None
    with pytest.raises(LogWriteError, match="unusable"):
        writer.sync()
    writer.close()


def test_the_file_starts_with_its_magic(tmp_path: Path) -> None:
    LogWriter.create(tmp_path / "log").close()
    assert (tmp_path / "log").read_bytes() == LOG_MAGIC
    assert RecordKind.BATCH == 1  # the numbers are the format: never renumbered


@pytest.mark.pure_python  # swaps os.write under the module's function
def test_write_all_writes_what_a_short_write_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A regular file takes a write whole unless the disk is full; when a write is
    short, the rest follows, from where it stopped."""
    real_write = os.write
    calls: list[int] = []

    def three_at_a_time(fd: int, data: bytes | memoryview) -> int:
        calls.append(len(data))
        return real_write(fd, bytes(data[:3]))

    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        write_all(fd, b"0123456789")
        monkeypatch.setattr(os, "write", three_at_a_time)
        write_all(fd, b"abcdefgh")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"0123456789abcdefgh"
    assert calls == [8, 5, 2]
