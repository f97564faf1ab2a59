"""Split a labelled dataset among clients: ``iid``, ``dirichlet:<alpha>``, ``shards:<k>``.

Written here rather than taken from flwr-datasets: its partitioners work on a
Hugging Face ``datasets.Dataset``, and importing ``datasets`` costs about 2 s and
150 MB in every process that partitions (each Ray actor, each ClientApp process
of a SuperNode), more than a round of training on a small model. These work on a
label array with numpy alone, are deterministic for a seed, and give every client
at least one sample.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .exceptions import PartitionError

__all__ = ["PartitionScheme", "label_skew", "parse_scheme", "partition_indices"]

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class PartitionScheme:
    """A parsed partition spec: ``kind`` with its parameter, if any."""

    kind: str
    alpha: float = 0.0
    k: int = 0

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "shards":
            return f"shards:{self.k}"
        return self.kind


def parse_scheme(spec: str) -> PartitionScheme:
    """Parse ``iid``, ``dirichlet:<alpha>`` (alpha > 0) or ``shards:<k>`` (k >= 1)."""
    kind, _, arg = spec.partition(":")
    if kind == "iid" and not arg:
        return PartitionScheme("iid")
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = -1.0
        if alpha > 0 and np.isfinite(alpha):
            return PartitionScheme("dirichlet", alpha=alpha)
    if kind == "shards" and re.fullmatch("[0-9]+", arg) and int(arg) >= 1:
        return PartitionScheme("shards", k=int(arg))
    raise PartitionError(
        f"partition: expected iid, dirichlet:<alpha> with alpha > 0, or "
        f"shards:<k> with k >= 1; got {spec!r}"
    )


def partition_indices(
    labels: npt.ArrayLike,
    num_partitions: int,
    scheme: str | PartitionScheme,
    seed: int,
    *,
    allow_duplicates: bool = False,
) -> list[IntArray]:
    """Return one sorted index array per client.

    Parameters
    ----------
    labels
        One integer label per sample.
    num_partitions
        Number of clients.
    scheme
        ``iid``, ``dirichlet:<alpha>`` or ``shards:<k>`` (each client holds ``k``
        classes), or a parsed :class:`PartitionScheme`.
    seed
        The same seed gives the same partitions.
    allow_duplicates
        With more clients than samples, the samples are first split into as many
        partitions as there are samples and client ``i`` gets partition
        ``i mod n_samples``, so clients share samples. Without it, that case is
        an error.

    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise PartitionError(f"labels: expected a 1-D array, got shape {y.shape}")
    if num_partitions < 1:
        raise PartitionError(f"num_partitions: expected an integer >= 1, got {num_partitions}")
    parsed = parse_scheme(scheme) if isinstance(scheme, str) else scheme
    n = len(y)
    if n == 0:
        raise PartitionError("labels: expected at least one sample, got none")
    if num_partitions > n:
        if not allow_duplicates:
            raise PartitionError(
                f"asked for {num_partitions} clients but the data has only {n} "
                "samples; use fewer clients, or set allow-duplicate-samples = true "
                "to let clients share samples"
            )
        base = partition_indices(y, n, parsed, seed)
        return [base[i % n].copy() for i in range(num_partitions)]

    rng = np.random.default_rng(seed)
    if parsed.kind == "iid":
        parts = np.array_split(rng.permutation(n), num_partitions)
    elif parsed.kind == "dirichlet":
        parts = _dirichlet(y, num_partitions, parsed.alpha, rng)
    else:
        parts = _shards(y, num_partitions, parsed.k, rng)
    _fill_empty(parts)
    return [np.sort(p).astype(np.int64) for p in parts]


def _dirichlet(
    y: np.ndarray, n_parts: int, alpha: float, rng: np.random.Generator
) -> list[IntArray]:
    # Per class, draw each client's share from Dir(alpha) (Hsu et al., 2019).
    chunks: list[list[IntArray]] = [[] for _ in range(n_parts)]
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        rng.shuffle(idx)
        shares = rng.dirichlet(np.full(n_parts, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
        for client, piece in enumerate(np.split(idx, cuts)):
            chunks[client].append(piece)
    return [np.concatenate(c) for c in chunks]


def _shards(y: np.ndarray, n_parts: int, k: int, rng: np.random.Generator) -> list[IntArray]:
    classes = np.unique(y)
    if k > len(classes):
        raise PartitionError(f"shards:{k}: expected k <= the number of classes ({len(classes)})")
    if n_parts * k < len(classes):
        raise PartitionError(
            f"shards:{k} with {n_parts} clients covers {n_parts * k} of "
            f"{len(classes)} classes; expected clients * k >= classes so no data "
            "is left out"
        )
    # Client i holds k consecutive classes of a shuffled cycle: k distinct
    # classes each, and every class held by about n_parts * k / C clients.
    order = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(n_parts):
        for j in range(k):
            holders[int(order[(client * k + j) % len(classes)])].append(client)
    chunks: list[list[IntArray]] = [[] for _ in range(n_parts)]
    for cls, owners in holders.items():
        idx = np.flatnonzero(y == cls)
        rng.shuffle(idx)
        for client, piece in zip(owners, np.array_split(idx, len(owners)), strict=True):
            chunks[client].append(piece)
    return [np.concatenate(c) if c else np.empty(0, dtype=np.int64) for c in chunks]


def _fill_empty(parts: list[IntArray]) -> None:
    # Every client gets at least one sample: an empty one takes the last sample
    # of the currently largest partition (deterministic, keeps disjointness).
    for i, part in enumerate(parts):
        if len(part) == 0:
            donor = max(range(len(parts)), key=lambda j: len(parts[j]))
            parts[i] = parts[donor][-1:]
            parts[donor] = parts[donor][:-1]


def label_skew(labels: npt.ArrayLike, parts: list[IntArray]) -> float:
    """Mean total-variation distance between each client's label mix and the whole's.

    0 means every client sees the global label distribution; 1 is the maximum.
    """
    y = np.asarray(labels)
    classes = np.unique(y)
    global_dist = np.array([(y == c).mean() for c in classes])
    distances = []
    for part in parts:
        local = y[part]
        dist = np.array([(local == c).mean() for c in classes])
        distances.append(0.5 * np.abs(dist - global_dist).sum())
    return float(np.mean(distances))
