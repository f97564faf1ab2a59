"""Update compression: client updates sent as float16, as int8, or top-k with error feedback.

A run's ``compression`` setting picks how each client's training reply travels to
the server (the global model still travels down whole). What is sent is the
*update*, trained minus received, per tensor:

- ``fp16``: the update as float16, half of float32's bytes; per element a relative
  error of at most ``2**-11`` while values lie in float16's normal range;
- ``int8``: the update as int8 codes with one symmetric scale per tensor,
  ``max|v| / 127``, codes rounded to nearest: a quarter of float32's bytes, an error
  of at most ``scale / 2`` per element;
- ``topk:<fraction>``: per tensor the ``ceil(fraction * size)`` entries of largest
  magnitude, as sorted int32 indices (int64 past 2**31 entries) and their exact
  values. What is not sent stays on the client as a residual and is added to the
  next round's update before selecting (error feedback): over the rounds the server
  receives the sum of the updates minus the last residual. The residual lives in
  the node's ``Context.state`` (:data:`RESIDUAL_RECORD`), which every runtime keeps
  per node and run: Flower's SuperNode (across its ClientApp processes), Flower's
  Ray engine and fedscale's in-process engine.

Only floating-point tensors are compressed; integer and boolean tensors (counters,
masks) travel whole, as they are.

The ClientApp's :func:`compression_mod` encodes: it replaces the reply's
``ArrayRecord`` by the encoded one (arrays of the smaller dtypes) and adds the
``ConfigRecord`` :data:`COMPRESSION_RECORD` naming the scheme, the round of the
global model the update is relative to, and int8's scales. The server's
:func:`decode_replies` decodes, before any other check: each reply becomes a full
``ArrayRecord`` of the global model's names, shapes and dtypes (global plus decoded
update), so the usual screening (:mod:`fedscale.validation`) and every strategy see
what they always see. Decoding trusts nothing: the scheme, the round, every array's
name, dtype, shape and bytes, int8's scales (finite, >= 0), top-k's counts, index
dtype, order and bounds are checked, and a reply that fails is rejected with a
reason naming what was expected and what arrived.

Non-finite updates (a client whose training diverged) are refused by the encoder,
as are fp16 values beyond float16's range (65504): the ClientApp then replies with
an error, counted as a failed client, instead of uploading a useless update. An
all-zero update is legal everywhere: int8 sends scale 0 and zero codes, top-k sends
``k`` zeros (and the residual stays zero).

This module imports Flower only inside functions: :mod:`fedscale.settings` checks
the setting with :func:`check_compression_settings`, and the serve-only install has
no Flower.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from .codec import decode, encode
from .exceptions import ConfigError, RecordError

if TYPE_CHECKING:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp.typing import ClientAppCallable

    from .settings import RunSettings

__all__ = [
    "COMPRESSION_FORMS",
    "COMPRESSION_RECORD",
    "INT8_LEVELS",
    "RESIDUAL_RECORD",
    "Compression",
    "check_compression_settings",
    "compress_reply",
    "compression_mod",
    "decode_fp16",
    "decode_int8",
    "decode_replies",
    "decode_topk",
    "decompress_reply",
    "encode_fp16",
    "encode_int8",
    "encode_topk",
    "topk_count",
    "update_bytes",
]

# The reply's ConfigRecord describing its encoding.
COMPRESSION_RECORD = "compression"
# The node's Context.state entry holding top-k's residual (an ArrayRecord).
RESIDUAL_RECORD = "compression-residual"
COMPRESSION_FORMS = (
    "'' (none), 'fp16', 'int8' or 'topk:<fraction>' with a fraction in (0, 1] (e.g. topk:0.1)"
)
# int8 codes are symmetric, -127..127: -128 would make the scale's zero off-centre.
INT8_LEVELS = 127
FP16_MAX = float(np.finfo(np.float16).max)
# ConfigRecord keys of COMPRESSION_RECORD.
_SCHEME = "scheme"
_BASE_ROUND = "base-round"
_SCALE = "scale:"  # + tensor name: int8's per-tensor scale
# Payload array names of a top-k tensor: name + suffix.
_INDICES = "::indices"
_VALUES = "::values"
# Rejected names quoted in a reason.
_NAMES_SHOWN = 5
# The ClientApp's incoming config key of the round (Flower's strategies set it).
_SERVER_ROUND = "server-round"

Scheme = Literal["fp16", "int8", "topk"]
Array_ = npt.NDArray[Any]


@dataclass(frozen=True)
class Compression:
    """A run's update compression: ``scheme`` and (for top-k) the ``fraction`` kept."""

    scheme: Scheme
    fraction: float = 1.0

    @classmethod
    def parse(cls, text: object) -> Compression | None:
        """Parse a ``compression`` setting; ``None`` for ``''`` (no compression)."""
        if text == "":
            return None
        if text == "fp16" or text == "int8":
            return cls(text)
        if isinstance(text, str) and text.startswith("topk:"):
            value = text.removeprefix("topk:")
            try:
                fraction = float(value) if value == value.strip() else math.nan
            except ValueError:
                fraction = math.nan
            if 0 < fraction <= 1:  # NaN fails this too
                return cls("topk", fraction)
        raise ConfigError(f"compression: expected {COMPRESSION_FORMS}, got {text!r}")

    def __str__(self) -> str:
        """Return the setting's text (``topk:0.1``)."""
        return f"topk:{self.fraction!r}" if self.scheme == "topk" else self.scheme


