"""The one adapter to the Flower internals the simulation engines lean on.

Flower's runtimes do a few things that no public API exposes: they set the
process-wide task identity that ``Message(...)`` reads when a strategy builds an
instruction, they write a message id into a message's read-only metadata, and
they describe a run with a ``Run`` record. Everything of that kind lives here, so
a Flower upgrade (pinned ``~=1.42.0``) touches this file only.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message import make_message
from flwr.app.message.recorddict import _check_key, _SyncedDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode, SType
from flwr.common.serde import (
    config_record_from_proto,
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    metric_record_from_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.common.serde_utils import metadata_from_proto, metadata_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.message_pb2 import Metadata as ProtoMetadata
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from numpy.typing import NDArray

from fedscale.codec import decode, dtype_name, encode
from fedscale.records import array_from_fields

__all__ = [
    "CLIENT_APP_CRASHED",
    "CLIENT_APP_RAISED_EXCEPTION",
    "NODE_UNAVAILABLE",
    "SERVER_NODE_ID",
    "copy_message_for_delivery",
    "copy_record_dict",
    "decode_context",
    "decode_delivered",
    "decode_message",
    "decode_records",
    "encode_context",
    "encode_message",
    "encode_metadata",
    "encode_records",
    "error_reply",
    "fast_array_codec",
    "fast_record_views",
    "make_run",
    "new_run_id",
    "server_context",
    "server_task_identity",
    "set_message_id",
]

# Node id of the server side (Flower's SuperLink). 0 means "unset", so virtual
# client nodes start above both.
SERVER_NODE_ID = SUPERLINK_NODE_ID
FIRST_CLIENT_NODE_ID = SUPERLINK_NODE_ID + 1
CLIENT_APP_RAISED_EXCEPTION = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
# What a SuperNode replies when its ClientApp process stops responding.
CLIENT_APP_CRASHED = ErrorCode.CLIENT_APP_CRASHED
NODE_UNAVAILABLE = ErrorCode.NODE_UNAVAILABLE
_SERVER_TASK_ID = 1


def new_run_id() -> int:
    """Draw a random 63-bit run id, as Flower's SuperLink does."""
    return secrets.randbits(63) or 1


def server_context(run_id: int, run_config: Mapping[str, Any]) -> Context:
    """Build the ``Context`` a ServerApp receives, as Flower's simulation does."""
    return Context(
        run_id=run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config),
    )


def make_run(run_id: int, override_config: dict[str, Any] | None = None) -> Run:
    """Describe a run that no SuperLink registered with a ``Run`` record."""
    run = Run.create_empty(run_id=run_id)
    run.override_config = dict(override_config or {})
    run.primary_task_id = _SERVER_TASK_ID
    # Flower's simulation registers its nodes under its no-op federation.
    run.federation_id = NOOP_FEDERATION_ID
    return run


@contextmanager
def server_task_identity(run_id: int) -> Iterator[None]:
    """Act as the server task of ``run_id`` while the block runs.

    ``Message(content, dst_node_id, message_type)`` reads the run, node and task
    ids from Flower's process-wide ``TaskIdentity``; Flower's runtimes set it
    before they start a ServerApp, and so must ours. The previous identity is put
    back afterwards.
    """
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SERVER_NODE_ID
    TaskIdentity.task_id = _SERVER_TASK_ID
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def set_message_id(message: Message, message_id: str) -> None:
    """Give a message its id, as the SuperLink does when it stores one.

    ``Metadata.message_id`` is read-only; Flower's own in-memory grid writes the
    field directly (flwr/superlink/grid/inmemory_grid.py), and so do we.
    """
    message.metadata.__dict__["_message_id"] = message_id


def copy_metadata(metadata: Metadata) -> Metadata:
    """Return an independent copy of a message's metadata."""
    clone = Metadata.__new__(Metadata)
    clone.__dict__.update(metadata.__dict__)
    return clone


