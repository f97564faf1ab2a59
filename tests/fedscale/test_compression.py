"""Update compression: round-trip error bounds, error feedback, and strict decoding."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedscale.compression import (
    COMPRESSION_RECORD,
    INT8_LEVELS,
    RESIDUAL_RECORD,
    Compression,
    compress_reply,
    decode_fp16,
    decode_int8,
    decode_replies,
    decode_topk,
    decompress_reply,
    encode_fp16,
    encode_int8,
    encode_topk,
    topk_count,
    update_bytes,
)
from fedscale.exceptions import ConfigError, RecordError
from fedscale.settings import RunSettings
from tests.edge_client.messages import incoming_message

FP16_TINY = float(np.finfo(np.float16).tiny)  # smallest normal float16
FP16_MAX = float(np.finfo(np.float16).max)
SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=12)


def _floats(min_value: float, max_value: float) -> st.SearchStrategy[float]:
    low, high = float(np.float32(min_value)), float(np.float32(max_value))
    return st.floats(low, high, allow_nan=False, allow_infinity=False, width=32)


# ---------------------------------------------------------------- the setting


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None),
        ("fp16", Compression("fp16")),
        ("int8", Compression("int8")),
        ("topk:0.1", Compression("topk", 0.1)),
        ("topk:1", Compression("topk", 1.0)),
        ("topk:1e-3", Compression("topk", 0.001)),
    ],
)
def test_valid_settings_parse(text, expected):
    assert Compression.parse(text) == expected
    assert RunSettings(compression=text).compression == text


@pytest.mark.parametrize(
    "text", ["none", "FP16", "int4", "topk", "topk:", "topk:0", "topk:1.5", "topk:-0.1",
             "topk:nan", "topk:inf", "topk: 0.1", " int8", "top-k:0.1", 8]
)  # fmt: skip
def test_invalid_settings_are_refused_listing_the_valid_forms(text):
    with pytest.raises(ConfigError) as caught:
        Compression.parse(text)
    message = str(caught.value)
    assert message.startswith("compression: expected ")
    for form in ("'fp16'", "'int8'", "'topk:<fraction>'", f"got {text!r}"):
        assert form in message


def test_canonical_text_round_trips():
    for text in ("fp16", "int8", "topk:0.25"):
        assert str(Compression.parse(text)) == text


@pytest.mark.parametrize("dp", ["client-fixed", "client-adaptive"])
def test_client_side_central_dp_is_refused(dp):
    with pytest.raises(ConfigError, match=f"compression: expected '' with dp '{dp}'"):
        RunSettings(compression="int8", dp=dp, num_clients=1000)


@pytest.mark.parametrize("dp", ["server-fixed", "server-adaptive", "local"])
def test_other_dp_modes_combine_with_compression(dp):
    assert RunSettings(compression="topk:0.1", dp=dp, num_clients=1000).compression == "topk:0.1"


def test_secure_aggregation_is_refused():
    with pytest.raises(ConfigError, match="compression: expected '' with secagg"):
        RunSettings(compression="fp16", secagg=True, strategy_args="")


# ---------------------------------------------------------------- error bounds


@settings(max_examples=300, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        SHAPES,
        elements=st.one_of(
            st.just(0.0), _floats(FP16_TINY, FP16_MAX), _floats(-FP16_MAX, -FP16_TINY)
        ),
    )
)
def test_fp16_error_is_within_float16s_relative_precision(update):
    codes = encode_fp16(update)
    assert codes.dtype == np.float16 and codes.shape == update.shape
    decoded = decode_fp16(codes, np.float32)
    assert decoded.dtype == np.float32
    # Round to nearest with 11 significant bits: half a unit in the last place.
    bound = np.abs(update.astype(np.float64)) * 2.0**-11
    assert (np.abs(decoded.astype(np.float64) - update) <= bound).all()


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(np.float32, SHAPES, elements=_floats(-1e30, 1e30)))
def test_int8_error_is_at_most_half_the_scale(update):
    codes, scale = encode_int8(update)
    assert codes.dtype == np.int8 and codes.shape == update.shape
    peak = float(np.abs(update).max())
    assert scale == peak / INT8_LEVELS
    assert int(np.abs(codes.astype(np.int16)).max()) == (INT8_LEVELS if peak else 0)
    decoded = decode_int8(codes, scale, np.float32)
    error = np.abs(decoded.astype(np.float64) - update)
    # scale / 2 from rounding the codes, plus float32's own rounding of the result.
    bound = scale / 2 * (1 + 1e-9) + float(np.spacing(np.float32(peak)))
    assert (error <= bound).all()


def test_an_all_zero_update_encodes_to_scale_zero_and_decodes_exactly():
    codes, scale = encode_int8(np.zeros((3, 4), np.float32))
    assert scale == 0.0 and not codes.any()
    assert not decode_int8(codes, scale, np.float32).any()
    indices, values = encode_topk(np.zeros(10, np.float32), 0.3)
    assert len(indices) == 3 and not values.any()


@settings(max_examples=300, deadline=None)
@given(
    hnp.arrays(np.float32, SHAPES, elements=_floats(-1e6, 1e6)),
    st.floats(0.001, 1.0),
)
def test_topk_keeps_the_largest_entries_exactly_and_zeroes_the_rest(update, fraction):
    indices, values = encode_topk(update, fraction)
    k = topk_count(update.size, fraction)
    assert (
        len(indices)
        == len(values)
        == k
        == min(update.size, max(1, math.ceil(fraction * update.size - 1e-9)))
    )
    assert indices.dtype == np.int32 and values.dtype == np.float32
    assert (np.diff(indices) > 0).all()
    decoded = decode_topk(indices, values, update.shape, np.float32, fraction)
    flat, out = update.reshape(-1), decoded.reshape(-1)
    kept = np.zeros(flat.size, bool)
    kept[indices] = True
    assert (out[kept] == flat[kept]).all()
    assert not out[~kept].any()
    if (~kept).any():
        assert np.abs(flat[kept]).min() >= np.abs(flat[~kept]).max()


@pytest.mark.parametrize("scheme", ["fp16", "int8", "topk"])
def test_non_finite_updates_are_refused_by_the_encoder(scheme):
    encoder = {
        "fp16": encode_fp16,
        "int8": encode_int8,
        "topk": lambda u, n: encode_topk(u, 0.5, n),
    }
    for bad in (np.nan, np.inf, -np.inf):
        update = np.array([1.0, bad, 2.0], np.float32)
        with pytest.raises(
            RecordError, match=f"w: expected a finite update to compress as {scheme}"
        ):
            encoder[scheme](update, "w")


def test_fp16_refuses_values_beyond_its_range():
    with pytest.raises(RecordError, match=r"expected update values within float16's range"):
        encode_fp16(np.array([1e5], np.float32))


# ---------------------------------------------------------------- records and error feedback


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(size=(6, 5)).astype(np.float32),
        "b": rng.normal(size=(5,)).astype(np.float32),
        "steps": np.array([3, 4], np.int64),  # an integer buffer travels whole
    }


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _reply(arrays: dict[str, np.ndarray]) -> RecordDict:
    return RecordDict(
        {"arrays": _record(arrays), "metrics": MetricRecord({"num-examples": 5, "train-loss": 0.5})}
    )


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


@pytest.mark.parametrize("spec", ["fp16", "int8", "topk:0.2", "topk:1"])
def test_a_compressed_reply_decodes_to_the_global_models_layout(spec):
    compression = Compression.parse(spec)
    assert compression is not None
    received = _model(0)
    trained = {
        k: v + (0.1 * np.ones_like(v) if v.dtype.kind == "f" else 1) for k, v in received.items()
    }
    encoded = compress_reply(
        _reply(trained), _record(received), compression, RecordDict(), base_round=4
    )
    assert list(encoded) == ["arrays", "metrics", COMPRESSION_RECORD]
    assert encoded[COMPRESSION_RECORD]["base-round"] == 4
    payload = encoded["arrays"]
    if compression.scheme != "topk":
        assert payload["w"].dtype == {"fp16": "float16", "int8": "int8"}[compression.scheme]
    else:
        assert payload["w::indices"].dtype == "int32" and payload["w::values"].dtype == "float32"
    assert payload["steps"].numpy().tolist() == [4, 5]

    decoded = decompress_reply(
        encoded, _record(received), compression, max_bytes=10**6, server_round=4
    )
    assert list(decoded) == ["arrays", "metrics"]
    assert dict(decoded["metrics"]) == {"num-examples": 5, "train-loss": 0.5}
    full = _numpy(decoded["arrays"])
    assert list(full) == list(received)
    for key, value in full.items():
        assert value.dtype == received[key].dtype and value.shape == received[key].shape
    assert full["steps"].tolist() == [4, 5]
    if compression.fraction == 1 or compression.scheme != "topk":
        np.testing.assert_allclose(full["w"], trained["w"], atol=1e-3)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        hnp.arrays(np.int32, (2, 7), elements=st.integers(-1000, 1000)), min_size=1, max_size=6
    ),
    st.sampled_from([0.1, 0.3, 0.5]),
)
def test_error_feedback_sends_the_sum_of_updates_minus_the_last_residual(deltas, fraction):
    # Integer-valued float32 updates and models: every sum below is exact.
    compression = Compression("topk", fraction)
    state = RecordDict()
    global_w = np.arange(14, dtype=np.float32).reshape(2, 7)
    sent_total = np.zeros((2, 7), np.float64)
    for server_round, delta in enumerate(deltas, start=1):
        received = {"w": global_w}
        trained = {"w": global_w + delta.astype(np.float32)}
        encoded = compress_reply(
            _reply(trained), _record(received), compression, state, base_round=server_round
        )
        decoded = decompress_reply(
            encoded, _record(received), compression, max_bytes=10**6, server_round=server_round
        )
        sent = decoded["arrays"]["w"].numpy() - global_w
        assert np.count_nonzero(sent) <= topk_count(14, fraction)
        sent_total += sent
        global_w = global_w + 1  # the server's model moves between rounds
    residual = state[RESIDUAL_RECORD]["w"].numpy()
    total = np.sum(deltas, axis=0, dtype=np.float64)
    np.testing.assert_array_equal(sent_total, total - residual)


def test_the_residual_must_match_the_model():
    compression = Compression("topk", 0.5)
    state = RecordDict({RESIDUAL_RECORD: _record({"w": np.zeros((2, 2), np.float32)})})
    with pytest.raises(RecordError, match="context state 'compression-residual': expected"):
        compress_reply(_reply(_model()), _record(_model()), compression, state)


def test_a_reply_whose_arrays_differ_from_the_received_model_is_refused():
    trained = {**_model(), "extra": np.zeros(2, np.float32)}
    with pytest.raises(RecordError, match="reply: expected the received model's arrays"):
        compress_reply(_reply(trained), _record(_model()), Compression("fp16"), RecordDict())


# ---------------------------------------------------------------- strict decoding

RECEIVED = _model(0)
TRAINED = {k: v + (0.25 if v.dtype.kind == "f" else 1) for k, v in RECEIVED.items()}


def _encoded(spec: str) -> RecordDict:
    compression = Compression.parse(spec)
    assert compression is not None
    return compress_reply(
        _reply(TRAINED), _record(RECEIVED), compression, RecordDict(), base_round=2
    )


def _set_array(content: RecordDict, key: str, value: Any) -> RecordDict:
    arrays = dict(content["arrays"].items())
    if value is None:
        del arrays[key]
    else:
        arrays[key] = value if isinstance(value, Array) else Array(np.asarray(value))
    content["arrays"] = ArrayRecord(arrays)
    return content


def _set_meta(content: RecordDict, key: str, value: Any) -> RecordDict:
    meta = dict(content[COMPRESSION_RECORD].items())
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    content[COMPRESSION_RECORD] = ConfigRecord(meta)
    return content


def _bad_bytes(array: Array, data: bytes) -> Array:
    return Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=data)


def _drop_meta(content: RecordDict) -> RecordDict:
    del content[COMPRESSION_RECORD]
    return content


def _second_arrays(content: RecordDict) -> RecordDict:
    content["arrays2"] = ArrayRecord()
    return content


def _with_bytes(key: str, data: bytes) -> Any:
    return lambda c: _set_array(c, key, _bad_bytes(c["arrays"][key], data))


def _meta(key: str, value: Any) -> Any:
    return lambda c: _set_meta(c, key, value)


def _arr(key: str, value: Any) -> Any:
    return lambda c: _set_array(c, key, value)


def _idx(*values: int, dtype: Any = np.int32) -> Any:
    return _arr("w::indices", np.array(values, dtype))


F16, F32 = np.float16, np.float32
SHAPE_W = r"shape \(6, 5\)"
MALFORMED = [
    ("fp16", _drop_meta, "expected an update compressed as 'fp16'"),
    ("fp16", _meta("scheme", "int8"), r"\['scheme'\]: expected the run's 'fp16', got 'int8'"),
    ("fp16", _meta("scheme", 16), r"expected the run's 'fp16', got 16"),
    ("fp16", _meta("base-round", 1), "expected an update of round 2's .* got one of round 1"),
    ("fp16", _meta("base-round", "2"), "expected a round number, got '2'"),
    ("fp16", _meta("extra", 1), "expected only keys .* got also 'extra'"),
    ("fp16", _arr("w", None), "missing 'w', unexpected none"),
    ("fp16", _arr("x", np.zeros(2, F16)), "missing none, unexpected 'x'"),
    ("fp16", _arr("w", np.zeros((6, 5), F32)), rf"\['w'\]: expected {SHAPE_W} and dtype float16"),
    ("fp16", _arr("w", np.zeros((5, 6), F16)), rf"expected {SHAPE_W} .* got shape \(5, 6\)"),
    ("fp16", _arr("steps", np.zeros(2, np.int32)), r"\['steps'\]: expected .* dtype int64"),
    ("fp16", _with_bytes("w", b"garbage"), "got undecodable bytes"),
    ("fp16", _with_bytes("w", Array(np.zeros(30, F16)).data), r"got bytes of shape \(30,\)"),
    ("int8", _meta("scale:w", None), r"\['scale:w'\]: expected int8's scale of 'w', got None"),
    ("int8", _meta("scale:w", "0.1"), "expected int8's scale of 'w', got '0.1'"),
    ("int8", _meta("scale:w", math.nan), "expected a finite scale >= 0, got nan"),
    ("int8", _meta("scale:w", math.inf), "expected a finite scale >= 0, got inf"),
    ("int8", _meta("scale:w", -0.1), "expected a finite scale >= 0, got -0.1"),
    ("int8", _meta("scale:steps", 1.0), "got also 'scale:steps'"),
    ("int8", _arr("w", np.zeros((6, 5), np.int16)), "dtype int8, got shape .* dtype int16"),
    ("topk:0.2", _idx(0, 1, 2, 3, 30, 5), "expected strictly increasing top-k indices"),
    ("topk:0.2", _idx(0, 1, 2, 3, 4, 30), r"expected top-k indices in \[0, 30\), got 0..30"),
    ("topk:0.2", _idx(-1, 1, 2, 3, 4, 5), r"expected top-k indices in \[0, 30\), got -1..5"),
    ("topk:0.2", _idx(0, 1, 1, 3, 4, 5), "expected strictly increasing top-k indices"),
    ("topk:0.2", _idx(5, 4, 3, 2, 1, 0), "expected strictly increasing top-k indices"),
    ("topk:0.2", _idx(*range(7)), r"\['w::indices'\]: expected shape \(6,\) .* got shape \(7,\)"),
    ("topk:0.2", _idx(*range(6), dtype=np.int64), "dtype int32, got shape .* dtype int64"),
    ("topk:0.2", _arr("w::values", np.zeros(6, np.float64)), "dtype float32, got .* dtype float64"),
    ("topk:0.2", _arr("w::values", None), "missing 'w::values'"),
    ("topk:0.2", _arr("w", np.zeros((6, 5), F32)), "unexpected 'w'"),
    ("topk:0.2", _meta("scheme", "topk:0.3"), "expected the run's 'topk:0.2', got 'topk:0.3'"),
    ("topk:0.2", _second_arrays, "reply: expected one ArrayRecord, got 2"),
]  # fmt: skip


@pytest.mark.parametrize(("spec", "corrupt", "match"), MALFORMED)
def test_decoding_refuses_malformed_payloads_naming_what_was_expected(spec, corrupt, match):
    compression = Compression.parse(spec)
    assert compression is not None
    content = corrupt(_encoded(spec))
    with pytest.raises(RecordError, match=match):
        decompress_reply(content, _record(RECEIVED), compression, max_bytes=10**6, server_round=2)


def test_decoding_refuses_a_payload_above_the_byte_limit():
    content = _encoded("int8")
    size = sum(len(a.data) for a in content["arrays"].values())
    decompress_reply(content, _record(RECEIVED), Compression("int8"), max_bytes=size)
    with pytest.raises(RecordError, match=f"at most {size - 1} bytes, got {size}"):
        decompress_reply(content, _record(RECEIVED), Compression("int8"), max_bytes=size - 1)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["fp16", "int8", "topk:0.2"]), st.data())
def test_random_bytes_in_any_payload_array_are_refused_cleanly(spec, data):
    content = _encoded(spec)
    key = data.draw(st.sampled_from(sorted(content["arrays"])))
    original = content["arrays"][key].data
    cut = data.draw(st.integers(0, len(original)))
    junk = data.draw(st.binary(max_size=64))
    corrupted = original[:cut] + junk
    _set_array(content, key, _bad_bytes(content["arrays"][key], corrupted))
    compression = Compression.parse(spec)
    assert compression is not None
    try:
        decoded = decompress_reply(content, _record(RECEIVED), compression, max_bytes=10**6)
    except RecordError:
        return
    # Bytes that still decode to the declared dtype and shape are a valid payload.
    assert list(decoded["arrays"]) == list(RECEIVED)


def test_decode_replies_keeps_errors_and_rejects_what_does_not_decode():
    run = RunSettings(compression="fp16")
    good = incoming_message(_encoded("fp16"))
    plain = incoming_message(_reply(TRAINED))
    kept, rejected = decode_replies([good, plain], _record(RECEIVED), run, server_round=2)
    assert kept == [good]
    assert list(good.content) == ["arrays", "metrics"]
    assert [m for m, _ in rejected] == [plain]
    assert "expected an update compressed as 'fp16'" in rejected[0][1]
    untouched = incoming_message(_reply(TRAINED))
    assert decode_replies([untouched], _record(RECEIVED), RunSettings()) == ([untouched], [])


def test_update_bytes_is_the_encoded_payloads_size():
    record = _record(RECEIVED)
    assert update_bytes(record, "") == sum(len(a.data) for a in record.values())
    for spec in ("fp16", "int8", "topk:0.2"):
        assert update_bytes(record, spec) == sum(
            len(a.data) for a in _encoded(spec)["arrays"].values()
        )