def check_compression_settings(s: RunSettings) -> None:
    """Check ``compression``, alone and with the run's differential privacy."""
    compression = Compression.parse(s.compression)
    if compression is None:
        return
    if getattr(s, "secagg", False):
        # The server only sees SecAgg+'s masked sum: there is no one update to decode.
        raise ConfigError(
            "compression: expected '' with secagg (SecAgg+ masks and sums the updates "
            f"before the server sees them, so none can be decoded), got {s.compression!r}"
        )
    if s.dp in ("client-fixed", "client-adaptive"):
        # The server's noise is calibrated to the clients' clipping norm; rounding
        # and top-k's error feedback can send an update above that norm.
        raise ConfigError(
            f"compression: expected '' with dp {s.dp!r} (the server's noise is calibrated "
            "to the clipping norm, and a compressed update may exceed it; use dp "
            f"server-fixed, server-adaptive or local with compression), got {s.compression!r}"
        )


# ---------------------------------------------------------------- numpy layer


def encode_fp16(update: Array_, name: str = "update") -> npt.NDArray[np.float16]:
    """Return ``update`` as float16; refuse non-finite values and values beyond 65504."""
    _check_finite(update, name, "fp16")
    peak = float(np.abs(update).max()) if update.size else 0.0
    if peak > FP16_MAX:
        raise RecordError(
            f"{name}: expected update values within float16's range (|v| <= {FP16_MAX:g}) "
            f"for compression fp16, got |v| = {peak:g}"
        )
    return update.astype(np.float16)


def decode_fp16(codes: npt.NDArray[np.float16], dtype: npt.DTypeLike) -> Array_:
    """Return float16 ``codes`` as an update of ``dtype``."""
    return codes.astype(dtype)


def encode_int8(update: Array_, name: str = "update") -> tuple[npt.NDArray[np.int8], float]:
    """Return ``update``'s int8 codes and scale: ``codes * scale`` is within ``scale / 2``.

    The scale is ``max|v| / 127`` (0 for an all-zero or empty update, whose codes
    are all 0); codes are ``v / scale`` rounded to nearest (ties to even).
    """
    _check_finite(update, name, "int8")
    peak = float(np.abs(update).max()) if update.size else 0.0
    if peak == 0:
        return np.zeros(update.shape, dtype=np.int8), 0.0
    scale = peak / INT8_LEVELS
    codes = np.rint(update.astype(np.float64) / scale)
    # |v| / scale <= 127 up to float64 rounding: the clip only catches that rounding.
    np.clip(codes, -INT8_LEVELS, INT8_LEVELS, out=codes)
    return codes.astype(np.int8), scale


