from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedscale.exceptions import RecordError
from fedscale.models import build_model
from fedscale.records import (
    arrays_to_state_dict,
    load_arrays_into,
    stacked_to_arrays,
    state_dict_to_arrays,
    train_reply_content,
)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.int64,
        torch.int32,
        torch.uint8,
        torch.bool,
    ],
)
def test_round_trip_is_exact_for_every_numpy_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(5, 7, generator=g) * 1000
    tensor = raw > 0 if dtype is torch.bool else raw.to(dtype)
    sd = OrderedDict(
        w=tensor,
        b=tensor[0].clone(),
        empty=torch.zeros(0, dtype=dtype),
        scalar=tensor[0, 0].clone(),
    )
    back = arrays_to_state_dict(state_dict_to_arrays(sd))
    assert list(back) == list(sd)
    for key in sd:
        assert back[key].dtype == sd[key].dtype and back[key].shape == sd[key].shape
        assert torch.equal(back[key], sd[key])


def test_model_round_trip_keeps_every_bit():
    model = build_model("cnn", (1, 28, 28), 10, seed=0)
    other = build_model("cnn", (1, 28, 28), 10, seed=1)
    load_arrays_into(other, state_dict_to_arrays(model.state_dict()))
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_bfloat16_is_refused_not_cast():
    with pytest.raises(RecordError, match=r"dtype numpy can hold, got torch.bfloat16"):
        state_dict_to_arrays({"w": torch.zeros(2, dtype=torch.bfloat16)})


def test_loading_mismatched_arrays_names_the_difference():
    mlp = build_model("mlp", (1, 8, 8), 10)
    wrong_shape = build_model("mlp", (1, 8, 8), 5)
    with pytest.raises(
        RecordError,
        match=r"arrays\['net.3.weight'\]: expected shape \(10, 128\).*got shape \(5, 128\)",
    ):
        load_arrays_into(mlp, state_dict_to_arrays(wrong_shape.state_dict()))
    cnn = build_model("cnn", (1, 8, 8), 10)
    with pytest.raises(RecordError, match=r"missing \['net.1.weight'"):
        load_arrays_into(mlp, state_dict_to_arrays(cnn.state_dict()))


def test_conform_dtypes_restores_integer_and_float_precision():
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedscale.records import conform_dtypes

    def record(**arrays):
        return ArrayRecord({k: Array(v) for k, v in arrays.items()})

    reference = record(
        w=np.zeros(3, np.float32), n=np.array(4, np.int64), mask=np.array([True, False])
    )
    averaged = record(w=np.array([0.5, 1.0, 1.5]), n=np.array(6.6), mask=np.array([0.9, 0.2]))
    out = conform_dtypes(averaged, reference)
    assert out["w"].numpy().dtype == np.float32 and out["w"].numpy().tolist() == [0.5, 1.0, 1.5]
    assert out["n"].numpy().dtype == np.int64 and int(out["n"].numpy()) == 7
    assert out["mask"].numpy().tolist() == [True, False]


def test_fast_record_building_equals_flowers_public_constructors():
    from flwr.app import ArrayRecord

    model = build_model("cnn", (1, 8, 8), 10, seed=3)
    fast = state_dict_to_arrays(model.state_dict())
    public = ArrayRecord(model.state_dict())
    assert fast == public
    assert list(fast) == list(public)
    assert fast.object_id == public.object_id
    for key in public:
        assert fast[key].object_id == public[key].object_id
        assert (fast[key].dtype, fast[key].shape, fast[key].stype) == (
            public[key].dtype,
            public[key].shape,
            public[key].stype,
        )
    fast["extra"] = public[next(iter(public))]  # a fast-built record stays a normal one
    assert len(fast) == len(public) + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.bool])
