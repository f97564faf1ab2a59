"""Check every training reply against the global model before it is aggregated.

A reply crossed a network from a device the server does not control. Flower's
strategies average whatever they receive: one reply with a NaN, a wrong shape, a
renamed array or an absurd ``num-examples`` either poisons the global model or
raises inside ``aggregate_train`` and ends the run. So the server screens each
reply first (:func:`screen_replies`), keeps the ones that pass and rejects the
rest with a reason naming what was expected and what arrived.

A reply passes :func:`validate_reply` when it

- carries content, not an error;
- holds exactly one ``ArrayRecord`` and one ``MetricRecord`` (what Flower's
  strategies require);
- is no larger than the byte limit, counted before anything is decoded
  (:func:`update_byte_limit` sizes it from the global model when the setting is 0);
- has the global model's array names, and each array the global model's shape and
  dtype, both as declared and as its bytes decode;
- has only finite values in its floating-point arrays and in its metrics;
- weighs itself with a positive whole ``num-examples`` of at most ``max_examples``.

:func:`screen_replies` also requires the round's accepted replies to agree on
their record names and metric keys, as Flower's aggregation does (it raises on a
mismatch): the most common layout wins and the others are rejected.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common.constant import SType

from .codec import dtype_name, view

__all__ = [
    "AUTO_SLACK_BYTES",
    "WEIGHT_KEY",
    "payload_bytes",
    "screen_replies",
    "update_byte_limit",
    "validate_reply",
]

# The key Flower's strategies weigh replies by (FedAvg's `weighted_by_key` default).
WEIGHT_KEY = "num-examples"
# With `max-update-bytes = 0` an update may be twice the global model's bytes plus
# this: an honest update is exactly the global model's size (same names, shapes and
# dtypes), so the limit only ever stops padding, and leaves room for the .npy headers.
AUTO_SLACK_BYTES = 1 << 20
_NAMES_SHOWN = 5  # missing or unexpected array names quoted in a reason
# What Flower's aggregation needs equal across replies: record names and metric keys.
_Layout = tuple[str, str, tuple[tuple[str, int | None], ...]]


def payload_bytes(arrays: ArrayRecord) -> int:
    """Return the bytes an ``ArrayRecord``'s arrays occupy (``.npy`` headers included)."""
    return sum(len(array.data) for array in arrays.values())


def update_byte_limit(global_arrays: ArrayRecord, setting: int) -> int:
    """Return the byte limit of one update: ``setting``, or when it is 0 the automatic one.

    Automatic: twice the global model's payload plus :data:`AUTO_SLACK_BYTES`.
    """
    if setting > 0:
        return setting
    return 2 * payload_bytes(global_arrays) + AUTO_SLACK_BYTES


def validate_reply(
    reply: Message,
    global_arrays: ArrayRecord,
    *,
    max_examples: int,
    max_bytes: int,
    weight_key: str = WEIGHT_KEY,
) -> str | None:
    """Check one training reply against the global model it was trained from.

    Returns ``None`` if the reply may be aggregated, else a one-line reason
    naming what was expected and what arrived.
    """
    return _validate(reply, global_arrays, max_examples, max_bytes, weight_key)[0]


def _validate(
    reply: Message,
    global_arrays: ArrayRecord,
    max_examples: int,
    max_bytes: int,
    weight_key: str,
) -> tuple[str | None, _Layout | None]:
    """Return :func:`validate_reply`'s reason and, for a valid reply, its layout.

    The content is read once, by its items: Flower's ``array_records`` and
    ``metric_records`` build a new checked dict on every access, which for a
    round of small replies costs more than the checks themselves.
    """
    if reply.has_error():
        error = reply.error
        return f"expected an update, got error {error.code}: {error.reason}", None
    array_records: list[tuple[str, ArrayRecord]] = []
    metric_records: list[tuple[str, MetricRecord]] = []
    for name, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            array_records.append((name, record))
        elif isinstance(record, MetricRecord):
            metric_records.append((name, record))
    if len(array_records) != 1 or len(metric_records) != 1:
        return (
            f"expected one ArrayRecord and one MetricRecord, got {len(array_records)} "
            f"and {len(metric_records)}"
        ), None
    (array_name, arrays), (metric_name, metrics) = array_records[0], metric_records[0]
    reason = _check_names(arrays, global_arrays)
    if reason is None:
        reason = _check_size(arrays, max_bytes)
    if reason is None:
        reason = _check_arrays(arrays, global_arrays)
    if reason is None:
        reason = _check_metrics(metrics, weight_key, max_examples)
    if reason is not None:
        return reason, None
    keys = tuple(
        sorted((key, len(v) if isinstance(v, list) else None) for key, v in metrics.items())
    )
    return None, (array_name, metric_name, keys)