def decode_int8(codes: npt.NDArray[np.int8], scale: float, dtype: npt.DTypeLike) -> Array_:
    """Return int8 ``codes`` times ``scale`` as an update of ``dtype``."""
    return (codes.astype(np.float64) * scale).astype(dtype)


def topk_count(size: int, fraction: float) -> int:
    """Return how many of a tensor's ``size`` entries top-k keeps: ``ceil(fraction * size)``.

    At least one of a non-empty tensor. Both sides compute it, so the server knows
    exactly how many entries a reply must carry.
    """
    if size <= 0:
        return 0
    # The epsilon keeps 0.1 * 30 = 3.0000000000000004 at 3.
    return min(size, max(1, math.ceil(fraction * size - 1e-9)))


def index_dtype(size: int) -> np.dtype[Any]:
    """Return the dtype of a tensor's top-k indices: int32, or int64 past 2**31 entries."""
    return np.dtype(np.int32) if size <= np.iinfo(np.int32).max else np.dtype(np.int64)


def encode_topk(update: Array_, fraction: float, name: str = "update") -> tuple[Array_, Array_]:
    """Return the sorted flat indices and values of ``update``'s largest-magnitude entries."""
    _check_finite(update, name, "topk")
    flat = update.reshape(-1)
    k = topk_count(flat.size, fraction)
    if k == flat.size:
        indices = np.arange(flat.size)
    else:
        indices = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]
        indices.sort()
    return indices.astype(index_dtype(flat.size)), flat[indices].copy()


def decode_topk(
    indices: Array_,
    values: Array_,
    shape: tuple[int, ...],
    dtype: npt.DTypeLike,
    fraction: float,
    name: str = "update",
) -> Array_:
    """Return the dense update of ``shape`` holding ``values`` at ``indices``, zeros elsewhere.

    Refuses indices and values that top-k with ``fraction`` cannot have produced:
    a count other than :func:`topk_count`, an index dtype other than
    :func:`index_dtype`, indices not strictly increasing or out of bounds.
    """
    size = math.prod(shape)
    k = topk_count(size, fraction)
    want_index = index_dtype(size)
    if indices.dtype != want_index or indices.shape != (k,):
        raise RecordError(
            f"{name}: expected {k} top-k indices of dtype {want_index} for a tensor of "
            f"{size} entries, got shape {indices.shape} and dtype {indices.dtype}"
        )
    if values.dtype != np.dtype(dtype) or values.shape != (k,):
        raise RecordError(
            f"{name}: expected {k} top-k values of dtype {np.dtype(dtype)}, got shape "
            f"{values.shape} and dtype {values.dtype}"
        )
    if k:
        if int(indices[0]) < 0 or int(indices[-1]) >= size:
            raise RecordError(
                f"{name}: expected top-k indices in [0, {size}), got "
                f"{int(indices.min())}..{int(indices.max())}"
            )
        if k > 1 and not bool((np.diff(indices) > 0).all()):
            raise RecordError(f"{name}: expected strictly increasing top-k indices, got others")
    out = np.zeros(size, dtype=dtype)
    out[indices] = values
    return out.reshape(shape)


def _check_finite(update: Array_, name: str, scheme: str) -> None:
    if update.size and not np.isfinite(update).all():
        bad = update[~np.isfinite(update)]
        raise RecordError(
            f"{name}: expected a finite update to compress as {scheme}, got {bad.size} "
            f"non-finite values (first {bad.flat[0]})"
        )


def _is_float(dtype: np.dtype[Any]) -> bool:
    return dtype.kind == "f"


# ---------------------------------------------------------------- records