def test_stacked_records_equal_each_rows_state_dict_record(dtype):
    g = torch.Generator().manual_seed(1)
    stacked = {
        "w": (torch.randn(5, 3, 4, generator=g) * 10).to(dtype),
        "b": (torch.randn(5, 3, generator=g) * 10).to(dtype),
        "scalar": torch.arange(5).to(dtype),  # a 0-d tensor per row
        "w.t": (torch.randn(5, 4, 3, generator=g) * 10).to(dtype).transpose(1, 2),  # not contiguous
    }
    records = stacked_to_arrays(stacked)
    assert len(records) == 5
    for i, record in enumerate(records):
        want = state_dict_to_arrays({k: t[i] for k, t in stacked.items()})
        assert list(record) == list(want)
        assert record.object_id == want.object_id
        for key in want:
            assert record[key].__dict__ == want[key].__dict__
        got = arrays_to_state_dict(record)
        assert all(torch.equal(got[k], stacked[k][i]) for k in stacked)


def test_stacked_records_refuse_what_a_state_dict_record_refuses():
    with pytest.raises(RecordError, match="expected a dtype numpy can hold"):
        stacked_to_arrays({"w": torch.zeros(2, 3, dtype=torch.bfloat16)})
    with pytest.raises(RecordError, match=r"expected a tensor of 2 rows, got shape \(3,\)"):
        stacked_to_arrays({"a": torch.zeros(2, 4), "b": torch.zeros(3)})
    with pytest.raises(RecordError, match="expected a torch.Tensor, got list"):
        stacked_to_arrays({"a": [1, 2]})  # type: ignore[dict-item]
    assert stacked_to_arrays({"a": torch.zeros(0, 4)}) == []


def test_train_reply_content_equals_flowers_public_constructors():
    from flwr.app import MetricRecord, RecordDict

    arrays = state_dict_to_arrays(build_model("mlp", (64,), 10, seed=2).state_dict())
    for examples, loss in [(3, 0.25), (2**40, float("nan")), (1, -0.0)]:
        fast = train_reply_content(arrays, examples, loss)
        public = RecordDict(
            {
                "arrays": arrays,
                "metrics": MetricRecord({"num-examples": examples, "train-loss": loss}),
            }
        )
        assert list(fast) == list(public) == ["arrays", "metrics"]
        assert fast.object_id == public.object_id
        assert fast["metrics"].deflate() == public["metrics"].deflate()
        fast["more"] = MetricRecord({"x": 1})  # a fast-built record stays a normal one
        assert "more" in fast.metric_records
    # Values the checked constructors refuse still reach them, and their errors.
    with pytest.raises(TypeError):
        train_reply_content(arrays, 3, "0.25")  # type: ignore[arg-type]
    assert train_reply_content(arrays, 3, 1)["metrics"]["train-loss"] == 1  # an int loss


