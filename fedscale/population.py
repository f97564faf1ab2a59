"""A federation as a lazy description: client id -> data and device, nothing stored per client.

A :class:`Population` of ``num_clients`` clients pairs a data provider (client id
to that client's train and test split) with a device source (client id to a
:class:`~fedscale.devices.DeviceProfile`). Neither holds anything per client:
synthetic data and built-in device mixes are pure functions of ``(seed, client
id)``, a partitioned in-memory dataset stores one index array for the whole
dataset (its own size, not the federation's), and Shakespeare stores its text
once. So memory grows with the clients a round selects, not with the federation:
a million-client population is created and sampled in a few megabytes.

:meth:`Population.sample` draws a round's clients from a pseudo-random
permutation of all ids (a keyed Feistel network, evaluated lazily in batches), so
it never materialises ``range(num_clients)``; with ``available_at`` it skips the
clients that are offline then, and it still visits every id at most once, so it
ends even when fewer clients than asked are online.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from .devices import DeviceProfile, DeviceSource, churn_interruptions, counter_hash
from .exceptions import ConfigError, DataError
from .partition import partition_indices

if TYPE_CHECKING:
    from .clock import ClientTask
    from .datasets import Dataset

__all__ = [
    "ClientData",
    "ClientDataProvider",
    "LazyPermutation",
    "PartitionedData",
    "Population",
    "data_provider",
]

IntArray = npt.NDArray[np.int64]
# Inputs are float32 features for most datasets, uint8 character codes for text.
Array = npt.NDArray[Any]


@dataclass(frozen=True, eq=False)
class ClientData:
    """One client's training split and held-out split. Arrays are read-only."""

    x_train: Array
    y_train: IntArray
    x_test: Array
    y_test: IntArray

    @property
    def num_train(self) -> int:
        """Number of training samples."""
        return len(self.y_train)


class ClientDataProvider(Protocol):
    """Maps a client id to its data, built when asked for."""

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are ``0 .. num_classes - 1``)."""
        ...

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one input sample."""
        ...

    @property
    def max_clients(self) -> int | None:
        """The most clients this data can have (``None``: no limit)."""
        ...

    def num_train_samples(self, client_id: int) -> int:
        """Return the size of a client's training split, without building its data."""
        ...

    def client_data(self, client_id: int) -> ClientData:
        """Build a client's data."""
        ...

    def test_set(self, num_clients: int) -> tuple[Array, IntArray]:
        """Return the server's test set for a federation of ``num_clients``."""
        ...


# ------------------------------------------------------------------ partitioned data


@dataclass(frozen=True, eq=False)
class PartitionedData:
    """An in-memory dataset split among clients by :func:`fedscale.partition.partition_indices`.

    Client ``i`` trains on the partition ``partition_indices`` gives it and
    evaluates on an iid share of the test split, as ``fedscale.node_data`` does.
    With more clients than samples (``allow_duplicates``), client ``i`` holds
    partition ``i mod samples``, as ``partition_indices`` defines it, but the
    partitions are stored once instead of once per client. The partitions live
    in two flat arrays (indices, and offsets into them).
    """

    dataset: Dataset
    num_clients: int
    scheme: str
    seed: int = 0
    allow_duplicates: bool = False
    _train: tuple[IntArray, IntArray] = field(init=False, repr=False)
    _test: tuple[IntArray, IntArray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.num_clients, int) or self.num_clients < 1:
            raise ConfigError(f"clients: expected an integer >= 1, got {self.num_clients!r}")
        y_train, y_test = self.dataset.y_train, self.dataset.y_test
        n_train = self.num_clients
        if self.allow_duplicates:
            n_train = min(n_train, len(y_train))
        train = partition_indices(
            y_train, n_train, self.scheme, self.seed, allow_duplicates=self.allow_duplicates
        )
        test = partition_indices(
            y_test, min(self.num_clients, len(y_test)), "iid", self.seed, allow_duplicates=True
        )
        object.__setattr__(self, "_train", _pack(train))
        object.__setattr__(self, "_test", _pack(test))

    @property
    def num_classes(self) -> int:
        """The dataset's classes."""
        return self.dataset.num_classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The dataset's sample shape."""
        return self.dataset.sample_shape

    @property
    def max_clients(self) -> int | None:
        """The number of clients the partitions were made for."""
        return self.num_clients

    def num_train_samples(self, client_id: int) -> int:
        """Return the size of client ``client_id``'s partition."""
        return len(self._indices(self._train, client_id))

    def client_data(self, client_id: int) -> ClientData:
        """Return client ``client_id``'s partition and its share of the test split."""
        tr = self._indices(self._train, client_id)
        te = self._indices(self._test, client_id)
        d = self.dataset
        arrays = (d.x_train[tr], d.y_train[tr], d.x_test[te], d.y_test[te])
        for a in arrays:
            a.setflags(write=False)
        return ClientData(*arrays)

    def test_set(self, num_clients: int) -> tuple[Array, IntArray]:
        """Return the dataset's whole test split."""
        return self.dataset.x_test, self.dataset.y_test

    def _indices(self, packed: tuple[IntArray, IntArray], client_id: int) -> IntArray:
        _check_client(client_id, self.num_clients)
        flat, offsets = packed
        part = client_id % (len(offsets) - 1)
        return flat[offsets[part] : offsets[part + 1]]


