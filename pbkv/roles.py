"""A role is state, not a process: one store moves between the two cores.

With a coordinator, a member's role changes while it runs. A backup promoted to
primary keeps its store, its history and its sequence number: the primary's
core is built around the very same store (no copy, no restart), starts in
*bootstrapping secondary* with its data confirmed (it serves reads at once and
refuses writes until a backup is in sync with it, the seed's rule), and acts
under the new epoch, which its copy now belongs to. A primary that fences
itself gives up every write not yet acknowledged ("replication failed": the
backup may hold it, the one indeterminate case) and becomes a backup of the
same store, still confirmed, waiting in *bootstrapping primary* for whoever
leads next; that primary's handshake decides what happens to its data
(``stages.plan``).

Pure functions over the cores: the caller carries out the old core's last
actions (closing its channel) before it drives the new one.
"""

from __future__ import annotations

import dataclasses

from pbkv.backup import BackupCore
from pbkv.catchup import Applied
from pbkv.core import ReplicationCore
from pbkv.primary import PrimaryCore
from pbkv.stages import Stage, State

__all__ = ["demoted", "promoted"]


def _carry(old: ReplicationCore, new: ReplicationCore) -> None:
    """What survives a change of role: the data's identity and the counters."""
    new.incarnation = old.incarnation
    new.history = old.history
    new.seq = old.seq
    new.confirmed = old.confirmed
    new.recovered = old.recovered
    new.copy_epoch = old.copy_epoch
    new.epoch_seen = old.epoch_seen
    new.member = old.member
    new.started_at = old.started_at
    new.resyncs_partial = old.resyncs_partial
    new.resyncs_full = old.resyncs_full
    new.transfers_completed = old.transfers_completed
    new.transfers_failed = old.transfers_failed
    new.last_transfer_error = old.last_transfer_error


def promoted(backup: BackupCore, now: float, epoch: int) -> PrimaryCore:
    """``backup``'s store as the primary's of ``epoch`` (the leadership has checked
    that this copy holds every acknowledged write). Its channel is lost: drain
    ``backup`` before driving the primary."""
    backup.lose_channel(f"promoted to primary of epoch {epoch}")
    primary = PrimaryCore(
        backup.settings, backup.store, now, backup.rng, initial=Stage.BOOTSTRAPPING_SECONDARY
    )
    _carry(backup, primary)
    primary.confirmed = True
    primary.sent_seq = primary.seq
    # The batches of the undo record are the last this copy applied: a member that
    # followed it and lags by some of them catches up by those (``catchup.py``).
    store = backup.store
    applied = [
        Applied(
            u.seq,
            tuple(u.ops),
            u.time,
            tuple(u.keyed or ()),
            u.checksum_before,
            u.count_before,
            u.size,
        )
        for u in backup.undo
    ]
    primary.applied_record.extend(applied, State(backup.seq, store.checksum, len(store)))
    primary.serve_epoch(now, epoch)
    primary.copy_epoch = epoch  # the new epoch's writes go on from this copy
    return primary


def demoted(primary: PrimaryCore, now: float, reason: str) -> BackupCore:
    """``primary``'s store as a backup's that waits for the next primary. Every
    write not yet acknowledged is answered "replication failed": drain ``primary``."""
    primary.now = now
    primary.step_down(reason)
    settings = dataclasses.replace(
        primary.settings, backup_initial_stage=Stage.BOOTSTRAPPING_PRIMARY.value
    )
    backup = BackupCore(settings, primary.store, now, primary.rng)
    _carry(primary, backup)
    backup.epoch = primary.epoch_seen
    return backup
