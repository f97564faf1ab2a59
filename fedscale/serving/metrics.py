"""Prometheus metrics of one ``fedscale serve`` process, at ``GET /metrics``.

Inference requests are counted by model and HTTP status, their latency goes
into one histogram, and every model load (the first included) counts as a
reload, ``ok`` or ``refused``. Requests the server's protection refuses (overload,
timeouts, a missing or wrong API key) are counted by protocol and reason, and a
gauge shows the inferences running. The registry is the server's own, not
prometheus-client's global one: one process may run several servers (tests).

The request path stays cheap: a label set's child counter is looked up once and
cached, so a request costs one dict lookup, one counter increment and one
histogram observation.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = [
    "CONTENT_TYPE",
    "METRIC_NAMES",
    "REJECTION_REASONS",
    "UNKNOWN_MODEL",
    "ServingMetrics",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()
UNKNOWN_MODEL = "_unknown"
"""The model label of requests naming no loaded model: URLs must not mint label values."""

REJECTION_REASONS = ("overloaded", "timeout", "unauthorized")
"""Why the server itself refused a request (``fedscale_serving_rejections_total``)."""

# A LeNet call is tens of microseconds; a large batch, seconds.
_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)

METRIC_NAMES = frozenset(
    {
        "fedscale_serving_requests_total",
        "fedscale_serving_request_duration_seconds",
        "fedscale_serving_grpc_requests_total",
        "fedscale_serving_grpc_request_duration_seconds",
        "fedscale_serving_model_version",
        "fedscale_serving_reloads_total",
        "fedscale_serving_rejections_total",
        "fedscale_serving_inflight",
        "fedscale_serving_queued",
    }
)


class ServingMetrics:
    """The serving metrics on a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "fedscale_serving_requests",
            "Inference requests by model and HTTP status code.",
            ["model", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fedscale_serving_request_duration_seconds",
            "Seconds from a parsed inference request to its response (REST).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        # gRPC gets its own pair: its status codes are not HTTP's (grpc_code, as
        # gRPC's own Prometheus interceptors name the label).
        self._grpc_requests = Counter(
            "fedscale_serving_grpc_requests",
            "gRPC ModelInfer calls by model and gRPC status code.",
            ["model", "grpc_code"],
            registry=self.registry,
        )
        self.grpc_latency = Histogram(
            "fedscale_serving_grpc_request_duration_seconds",
            "Seconds from a ModelInfer call's arrival to its response (gRPC).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._version = Gauge(
            "fedscale_serving_model_version",
            "The served model's version (the federation round it comes from).",
            ["model"],
            registry=self.registry,
        )
        self._reloads = Counter(
            "fedscale_serving_reloads",
            "Model loads from the model directory, the first included: ok or refused.",
            ["result"],
            registry=self.registry,
        )
        self._rejections = Counter(
            "fedscale_serving_rejections",
            "Requests refused by the server's own protection, by protocol (rest, grpc) and "
            "reason: overloaded (503 / RESOURCE_EXHAUSTED), timeout (408 slow request, "
            "504 / DEADLINE_EXCEEDED slow inference), unauthorized (401 / UNAUTHENTICATED).",
            ["protocol", "reason"],
            registry=self.registry,
        )
        for protocol in ("rest", "grpc"):  # every series exists from the start, at 0
            for reason in REJECTION_REASONS:
                self._rejections.labels(protocol=protocol, reason=reason)
        self.inflight = Gauge(
            "fedscale_serving_inflight",
            "Inferences running now (REST and gRPC), out of --max-concurrency.",
            registry=self.registry,
        )
        self.queued = Gauge(
            "fedscale_serving_queued",
            "Inference requests waiting for a slot now, out of --max-queue.",
            registry=self.registry,
        )
        self._children: dict[tuple[str, int], Counter] = {}
        self._grpc_children: dict[tuple[str, str], Counter] = {}

    def request(self, model: str, code: int, seconds: float) -> None:
        """Count one inference request and observe its latency."""
        key = (model, code)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._requests.labels(model=model, code=str(code))
        child.inc()
        self.latency.observe(seconds)

    def grpc_request(self, model: str, grpc_code: str, seconds: float) -> None:
        """Count one gRPC inference call (``grpc_code``: ``OK``, ``INVALID_ARGUMENT``, ...)."""
        key = (model, grpc_code)
        child = self._grpc_children.get(key)
        if child is None:
            child = self._grpc_children[key] = self._grpc_requests.labels(
                model=model, grpc_code=grpc_code
            )
        child.inc()
        self.grpc_latency.observe(seconds)

    def rejected(self, protocol: str, reason: str) -> None:
        """Count one request refused for ``reason`` (one of :data:`REJECTION_REASONS`)."""
        self._rejections.labels(protocol=protocol, reason=reason).inc()

    def loaded(self, model: str, version: str) -> None:
        """Record a model load that succeeded."""
        self._reloads.labels(result="ok").inc()
        # Versions are round numbers; anything else shows as -1 rather than failing a load.
        self._version.labels(model=model).set(int(version) if version.isdigit() else -1)

    def refused(self) -> None:
        """Record a new model that failed its checks (the old one keeps serving)."""
        self._reloads.labels(result="refused").inc()

    def exposition(self) -> bytes:
        """Return the Prometheus text format of every metric."""
        return generate_latest(self.registry)
