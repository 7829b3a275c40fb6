"""``pbkv check-data DIR [--fix]``: what each persistence file holds and where it is
torn or damaged, like ``redis-check-aof``.

DIR is a server's folder (it has a manifest), a ``data_dir`` holding such
folders, or one log or snapshot file.  ``--fix`` cuts a torn last record off the
last increment (what a server does at start-up) and nothing else: damage
anywhere is reported with its file and offset and left alone, since cutting
there would drop records that may have been acknowledged.

Exit status: 0 everything verifies (after ``--fix``, if given); 1 a problem
remains; 2 usage error or no pbkv data at DIR.
"""

from __future__ import annotations

import argparse
import fcntl
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pbkv.persist.datadir import (
    BASE_NAME,
    INCREMENT_NAME,
    LOCK,
    MANIFEST,
    TEMP_PREFIX,
    Replay,
    read_manifest,
)
from pbkv.persist.framing import MAGIC_SIZE, FileProblem, PersistError, TornTail
from pbkv.persist.log import (
    DEFAULT_MAX_RECORD,
    LOG_MAGIC,
    LogScan,
    read_records,
    scan_log,
    truncate_torn_tail,
)
from pbkv.persist.snapshot import SNAPSHOT_MAGIC, SnapshotInfo, verify_snapshot

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2

Out = Callable[[str], None]


def describe_log(scan: LogScan) -> str:
    if scan.records:
        held = f"{scan.records} records, seq {scan.first_seq}..{scan.last_seq}"
    else:
        held = "no good record"
    text = f"{held}, {scan.size} bytes"
    problem = scan.problem
    if problem is None:
        return f"{text}: ok"
    if isinstance(problem, TornTail):
        return (
            f"{text}: torn tail at offset {problem.offset}: {problem.reason} "
            f"({scan.size - problem.offset} bytes to cut)"
        )
    return f"{text}: damage at offset {problem.offset}: {problem.reason}"


def describe_snapshot(info: SnapshotInfo) -> str:
    when = datetime.fromtimestamp(info.created, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        f"snapshot of {info.count} pairs in {info.chunks} chunks, history "
        f"{info.state.history:016x}, seq {info.state.seq}, epoch {info.state.epoch}, "
        f"written {when}, {info.size} bytes: ok"
    )


def _locked(folder: Path) -> int | None:
    """The folder's lock, or None when a server holds it."""
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _cut(path: Path, max_record: int, out: Out) -> bool:
    """Cut a torn tail; False (and why) when something else is wrong."""
    try:
        torn = truncate_torn_tail(path, max_record)
    except FileProblem as exc:
        out(f"  refusing to fix {path}: {exc.kind} at offset {exc.offset}: {exc.reason}")
        return False
    if torn is not None:
        out(f"  {path.name}: cut at offset {torn.offset} (the torn record removed)")
    return True


def check_folder(folder: Path, max_record: int, fix: bool, out: Out) -> bool:
    """Report on one server's folder; True when it verifies (after fixing)."""
    out(f"{folder}:")
    try:
        manifest = read_manifest(folder / MANIFEST)
    except PersistError as exc:
        out(f"  {MANIFEST}: {exc}")
        return False
    out(f"  {MANIFEST}: base {manifest.base}, increments {' '.join(manifest.increments)}")
    for entry in sorted(os.listdir(folder)):
        if entry.startswith(TEMP_PREFIX):
            out(f"  {entry}: leftover of an interrupted write (a server removes it at start)")
        elif (BASE_NAME.fullmatch(entry) or INCREMENT_NAME.fullmatch(entry)) and (
            entry not in manifest.files
        ):
            out(f"  {entry}: not named by the manifest (a server removes it at start)")
    damaged: list[str] = []  # "file: what, at offset N" for the refusal to fix
    base_path = folder / manifest.base
    base = None
    try:
        base = verify_snapshot(base_path, max_record)
        out(f"  {manifest.base}: {describe_snapshot(base)}")
    except FileNotFoundError:
        out(f"  {manifest.base}: missing")
        damaged.append(f"{manifest.base} is missing")
    except FileProblem as exc:
        out(f"  {manifest.base}: damage at offset {exc.offset}: {exc.reason}")
        damaged.append(f"{manifest.base}: damage at offset {exc.offset}")
    torn_last: Path | None = None
    last = len(manifest.increments) - 1
    for index, name in enumerate(manifest.increments):
        path = folder / name
        if not path.exists():
            out(f"  {name}: missing")
            damaged.append(f"{name} is missing")
            continue
        scan = scan_log(path, max_record)
        line = describe_log(scan)
        problem = scan.problem
        if isinstance(problem, TornTail) and index != last:
            line += " -- not the last increment, so damage: refusing to cut it"
            damaged.append(f"{name}: torn at offset {problem.offset}, not the last increment")
        elif isinstance(problem, TornTail):
            torn_last = path
        elif problem is not None:
            damaged.append(f"{name}: damage at offset {problem.offset}")
        out(f"  {name}: {line}")
    if not damaged and base is not None:
        disorder = _check_sequence(folder, base, manifest.increments, max_record, out)
        if disorder is not None:
            damaged.append(disorder)
    healthy = not damaged
    if torn_last is not None:
        if not fix:
            out(f"  a server cuts the torn tail of {torn_last.name} at start; --fix cuts it now")
            return False
        if not healthy:
            out(f"  refusing to fix {torn_last.name} while {'; '.join(damaged)}")
            return False
        lock = _locked(folder)
        if lock is None:
            out(f"  refusing to fix: {folder} is in use by a running server")
            return False
        try:
            return _cut(torn_last, max_record, out)
        finally:
            os.close(lock)
    if not healthy and fix:
        out(
            f"  refusing to fix {'; '.join(damaged)}: only a torn last record is ever cut, "
            "and cutting there would drop records after it"
        )
    return healthy