def _pack(parts: list[IntArray]) -> tuple[IntArray, IntArray]:
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    flat = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    flat.setflags(write=False)
    offsets.setflags(write=False)
    return flat, offsets


def data_provider(
    spec: str,
    *,
    num_clients: int,
    seed: int = 0,
    partition: str = "iid",
    test_fraction: float = 0.2,
    allow_duplicates: bool = False,
    label_column: str = "label",
) -> ClientDataProvider:
    """Return the data provider for a dataset spec.

    ``synthetic:<alpha>,<beta>`` and ``shakespeare`` have natural clients (the
    partition argument does not apply to them); any other spec is loaded by
    :func:`fedscale.datasets.load_dataset` and partitioned.
    """
    from .shakespeare import SHAKESPEARE, Shakespeare
    from .synthetic import Synthetic, is_synthetic_spec

    if is_synthetic_spec(spec):
        return Synthetic.from_spec(spec, seed=seed)
    if spec == SHAKESPEARE:
        return Shakespeare.load()
    from .datasets import load_dataset

    dataset = load_dataset(spec, seed=seed, test_fraction=test_fraction, label_column=label_column)
    return PartitionedData(dataset, num_clients, partition, seed, allow_duplicates)


# ------------------------------------------------------------------ lazy permutation


@dataclass(frozen=True)
class LazyPermutation:
    """A keyed pseudo-random permutation of ``0 .. n - 1``, evaluated on demand.

    A four-round balanced Feistel network on the smallest even number of bits
    covering ``n`` (round function: splitmix64 of the key, round and half), with
    cycle-walking to stay below ``n``: a bijection on ``0 .. n - 1`` whose values
    at any positions cost O(1) memory each.
    """

    n: int
    key: int
    _half_bits: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"permutation: expected n >= 1, got {self.n!r}")
        bits = max(2, (self.n - 1).bit_length())
        object.__setattr__(self, "_half_bits", (bits + 1) // 2)

    def __getitem__(self, positions: npt.ArrayLike) -> IntArray:
        """Return the permuted values at ``positions`` (each in ``0 .. n - 1``)."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n):
            raise ConfigError(f"permutation: expected positions in 0..{self.n - 1}")
        out = self._encrypt(pos.astype(np.uint64))
        pending = out >= np.uint64(self.n)
        while pending.any():  # cycle-walking: expected under 4 steps, ends for a bijection
            out[pending] = self._encrypt(out[pending])
            pending = out >= np.uint64(self.n)
        return out.astype(np.int64)

    def __iter__(self) -> Iterator[int]:
        for start in range(0, self.n, 4096):
            yield from (int(v) for v in self[np.arange(start, min(self.n, start + 4096))])

    def _encrypt(self, values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        h = np.uint64(self._half_bits)
        mask = np.uint64((1 << self._half_bits) - 1)
        left, right = values >> h, values & mask
        for rnd in range(4):
            f = counter_hash(self.key, right.astype(np.int64), rnd) & mask
            left, right = right, left ^ f
        out: npt.NDArray[np.uint64] = (left << h) | right
        return out


# ------------------------------------------------------------------ the population


@dataclass(frozen=True, eq=False)
class Population:
    """A federation of ``num_clients``: data from ``data``, devices from ``devices``."""

    num_clients: int
    data: ClientDataProvider
    devices: DeviceSource
    seed: int = 0

    def __post_init__(self) -> None:
        if (
            not isinstance(self.num_clients, int)
            or isinstance(self.num_clients, bool)
            or self.num_clients < 1
        ):
            raise ConfigError(f"clients: expected an integer >= 1, got {self.num_clients!r}")
        limit = self.data.max_clients
        if limit is not None and self.num_clients > limit:
            raise ConfigError(
                f"clients: expected at most {limit} for this dataset (it has that many "
                f"natural clients or partitions), got {self.num_clients}"
            )

    def client_data(self, client_id: int) -> ClientData:
        """Build client ``client_id``'s data."""
        _check_client(client_id, self.num_clients)
        return self.data.client_data(client_id)

    def num_train_samples(self, client_id: int) -> int:
        """Return the size of client ``client_id``'s training split."""
        _check_client(client_id, self.num_clients)
        return self.data.num_train_samples(client_id)

    def profile(self, client_id: int) -> DeviceProfile:
        """Return client ``client_id``'s device profile."""
        _check_client(client_id, self.num_clients)
        return self.devices.profile(client_id)

    def sample(self, round_number: int, k: int, *, available_at: float | None = None) -> IntArray:
        """Return up to ``k`` distinct client ids for a round, drawn from the seed.

        The same seed and round give the same ids. With ``available_at``, only
        clients online at that virtual time are drawn; fewer than ``k`` come back
        only when fewer are online.
        """
        if not isinstance(round_number, int) or round_number < 0:
            raise ConfigError(f"round: expected an integer >= 0, got {round_number!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ConfigError(f"clients per round: expected an integer >= 0, got {k!r}")
        perm = LazyPermutation(self.num_clients, self._round_key(round_number))
        if available_at is None:
            return perm[np.arange(min(k, self.num_clients))]
        chosen: list[IntArray] = []
        found = 0
        position = 0
        batch = max(64, 2 * k)
        while found < k and position < self.num_clients:
            ids = perm[np.arange(position, min(self.num_clients, position + batch))]
            position += len(ids)
            online = ids[self.devices.online(ids, available_at)]
            take = online[: k - found]
            chosen.append(take)
            found += len(take)
            batch = min(4 * batch, 1 << 20)  # few online: widen the net
        return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)

    def tasks(self, client_ids: npt.ArrayLike, round_number: int) -> list[ClientTask]:
        """Return the clock's view of each client for a round: samples, device, churn."""
        from .clock import ClientTask

        ids = np.asarray(client_ids, dtype=np.int64).reshape(-1)
        for c in ids:
            _check_client(int(c), self.num_clients)
        profiles = self.devices.profiles(ids)
        interrupts = churn_interruptions(
            self.seed, ids, round_number, [p.churn_per_hour for p in profiles]
        )
        return [
            ClientTask(int(c), self.num_train_samples(int(c)), p, float(t))
            for c, p, t in zip(ids, profiles, interrupts, strict=True)
        ]

    def _round_key(self, round_number: int) -> int:
        # A different permutation per round, all from the population's seed.
        return int(counter_hash(self.seed, [round_number], 0x5A3F)[0])


def _check_client(client_id: int, num_clients: int) -> None:
    if (
        not isinstance(client_id, int | np.integer)
        or isinstance(client_id, bool)
        or not 0 <= client_id < num_clients
    ):
        raise DataError(
            f"client id: expected an integer in 0..{num_clients - 1}, got {client_id!r}"
        )
