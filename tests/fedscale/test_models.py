import pytest
import torch
from torch import nn

from fedscale.exceptions import ModelError
from fedscale.models import build_model, register_model


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_mlp_on_digits_has_about_ten_thousand_parameters():
    assert n_params(build_model("mlp", (1, 8, 8), 10)) == 64 * 128 + 128 + 128 * 10 + 10


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_cnn_outputs_logits_for_each_image_size(shape):
    model = build_model("cnn", shape, 7)
    assert model(torch.zeros(4, *shape)).shape == (4, 7)


def test_same_seed_same_initial_weights_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("mlp", (4,), 3, seed=5)
    after = torch.rand(1)
    b = build_model("mlp", (4,), 3, seed=5)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert torch.equal(before, after), "building a seeded model leaves the global RNG alone"


def small_net(input_shape, num_classes):
    return nn.Sequential(
        nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes)
    )


def no_arg_net():
    return nn.Linear(3, 2)


def not_a_module():
    return "nope"


def test_user_factories_by_module_attr_and_registration():
    assert build_model("tests.fedscale.test_models:small_net", (2, 2), 4)(
        torch.zeros(1, 2, 2)
    ).shape == (1, 4)
    assert isinstance(build_model("tests.fedscale.test_models:no_arg_net", (3,), 2), nn.Linear)
    register_model("tiny", small_net)
    assert isinstance(build_model("tiny", (5,), 2), nn.Sequential)


@pytest.mark.parametrize(
    ("spec", "shape", "message"),
    [
        (
            "resnet",
            (1, 8, 8),
            r"expected one of mlp, cnn, char-lstm, char-lstm-small or MODULE:ATTR, got 'resnet'",
        ),
        (
            "tests.fedscale.test_models:not_a_module",
            (3,),
            r"return a torch.nn.Module, got str",
        ),
        ("tests.fedscale.test_models:missing", (3,), r"has no attribute 'missing'"),
        ("no_such_module_xyz:make", (3,), r"importable module 'no_such_module_xyz'"),
        (
            "cnn",
            (64,),
            r"image samples of shape \(channels, height, width\), got \(64,\)",
        ),
    ],
)
def test_bad_model_specs_are_clear_errors(spec, shape, message):
    with pytest.raises(ValueError, match=message):
        build_model(spec, shape, 10)


def test_model_error_is_a_value_error():
    assert issubclass(ModelError, ValueError)
