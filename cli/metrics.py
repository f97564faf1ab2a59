"""``--metrics-port`` for ``simulate`` and ``server``: a Prometheus exporter for the run."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console

__all__ = ["MetricsLinger", "MetricsPort", "both", "round_metrics"]

MetricsPort = Annotated[
    int,
    typer.Option(
        help="Serve Prometheus metrics at http://HOST:PORT/metrics on this port (0: off)."
    ),
]
MetricsLinger = Annotated[
    float,
    typer.Option(
        min=0.0,
        help="With --metrics-port: keep /metrics up this many seconds after the run, so "
        "Prometheus scrapes its last round (Ctrl-C ends the wait).",
    ),
]
RowCallback = Callable[[dict[str, Any]], None]


@contextmanager
def round_metrics(console: Console, host: str, port: int, linger: float) -> Iterator[RowCallback]:
    """Yield the callback that feeds each round's row to the exporter (none: port 0).

    On leaving, with ``linger``, the endpoint stays up that long before it stops.
    """
    if not port:
        yield _ignore
        return
    from fedscale.server.metrics import MetricsExporter, ServerMetrics, update_from_round

    metrics = ServerMetrics()
    exporter = MetricsExporter(metrics, host, port).start()
    console.print(f"Prometheus metrics at {exporter.url}")

    try:
        yield lambda row: update_from_round(metrics, row)
        if linger > 0:
            console.print(f"keeping {exporter.url} up for {linger:g} s (Ctrl-C to stop)")
            try:
                time.sleep(linger)
            except KeyboardInterrupt:
                pass  # the run finished: ending the wait early is no failure
    finally:
        exporter.stop()


def _ignore(row: dict[str, Any]) -> None:
    return None


def both(first: RowCallback, second: RowCallback) -> RowCallback:
    """Return a callback that calls ``first``, then ``second``, with each row."""

    def call(row: dict[str, Any]) -> None:
        first(row)
        second(row)

    return call
