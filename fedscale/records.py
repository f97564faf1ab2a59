"""Exact conversions between torch state dicts and Flower ``ArrayRecord``.

Flower serialises each array in the ``.npy`` format, so a round trip is exact for
every dtype numpy has; :mod:`fedscale.codec` writes and reads the same bytes
faster than Flower's own ``Array`` methods. Tensors numpy cannot hold (bfloat16,
float8) are refused with a clear error instead of being cast silently.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.common.constant import SType
from torch import nn

from .codec import decode, dtype_name, encode, npy_header
from .exceptions import RecordError

__all__ = [
    "array_from_fields",
    "arrays_to_state_dict",
    "conform_dtypes",
    "load_arrays_into",
    "serialized_bytes",
    "serialized_size",
    "stacked_to_arrays",
    "state_dict_to_arrays",
    "train_reply_content",
]

_NUMPY_LESS_DTYPES = {
    torch.bfloat16,
    *(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)),
}


def state_dict_to_arrays(state_dict: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Turn a state dict into an ``ArrayRecord`` with the same keys, in order."""
    _check_tensors(state_dict)
    record = ArrayRecord()
    items = record.__dict__["_data"]
    for key, tensor in state_dict.items():
        items[key] = _array(tensor.detach().cpu().numpy())
    return record


def stacked_to_arrays(stacked: Mapping[str, torch.Tensor]) -> list[ArrayRecord]:
    """Return one ``ArrayRecord`` per row of tensors stacked along their first dimension.

    Record ``i`` equals ``state_dict_to_arrays({k: t[i] for k, t in stacked.items()})``
    (tests/fedscale/test_records.py checks it), built from one host copy of each
    stack: a cohort's replies, without a per-client pass through numpy. With no
    tensors there are no rows to count: the result is empty.
    """
    _check_tensors(stacked)
    rows: int | None = None
    arrays: list[npt.NDArray[Any]] = []
    for key, tensor in stacked.items():
        if tensor.dim() < 1 or (rows is not None and tensor.shape[0] != rows):
            raise RecordError(
                f"stacked entry {key!r}: expected a tensor of {rows if rows is not None else 'n'} "
                f"rows, got shape {tuple(tensor.shape)}"
            )
        rows = tensor.shape[0]
        arrays.append(tensor.detach().cpu().numpy())
    # A C-contiguous stack's rows are consecutive slices of its bytes, each behind
    # the header np.save writes for a row; other stacks encode row by row (a row
    # that is not C-ordered may be saved in Fortran order, as state_dict_to_arrays
    # would save it).
    columns: list[tuple[str, npt.NDArray[Any], str, bytes, memoryview | None, int]] = []
    for key, array in zip(stacked, arrays, strict=True):
        shape = tuple(array.shape[1:])
        if array.flags.c_contiguous and not array.dtype.hasobject:
            flat = memoryview(array.reshape(-1)).cast("B")  # type: ignore[arg-type]
            header = npy_header(array.dtype, shape)
            columns.append((key, array, dtype_name(array.dtype), header, flat, array[:1].nbytes))
        else:
            columns.append((key, array, "", b"", None, 0))
    records = []
    for i in range(rows or 0):
        record = ArrayRecord()
        items = record.__dict__["_data"]
        for key, array, dtype, header, row_bytes, size in columns:
            if row_bytes is None:
                items[key] = _array(array[i])
            else:
                data = header + row_bytes[i * size : (i + 1) * size]
                items[key] = array_from_fields(dtype, array.shape[1:], SType.NUMPY, data)
        records.append(record)
    return records


def _check_tensors(tensors: Mapping[str, torch.Tensor]) -> None:
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise RecordError(
                f"state dict entry {key!r}: expected a torch.Tensor, got {type(tensor).__name__}"
            )
        if tensor.dtype in _NUMPY_LESS_DTYPES:
            raise RecordError(
                f"state dict entry {key!r}: expected a dtype numpy can hold, got "
                f"{tensor.dtype}; cast the model (e.g. model.float()) before sending"
            )


def train_reply_content(arrays: ArrayRecord, num_examples: int, loss: float) -> RecordDict:
    """Return a training reply's content: the trained ``arrays`` and their metrics.

    The same object as ``RecordDict({"arrays": arrays, "metrics":
    MetricRecord({"num-examples": num_examples, "train-loss": loss})})``, built
    without the per-item checks (an ``ArrayRecord``, an ``int`` and a ``float``
    pass them by their types): a cohort's hundred replies a round are built here.
    Other values go through the checked constructors and their errors.
    """
    if type(num_examples) is not int or type(loss) is not float or type(arrays) is not ArrayRecord:
        return RecordDict(
            {
                "arrays": arrays,
                "metrics": MetricRecord({"num-examples": num_examples, "train-loss": loss}),
            }
        )
    metrics = MetricRecord()
    metrics.__dict__["_data"] = {"num-examples": num_examples, "train-loss": loss}
    content = RecordDict()
    content.__dict__["_data"] = {"arrays": arrays, "metrics": metrics}
    return content


def _array(array: npt.NDArray[Any]) -> Array:
    return array_from_fields(
        dtype_name(array.dtype), tuple(array.shape), SType.NUMPY, encode(array)
    )


