"""Every malformed training reply is refused with a reason; honest ones pass."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode, SType
from flwr.serverapp.strategy import FedAvg
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedscale.records import arrays_to_state_dict, state_dict_to_arrays
from fedscale.validation import (
    AUTO_SLACK_BYTES,
    payload_bytes,
    screen_replies,
    update_byte_limit,
    validate_reply,
)
from tests.edge_client.messages import incoming_message

MAX_EXAMPLES = 10_000


def _global_arrays() -> ArrayRecord:
    # Float weights, float buffers and an int64 counter, as a BatchNorm model has.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    return state_dict_to_arrays(model.state_dict())


GLOBAL = _global_arrays()
MAX_BYTES = update_byte_limit(GLOBAL, 0)
FLOAT_KEYS = [k for k, a in GLOBAL.items() if a.dtype.startswith("float")]
INT_KEY = "1.num_batches_tracked"


def _numpy() -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays_to_state_dict(GLOBAL).items()}


def _honest_arrays(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for key, value in _numpy().items():
        if value.dtype.kind == "f":
            value = (value + rng.normal(0, 0.01, value.shape)).astype(value.dtype)
        out[key] = value
    return out


def _reply(
    arrays: dict[str, Array | np.ndarray] | None = None,
    metrics: dict | None = None,
    *,
    content: RecordDict | None = None,
) -> Message:
    if content is None:
        arrays = _honest_arrays() if arrays is None else arrays
        record = ArrayRecord(
            {
                k: v if isinstance(v, Array) else Array(np.require(v, requirements="C"))
                for k, v in arrays.items()
            }
        )
        metric = MetricRecord(
            {"num-examples": 32, "train-loss": 0.5} if metrics is None else metrics
        )
        content = RecordDict({"arrays": record, "metrics": metric})
    return Message(content, reply_to=incoming_message(RecordDict({"arrays": GLOBAL})))


def _check(reply: Message) -> str | None:
    return validate_reply(reply, GLOBAL, max_examples=MAX_EXAMPLES, max_bytes=MAX_BYTES)


def _with(key: str, value: Array | np.ndarray) -> dict[str, Array | np.ndarray]:
    arrays: dict[str, Array | np.ndarray] = dict(_honest_arrays())
    arrays[key] = value
    return arrays


def _without(key: str) -> dict[str, np.ndarray]:
    arrays = _honest_arrays()
    del arrays[key]
    return arrays


def _renamed(key: str, new: str) -> dict[str, np.ndarray]:
    arrays = _honest_arrays()
    arrays[new] = arrays.pop(key)
    return arrays


def _lying(key: str, real: np.ndarray) -> Array:
    """An Array that declares the global model's shape and dtype but holds ``real``."""
    want = GLOBAL[key]
    return Array(
        dtype=want.dtype, shape=tuple(want.shape), stype=SType.NUMPY, data=Array(real).data
    )


def _raw(key: str, data: bytes, stype: str = SType.NUMPY) -> Array:
    want = GLOBAL[key]
    return Array(dtype=want.dtype, shape=tuple(want.shape), stype=stype, data=data)


def _poisoned(key: str, value: float) -> dict[str, np.ndarray]:
    arrays = _honest_arrays()
    arrays[key] = arrays[key].copy()
    arrays[key].flat[1] = value
    return arrays


W = "0.weight"  # float32, shape (4, 8)
VALID_METRICS = {"num-examples": 32, "train-loss": 0.5}