def compress_reply(
    content: RecordDict,
    received: ArrayRecord,
    compression: Compression,
    state: RecordDict,
    *,
    base_round: int | None = None,
) -> RecordDict:
    """Return a train reply's ``content`` with its update encoded by ``compression``.

    ``received`` is the global model the reply was trained from; ``state`` the
    node's ``Context.state``, where top-k reads and writes its residual.
    ``base_round`` (the round of the received model) is recorded for the server
    to check.
    """
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    key, trained = _single_arrays(content, "reply")
    if COMPRESSION_RECORD in content:
        raise RecordError(
            f"reply: expected no record named {COMPRESSION_RECORD!r} before compressing, "
            "got one (compressed twice?)"
        )
    if list(trained.keys()) != list(received.keys()):
        raise RecordError(
            f"reply: expected the received model's arrays {_names(list(received))}, got "
            f"{_names(list(trained))}"
        )
    new = {k: _numpy(a, f"reply arrays[{k!r}]") for k, a in trained.items()}
    old = {k: _numpy(a, f"received arrays[{k!r}]") for k, a in received.items()}
    for name, value in new.items():
        if value.shape != old[name].shape or value.dtype != old[name].dtype:
            raise RecordError(
                f"reply arrays[{name!r}]: expected the received {old[name].dtype}"
                f"{list(old[name].shape)}, got {value.dtype}{list(value.shape)}"
            )
    floats = [name for name, value in old.items() if _is_float(value.dtype)]
    residual: dict[str, Array_] = {}
    if compression.scheme == "topk":
        clash = [n for n in floats if n + _INDICES in old or n + _VALUES in old]
        if clash:
            raise RecordError(
                f"reply: expected array names free of top-k's suffixes {_INDICES!r} and "
                f"{_VALUES!r}, got {_names([n + _INDICES for n in clash])} beside {_names(clash)}"
            )
        residual = _load_residual(state, {n: old[n] for n in floats})
    payload: dict[str, Array_] = {}
    meta: dict[str, Any] = {_SCHEME: str(compression)}
    if base_round is not None:
        meta[_BASE_ROUND] = base_round
    for name, value in new.items():
        if not _is_float(value.dtype):
            payload[name] = value  # integers and booleans travel whole
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            update = value - old[name]
        label = f"update {name!r}"
        if compression.scheme == "fp16":
            payload[name] = encode_fp16(update, label)
        elif compression.scheme == "int8":
            payload[name], scale = encode_int8(update, label)
            meta[_SCALE + name] = scale
        else:
            corrected = update + residual[name]
            indices, values = encode_topk(corrected, compression.fraction, label)
            payload[name + _INDICES] = indices
            payload[name + _VALUES] = values
            # residual += update - sent: exactly what was not sent.
            sent = np.zeros(corrected.size, dtype=corrected.dtype)
            sent[indices] = values
            residual[name] = corrected - sent.reshape(corrected.shape)
    if compression.scheme == "topk":
        state[RESIDUAL_RECORD] = ArrayRecord({n: _array(v) for n, v in residual.items()})
    encoded = RecordDict()
    for name, record in content.items():
        encoded[name] = (
            ArrayRecord({k: _array(v) for k, v in payload.items()}) if name == key else record
        )
    encoded[COMPRESSION_RECORD] = ConfigRecord(meta)
    return encoded