def screen_replies(
    replies: Iterable[Message],
    global_arrays: ArrayRecord,
    *,
    max_examples: int,
    max_bytes: int,
    weight_key: str = WEIGHT_KEY,
) -> tuple[list[Message], list[tuple[Message, str]]]:
    """Split a round's replies into those to aggregate and those rejected, with reasons.

    Error replies are kept: the strategy counts and logs them as failures, as
    it always has. Content replies must pass :func:`validate_reply`, then share
    the layout (record names, metric keys) of the most common valid layout.
    """
    kept: list[Message] = []
    rejected: list[tuple[Message, str]] = []
    valid: list[Message] = []
    layouts: list[_Layout] = []
    for reply in replies:
        if reply.has_error():
            kept.append(reply)
            continue
        reason, layout = _validate(reply, global_arrays, max_examples, max_bytes, weight_key)
        if layout is not None:
            valid.append(reply)
            layouts.append(layout)
        else:
            rejected.append((reply, cast(str, reason)))
    if layouts:
        # most_common keeps first-seen order among equals: ties go to the earliest reply.
        majority = Counter(layouts).most_common(1)[0][0]
        for reply, layout in zip(valid, layouts, strict=True):
            if layout == majority:
                kept.append(reply)
            else:
                rejected.append(
                    (
                        reply,
                        f"expected the round's record layout {_describe(majority)}, "
                        f"got {_describe(layout)}",
                    )
                )
    return kept, rejected


def _describe(layout: _Layout) -> str:
    array_name, metric_name, keys = layout
    metrics = ", ".join(k if n is None else f"{k}[{n}]" for k, n in keys)
    return f"(arrays {array_name!r}, metrics {metric_name!r}: {metrics})"


def _check_names(arrays: ArrayRecord, global_arrays: ArrayRecord) -> str | None:
    if arrays.keys() == global_arrays.keys():
        return None
    missing = [k for k in global_arrays if k not in arrays]
    extra = [k for k in arrays if k not in global_arrays]
    return (
        f"expected the global model's {len(global_arrays)} arrays, got {len(arrays)}: "
        f"missing {_names(missing)}, unexpected {_names(extra)}"
    )


def _names(names: Sequence[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(repr(n) for n in names[:_NAMES_SHOWN])
    return shown if len(names) <= _NAMES_SHOWN else f"{shown} and {len(names) - _NAMES_SHOWN} more"


def _check_size(arrays: ArrayRecord, max_bytes: int) -> str | None:
    # Before any decoding: an oversized reply costs no more than this sum.
    total = 0
    for key, array in arrays.items():
        if not isinstance(array.data, bytes):
            return f"arrays[{key!r}]: expected bytes, got {type(array.data).__name__}"
        total += len(array.data)
    if total > max_bytes:
        return f"expected an update of at most {max_bytes} bytes, got {total}"
    return None


def _check_arrays(arrays: ArrayRecord, global_arrays: ArrayRecord) -> str | None:
    for key, want in global_arrays.items():
        reason = _check_array(key, arrays[key], want)
        if reason is not None:
            return reason
    return None


def _check_array(key: str, got: Array, want: Array) -> str | None:
    want_shape = tuple(want.shape)
    if got.stype != SType.NUMPY:
        return f"arrays[{key!r}]: expected stype {SType.NUMPY!r}, got {got.stype!r}"
    if tuple(got.shape) != want_shape or got.dtype != want.dtype:
        return (
            f"arrays[{key!r}]: expected {_expected(want)}, got shape {tuple(got.shape)} "
            f"and dtype {got.dtype}"
        )
    # The declared shape and dtype are only labels: aggregation decodes the bytes.
    try:
        values = view(got.data)  # no copy: only read
    except Exception as err:  # noqa: BLE001  # any decoding failure makes the reply unusable
        return (
            f"arrays[{key!r}]: expected .npy bytes of {_expected(want)}, "
            f"got undecodable bytes ({err})"
        )
    if values.shape != want_shape or dtype_name(values.dtype) != want.dtype:
        return (
            f"arrays[{key!r}]: expected bytes of {_expected(want)}, got bytes of shape "
            f"{values.shape} and dtype {values.dtype}"
        )
    # One pass and a boolean temporary: as fast as a sum, and exact.
    if values.dtype.kind in "fc" and not np.isfinite(values).all():
        bad = values[~np.isfinite(values)]
        return (
            f"arrays[{key!r}]: expected finite values, got {bad.size} non-finite "
            f"(first {bad.flat[0]})"
        )
    return None


def _expected(want: Array) -> str:
    return f"shape {tuple(want.shape)} and dtype {want.dtype}"


def _check_metrics(metrics: MetricRecord, weight_key: str, max_examples: int) -> str | None:
    if weight_key not in metrics:
        return (
            f"metrics: expected {weight_key!r}, got only {', '.join(map(repr, metrics)) or 'none'}"
        )
    weight = metrics[weight_key]
    # Flower's MetricRecord holds ints and floats; a float weight must be a whole number.
    whole = (isinstance(weight, int) and not isinstance(weight, bool)) or (
        isinstance(weight, float) and math.isfinite(weight) and weight.is_integer()
    )
    if not whole or not 0 < cast(float, weight) <= max_examples:
        return (
            f"metrics[{weight_key!r}]: expected a whole number in [1, {max_examples}], "
            f"got {weight!r}"
        )
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                return f"metrics[{key!r}]: expected finite numbers, got {value!r}"
    return None
