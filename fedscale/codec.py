"""The bytes of a Flower ``Array``, written and read fast, identical to numpy's.

Flower stores every array as the output of ``np.save`` and reads it back with
``np.load``, which parses each header with ``ast.literal_eval``. For a small
model that costs more than training it (about 50 us an array, read and write).
These functions produce and accept exactly the same bytes: the header of each
(dtype, shape) is made once by ``np.save`` itself and reused, and each distinct
header is parsed once. Anything off the fast path (Fortran order, views that are
not contiguous, structured dtypes) goes through numpy as before.
"""

from __future__ import annotations

import ast
import io
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["decode", "dtype_name", "encode", "npy_header", "view"]

_MAGIC = b"\x93NUMPY"
_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}
_PARSED: dict[bytes, tuple[np.dtype[Any], bool, tuple[int, ...], int]] = {}
_DTYPE_NAMES: dict[np.dtype[Any], str] = {}
_CACHE_LIMIT = 4096  # distinct shapes kept; a model has a few dozen


def dtype_name(dtype: np.dtype[Any]) -> str:
    """Return ``str(dtype)`` (what Flower's ``Array`` records), remembered per dtype.

    numpy builds the name anew on every call, which costs more than encoding a
    small array; a federation uses a handful of dtypes.
    """
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = str(dtype)
        if len(_DTYPE_NAMES) < _CACHE_LIMIT:
            _DTYPE_NAMES[dtype] = name
    return name


def encode(array: npt.NDArray[Any]) -> bytes:
    """Return ``np.save(array)``'s bytes (no pickling)."""
    if not array.flags.c_contiguous or array.dtype.hasobject or array.dtype.names:
        return _np_save(array)
    return npy_header(array.dtype, array.shape) + array.tobytes()


def npy_header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    """Return the ``.npy`` header ``np.save`` writes for a C-ordered ``dtype`` array of ``shape``.

    Followed by the array's raw bytes, it makes the same bytes as :func:`encode`;
    made once per (dtype, shape) by ``np.save`` itself. Not for object or
    structured dtypes (:func:`encode` sends those to numpy).
    """
    key = (dtype.str, shape)
    header = _HEADERS.get(key)
    if header is None:
        empty = np.zeros(shape, dtype=dtype)
        full = _np_save(empty)
        header = full[: len(full) - empty.nbytes]
        if len(_HEADERS) < _CACHE_LIMIT:
            _HEADERS[key] = header
    return header


def decode(data: bytes) -> npt.NDArray[Any]:
    """Return ``np.load(data)`` for ``.npy`` bytes: a new, writable array."""
    return view(data).copy(order="K")


def view(data: bytes) -> npt.NDArray[Any]:
    """Return the array ``.npy`` bytes hold, as a read-only view of ``data`` where it can.

    For checking values without copying them (the server screens every reply).
    Raises ``ValueError`` on bytes that are not ``.npy`` or that are too short.
    """
    if data[:6] != _MAGIC:
        raise ValueError(f"expected .npy bytes starting with {_MAGIC!r}, got {data[:6]!r}")
    major = data[6]
    size_bytes = 2 if major == 1 else 4
    start = 8 + size_bytes
    end = start + int.from_bytes(data[8:start], "little")
    header = data[start:end]
    parsed = _PARSED.get(header)
    if parsed is None:
        parsed = _parse_header(header)
        if parsed is None:
            return np.load(io.BytesIO(data), allow_pickle=False)  # type: ignore[no-any-return]
        if len(_PARSED) < _CACHE_LIMIT:
            _PARSED[header] = parsed
    dtype, fortran, shape, count = parsed
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    return flat.reshape(shape, order="F" if fortran else "C")


def _parse_header(header: bytes) -> tuple[np.dtype[Any], bool, tuple[int, ...], int] | None:
    # The same safe literal parse numpy uses, once per distinct header.
    fields = ast.literal_eval(header.decode("latin1"))
    descr = fields.get("descr") if isinstance(fields, dict) else None
    if not isinstance(descr, str):
        return None  # structured dtypes: leave them to numpy
    dtype = np.dtype(descr)
    if dtype.hasobject:
        raise ValueError("expected an array without Python objects (no pickling), got one")
    shape = tuple(int(d) for d in fields["shape"])
    return dtype, bool(fields["fortran_order"]), shape, int(np.prod(shape, dtype=np.int64))


def _np_save(array: npt.NDArray[Any]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
