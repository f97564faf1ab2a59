"""Exact conversions between torch state dicts and Flower ``ArrayRecord``.

Flower serialises each array with ``np.save``, so a round trip is exact for every
dtype numpy has. Tensors numpy cannot hold (bfloat16, float8) are refused with a
clear error instead of being cast silently.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord
from torch import nn

from .exceptions import RecordError

__all__ = ["arrays_to_state_dict", "load_arrays_into", "state_dict_to_arrays"]

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
    return ArrayRecord(OrderedDict(state_dict))


def arrays_to_state_dict(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """Turn an ``ArrayRecord`` back into a state dict of CPU tensors."""
    return OrderedDict((key, torch.from_numpy(array.numpy())) for key, array in record.items())


def load_arrays_into(model: nn.Module, record: ArrayRecord) -> None:
    """Load ``record`` into ``model``, refusing any name, shape or dtype mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in record]
    extra = [k for k in record if k not in expected]
    if missing or extra:
        raise RecordError(
            f"arrays: expected the model's {len(expected)} entries; "
            f"missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    state = arrays_to_state_dict(record)
    for key, tensor in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(tensor.shape) or got.dtype != tensor.dtype:
            raise RecordError(
                f"arrays[{key!r}]: expected shape {tuple(tensor.shape)} and dtype "
                f"{tensor.dtype}, got shape {tuple(got.shape)} and dtype {got.dtype}"
            )
    model.load_state_dict(state)