CASES: list[tuple[str, Callable[[], Message], str]] = [
    (
        "error reply",
        lambda: Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="boom"),
            reply_to=incoming_message(RecordDict()),
        ),
        r"expected an update, got error \d+: boom",
    ),
    (
        "no ArrayRecord",
        lambda: _reply(content=RecordDict({"metrics": MetricRecord(VALID_METRICS)})),
        r"expected one ArrayRecord and one MetricRecord, got 0 and 1",
    ),
    (
        "two ArrayRecords",
        lambda: _reply(
            content=RecordDict({"a": GLOBAL, "b": GLOBAL, "metrics": MetricRecord(VALID_METRICS)})
        ),
        r"got 2 and 1",
    ),
    (
        "no MetricRecord",
        lambda: _reply(content=RecordDict({"arrays": GLOBAL, "c": ConfigRecord({"x": 1})})),
        r"got 1 and 0",
    ),
    (
        "missing array",
        lambda: _reply(_without("0.bias")),
        r"expected the global model's 9 arrays, got 8: missing '0\.bias', unexpected none",
    ),
    (
        "extra array",
        lambda: _reply(_with("extra", np.zeros(3, np.float32))),
        r"expected the global model's 9 arrays, got 10: missing none, unexpected 'extra'",
    ),
    (
        "renamed array",
        lambda: _reply(_renamed(W, "0.weight2")),
        r"missing '0\.weight', unexpected '0\.weight2'",
    ),
    (
        "wrong shape",
        lambda: _reply(_with(W, np.zeros((8, 4), np.float32))),
        r"arrays\['0\.weight'\]: expected shape \(4, 8\) and dtype float32, got shape \(8, 4\)",
    ),
    (
        "wrong dtype",
        lambda: _reply(_with(W, np.zeros((4, 8), np.float64))),
        r"expected shape \(4, 8\) and dtype float32, got shape \(4, 8\) and dtype float64",
    ),
    (
        "counter as float",
        lambda: _reply(_with(INT_KEY, np.array(3.0))),
        r"arrays\['1\.num_batches_tracked'\]: expected shape \(\) and dtype int64, got .*float64",
    ),
    (
        "bytes of another shape than declared",
        lambda: _reply(_with(W, _lying(W, np.zeros((2, 16), np.float32)))),
        r"expected bytes of shape \(4, 8\) and dtype float32, got bytes of shape \(2, 16\)",
    ),
    (
        "bytes of another dtype than declared",
        lambda: _reply(_with(W, _lying(W, np.zeros((4, 8), np.int32)))),
        r"got bytes of shape \(4, 8\) and dtype int32",
    ),
    (
        "bytes that are not .npy",
        lambda: _reply(_with(W, _raw(W, b"not an array at all"))),
        r"arrays\['0\.weight'\]: expected \.npy bytes of shape \(4, 8\).*undecodable",
    ),
    (
        "truncated bytes",
        lambda: _reply(_with(W, _raw(W, Array(np.zeros((4, 8), np.float32)).data[:-4]))),
        r"undecodable",
    ),
    (
        "another serialisation",
        lambda: _reply(_with(W, _raw(W, Array(np.zeros((4, 8), np.float32)).data, "torch"))),
        r"expected stype 'numpy\.ndarray', got 'torch'",
    ),
    ("NaN", lambda: _reply(_poisoned(W, math.nan)), r"expected finite values, got 1 non-finite"),
    ("+Inf", lambda: _reply(_poisoned("2.bias", math.inf)), r"2\.bias.*non-finite \(first inf\)"),
    ("-Inf", lambda: _reply(_poisoned("1.running_var", -math.inf)), r"first -inf"),
    (
        "oversized payload",
        lambda: _reply(
            _with(W, _raw(W, Array(np.zeros((4, 8), np.float32)).data + bytes(MAX_BYTES)))
        ),
        rf"expected an update of at most {MAX_BYTES} bytes, got \d+",
    ),
    (
        "no num-examples",
        lambda: _reply(metrics={"train-loss": 0.5}),
        r"metrics: expected 'num-examples', got only 'train-loss'",
    ),
    (
        "zero examples",
        lambda: _reply(metrics={"num-examples": 0, "train-loss": 0.5}),
        rf"metrics\['num-examples'\]: expected a whole number in \[1, {MAX_EXAMPLES}\], got 0",
    ),
    ("negative examples", lambda: _reply(metrics={"num-examples": -7}), r"got -7"),
    ("fractional examples", lambda: _reply(metrics={"num-examples": 2.5}), r"got 2\.5"),
    ("NaN examples", lambda: _reply(metrics={"num-examples": math.nan}), r"got nan"),
    ("infinite examples", lambda: _reply(metrics={"num-examples": math.inf}), r"got inf"),
    ("absurd examples", lambda: _reply(metrics={"num-examples": 10**15}), r"got 1000000000000000"),
    ("examples as a list", lambda: _reply(metrics={"num-examples": [1, 2]}), r"got \[1, 2\]"),
    (
        "non-finite loss",
        lambda: _reply(metrics={"num-examples": 3, "train-loss": math.nan}),
        r"metrics\['train-loss'\]: expected finite numbers, got nan",
    ),
    (
        "non-finite metric list",
        lambda: _reply(metrics={"num-examples": 3, "losses": [0.1, math.inf]}),
        r"metrics\['losses'\]: expected finite numbers",
    ),
]