def copy_message_for_delivery(message: Message) -> Message:
    """Return what a node receives: a copy no other node's edits can reach.

    Flower serialises each message per destination; a strategy hands the same
    ``RecordDict`` to every node, so passing the object itself would let one
    node's in-place edit leak into another's. Array bytes are immutable and are
    shared, not copied.
    """
    # `metadata=` is the constructor's internal form (not in its public
    # overloads), the one Flower uses when it inflates a received message.
    delivered: Message = Message(  # type: ignore[call-overload]
        content=copy_record_dict(message.content), metadata=copy_metadata(message.metadata)
    )
    return delivered


def copy_record_dict(records: RecordDict) -> RecordDict:
    """Copy a ``RecordDict`` down to its values; array bytes are shared.

    The copy skips the type checks of ``RecordDict.__setitem__`` (their cost is
    most of a small message's delivery): what is copied was checked when it was
    built. It relies on Flower's records keeping their items in ``_data``.
    """
    clone: RecordDict = _shallow(records)
    clone.__dict__["_data"] = {key: _copy_record(rec) for key, rec in records.items()}
    return clone


def _copy_record(record: Any) -> ArrayRecord | MetricRecord | ConfigRecord:
    clone = _shallow(record)
    if isinstance(record, ArrayRecord):
        clone.__dict__["_data"] = {key: _shallow(array) for key, array in record.items()}
    else:
        clone.__dict__["_data"] = {
            key: list(value) if isinstance(value, list) else value for key, value in record.items()
        }
    return clone  # type: ignore[no-any-return]


def _shallow(obj: Any) -> Any:
    clone = object.__new__(type(obj))
    clone.__dict__.update(obj.__dict__)
    return clone


@contextmanager
def fast_array_codec() -> Iterator[None]:
    """Let Flower's ``Array`` encode and decode with :mod:`fedscale.codec` meanwhile.

    The bytes and arrays are exactly those of ``np.save``/``np.load`` (the codec's
    tests check it), so every app and strategy behaves the same, only faster: on
    a small model Flower's own codec costs more than a client's training. The
    original methods are put back afterwards.
    """
    original_numpy = Array.numpy
    original_from_numpy = Array.__dict__["from_numpy_ndarray"]

    def numpy(self: Array) -> NDArray[Any]:
        if self.stype != SType.NUMPY:
            raise TypeError(f"Unsupported serialization type for numpy conversion: '{self.stype}'")
        return decode(self.data)

    def from_numpy_ndarray(cls: type[Array], ndarray: NDArray[Any]) -> Array:
        if not isinstance(ndarray, np.ndarray):
            raise TypeError(f"Expected NumPy ndarray, got {type(ndarray)}")
        return cls(
            dtype=dtype_name(ndarray.dtype),
            shape=tuple(ndarray.shape),
            stype=SType.NUMPY,
            data=encode(ndarray),
        )

    Array.numpy = numpy  # type: ignore[method-assign]
    Array.from_numpy_ndarray = classmethod(from_numpy_ndarray)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        Array.numpy = original_numpy  # type: ignore[method-assign]
        Array.from_numpy_ndarray = original_from_numpy  # type: ignore[method-assign]


@contextmanager
def fast_record_views() -> Iterator[None]:
    """Let ``RecordDict.array_records``/``metric_records``/``config_records`` build faster.

    Flower builds each view by setting every matching record into a new
    ``_SyncedDict``, whose ``__setitem__`` type-checks it and sets it back into
    the ``RecordDict`` (the same key, the same object: a no-op). Its strategies
    read these views several times per reply, which for a round of small
    replies costs more than averaging them. These build the same ``_SyncedDict``
    (same class, items, order and write-through) by filling it directly; the
    records were type-checked when they entered the ``RecordDict``. The
    original properties are put back afterwards.
    """
    originals = {name: RecordDict.__dict__[name] for name in _RECORD_VIEWS}

    def view(name: str, kind: type[Any]) -> property:
        def build(self: RecordDict) -> _SyncedDict[Any]:
            synced = _SyncedDict.__new__(_SyncedDict)
            state = synced.__dict__
            state["_check_key_fn"] = _check_key
            state["_check_value_fn"] = synced.check_value
            # Exact types first: isinstance on Flower's records goes through ABCMeta.
            state["_data"] = {
                k: r
                for k, r in self.__dict__["_data"].items()
                if type(r) is kind or (type(r) not in _RECORD_TYPES and isinstance(r, kind))
            }
            state["recorddict"] = self
            state["allowed_type"] = kind
            return synced

        return property(build, doc=originals[name].__doc__)

    for name, kind in _RECORD_VIEWS.items():
        setattr(RecordDict, name, view(name, kind))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(RecordDict, name, original)