def decompress_reply(
    content: RecordDict,
    global_arrays: ArrayRecord,
    compression: Compression,
    *,
    max_bytes: int,
    server_round: int | None = None,
    global_values: Mapping[str, Array_] | None = None,
) -> RecordDict:
    """Return a compressed train reply's ``content`` with the full model it encodes.

    The result holds the reply's records in order, its ArrayRecord replaced by the
    global model plus the decoded update (the global model's names, shapes and
    dtypes) and :data:`COMPRESSION_RECORD` dropped. Raises :class:`RecordError`
    naming what was expected and what arrived when anything does not fit.
    ``global_values`` are ``global_arrays`` decoded, when the caller has them (a
    round decodes them once for all its replies).
    """
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    meta = content.get(COMPRESSION_RECORD)
    if not isinstance(meta, ConfigRecord):
        got = "none" if meta is None else type(meta).__name__
        raise RecordError(
            f"expected an update compressed as {str(compression)!r} (a ConfigRecord "
            f"{COMPRESSION_RECORD!r} from fedscale's compression_mod), got {got}"
        )
    key, payload = _single_arrays(content, "reply")
    scales = _check_meta(meta, global_arrays, compression, server_round)
    total = sum(len(a.data) if isinstance(a.data, bytes) else 0 for a in payload.values())
    if total > max_bytes:
        raise RecordError(f"expected a compressed update of at most {max_bytes} bytes, got {total}")
    expected = _payload_layout(global_arrays, compression)
    if set(payload.keys()) != set(expected):
        missing = [k for k in expected if k not in payload]
        extra = [k for k in payload if k not in expected]
        raise RecordError(
            f"expected the {len(expected)} arrays of a {compression} update, got "
            f"{len(payload)}: missing {_names(missing)}, unexpected {_names(extra)}"
        )
    arrays = {k: _payload_array(k, payload[k], *expected[k]) for k in expected}
    if global_values is None:
        global_values = _numpy_arrays(global_arrays)
    decoded = ArrayRecord()
    for name in global_arrays:
        ref = global_values[name]
        if not _is_float(ref.dtype):
            full = arrays[name]
        else:
            if compression.scheme == "fp16":
                update = decode_fp16(arrays[name], ref.dtype)
            elif compression.scheme == "int8":
                update = decode_int8(arrays[name], scales[name], ref.dtype)
            else:
                update = decode_topk(
                    arrays[name + _INDICES],
                    arrays[name + _VALUES],
                    ref.shape,
                    ref.dtype,
                    compression.fraction,
                    f"arrays[{name!r}]",
                )
            # An overflow gives inf, which the screening after this rejects by name.
            with np.errstate(over="ignore", invalid="ignore"):
                full = (ref + update).astype(ref.dtype, copy=False)
        decoded[name] = _array(full)
    out = RecordDict()
    for name, record in content.items():
        if name != COMPRESSION_RECORD:
            out[name] = decoded if name == key else record
    return out


def decode_replies(
    replies: Iterable[Message],
    global_arrays: ArrayRecord,
    settings: RunSettings,
    *,
    server_round: int | None = None,
) -> tuple[list[Message], list[tuple[Message, str]]]:
    """Decode a round's compressed train replies in place; return the kept and the rejected.

    Without compression every reply is kept as it is. With it, each content reply
    must decode (:func:`decompress_reply`) against ``global_arrays`` (and carry
    ``server_round`` as its base round, when both are known); error replies are
    kept for the strategy to count as failures. Rejected replies come with a reason.
    """
    from .validation import update_byte_limit

    replies = list(replies)
    compression = Compression.parse(settings.compression)
    if compression is None:
        return replies, []
    max_bytes = update_byte_limit(global_arrays, settings.max_update_bytes)
    global_values = _numpy_arrays(global_arrays)
    kept: list[Message] = []
    rejected: list[tuple[Message, str]] = []
    for reply in replies:
        if reply.has_error():
            kept.append(reply)
            continue
        try:
            reply.content = decompress_reply(
                reply.content,
                global_arrays,
                compression,
                max_bytes=max_bytes,
                server_round=server_round,
                global_values=global_values,
            )
        except RecordError as err:
            rejected.append((reply, str(err)))
        else:
            kept.append(reply)
    return kept, rejected


def update_bytes(global_arrays: ArrayRecord, setting: str) -> int:
    """Return the bytes of one update's arrays under the ``compression`` setting.

    The payload a client uploads (``.npy`` headers included): the global model's
    own size without compression. The virtual clock times uploads by it.
    """
    compression = Compression.parse(setting)
    if compression is None:
        return sum(len(array.data) for array in global_arrays.values())
    return sum(
        len(encode(np.zeros(shape, dtype=dtypes[0])))
        for dtypes, shape in _payload_layout(global_arrays, compression).values()
    )