def _check_sequence(
    folder: Path, base: SnapshotInfo, increments: tuple[str, ...], max_record: int, out: Out
) -> str | None:
    """Whether each record follows the one before it, from the base on: None, or
    where one does not."""
    replay = Replay(base.state)
    try:
        for name in increments:
            path = folder / name
            for offset, _, record in read_records(path, max_record):
                replay.feed(record, path, offset)
    except TornTail:
        pass  # reported with its file
    except FileProblem as exc:
        out(f"  {exc.path.name}: records out of order at offset {exc.offset}: {exc.reason}")
        return f"{exc.path.name}: records out of order at offset {exc.offset}"
    out(
        f"  sequence: ok, history {replay.state.history:016x}, seq {base.state.seq} -> "
        f"{replay.state.seq}, {len(replay.batches)} batches after the snapshot"
    )
    return None


def check_file(path: Path, max_record: int, fix: bool, out: Out) -> bool:
    with open(path, "rb") as file:
        magic = file.read(MAGIC_SIZE)
    if magic == SNAPSHOT_MAGIC:
        try:
            out(f"{path}: {describe_snapshot(verify_snapshot(path, max_record))}")
            return True
        except FileProblem as exc:
            out(f"{path}: damage at offset {exc.offset}: {exc.reason}")
            if fix:
                out(f"  refusing to fix {path}: a snapshot is never cut")
            return False
    if magic != LOG_MAGIC:
        out(f"{path}: not a pbkv log or snapshot")
        return False
    scan = scan_log(path, max_record)
    out(f"{path}: {describe_log(scan)}")
    if scan.problem is None:
        return True
    if fix:
        return _cut(path, max_record, out) and isinstance(scan.problem, TornTail)
    return False


def check_data(target: Path, max_record: int, fix: bool, out: Out) -> int:
    """The exit status of ``pbkv check-data``; the report goes to ``out``."""
    if target.is_file():
        return EXIT_OK if check_file(target, max_record, fix, out) else EXIT_PROBLEM
    if not target.is_dir():
        out(f"{target}: no such file or folder")
        return EXIT_USAGE
    if (target / MANIFEST).exists():
        folders = [target]
    else:
        folders = sorted(sub for sub in target.iterdir() if (sub / MANIFEST).exists())
    if not folders:
        out(f"{target}: no pbkv data here (no {MANIFEST}, nor a folder holding one)")
        return EXIT_USAGE
    healthy = [check_folder(folder, max_record, fix, out) for folder in folders]
    return EXIT_OK if all(healthy) else EXIT_PROBLEM


def check_data_main(argv: list[str], out: Out = print) -> int:
    parser = argparse.ArgumentParser(
        prog="pbkv check-data",
        description="Verify pbkv's persistence files; with --fix, cut a torn last record.",
        epilog="Exit status: 0 all verify, 1 a problem remains, 2 usage error or no data.",
    )
    parser.add_argument(
        "target", metavar="DIR", help="a server's data folder, a data_dir, or one file"
    )
    parser.add_argument(
        "--fix", action="store_true", help="cut a torn last record (never anything else)"
    )
    parser.add_argument(
        "--max-record",
        type=int,
        default=DEFAULT_MAX_RECORD,
        metavar="BYTES",
        help=f"largest record accepted (default {DEFAULT_MAX_RECORD})",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return check_data(Path(args.target), args.max_record, args.fix, out)