_RECORD_VIEWS: dict[str, type[Any]] = {
    "array_records": ArrayRecord,
    "metric_records": MetricRecord,
    "config_records": ConfigRecord,
}
_RECORD_TYPES = frozenset(_RECORD_VIEWS.values())


def error_reply(message: Message, code: int, reason: str) -> Message:
    """Reply to ``message`` with an ``Error`` instead of content."""
    return Message(Error(code=code, reason=reason), reply_to=message)


# Flower's own wire form (its protobuf serde) for what crosses a process boundary:
# worker processes (.workers) receive messages and contexts, and send replies and
# contexts back, as the bytes Flower's SuperLink and SuperNodes exchange, never as
# pickles. A message's metadata and content travel apart, so that the content a
# round's messages share is encoded once.


def encode_message(message: Message) -> bytes:
    """Encode a whole message (metadata, and content or error) in Flower's wire form."""
    return bytes(message_to_proto(message).SerializeToString())


def decode_message(data: bytes) -> Message:
    """Decode what :func:`encode_message` encoded."""
    proto = ProtoMessage.FromString(data)
    if proto.HasField("error") or not proto.HasField("content"):
        return message_from_proto(proto)
    return make_message(
        metadata=metadata_from_proto(proto.metadata),
        content=_records_from_proto(proto.content),
        error=None,
    )


def encode_metadata(message: Message) -> bytes:
    """Encode a message's metadata alone in Flower's wire form."""
    return bytes(metadata_to_proto(message.metadata).SerializeToString())


def decode_delivered(metadata: bytes, content: RecordDict) -> Message:
    """Rebuild a message from its encoded metadata and its (decoded) content."""
    delivered: Message = Message(  # type: ignore[call-overload]
        content=content, metadata=metadata_from_proto(ProtoMetadata.FromString(metadata))
    )
    return delivered


def encode_records(records: RecordDict) -> bytes:
    """Encode a ``RecordDict`` in Flower's wire form."""
    return bytes(recorddict_to_proto(records).SerializeToString())


def decode_records(data: bytes) -> RecordDict:
    """Decode what :func:`encode_records` encoded."""
    return _records_from_proto(ProtoRecordDict.FromString(data))


def _records_from_proto(proto: ProtoRecordDict) -> RecordDict:
    """Flower's ``recorddict_from_proto``, its arrays built without per-field parsing.

    Flower builds every ``Array`` twice through its argument-parsing constructor
    and sets each record through a checked ``__setitem__``: for a reply of a few
    arrays that is most of decoding it (about 60 us of a synthetic reply, in the
    parent, for each of a round's thousand replies). The arrays here are the
    same objects (tests/simulations/test_flower_adapter.py compares them, object
    ids included); metric and config records, and anything unexpected, go
    through Flower's own functions.
    """
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {}
    for item in proto.items:
        field = item.WhichOneof("value")
        if field == "array_record":
            records[item.key] = _array_record_from_proto(item.array_record)
        elif field == "metric_record":
            records[item.key] = metric_record_from_proto(item.metric_record)
        elif field == "config_record":
            records[item.key] = config_record_from_proto(item.config_record)
        else:
            return recorddict_from_proto(proto)  # Flower's error for it
    content = RecordDict()
    content.__dict__["_data"] = records
    return content


def _array_record_from_proto(proto: Any) -> ArrayRecord:
    record = ArrayRecord()
    items = record.__dict__["_data"]
    for item in proto.items:
        value = item.value
        items[item.key] = array_from_fields(
            value.dtype, tuple(value.shape), value.stype, value.data
        )
    return record


def encode_context(context: Context) -> bytes:
    """Encode a node's ``Context`` (its state, node and run config) in Flower's wire form."""
    return bytes(context_to_proto(context).SerializeToString())


def decode_context(data: bytes) -> Context:
    """Decode what :func:`encode_context` encoded."""
    return context_from_proto(ProtoContext.FromString(data))