def base_round_of(content: RecordDict) -> int | None:
    """Return the ``server-round`` of a train message's config, if it has exactly one config."""
    configs = list(content.config_records.values())
    value = configs[0].get(_SERVER_ROUND) if len(configs) == 1 else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def compression_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Encode a train reply's update by the run's ``compression`` (a Flower mod).

    Like :func:`fedscale.privacy.privacy_mod`, it reads the run config, so one
    ClientApp serves every run. Listed before the privacy mod, it runs after it on
    the reply: the update is clipped (and locally noised) first, then encoded.
    Top-k's residual is kept in ``ctxt.state``.
    """
    compression = Compression.parse(ctxt.run_config.get("compression", ""))
    if compression is None:
        return call_next(msg, ctxt)
    # Taken before the inner app runs: the update is relative to what arrived.
    received = list(msg.content.array_records.values())
    base_round = base_round_of(msg.content)
    reply = call_next(msg, ctxt)
    if reply.has_error():
        return reply
    if len(received) != 1:
        raise RecordError(
            f"message: expected one ArrayRecord holding the global model, got {len(received)}"
        )
    reply.content = compress_reply(
        reply.content, received[0], compression, ctxt.state, base_round=base_round
    )
    return reply


def _single_arrays(content: RecordDict, what: str) -> tuple[str, ArrayRecord]:
    items = list(content.array_records.items())
    if len(items) != 1:
        raise RecordError(f"{what}: expected one ArrayRecord, got {len(items)}")
    return items[0]


def _check_meta(
    meta: ConfigRecord,
    global_arrays: ArrayRecord,
    compression: Compression,
    server_round: int | None,
) -> dict[str, float]:
    """Check the reply's COMPRESSION_RECORD; return int8's scales by tensor name."""
    scheme = meta.get(_SCHEME)
    try:
        got = Compression.parse(scheme) if isinstance(scheme, str) else None
    except ConfigError:
        got = None
    if got != compression:
        raise RecordError(
            f"{COMPRESSION_RECORD}[{_SCHEME!r}]: expected the run's {str(compression)!r}, "
            f"got {scheme!r}"
        )
    base = meta.get(_BASE_ROUND)
    if _BASE_ROUND in meta and (not isinstance(base, int) or isinstance(base, bool)):
        raise RecordError(
            f"{COMPRESSION_RECORD}[{_BASE_ROUND!r}]: expected a round number, got {base!r}"
        )
    if server_round is not None and base is not None and base != server_round:
        raise RecordError(
            f"{COMPRESSION_RECORD}[{_BASE_ROUND!r}]: expected an update of round "
            f"{server_round}'s global model, got one of round {base!r}"
        )
    wanted = {_SCHEME, _BASE_ROUND}
    scales: dict[str, float] = {}
    if compression.scheme == "int8":
        for name, array in global_arrays.items():
            if not _is_float(np.dtype(array.dtype)):
                continue
            key = _SCALE + name
            wanted.add(key)
            value = meta.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RecordError(
                    f"{COMPRESSION_RECORD}[{key!r}]: expected int8's scale of {name!r}, "
                    f"got {value!r}"
                )
            if not (math.isfinite(value) and value >= 0):
                raise RecordError(
                    f"{COMPRESSION_RECORD}[{key!r}]: expected a finite scale >= 0, got {value!r}"
                )
            scales[name] = float(value)
    extra = [k for k in meta if k not in wanted]
    if extra:
        raise RecordError(
            f"{COMPRESSION_RECORD}: expected only keys {_names(sorted(wanted))}, got also "
            f"{_names(extra)}"
        )
    return scales


def _payload_layout(
    global_arrays: ArrayRecord, compression: Compression
) -> dict[str, tuple[tuple[np.dtype[Any], ...], tuple[int, ...]]]:
    """Return each payload array's name, allowed dtypes and shape for ``global_arrays``."""
    layout: dict[str, tuple[tuple[np.dtype[Any], ...], tuple[int, ...]]] = {}
    for name, array in global_arrays.items():
        dtype, shape = np.dtype(array.dtype), tuple(int(n) for n in array.shape)
        if not _is_float(dtype):
            layout[name] = ((dtype,), shape)
        elif compression.scheme == "fp16":
            layout[name] = ((np.dtype(np.float16),), shape)
        elif compression.scheme == "int8":
            layout[name] = ((np.dtype(np.int8),), shape)
        else:
            size = math.prod(shape)
            k = topk_count(size, compression.fraction)
            layout[name + _INDICES] = ((index_dtype(size),), (k,))
            layout[name + _VALUES] = ((dtype,), (k,))
    return layout


