"""Prometheus metrics, rendered from the node's status when scraped.

Counting on the hot path is a dict increment; the prometheus-client objects
are built only at scrape time (a custom collector), so serving requests pays
nothing for them.  Everything but the request counts is read from the status
mapping (what ``/kvman/status`` shows), so the two never tell different stories.
"""

from __future__ import annotations

import collections
import gc
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from pbkv.commands import Command
from pbkv.stages import ACCEPTANCE, Role

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

Status = Mapping[str, Any]  # a node's status: JSON values by name


def freeze_startup_objects() -> int:
    """Move every object alive now (the modules, their functions and classes, the
    server just built) out of the collector's reach, after one collection of what is
    garbage already; returns how many are frozen.

    They live as long as the process, yet each full collection would walk them all
    again (tens of thousands: several milliseconds of the event loop's time, each
    time).  Frozen, a full collection walks only what was made since."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class CollectorPaused:
    """``with CollectorPaused():`` the cyclic garbage collector is off meanwhile.

    For work that makes many short-lived containers at once: reading a load's lines
    (a list per JSON line, and on a primary thousands of overlay entries; an eighth
    of ``pbkv load``'s own time), or the records and chunks read at start.  One
    collection of the young generation after them, rather than one every 700
    objects that walks whatever is alive."""

    def __init__(self) -> None:
        self.collecting = False

    def __enter__(self) -> None:
        self.collecting = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self.collecting:
            gc.enable()


class GcPauses:
    """The longest pause of the cyclic garbage collector, per generation (a pause
    inside a turn of the loop is part of that turn's time)."""

    def __init__(self) -> None:
        self.longest = [0.0, 0.0, 0.0]
        self._started = 0.0

    def install(self) -> None:
        gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            generation = info["generation"]
            pause = time.perf_counter() - self._started
            self.longest[generation] = max(self.longest[generation], pause)


class LoopLag:
    """The event loop's longest delay: over the last ``window`` seconds and ever.

    The driver runs a timer every ``interval`` seconds and calls ``fired(now)``
    from it; how late it fires is how long the loop was busy.  Every ``now``
    (here and in ``recent_max``) is read from the same monotonic clock.
    """

    def __init__(self, window: float = 10.0, interval: float = 0.02) -> None:
        self.window = window
        self.interval = interval
        self.worst = 0.0
        self._due: float | None = None
        self._buckets: collections.deque[tuple[float, float]] = collections.deque()

    def fired(self, now: float) -> float:
        """The probe timer ran at ``now``; the next one is due ``interval`` later.
        Returns how late it ran (0 the first time)."""
        lag = 0.0
        if self._due is not None:
            lag = max(0.0, now - self._due)
            self.record(now, lag)
        self._due = now + self.interval
        return lag

    def record(self, now: float, lag: float) -> None:
        self.worst = max(self.worst, lag)
        buckets = self._buckets
        if buckets and now - buckets[-1][0] < 1.0:  # one bucket per second
            start, worst = buckets[-1]
            buckets[-1] = (start, max(worst, lag))
        else:
            buckets.append((now, lag))
        while buckets and now - buckets[0][0] > self.window:
            buckets.popleft()

    def recent_max(self, now: float) -> float:
        return max((lag for start, lag in self._buckets if now - start <= self.window), default=0.0)


class Metrics:
    """The request counts, and a collector that renders them with a status mapping."""

    def __init__(self, status: Callable[[], Status]) -> None:
        self.status = status
        # Every command counted from 0: a plain dict's item, where a Counter's goes
        # through Python-level lookups (compiled, 0.1 us a request).
        self.requests: dict[Command, int] = dict.fromkeys(Command, 0)
        self._registry: CollectorRegistry | None = None  # built at the first scrape

    def count(self, command: Command) -> None:
        self.requests[command] += 1

    def render(self) -> tuple[bytes, str]:
        # prometheus-client is imported here, not at start: a server starts faster.
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self._registry is None:
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(self)
        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    def collect(self) -> Iterator[Metric]:  # prometheus-client collector protocol
        return families(self.status(), self.requests)


# name: (help text, status field, how many of the field's unit make one of the metric's)
GAUGES: dict[str, tuple[str, str, float]] = {
    "pbkv_keys": ("Keys held", "keys", 1),
    "pbkv_replication_seq": ("Last replicated batch applied", "seq", 1),
    "pbkv_replication_lag": ("Batches not yet acknowledged", "lag", 1),
    "pbkv_peer_connected": ("1 while the replication channel is up", "peer_connected", 1),
    "pbkv_uptime_seconds": ("Seconds since start", "uptime", 1),
    "pbkv_client_connections": ("Open client connections", "clients", 1),
    "pbkv_memory_bytes": (
        "Approximate bytes held by the pairs and the idempotency table",
        "memory_bytes",
        1,
    ),
    "pbkv_idempotency_entries": (
        "Remembered replies of writes sent with an Idempotency-Key",
        "idempotency_entries",
        1,
    ),
    "pbkv_max_memory_bytes": ("max_memory (0: no limit)", "max_memory", 1),
    "pbkv_pending_request_bytes": (
        "Bytes of unfinished requests held",
        "pending_request_bytes",
        1,
    ),
    "pbkv_loop_lag_seconds": ("Longest event-loop delay in the last 10 s", "loop_lag_ms", 1000),
}

# With a coordinator only: name: (help text, status field); left out when null.
MEMBER_GAUGES: dict[str, tuple[str, str]] = {
    "pbkv_epoch": ("The epoch this member leads or follows", "epoch"),
    "pbkv_lease_left_seconds": ("Seconds this member's lease is certainly valid", "lease_left"),
    "pbkv_follow_lag_batches": (
        "Batches a spare's followed copy is behind the backup it follows",
        "follow_lag",
    ),
}

# name: (help text, status field); a counter whose field the role lacks is left out.
COUNTERS: dict[str, tuple[str, str]] = {
    "pbkv_transfers_completed": (
        "Synchronizations completed (full, partial, or data already matching)",
        "transfers_completed",
    ),
    "pbkv_transfers_failed": ("Synchronizations that failed", "transfers_failed"),
    "pbkv_resyncs_partial": (
        "Synchronizations by a rollback or a catch-up of the backup (no copy)",
        "resyncs_partial",
    ),
    "pbkv_resyncs_full": ("Synchronizations by a full transfer", "resyncs_full"),
    "pbkv_catchups": (
        "Synchronizations by a catch-up on the primary's batches (sent or received)",
        "catchups_sent",
    ),
    "pbkv_writes_rewound": ("Writes rewound after a replication failure", "writes_rewound"),
    "pbkv_backup_diverged": (
        "Acknowledgements whose checksum was not the primary's after the batch",
        "backup_diverged",
    ),
    "pbkv_writes_replayed": (
        "Retries with an Idempotency-Key answered without being applied again",
        "writes_replayed",
    ),
    "pbkv_idempotency_keys_reused": (
        "Writes refused: their Idempotency-Key came with another request (422)",
        "idempotency_keys_reused",
    ),
    "pbkv_batches": ("Replication batches sent or applied", "batches_sent"),
    "pbkv_clients_refused": ("Connections refused over max_clients", "clients_refused"),
    "pbkv_bodies_refused": ("Requests refused over max_pending_bytes", "bodies_refused"),
    "pbkv_connections_timed_out": (
        "Connections closed by a header, body or send timeout",
        "connections_timed_out",
    ),
}

# With a coordinator only: name: (help text, status field).
MEMBER_COUNTERS: dict[str, tuple[str, str]] = {
    "pbkv_promotions": ("Times this member became the primary", "promotions"),
    "pbkv_fencings": ("Times this member stopped serving as primary on its own", "fencings"),
}


def families(status: Status, requests: Mapping[Command, int]) -> Iterator[Metric]:
    """The metric families of one node, from its status and its request counts."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

    # A member's role may be "spare"; its stages are those of the core it runs.
    role = Role(status.get("core_role", status["role"]))
    label = str(status["role"])
    labels = [label]
    counted = CounterMetricFamily(
        "pbkv_requests", "Client requests by command", labels=["role", "command"]
    )
    for command in Command:
        counted.add_metric([label, command.value], requests.get(command, 0))
    yield counted
    stage = GaugeMetricFamily("pbkv_stage", "1 for the current stage", labels=["role", "stage"])
    for each in ACCEPTANCE[role]:
        stage.add_metric([label, each.value], 1.0 if each.value == status["stage"] else 0.0)
    yield stage
    for name, (text, field, per_unit) in GAUGES.items():
        gauge = GaugeMetricFamily(name, text, labels=["role"])
        gauge.add_metric(labels, float(status[field]) / per_unit)
        yield gauge
    for name, (text, field) in MEMBER_GAUGES.items():
        if status.get(field) is not None:
            gauge = GaugeMetricFamily(name, text, labels=["role"])
            gauge.add_metric(labels, float(status[field]))
            yield gauge
    if "batches_acked" in status:  # the primary's group commit
        yield SummaryMetricFamily(
            "pbkv_replication_ack_seconds",
            "Time from sending a batch to the backup's acknowledgement",
            count_value=status["batches_acked"],
            sum_value=status["ack_seconds_total"],
        )
        replicated = CounterMetricFamily(
            "pbkv_writes_replicated", "Writes acknowledged by the backup", labels=["role"]
        )
        replicated.add_metric(labels, float(status["writes_replicated"]))
        yield replicated
    for name, (text, field) in [*COUNTERS.items(), *MEMBER_COUNTERS.items()]:
        if field == "batches_sent" and role is Role.BACKUP:
            field = "batches_applied"
        if field == "catchups_sent" and role is Role.BACKUP:
            field = "catchups"
        if field in status:
            counter = CounterMetricFamily(name, text, labels=["role"])
            counter.add_metric(labels, float(status[field]))
            yield counter
