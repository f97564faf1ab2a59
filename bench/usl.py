"""Gunther's universal scalability law (USL), fitted to measured throughput.

``X(N) = lambda * N / (1 + sigma * (N - 1) + kappa * N * (N - 1))``: throughput
with ``N`` workers, where ``lambda`` is one worker's throughput, ``sigma`` the
contention (the serial share: here the parent's encoding, decoding and
aggregation) and ``kappa`` the coherency cost (workers waiting on each other:
shared memory bandwidth, the pipes). Throughput peaks at
``N* = sqrt((1 - sigma) / kappa)``: past it, adding workers makes a run slower.

Dividing through, ``N / X(N) = a + b (N - 1) + c N (N - 1)`` with ``a = 1/lambda``,
``b = sigma/lambda``, ``c = kappa/lambda``: linear in ``a, b, c``, so one least
squares solve fits it (no optimiser, no starting guess). It needs at least three
distinct worker counts; two cores give two, which is why ``bench/sim_scale.py``
reports only measured points there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["fit_usl", "peak_workers", "usl_throughput"]

FloatArray = npt.NDArray[np.float64]


def usl_throughput(
    workers: Sequence[float] | npt.NDArray[np.number], sigma: float, kappa: float, lam: float
) -> FloatArray:
    """Return the USL's throughput at each worker count."""
    n = np.asarray(workers, dtype=np.float64)
    return lam * n / (1.0 + sigma * (n - 1.0) + kappa * n * (n - 1.0))  # type: ignore[no-any-return]


def fit_usl(
    workers: Sequence[float] | npt.NDArray[np.number],
    throughput: Sequence[float] | npt.NDArray[np.number],
) -> tuple[float, float, float]:
    """Fit the USL to measured points; return ``(sigma, kappa, lambda)``.

    ``workers`` and ``throughput`` are paired measurements (say client updates
    per second), at least three distinct worker counts, all positive. The
    coefficients are returned as fitted, unclamped: a negative ``sigma`` or
    ``kappa`` says the points scale better than the law allows (noise, or a
    cache effect), which a reader should see rather than a zero.
    """
    n = np.asarray(workers, dtype=np.float64)
    x = np.asarray(throughput, dtype=np.float64)
    if n.ndim != 1 or n.shape != x.shape:
        raise ValueError(
            f"fit_usl: expected two 1-D sequences of equal length, got shapes {n.shape} "
            f"and {x.shape}"
        )
    if np.unique(n).size < 3:
        raise ValueError(
            f"fit_usl: expected at least 3 distinct worker counts, got {np.unique(n).tolist()}"
        )
    if not (np.all(np.isfinite(n)) and np.all(np.isfinite(x)) and n.min() >= 1 and x.min() > 0):
        raise ValueError("fit_usl: expected worker counts >= 1 and finite throughputs > 0")
    design = np.column_stack([np.ones_like(n), n - 1.0, n * (n - 1.0)])
    (a, b, c), *_ = np.linalg.lstsq(design, n / x, rcond=None)
    if a <= 0:
        raise ValueError(f"fit_usl: the points give a non-positive 1/lambda ({a:g})")
    return float(b / a), float(c / a), float(1.0 / a)


def peak_workers(sigma: float, kappa: float) -> float:
    """Return the worker count where the USL's throughput peaks (``inf`` if it never does)."""
    if kappa <= 0 or sigma >= 1:
        return math.inf if kappa <= 0 else 1.0
    return math.sqrt((1.0 - sigma) / kappa)
