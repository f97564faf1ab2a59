from collections import OrderedDict

import pytest
import torch

from fedscale.exceptions import RecordError
from fedscale.models import build_model
from fedscale.records import (
    arrays_to_state_dict,
    load_arrays_into,
    state_dict_to_arrays,
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
