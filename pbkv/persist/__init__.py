"""Optional persistence: a server's batches in a record log, its data in snapshots.

Modules: ``framing`` (the checksummed frame every file uses, torn versus damaged,
durable writes), ``log`` (records and the append-only log), ``snapshot`` (a
store's pairs, written in chunks and renamed into place), ``datadir`` (a
server's folder: the manifest naming the base snapshot and the increment logs,
loading, rewrites) and ``check`` (``pbkv check-data``).
"""

from pbkv.persist.datadir import DataDir, Loaded, Manifest, Replay, address_folder
from pbkv.persist.framing import Damage, FileProblem, PersistError, TornTail
from pbkv.persist.log import (
    LogWriteError,
    LogWriter,
    Record,
    RecordKind,
    State,
    read_records,
    scan_log,
    truncate_torn_tail,
)
from pbkv.persist.snapshot import SnapshotInfo, SnapshotReader, SnapshotWriter, verify_snapshot

__all__ = [
    "Damage",
    "DataDir",
    "FileProblem",
    "Loaded",
    "LogWriteError",
    "LogWriter",
    "Manifest",
    "PersistError",
    "Record",
    "RecordKind",
    "Replay",
    "SnapshotInfo",
    "SnapshotReader",
    "SnapshotWriter",
    "State",
    "TornTail",
    "address_folder",
    "read_records",
    "scan_log",
    "truncate_torn_tail",
    "verify_snapshot",
]
