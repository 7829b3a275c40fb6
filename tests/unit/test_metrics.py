"""/metrics rendered from a status mapping, with no server: names, labels and values; and
the collector helpers."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pbkv.backup import BackupCore
from pbkv.commands import Command
from pbkv.config import Settings
from pbkv.metrics import COUNTERS, GAUGES, CollectorPaused, Metrics, freeze_startup_objects
from pbkv.primary import PrimaryCore
from pbkv.store import make_store

# What the node adds to its core's status (see Node.status).
NODE_FIELDS: dict[str, Any] = {
    "clients": 3,
    "memory_bytes": 4096,
    "max_memory": 1 << 20,
    "pending_request_bytes": 17,
    "clients_refused": 1,
    "bodies_refused": 2,
    "connections_timed_out": 4,
    "loop_lag_ms": 12.5,
    "loop_lag_max_ms": 40.0,
}


def status_of(core: PrimaryCore | BackupCore, **changes: Any) -> dict[str, Any]:
    status = core.status(5.0) | NODE_FIELDS
    status.update(changes)
    return status


def primary_status(**changes: Any) -> dict[str, Any]:
    return status_of(PrimaryCore(Settings(), make_store("sharded", 4), 0.0), **changes)


def backup_status(**changes: Any) -> dict[str, Any]:
    return status_of(BackupCore(Settings(), make_store("sharded", 4), 0.0), **changes)


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the rendered text: (name, sorted labels) -> value."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def test_every_value_comes_from_the_status_or_the_request_counts():
    status = primary_status(
        keys=7, seq=9, lag=2, peer_connected=True, batches_sent=9, writes_replicated=30
    )
    status.update(batches_acked=8, ack_seconds_total=0.25, backup_diverged=1)
    metrics = Metrics(lambda: status)
    metrics.count(Command.INSERT)
    metrics.count(Command.INSERT)
    metrics.count(Command.GET)
    samples = scrape(metrics)
    role = (("role", "primary"),)

    def requests(command: str) -> float:
        return samples["pbkv_requests_total", (("command", command), ("role", "primary"))]

    assert (requests("insert"), requests("get"), requests("delete")) == (2, 1, 0)
    stages = {
        dict(labels)["stage"]: value
        for (name, labels), value in samples.items()
        if name == "pbkv_stage"
    }
    assert stages == {
        "cold_start": 1,
        "bootstrapping_secondary": 0,
        "warm_start": 0,
        "in_sync": 0,
    }
    assert samples["pbkv_keys", role] == 7
    assert samples["pbkv_replication_seq", role] == 9
    assert samples["pbkv_replication_lag", role] == 2
    assert samples["pbkv_peer_connected", role] == 1
    assert samples["pbkv_uptime_seconds", role] == 5.0
    assert samples["pbkv_client_connections", role] == 3
    assert samples["pbkv_memory_bytes", role] == 4096
    assert samples["pbkv_max_memory_bytes", role] == 1 << 20
    assert samples["pbkv_pending_request_bytes", role] == 17
    assert samples["pbkv_loop_lag_seconds", role] == 0.0125
    assert samples["pbkv_replication_ack_seconds_count", ()] == 8
    assert samples["pbkv_replication_ack_seconds_sum", ()] == 0.25
    assert samples["pbkv_writes_replicated_total", role] == 30
    assert samples["pbkv_batches_total", role] == 9
    assert samples["pbkv_backup_diverged_total", role] == 1
    assert samples["pbkv_clients_refused_total", role] == 1
    assert samples["pbkv_bodies_refused_total", role] == 2
    assert samples["pbkv_connections_timed_out_total", role] == 4
    names = {name for name, _ in samples}
    assert {f"{name}_total" for name in COUNTERS} <= names
    assert set(GAUGES) <= names


def test_a_member_is_labelled_by_its_role_and_counts_promotions_and_fencings():
    status = backup_status(stage="in_sync")
    status.update(
        role="spare", core_role="backup", epoch=41, lease_left=1.25, promotions=1, fencings=2
    )
    samples = scrape(Metrics(lambda: status))
    role = (("role", "spare"),)
    assert samples["pbkv_stage", (("role", "spare"), ("stage", "in_sync"))] == 1
    assert samples["pbkv_epoch", role] == 41
    assert samples["pbkv_lease_left_seconds", role] == 1.25
    assert samples["pbkv_promotions_total", role] == 1
    assert samples["pbkv_fencings_total", role] == 2
    status.update(epoch=None)  # following nobody: no epoch to show
    assert "pbkv_epoch" not in {name for name, _ in scrape(Metrics(lambda: status))}


def test_the_backup_counts_batches_applied_and_has_no_acknowledgements():
    samples = scrape(Metrics(lambda: backup_status(batches_applied=5, stage="in_sync")))
    role = (("role", "backup"),)
    assert samples["pbkv_batches_total", role] == 5
    assert samples["pbkv_stage", (("role", "backup"), ("stage", "in_sync"))] == 1
    names = {name for name, _ in samples}
    assert "pbkv_writes_rewound_total" not in names  # a primary's counter
    assert "pbkv_backup_diverged_total" not in names
    assert not any(name.startswith("pbkv_replication_ack_seconds") for name in names)
    assert "pbkv_writes_replicated_total" not in names


def test_each_scrape_reads_the_status_afresh():
    status = backup_status(keys=1)
    metrics = Metrics(lambda: status)
    assert scrape(metrics)["pbkv_keys", (("role", "backup"),)] == 1
    status["keys"] = 2
    assert scrape(metrics)["pbkv_keys", (("role", "backup"),)] == 2


def test_freezing_the_startup_objects_leaves_the_collections_only_what_comes_later() -> None:
    try:
        frozen = freeze_startup_objects()
        assert frozen == gc.get_freeze_count() > 0
        assert len(gc.get_objects()) < frozen  # what a full collection still walks
    finally:
        gc.unfreeze()


def test_the_collector_is_off_meanwhile_and_as_it_was_after() -> None:
    assert gc.isenabled()
    with CollectorPaused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with CollectorPaused():  # a caller that turned it off keeps it off
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(LookupError), CollectorPaused():
        raise LookupError  # back on after an error too
    assert gc.isenabled()