def _flower_bytes(message) -> int:
    """What Flower ships for ``message``: every object of its tree, deflated (the reference)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def _message(content, *, node: int, when: float, error=None):
    from flwr.app import Message, Metadata

    metadata = Metadata(
        run_id=12345678901234,
        message_id="",
        src_node_id=node,
        dst_node_id=1,
        reply_to_message_id="f" * 64,
        group_id="3",
        created_at=when,
        ttl=600.0,
        message_type="train",
    )
    if error is not None:
        return Message(metadata=metadata, error=error)
    return Message(metadata=metadata, content=content)


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 40), min_size=0, max_size=3), min_size=1, max_size=4),
    dtype=st.sampled_from(["float32", "float16", "int64", "uint8", "bool"]),
    examples=st.integers(0, 2**62),
    loss=st.floats(allow_nan=False),
    node=st.integers(1, 2**63 - 1),
    when=st.floats(0, 4e9),
    seed=st.integers(0, 2**32 - 1),
    duplicate=st.booleans(),
)
def test_serialized_size_equals_flowers_own_serialization(
    shapes, dtype, examples, loss, node, when, seed, duplicate
):
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from fedscale.records import serialized_size

    rng = np.random.default_rng(seed)
    values = {
        f"layer{i}.weight": (rng.standard_normal(shape) * 100).astype(dtype)
        if shape
        else np.array(3, dtype=dtype)
        for i, shape in enumerate(shapes)
    }
    if duplicate:
        # Equal arrays (two zero biases of one size, say) are one object to Flower.
        values["copy.weight"] = next(iter(values.values())).copy()
    arrays = ArrayRecord({k: Array(v) for k, v in values.items()})
    content = RecordDict(
        {
            "arrays": arrays,
            "metrics": MetricRecord({"num-examples": examples, "train-loss": loss}),
            "config": ConfigRecord({"note": "x" * (seed % 50)}),
        }
    )
    message = _message(content, node=node, when=when)
    # Twice: the second answer comes from the memo, and must still be exact.
    assert serialized_size(message) == _flower_bytes(message)
    assert serialized_size(message) == _flower_bytes(message)


def test_serialized_size_of_an_array_of_several_chunks_and_of_an_error_reply():
    import numpy as np
    from flwr.app import Array, ArrayRecord, Error, RecordDict

    from fedscale.records import serialized_size

    big = ArrayRecord({"w": Array(np.arange(3_000_000, dtype=np.float32))})  # 12 MB, 3 chunks
    message = _message(RecordDict({"arrays": big}), node=5, when=1.0)
    size = serialized_size(message)
    assert size == _flower_bytes(message)
    assert size > 12_000_000
    # 18 MB of zeros in 4 chunks: the first starts with the .npy header, the next
    # two are 5 MB of zeros each, one object to Flower.
    zeros = ArrayRecord({"w": Array(np.zeros(4_500_000, dtype=np.float32))})
    message = _message(RecordDict({"arrays": zeros}), node=5, when=1.0)
    assert serialized_size(message) == _flower_bytes(message) < 14_000_000
    failed = _message(None, node=5, when=1.0, error=Error(code=2, reason="client crashed"))
    assert serialized_size(failed) == _flower_bytes(failed)


def test_serialized_size_tells_equal_arrays_from_distinct_ones_of_the_same_shape():
    import numpy as np
    from flwr.app import Array, ArrayRecord, RecordDict

    from fedscale.records import serialized_size

    def message(second: np.ndarray):
        arrays = ArrayRecord({"a.bias": Array(np.ones(64, np.float32)), "b.bias": Array(second)})
        return _message(RecordDict({"arrays": arrays}), node=3, when=2.0)

    distinct = message(np.full(64, 2.0, np.float32))
    equal = message(np.ones(64, np.float32))  # the same shape, and the same bytes as a.bias
    assert serialized_size(distinct) == _flower_bytes(distinct)
    assert serialized_size(equal) == _flower_bytes(equal) < _flower_bytes(distinct)


@settings(max_examples=200, deadline=None)
@given(
    run_id=st.one_of(st.just(0), st.integers(1, 2**64 - 1)),
    src=st.one_of(st.just(0), st.integers(1, 2**64 - 1)),
    dst=st.one_of(st.just(0), st.integers(1, 2**64 - 1)),
    reply_to=st.text(max_size=70),
    group=st.text(max_size=12),
    message_type=st.sampled_from(["train", "evaluate", "query", "train.fit", "query.x1"]),
    ttl=st.one_of(st.sampled_from([0.0, -0.0]), st.floats(allow_nan=False)),
    when=st.one_of(st.sampled_from([0.0, -0.0]), st.floats(0, 4e9)),
)
def test_serialized_size_is_exact_for_any_metadata(
    run_id, src, dst, reply_to, group, message_type, ttl, when
):
    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, Metadata, RecordDict

    from fedscale.records import serialized_bytes

    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(3, np.float32))})})
    metadata = Metadata(
        run_id=run_id,
        message_id="",
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id=group,
        created_at=when,
        ttl=ttl,
        message_type=message_type,
    )
    message = Message(metadata=metadata, content=content)
    # Twice: the second answer comes from the memo of its metadata's layout.
    assert serialized_bytes([message]) == _flower_bytes(message)
    assert serialized_bytes([message]) == _flower_bytes(message)
