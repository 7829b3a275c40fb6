"""Prometheus metrics, read from the node when scraped.

Counting on the hot path is a dict increment; the prometheus-client objects
are built only at scrape time (a custom collector), so serving requests pays
nothing for them.
"""

from __future__ import annotations

import collections
from collections import Counter
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from pbkv.commands import Command
from pbkv.stages import ACCEPTANCE

if TYPE_CHECKING:
    from pbkv.node import Node


class LoopLag:
    """The event loop's longest delay: over the last ``window`` seconds and ever."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self.worst = 0.0
        self._buckets: collections.deque[tuple[float, float]] = collections.deque()

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
        return max((lag for start, lag in self._buckets if now - start <= self.window), default=0)


class Metrics:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.requests: Counter[Command] = Counter()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def count(self, command: Command) -> None:
        self.requests[command] += 1

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def collect(self):  # prometheus-client collector protocol
        node = self.node
        status = node.status()
        role = node.role
        requests = CounterMetricFamily(
            "pbkv_requests", "Client requests by command", labels=["role", "command"]
        )
        for command in Command:
            requests.add_metric([role, command.value], self.requests[command])
        yield requests
        stage = GaugeMetricFamily("pbkv_stage", "1 for the current stage", labels=["role", "stage"])
        for name in ACCEPTANCE[role]:
            stage.add_metric([role, name.value], 1.0 if name.value == status["stage"] else 0.0)
        yield stage
        gauges = {
            "pbkv_keys": ("Keys held", status["keys"]),
            "pbkv_replication_seq": ("Last replicated batch applied", status["seq"]),
            "pbkv_replication_lag": ("Batches not yet acknowledged", status["lag"]),
            "pbkv_peer_connected": (
                "1 while the replication channel is up",
                int(status["peer_connected"]),
            ),
            "pbkv_uptime_seconds": ("Seconds since start", status["uptime"]),
            "pbkv_client_connections": ("Open client connections", len(node.connections)),
            "pbkv_memory_bytes": ("Approximate bytes held by the pairs", status["memory_bytes"]),
            "pbkv_max_memory_bytes": ("max_memory (0: no limit)", status["max_memory"]),
            "pbkv_pending_request_bytes": (
                "Bytes of unfinished requests held",
                status["pending_request_bytes"],
            ),
            "pbkv_loop_lag_seconds": (
                "Longest event-loop delay in the last 10 s",
                node.lag.recent_max(node.loop.time()),
            ),
        }
        for name, (text, value) in gauges.items():
            gauge = GaugeMetricFamily(name, text, labels=["role"])
            gauge.add_metric([role], float(value))
            yield gauge
        counters = {
            "pbkv_transfers_completed": (
                "Synchronizations completed (full, partial, or data already matching)",
                "transfers_completed",
            ),
            "pbkv_transfers_failed": ("Synchronizations that failed", "transfers_failed"),
            "pbkv_resyncs_partial": (
                "Synchronizations by a rollback of the backup (no copy)",
                "resyncs_partial",
            ),
            "pbkv_resyncs_full": ("Synchronizations by a full transfer", "resyncs_full"),
            "pbkv_writes_rewound": ("Writes rewound after a replication failure", "writes_rewound"),
            "pbkv_batches": ("Replication batches sent or applied", "batches_sent"),
            "pbkv_clients_refused": ("Connections refused over max_clients", "clients_refused"),
            "pbkv_bodies_refused": (
                "Requests refused over max_pending_bytes",
                "bodies_refused",
            ),
            "pbkv_connections_timed_out": (
                "Connections closed by a header, body or send timeout",
                "connections_timed_out",
            ),
        }
        if "batches_acked" in status:
            core = node.core
            yield SummaryMetricFamily(
                "pbkv_replication_ack_seconds",
                "Time from sending a batch to the backup's acknowledgement",
                count_value=core.batches_acked,
                sum_value=core.ack_seconds_total,
            )
            replicated = CounterMetricFamily(
                "pbkv_writes_replicated", "Writes acknowledged by the backup", labels=["role"]
            )
            replicated.add_metric([role], float(core.writes_replicated))
            yield replicated
        for name, (text, field) in counters.items():
            if field == "batches_sent" and role == "backup":
                field = "batches_applied"
            if field in status:
                counter = CounterMetricFamily(name, text, labels=["role"])
                counter.add_metric([role], float(status[field]))
                yield counter