@pytest.mark.parametrize(("name", "build", "reason"), CASES, ids=[c[0] for c in CASES])
def test_each_malformation_is_rejected_with_a_reason_naming_it(name, build, reason):
    got = _check(build())
    assert got is not None, name
    assert re.search(reason, got), got


def test_an_honest_reply_passes():
    assert _check(_reply()) is None
    # A whole number sent as a float is a whole number.
    assert _check(_reply(metrics={"num-examples": 32.0, "train-loss": 0.5})) is None
    assert _check(_reply(metrics={"num-examples": MAX_EXAMPLES, "losses": [0.1, 0.2]})) is None


def test_huge_finite_float64_values_are_finite():
    # Values at the edge of float64 are still finite: the update is valid.
    big = np.full(4, np.finfo(np.float64).max)
    arrays = {"w": Array(big)}
    reply = Message(
        RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 1})}),
        reply_to=incoming_message(RecordDict()),
    )
    limit = 10**6
    assert validate_reply(reply, ArrayRecord(arrays), max_examples=1, max_bytes=limit) is None


def test_the_automatic_byte_limit_is_twice_the_model_plus_slack():
    assert payload_bytes(GLOBAL) == sum(len(a.data) for a in GLOBAL.values())
    assert update_byte_limit(GLOBAL, 0) == 2 * payload_bytes(GLOBAL) + AUTO_SLACK_BYTES
    assert update_byte_limit(GLOBAL, 1234) == 1234
    reply = _reply()
    exact = payload_bytes(reply.content["arrays"])
    assert validate_reply(reply, GLOBAL, max_examples=MAX_EXAMPLES, max_bytes=exact) is None
    tight = validate_reply(reply, GLOBAL, max_examples=MAX_EXAMPLES, max_bytes=exact - 1)
    assert tight == f"expected an update of at most {exact - 1} bytes, got {exact}"


def test_screening_keeps_errors_for_the_strategy_and_the_majority_layout():
    honest = [_reply(_honest_arrays(s)) for s in range(3)]
    error = Message(Error(code=1, reason="crashed"), reply_to=incoming_message(RecordDict()))
    odd = _reply(metrics={"num-examples": 5, "other": 1.0})
    bad = _reply(metrics={"num-examples": 0, "train-loss": 0.5})
    kept, rejected = screen_replies(
        [honest[0], odd, error, honest[1], bad, honest[2]],
        GLOBAL,
        max_examples=MAX_EXAMPLES,
        max_bytes=MAX_BYTES,
    )
    assert kept == [error, *honest]
    assert [m for m, _ in rejected] == [bad, odd]
    assert rejected[1][1] == (
        "expected the round's record layout (arrays 'arrays', metrics 'metrics': "
        "num-examples, train-loss), got (arrays 'arrays', metrics 'metrics': num-examples, other)"
    )
    assert screen_replies([], GLOBAL, max_examples=1, max_bytes=1) == ([], [])


# ---------------------------------------------------------------- hypothesis

KINDS = (
    "shape",
    "dtype",
    "missing",
    "extra",
    "rename",
    "non-finite",
    "examples",
    "oversize",
    "lying",
    "records",
    "metric",
)
DTYPES = ["float16", "float32", "float64", "int8", "int32", "int64", "uint8", "bool", "complex64"]
NAMES = st.text("abcdefghij._0123456789", min_size=1, max_size=12)