def _payload_array(
    name: str, array: Array, dtypes: tuple[np.dtype[Any], ...], shape: tuple[int, ...]
) -> Array_:
    """Decode one payload array after checking its declared and actual dtype and shape."""
    from flwr.common.constant import SType

    expected = f"shape {shape} and dtype {' or '.join(str(d) for d in dtypes)}"
    if array.stype != SType.NUMPY or not isinstance(array.data, bytes):
        return _bad(name, f"expected a numpy array, got stype {array.stype!r}")
    declared = (tuple(array.shape), array.dtype)
    if declared[0] != shape or declared[1] not in [str(d) for d in dtypes]:
        return _bad(name, f"expected {expected}, got shape {declared[0]} and dtype {declared[1]}")
    try:
        values = decode(array.data)
    except Exception as err:  # noqa: BLE001  # any decoding failure makes the reply unusable
        return _bad(name, f"expected .npy bytes of {expected}, got undecodable bytes ({err})")
    if values.shape != shape or str(values.dtype) != declared[1]:
        return _bad(
            name,
            f"expected bytes of {expected}, got bytes of shape {values.shape} and dtype "
            f"{values.dtype}",
        )
    return values


def _bad(name: str, reason: str) -> Array_:
    raise RecordError(f"arrays[{name!r}]: {reason}")


def _load_residual(state: RecordDict, floats: Mapping[str, Array_]) -> dict[str, Array_]:
    """Return top-k's residual from ``state`` (zeros the first time), checked against the model."""
    from flwr.app import ArrayRecord

    stored = state.get(RESIDUAL_RECORD)
    if stored is None:
        return {name: np.zeros_like(value) for name, value in floats.items()}
    if not isinstance(stored, ArrayRecord):
        raise RecordError(
            f"context state {RESIDUAL_RECORD!r}: expected an ArrayRecord, got "
            f"{type(stored).__name__}"
        )
    residual = {
        k: _numpy(a, f"context state {RESIDUAL_RECORD!r}[{k!r}]") for k, a in stored.items()
    }
    if list(residual) != list(floats) or any(
        residual[n].shape != v.shape or residual[n].dtype != v.dtype for n, v in floats.items()
    ):
        raise RecordError(
            f"context state {RESIDUAL_RECORD!r}: expected the residual of the model's "
            f"floating-point arrays {_describe(floats)}, got {_describe(residual)}"
        )
    return residual


def _describe(arrays: Mapping[str, Array_]) -> str:
    items = [f"{k}: {v.dtype}{list(v.shape)}" for k, v in arrays.items()]
    shown = ", ".join(items[:_NAMES_SHOWN])
    more = len(items) - _NAMES_SHOWN
    return "{" + shown + (f", and {more} more" if more > 0 else "") + "}"


def _names(names: list[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(repr(n) for n in names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return shown if more <= 0 else f"{shown} and {more} more"


def _numpy_arrays(record: ArrayRecord) -> dict[str, Array_]:
    return {k: _numpy(a, f"global arrays[{k!r}]") for k, a in record.items()}


def _numpy(array: Array, what: str) -> Array_:
    from flwr.common.constant import SType

    if array.stype != SType.NUMPY:
        raise RecordError(f"{what}: expected stype {SType.NUMPY!r}, got {array.stype!r}")
    try:
        return decode(array.data)
    except Exception as err:  # noqa: BLE001  # bytes from elsewhere: say so, with the cause
        raise RecordError(f"{what}: expected .npy bytes, got undecodable bytes ({err})") from err


def _array(value: Array_) -> Array:
    from flwr.app import Array
    from flwr.common.constant import SType

    # The public constructor with fedscale's codec: byte-identical to Array(ndarray).
    contiguous = np.ascontiguousarray(value)
    return Array(
        dtype=str(contiguous.dtype),
        shape=tuple(contiguous.shape),
        stype=SType.NUMPY,
        data=encode(contiguous),
    )
