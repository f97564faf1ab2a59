"""Exact conversions between torch state dicts and Flower ``ArrayRecord``.

Flower serialises each array in the ``.npy`` format, so a round trip is exact for
every dtype numpy has; :mod:`fedscale.codec` writes and reads the same bytes
faster than Flower's own ``Array`` methods. Tensors numpy cannot hold (bfloat16,
float8) are refused with a clear error instead of being cast silently.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType
from torch import nn

from .codec import decode, encode
from .exceptions import RecordError

__all__ = [
    "arrays_to_state_dict",
    "conform_dtypes",
    "load_arrays_into",
    "state_dict_to_arrays",
]

_NUMPY_LESS_DTYPES = {
    torch.bfloat16,
    *(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)),
}


def state_dict_to_arrays(state_dict: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Turn a state dict into an ``ArrayRecord`` with the same keys, in order."""
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise RecordError(
                f"state dict entry {key!r}: expected a torch.Tensor, got {type(tensor).__name__}"
            )
        if tensor.dtype in _NUMPY_LESS_DTYPES:
            raise RecordError(
                f"state dict entry {key!r}: expected a dtype numpy can hold, got "
                f"{tensor.dtype}; cast the model (e.g. model.float()) before sending"
            )
    record = ArrayRecord()
    items = record.__dict__["_data"]
    for key, tensor in state_dict.items():
        items[key] = _array(tensor.detach().cpu().numpy())
    return record


def _array(array: npt.NDArray[Any]) -> Array:
    # The same object as Array(dtype=..., shape=..., stype=..., data=...) and an
    # ArrayRecord filled through its checked __setitem__, built without the
    # argument parsing and per-item checks that cost more than a small model's
    # encoding; the inputs are a state dict's str keys and numpy arrays.
    # tests/fedscale/test_records.py compares it with the public constructors.
    out: Array = object.__new__(Array)
    out.__dict__.update(
        dtype=str(array.dtype), shape=tuple(array.shape), stype=SType.NUMPY, data=encode(array)
    )
    return out


def arrays_to_state_dict(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """Turn an ``ArrayRecord`` back into a state dict of CPU tensors."""
    return OrderedDict((key, torch.from_numpy(_to_numpy(array))) for key, array in record.items())


def _to_numpy(array: Array) -> npt.NDArray[Any]:
    if array.stype != SType.NUMPY:
        raise RecordError(f"array: expected stype {SType.NUMPY!r}, got {array.stype!r}")
    return decode(array.data)


def load_arrays_into(model: nn.Module, record: ArrayRecord) -> None:
    """Load ``record`` into ``model``, refusing any name, shape or dtype mismatch.

    Copies into the model's own parameters and buffers in place (what
    ``load_state_dict`` does, without its second walk over the module tree).
    """
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in record]
    extra = [k for k in record if k not in expected]
    if missing or extra:
        raise RecordError(
            f"arrays: expected the model's {len(expected)} entries; "
            f"missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    incoming = arrays_to_state_dict(record)
    for key, target in expected.items():
        got = incoming[key]
        if tuple(got.shape) != tuple(target.shape) or got.dtype != target.dtype:
            raise RecordError(
                f"arrays[{key!r}]: expected shape {tuple(target.shape)} and dtype "
                f"{target.dtype}, got shape {tuple(got.shape)} and dtype {got.dtype}"
            )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(incoming[key])


def conform_dtypes(aggregated: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """Give each aggregated array the dtype it had in ``reference``.

    Flower's averaging strategies compute ``array * weight`` in floating point, so
    an integer or boolean entry (BatchNorm's ``num_batches_tracked``, a step
    counter, a mask) comes back as float64 and no longer loads into the model.
    Such entries are rounded and cast back; floating entries are cast to their
    original precision.
    """
    out = {}
    for key, array in aggregated.items():
        want = reference[key].dtype if key in reference else array.dtype
        if array.dtype == want:
            out[key] = array
            continue
        values = _to_numpy(array)
        target = np.dtype(want)
        if target.kind in "biu":
            values = np.rint(values)
        out[key] = _array(values.astype(target))
    return ArrayRecord(out)
