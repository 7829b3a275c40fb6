"""``pbkv check-data``: the report on each case, and ``--fix`` cutting only a torn tail."""

from __future__ import annotations

from pathlib import Path

import pytest

from pbkv.cli import main as cli_main
from pbkv.persist.check import check_data
from pbkv.persist.datadir import DataDir, address_folder
from pbkv.persist.framing import MAGIC_SIZE
from pbkv.persist.log import Record, State
from pbkv.persist.snapshot import SnapshotWriter

HISTORY = 0x77


def make_folder(root: Path) -> tuple[Path, list[int]]:
    """A server's folder: a base and two increments, two batches in each; returns the
    folder and the ends of the records in the last increment."""
    folder = root / address_folder("127.0.0.1", 8001)
    with DataDir(folder) as data:
        writer = data.start(State(HISTORY, 0), b"")
        data.write_snapshot(writer, [("a", "1"), ("\r\n", "😀")])
        data.finish_rewrite()
        data.append(Record.batch(HISTORY, 1, 0, ["b", "2"]))
        data.append(Record.batch(HISTORY, 2, 0, ["c", None]))
        data.begin_rewrite(State(HISTORY, 2), b"")
        data.abort_rewrite()
        ends = [MAGIC_SIZE]
        ends.append(data.append(Record.batch(HISTORY, 3, 0, ["d", "4"])))
        ends.append(data.append(Record.batch(HISTORY, 4, 0, ["e", "5"])))
    return folder, ends


def run(target: Path, fix: bool = False) -> tuple[int, str]:
    lines: list[str] = []
    status = check_data(target, 1 << 20, fix, lines.append)
    return status, "\n".join(lines)


def test_a_healthy_folder(tmp_path: Path) -> None:
    folder, _ = make_folder(tmp_path)
    for target in (folder, tmp_path):  # the server's folder, or the data_dir above it
        status, report = run(target)
        assert status == 0, report
        assert "base.1.snap: snapshot of 2 pairs in 1 chunks" in report
        assert "incr.1.log: 2 records, seq 1..2" in report
        assert "incr.2.log: 2 records, seq 3..4" in report and ": ok" in report
        assert "sequence: ok" in report and "seq 0 -> 4" in report


def test_a_torn_tail_is_reported_and_cut_by_fix(tmp_path: Path) -> None:
    folder, ends = make_folder(tmp_path)
    log = folder / "incr.2.log"
    log.write_bytes(log.read_bytes()[: ends[2] - 5])
    status, report = run(folder)
    assert status == 1
    assert f"torn tail at offset {ends[1]}" in report and "--fix cuts it now" in report
    status, report = run(folder, fix=True)
    assert status == 0, report
    assert f"incr.2.log: cut at offset {ends[1]}" in report
    assert log.stat().st_size == ends[1]
    assert run(folder)[0] == 0


def test_damage_is_reported_and_never_cut(tmp_path: Path) -> None:
    folder, ends = make_folder(tmp_path)
    log = folder / "incr.2.log"
    content = bytearray(log.read_bytes())
    content[ends[1] - 1] ^= 1  # inside the first of two records: damage in the middle
    log.write_bytes(content)
    status, report = run(folder)
    assert status == 1 and "incr.2.log: 2 records" not in report
    assert f"damage at offset {MAGIC_SIZE}: record checksum mismatch" in report
    status, report = run(folder, fix=True)
    assert status == 1 and f"refusing to fix incr.2.log: damage at offset {MAGIC_SIZE}" in report
    assert log.read_bytes() == content


def test_a_torn_tail_is_not_cut_while_another_file_is_damaged(tmp_path: Path) -> None:
    folder, ends = make_folder(tmp_path)
    first = folder / "incr.1.log"
    content = bytearray(first.read_bytes())
    content[MAGIC_SIZE + 20] ^= 1
    first.write_bytes(content)
    last = folder / "incr.2.log"
    torn = last.read_bytes()[:-1]
    last.write_bytes(torn)
    status, report = run(folder, fix=True)
    assert (
        status == 1 and "refusing to fix incr.2.log while incr.1.log: damage at offset 8" in report
    )
    assert last.read_bytes() == torn


def test_a_torn_increment_that_is_not_the_last_is_damage(tmp_path: Path) -> None:
    folder, _ = make_folder(tmp_path)
    first = folder / "incr.1.log"
    first.write_bytes(first.read_bytes()[:-2])
    status, report = run(folder, fix=True)
    assert status == 1 and "not the last increment, so damage" in report


def test_out_of_order_records_are_reported(tmp_path: Path) -> None:
    folder, _ = make_folder(tmp_path)
    manifest = folder / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"incr.1.log",', ""))
    (folder / "incr.1.log").unlink()
    status, report = run(folder)
    assert status == 1 and "records out of order at offset 8: batch 3 follows batch 0" in report


def test_leftovers_and_a_damaged_snapshot(tmp_path: Path) -> None:
    folder, _ = make_folder(tmp_path)
    writer = SnapshotWriter(folder / "base.9.snap", State(HISTORY, 4), temp_prefix="temp-")
    writer.write_chunk([("x", "y")])  # a crash here: the temporary file stays
    status, report = run(folder)
    assert status == 0 and "temp-base.9.snap: leftover of an interrupted write" in report
    writer.abort()
    base = folder / "base.1.snap"
    base.write_bytes(base.read_bytes()[:-1])
    status, report = run(folder, fix=True)
    assert status == 1 and "base.1.snap: damage at offset" in report and "cut short" in report


def test_one_file(tmp_path: Path) -> None:
    folder, ends = make_folder(tmp_path)
    log = folder / "incr.2.log"
    log.write_bytes(log.read_bytes() + b"\0\0\3")
    status, report = run(log)
    assert status == 1 and f"torn tail at offset {ends[2]}" in report
    assert run(log, fix=True)[0] == 0 and log.stat().st_size == ends[2]
    assert run(folder / "base.1.snap")[0] == 0
    (tmp_path / "other").write_bytes(b"hello")
    assert run(tmp_path / "other")[0] == 1
    assert run(tmp_path / "missing")[0] == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(empty)[0] == 2


def test_the_fix_waits_for_no_server(tmp_path: Path) -> None:
    folder, _ = make_folder(tmp_path)
    log = folder / "incr.2.log"
    log.write_bytes(log.read_bytes()[:-1])
    with DataDir(folder):  # a running server holds the folder
        status, report = run(folder, fix=True)
    assert status == 1 and "in use by a running server" in report


def test_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = make_folder(tmp_path)
    log = folder / "incr.2.log"
    log.write_bytes(log.read_bytes()[:-1])
    assert cli_main(["check-data", str(tmp_path)]) == 1
    assert "torn tail" in capsys.readouterr().out
    assert cli_main(["check-data", str(tmp_path), "--fix"]) == 0
    assert cli_main(["check-data", str(folder)]) == 0
    assert cli_main(["check-data"]) == 2
