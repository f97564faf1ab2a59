"""Which data a node trains and evaluates on, from its Flower ``node_config``.

A node either holds one partition of a demo federation (``partition-id`` and
``num-partitions``, as Flower's simulation and ``fedscale edge-client --partition``
set them), or its own data (``data-path``: an ``.npz`` or ``.csv`` file on the
device). Partitions are computed once per process and shared by every virtual
client in it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from .datasets import load_dataset, load_local_data
from .exceptions import ConfigError
from .partition import partition_indices
from .settings import RunSettings

__all__ = ["NodeData", "node_data", "node_device_name"]

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"
DEVICE = "device"


@dataclass(frozen=True, eq=False)
class NodeData:
    """A node's training data and the data it evaluates the global model on."""

    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    x_eval: npt.NDArray[np.float32]
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