@st.composite
def malformed_replies(draw: st.DrawFn) -> tuple[str, Message]:
    """A reply that an honest client could not have sent, and the kind of its fault."""
    kind = draw(st.sampled_from(KINDS))
    arrays: dict[str, Array | np.ndarray] = dict(_honest_arrays(draw(st.integers(0, 3))))
    metrics: dict = {"num-examples": draw(st.integers(1, MAX_EXAMPLES)), "train-loss": 0.25}
    key = draw(st.sampled_from(sorted(GLOBAL.keys())))
    want = GLOBAL[key]
    if kind == "shape":
        shape = draw(
            st.lists(st.integers(0, 9), max_size=3)
            .map(tuple)
            .filter(lambda s: s != tuple(want.shape))
        )
        arrays[key] = np.zeros(shape, dtype=want.dtype)
    elif kind == "dtype":
        dtype = draw(st.sampled_from([d for d in DTYPES if d != want.dtype]))
        arrays[key] = np.zeros(tuple(want.shape), dtype=dtype)
    elif kind == "missing":
        gone = draw(st.sets(st.sampled_from(sorted(GLOBAL.keys())), min_size=1))
        arrays = {k: v for k, v in arrays.items() if k not in gone}
    elif kind == "extra":
        for name in draw(st.sets(NAMES.filter(lambda n: n not in GLOBAL), min_size=1, max_size=3)):
            arrays[name] = np.zeros(draw(st.integers(0, 5)), np.float32)
    elif kind == "rename":
        new = draw(NAMES.filter(lambda n: n not in GLOBAL))
        arrays[new] = arrays.pop(key)
    elif kind == "non-finite":
        key = draw(st.sampled_from(FLOAT_KEYS))
        value = np.array(arrays[key], copy=True)
        spots = draw(st.lists(st.integers(0, value.size - 1), min_size=1, max_size=4))
        bad = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        value.flat[spots] = bad
        arrays[key] = value
    elif kind == "examples":
        metrics["num-examples"] = draw(
            st.one_of(
                st.integers(max_value=0),
                st.integers(min_value=MAX_EXAMPLES + 1, max_value=2**62),
                st.floats(allow_nan=True, allow_infinity=True).filter(
                    lambda f: not (f.is_integer() and 0 < f <= MAX_EXAMPLES)
                ),
                st.lists(st.integers(1, 10), max_size=3),
            )
        )
    elif kind == "oversize":
        padding = draw(st.integers(MAX_BYTES, MAX_BYTES + 4096))
        arrays[key] = _raw(key, Array(np.asarray(arrays[key])).data + bytes(padding))
    elif kind == "lying":
        real_dtype = draw(st.sampled_from(DTYPES))
        real_shape = draw(st.lists(st.integers(0, 6), max_size=3).map(tuple))
        if real_dtype == want.dtype and real_shape == tuple(want.shape):
            real_shape = (*real_shape, 2)
        arrays[key] = _lying(key, np.zeros(real_shape, dtype=real_dtype))
    elif kind == "records":
        n_arrays, n_metrics = draw(
            st.tuples(st.integers(0, 3), st.integers(0, 3)).filter(lambda t: t != (1, 1))
        )
        records: dict = {f"a{i}": GLOBAL for i in range(n_arrays)}
        records.update({f"m{i}": MetricRecord(metrics) for i in range(n_metrics)})
        return kind, _reply(content=RecordDict(records))
    elif kind == "metric":
        metrics[draw(st.sampled_from(["train-loss", "extra"]))] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf, [1.0, math.nan]])
        )
    return kind, _reply(arrays, metrics)


def test_no_malformed_reply_reaches_aggregation():
    seen: list[str] = []
    strategy = FedAvg()
    honest = [_reply(_honest_arrays(s)) for s in (10, 11)]
    expected = strategy.aggregate_train(1, honest)[0]

    @settings(max_examples=250, deadline=None)
    @given(malformed_replies())
    def check(case: tuple[str, Message]) -> None:
        kind, reply = case
        reason = _check(reply)
        assert reason is not None, kind
        kept, rejected = screen_replies(
            [honest[0], reply, honest[1]], GLOBAL, max_examples=MAX_EXAMPLES, max_bytes=MAX_BYTES
        )
        assert kept == honest and rejected == [(reply, reason)]
        # What the strategy then averages is the honest replies alone.
        arrays, _ = strategy.aggregate_train(1, kept)
        for name, array in arrays.items():
            np.testing.assert_array_equal(array.numpy(), expected[name].numpy())
        seen.append(kind)

    check()
    assert len(seen) >= 200
    assert set(seen) == set(KINDS)
