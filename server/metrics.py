"""Prometheus metrics of a federation, fed from its round records.

Both ``fedscale server`` and ``fedscale simulate`` export the same metrics with
``--metrics-port``. Under ``fedscale server`` the ServerApp runs in a process
``flwr run`` starts, so the launcher (the ``fedscale server`` process, which
follows ``metrics.jsonl``) owns the exporter; under ``simulate`` the rounds are
logged in this process. Either way each round's record, as written to
``metrics.jsonl``, goes through :func:`update_from_round`: one source of truth,
so the counters always equal what the run folder holds.

Each exporter has its own :class:`~prometheus_client.CollectorRegistry`, not
the process-global one: no default process collectors, and two federations in
one process (tests) never share counters.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fedscale.exceptions import ConfigError
from fedscale.processes import join_address

__all__ = ["METRIC_NAMES", "MetricsExporter", "ServerMetrics", "update_from_round"]

# Round durations run from a fraction of a second (small simulations) to the
# round timeout of real deployments (minutes).
_ROUND_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# Aggregation: a millisecond for FedAvg over a few small updates, seconds for
# Krum/Bulyan's pairwise distances over many large ones.
_AGGREGATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0)


@dataclass
class ServerMetrics:
    """The server's metrics on one registry of their own."""

    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )

    def __post_init__(self) -> None:
        r = self.registry
        self.rounds_completed = Counter(
            "fedscale_server_rounds_completed", "Training rounds completed.", registry=r
        )
        self.round_duration = Histogram(
            "fedscale_server_round_duration_seconds",
            "Wall-clock seconds per training round (sampling to global evaluation).",
            buckets=_ROUND_BUCKETS,
            registry=r,
        )
        self.clients_sampled = Counter(
            "fedscale_server_clients_sampled", "Clients sampled for training.", registry=r
        )
        self.clients_replied = Counter(
            "fedscale_server_clients_replied",
            "Training replies accepted into the aggregate.",
            registry=r,
        )
        self.clients_failed = Counter(
            "fedscale_server_clients_failed",
            "Sampled clients that answered with an error or not at all.",
            registry=r,
        )
        self.clients_rejected = Counter(
            "fedscale_server_clients_rejected",
            "Replies refused by update validation (shape, size, num-examples, non-finite).",
            registry=r,
        )
        self.clients_dropped = Counter(
            "fedscale_server_clients_dropped",
            "Clients the simulated system dropped (offline, deadline, overcommit).",
            registry=r,
        )
        self.bytes_sent = Counter(
            "fedscale_server_bytes_sent",
            "Bytes of the messages sent to clients (training and evaluation), as Flower "
            "serializes them.",
            registry=r,
        )
        self.bytes_received = Counter(
            "fedscale_server_bytes_received",
            "Bytes of the replies received from clients, as Flower serializes them.",
            registry=r,
        )
        self.aggregation = Histogram(
            "fedscale_server_aggregation_seconds",
            "Seconds the strategy spends aggregating one round's updates.",
            buckets=_AGGREGATION_BUCKETS,
            registry=r,
        )
        self.global_loss = Gauge(
            "fedscale_server_global_loss", "Global model's test loss, latest round.", registry=r
        )
        self.global_accuracy = Gauge(
            "fedscale_server_global_accuracy",
            "Global model's test accuracy, latest round.",
            registry=r,
        )
        self.current_round = Gauge(
            "fedscale_server_current_round",
            "The latest round recorded (0: the initial model's evaluation).",
            registry=r,
        )


# Every name a scrape shows (counters gain _total, histograms _bucket/_sum/_count).
METRIC_NAMES = frozenset(
    {
        "fedscale_server_rounds_completed_total",
        "fedscale_server_round_duration_seconds",
        "fedscale_server_clients_sampled_total",
        "fedscale_server_clients_replied_total",
        "fedscale_server_clients_failed_total",
        "fedscale_server_clients_rejected_total",
        "fedscale_server_clients_dropped_total",
        "fedscale_server_bytes_sent_total",
        "fedscale_server_bytes_received_total",
        "fedscale_server_aggregation_seconds",
        "fedscale_server_global_loss",
        "fedscale_server_global_accuracy",
        "fedscale_server_current_round",
    }
)


def update_from_round(metrics: ServerMetrics, record: Mapping[str, Any]) -> None:
    """Account for one ``metrics.jsonl`` row (call once per row, in order).

    Round 0 is the initial model's evaluation: it sets the gauges but is no
    training round, so it adds to no counter.
    """
    server_round = int(record["round"])
    metrics.current_round.set(server_round)
    for gauge, key in (
        (metrics.global_loss, "loss"),
        (metrics.global_accuracy, "accuracy"),
    ):
        value = record.get(key)
        # A diverged loss is written as null: show NaN rather than the last finite value.
        gauge.set(float(value) if isinstance(value, int | float) else math.nan)
    if server_round == 0:
        return
    metrics.rounds_completed.inc()
    seconds = record.get("seconds")
    if isinstance(seconds, int | float):
        metrics.round_duration.observe(float(seconds))
    aggregate = record.get("aggregate_seconds")  # null when a round had nothing to aggregate
    if isinstance(aggregate, int | float):
        metrics.aggregation.observe(float(aggregate))
    for counter, key in (
        (metrics.clients_sampled, "clients_sampled"),
        (metrics.clients_replied, "clients_replied"),
        (metrics.clients_failed, "clients_failed"),
        (metrics.clients_rejected, "clients_rejected"),
        (metrics.clients_dropped, "clients_dropped"),  # null without a device model
        (metrics.bytes_sent, "bytes_sent"),
        (metrics.bytes_received, "bytes_received"),
    ):
        count = record.get(key)
        if isinstance(count, int) and count > 0:
            counter.inc(count)


class MetricsExporter:
    """``GET /metrics`` for one :class:`ServerMetrics`, on a thread of its own."""

    def __init__(self, metrics: ServerMetrics, host: str, port: int):
        if not 0 < port < 65536:
            raise ConfigError(f"metrics port: expected 1-65535, got {port}")
        self.metrics = metrics
        self.host = host
        self.port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Where Prometheus scrapes."""
        return f"http://{join_address(self.host, self.port)}/metrics"

    def start(self) -> MetricsExporter:
        """Bind and serve; a taken port is a clear error, raised here."""
        try:
            self._server, self._thread = start_http_server(
                self.port, addr=self.host, registry=self.metrics.registry
            )
        except OSError as err:
            raise ConfigError(
                f"metrics port: could not listen on {join_address(self.host, self.port)}: {err}"
            ) from err
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