def array_from_fields(dtype: str, shape: tuple[int, ...], stype: str, data: bytes) -> Array:
    """Return ``Array(dtype=dtype, shape=shape, stype=stype, data=data)``, unchecked.

    The same object, built without the argument parsing and per-field checks
    that cost more than a small model's encoding; for fields known to be right
    (encoded here, or read from Flower's own wire form).
    tests/fedscale/test_records.py and tests/simulations/test_flower_adapter.py
    compare the results with Flower's constructors and serde.
    """
    out: Array = object.__new__(Array)
    out.__dict__.update(dtype=dtype, shape=shape, stype=stype, data=data)
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


# serialized_size's memo: message shape -> bytes. Bounded; a federation has few shapes.
_SIZES: dict[tuple[Any, ...], int] = {}
# The metadata's part of it: metadata layout -> bytes of the message without content.
_BODIES: dict[tuple[Any, ...], int] = {}
_MAX_SIZES = 4096


def serialized_size(message: Message) -> int:
    """Return the bytes Flower sends for ``message``: every object of its tree, deflated.

    That is what crosses the network between a SuperLink and a SuperNode (the
    message, its RecordDict, records, arrays and array chunks, each with its
    header). Deflating a message hashes every array chunk, which would cost an
    in-process simulation more than training a small client; but the size
    depends only on the message's shape: array names, dtypes, shapes and byte
    lengths, the other records' own encodings, the metadata's encoding (object
    ids and array chunk boundaries have fixed lengths). So the size is computed
    with Flower's own ``deflate`` once per shape and remembered; a test checks
    it against the full computation on varied messages.
    """
    return serialized_bytes([message])


def serialized_bytes(messages: Iterable[Message]) -> int:
    """Return the bytes Flower sends for all of ``messages`` (see :func:`serialized_size`).

    Messages that share one content object (a round's train messages all carry
    the same global model) have its shape read once.
    """
    from flwr.common.serde_utils import error_to_proto, metadata_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    total = 0
    content_shapes: dict[int, tuple[Any, ...]] = {}
    for message in messages:
        error = error_to_proto(message.error) if message.has_error() else None
        layout = None if error is not None else _metadata_layout(message.metadata)
        body = _BODIES.get(layout) if layout is not None else None
        if body is None:
            proto_metadata = metadata_to_proto(message.metadata)
            proto_metadata.message_id = ""  # as Message.deflate: the id is not serialized
            body = ProtoMessage(metadata=proto_metadata, content=None, error=error).ByteSize()
            if layout is not None:
                if len(_BODIES) >= _MAX_SIZES:
                    _BODIES.clear()
                _BODIES[layout] = body
        content: tuple[Any, ...] = ()
        if message.has_content():
            content = content_shapes.get(id(message.content), ())
            if not content:
                content = _content_shape(message.content)
                content_shapes[id(message.content)] = content
        key = (body, content)
        size = _SIZES.get(key)
        if size is None:
            size = sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
            if len(_SIZES) >= _MAX_SIZES:
                _SIZES.clear()
            _SIZES[key] = size
        total += size
    return total


def _metadata_layout(metadata: Metadata) -> tuple[Any, ...]:
    """Return what the size of a message's metadata, serialized, depends on.

    Protobuf writes each integer as a varint (its length set by its bit length),
    each string as its length and bytes, and leaves out fields at their default
    (0, "", +0.0); the message id is not serialized. Two metadata with the same
    layout serialize to the same number of bytes, so the size is computed once
    per layout (a round's messages share one or a few).
    """
    return (
        metadata.run_id.bit_length(),
        metadata.src_node_id.bit_length(),
        metadata.dst_node_id.bit_length(),
        len(metadata.reply_to_message_id.encode()),
        len(metadata.group_id.encode()),
        len(metadata.message_type.encode()),
        _double_layout(metadata.ttl),
        _double_layout(metadata.created_at),
        metadata.src_task_id,
        metadata.dst_task_id,
    )


def _double_layout(value: float) -> tuple[bool, float]:
    # +0.0 is the default and left out; -0.0, NaN and the rest take 9 bytes.
    return value == 0.0, math.copysign(1.0, value)


def _content_shape(content: RecordDict) -> tuple[Any, ...]:
    shape: list[Any] = []
    arrays: list[Array] = []
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            shape.append(
                (
                    name,
                    "arrays",
                    tuple(
                        (k, a.dtype, tuple(a.shape), a.stype, len(a.data))
                        for k, a in record.items()
                    ),
                )
            )
            arrays.extend(record.values())
        else:  # metric and config records have no children: deflating them is cheap
            shape.append((name, type(record).__name__, len(record.deflate())))
    return ("content", *shape, _duplicate_chunks(arrays))


def _duplicate_chunks(arrays: list[Array]) -> tuple[int, ...]:
    """Return which array chunks of a message hold the same bytes (Flower ships those once).

    Flower names every object by the hash of its bytes, so equal chunks (two
    zero biases of one size, a large array of zeros) are one object. Only chunks
    of equal length can be equal: only those are compared.
    """
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE as CHUNK

    chunks = [
        memoryview(a.data)[start : start + CHUNK]
        for a in arrays
        for start in range(0, len(a.data), CHUNK)
    ]
    by_length: dict[int, list[int]] = {}
    for i, chunk in enumerate(chunks):
        by_length.setdefault(len(chunk), []).append(i)
    labels = list(range(len(chunks)))
    for members in by_length.values():
        if len(members) > 1:
            first: dict[bytes, int] = {}
            for i in members:
                labels[i] = first.setdefault(bytes(chunks[i]), i)
    return tuple(labels)
