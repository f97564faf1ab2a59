"""Which data a node trains and evaluates on, from its Flower ``node_config``.

A node either holds one partition of a demo federation (``partition-id`` and
``num-partitions``, as Flower's simulation and ``fedscale edge-client --partition``
set them), or its own data (``data-path``: an ``.npz`` or ``.csv`` file on the
device). Partitions are computed once per process and shared by every virtual
client in it.

Datasets with natural clients (``synthetic:<alpha>,<beta>``, ``shakespeare``; see
:func:`fedscale.population.data_provider`) are not partitioned: ``partition-id``
is the client id, and its data comes from the dataset's provider, built when the
client is asked for. The latest clients' data is kept in a small cache bounded in
bytes (a client usually trains and evaluates in the same round), so memory grows
with a round's clients, never with the federation.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .datasets import load_dataset, load_local_data
from .exceptions import ConfigError
from .partition import partition_indices
from .settings import RunSettings

if TYPE_CHECKING:
    from .population import ClientDataProvider

__all__ = [
    "NodeData",
    "has_natural_clients",
    "natural_provider",
    "node_data",
    "node_device_name",
]

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"
DEVICE = "device"


@dataclass(frozen=True, eq=False)
class NodeData:
    """A node's training data and the data it evaluates the global model on."""

    # float32 features, or integer codes for text (shakespeare).
    x_train: npt.NDArray[Any]
    y_train: npt.NDArray[np.int64]
    x_eval: npt.NDArray[Any]
    y_eval: npt.NDArray[np.int64]
    source: str


def node_device_name(settings: RunSettings, node_config: Mapping[str, Any]) -> str:
    """Return the device a node trains on: its own ``device``, else the run's."""
    value = node_config.get(DEVICE, settings.device)
    if not isinstance(value, str):
        raise ConfigError(f"node config {DEVICE}: expected a string, got {value!r}")
    return value


def node_data(settings: RunSettings, node_config: Mapping[str, Any]) -> NodeData:
    """Return the data of the node described by ``node_config``.

    A demo partition evaluates on the same share of the test split (an iid split
    of it); a device with its own data evaluates on all of it.
    """
    path = node_config.get(DATA_PATH)
    if path:
        if not isinstance(path, str):
            raise ConfigError(f"node config {DATA_PATH}: expected a path string, got {path!r}")
        x, y = load_local_data(path, settings.label_column)
        return NodeData(x, y, x, y, source=path)
    if PARTITION_ID not in node_config or NUM_PARTITIONS not in node_config:
        raise ConfigError(
            f"node config: expected {DATA_PATH}, or both {PARTITION_ID} and "
            f"{NUM_PARTITIONS}; got {dict(node_config) or 'nothing'}"
        )
    pid, count = node_config[PARTITION_ID], node_config[NUM_PARTITIONS]
    if not (_is_int(pid) and _is_int(count) and 0 <= pid < count):
        raise ConfigError(
            f"node config: expected integers 0 <= {PARTITION_ID} < {NUM_PARTITIONS}, "
            f"got {PARTITION_ID}={pid!r}, {NUM_PARTITIONS}={count!r}"
        )
    if has_natural_clients(settings.dataset):
        return _natural_node_data(settings, pid, count)
    dataset = load_dataset(
        settings.dataset,
        seed=settings.seed,
        test_fraction=settings.test_fraction,
        label_column=settings.label_column,
    )
    train_parts, eval_parts = _partitions(settings, int(count))
    tr, ev = train_parts[pid], eval_parts[pid]
    return NodeData(
        dataset.x_train[tr],
        dataset.y_train[tr],
        dataset.x_test[ev],
        dataset.y_test[ev],
        source=f"{settings.dataset} partition {pid}/{count} ({settings.partition})",
    )


def has_natural_clients(spec: str) -> bool:
    """Return whether dataset ``spec`` comes as clients (synthetic, shakespeare), not partitions."""
    from .shakespeare import SHAKESPEARE
    from .synthetic import is_synthetic_spec

    return is_synthetic_spec(spec) or spec == SHAKESPEARE


def natural_provider(settings: RunSettings) -> ClientDataProvider:
    """Return the data provider of a dataset with natural clients, once per process."""
    if not has_natural_clients(settings.dataset):
        raise ConfigError(
            f"dataset: expected one with natural clients (synthetic:<alpha>,<beta> or "
            f"shakespeare), got {settings.dataset!r}"
        )
    return _provider(settings.dataset, settings.seed)


@lru_cache(maxsize=4)
def _provider(spec: str, seed: int) -> ClientDataProvider:
    from .population import data_provider

    # Natural clients ignore the partition and the federation's size.
    return data_provider(spec, num_clients=1, seed=seed)


def _natural_node_data(settings: RunSettings, client_id: int, num_clients: int) -> NodeData:
    provider = natural_provider(settings)
    limit = provider.max_clients
    if limit is not None and num_clients > limit:
        raise ConfigError(
            f"clients: expected at most {limit} for dataset {settings.dataset!r} (it has that "
            f"many natural clients), got {num_clients}"
        )
    key = (settings.dataset, settings.seed, client_id)
    cached = _CLIENT_CACHE.get(key)
    if cached is not None:
        return cached
    data = provider.client_data(client_id)
    built = NodeData(
        data.x_train,
        data.y_train,
        data.x_test,
        data.y_test,
        source=f"{settings.dataset} client {client_id}",
    )
    _CLIENT_CACHE.put(key, built)
    return built


class _ByteBoundedCache:
    """The most recently used clients' data, up to a total number of bytes."""

    def __init__(self, max_bytes: int):
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[tuple[str, int, int], tuple[NodeData, int]] = OrderedDict()
        self._lock = threading.Lock()  # the Ray engine runs ClientApps on threads too

    def get(self, key: tuple[str, int, int]) -> NodeData | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: tuple[str, int, int], data: NodeData) -> None:
        size = sum(a.nbytes for a in (data.x_train, data.y_train, data.x_eval, data.y_eval))
        if size > self._max_bytes:
            return  # one client bigger than the whole cache: rebuilt when needed
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (data, size)
            self._bytes += size
            while self._bytes > self._max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


# 64 MiB: a few hundred typical synthetic clients; a round's clients are
# rebuilt on demand beyond that (building one costs about what training it does).
_CLIENT_CACHE = _ByteBoundedCache(64 << 20)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@lru_cache(maxsize=4)
def _partitions(
    settings: RunSettings, num_partitions: int
) -> tuple[list[npt.NDArray[np.int64]], list[npt.NDArray[np.int64]]]:
    dataset = load_dataset(
        settings.dataset,
        seed=settings.seed,
        test_fraction=settings.test_fraction,
        label_column=settings.label_column,
    )
    train = partition_indices(
        dataset.y_train,
        num_partitions,
        settings.partition,
        settings.seed,
        allow_duplicates=settings.allow_duplicate_samples,
    )
    # Evaluation shares: an iid split of the test set; with more nodes than test
    # samples they share samples (evaluation only reads them).
    evaluation = partition_indices(
        dataset.y_test,
        num_partitions,
        "iid",
        settings.seed,
        allow_duplicates=True,
    )
    return train, evaluation
