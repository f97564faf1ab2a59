import numpy as np
import pytest
import torch

from fedscale.datasets import load_dataset
from fedscale.exceptions import ConfigError, DeviceError
from fedscale.models import build_model
from fedscale.training import evaluate, resolve_device, train

CPU = torch.device("cpu")


def test_auto_picks_cuda_then_mps_then_cpu():
    expected = (
        "cuda"
        if torch.cuda.is_available()
        else "mps"
        if torch.backends.mps.is_available()
        else "cpu"
    )
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_asking_for_cuda_without_a_gpu_is_an_error_not_a_fallback():
    with pytest.raises(DeviceError, match=r"device cuda: expected a CUDA GPU, but torch sees none"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match=r"device cuda:1: expected a CUDA GPU"):
        resolve_device("cuda:1")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without Apple MPS")
def test_asking_for_mps_without_it_is_an_error():
    with pytest.raises(DeviceError, match=r"device mps: expected Apple Metal"):
        resolve_device("mps")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "CPU", "", "cpu\n", "cuda:\u0662"])
def test_bad_device_names_are_config_errors(name):
    with pytest.raises(ConfigError, match=r"expected one of auto, cpu, cuda, cuda:N, mps"):
        resolve_device(name)


def test_training_learns_and_is_deterministic_for_a_seed():
    ds = load_dataset("digits", seed=0, test_fraction=0.2)
    weights = []
    for _ in range(2):
        model = build_model("mlp", ds.sample_shape, ds.num_classes, seed=0)
        before = evaluate(model, ds.x_test, ds.y_test, device=CPU)
        result = train(
            model,
            ds.x_train,
            ds.y_train,
            epochs=3,
            batch_size=32,
            lr=0.1,
            device=CPU,
            seed=9,
        )
        after = evaluate(model, ds.x_test, ds.y_test, device=CPU)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert result.num_examples == len(ds.y_train)
    assert result.steps == 3 * int(np.ceil(len(ds.y_train) / 32))
    assert before.accuracy < 0.3 and after.accuracy > 0.85 and after.loss < before.loss
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


def test_evaluate_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2500, 5)).astype(np.float32)
    y = rng.integers(0, 3, 2500)
    model = build_model("mlp", (5,), 3, seed=1)
    result = evaluate(model, x, y, device=CPU, batch_size=1000)
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    expected_loss = torch.nn.functional.cross_entropy(logits.double(), torch.from_numpy(y)).item()
    assert result.accuracy == pytest.approx((logits.argmax(1).numpy() == y).mean())
    assert result.loss == pytest.approx(expected_loss, rel=1e-5)


def test_training_takes_torch_sgds_steps_bit_for_bit():
    # train() applies p -= lr * grad itself; it must be exactly torch.optim.SGD's update.
    from torch import nn
    from torch.nn import functional as F

    ds = load_dataset("digits", seed=0, test_fraction=0.2)
    x, y = ds.x_train[:300], ds.y_train[:300]

    def frozen_first_layer():
        model = build_model("mlp", ds.sample_shape, ds.num_classes, seed=3)
        next(model.parameters()).requires_grad_(False)  # a frozen parameter stays put
        return model

    ours = frozen_first_layer()
    result = train(ours, x, y, epochs=2, batch_size=16, lr=0.05, device=CPU, seed=4)

    reference: nn.Module = frozen_first_layer()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(4)
    inputs, targets = torch.from_numpy(x.copy()), torch.from_numpy(y.copy())
    for _ in range(2):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), 16):
            idx = order[start : start + 16]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(reference(inputs[idx]), targets[idx]).backward()
            optimizer.step()
    assert result.steps == 2 * 19
    for (name, got), expected in zip(
        ours.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(got, expected), name
    assert torch.equal(
        next(ours.parameters()),
        next(build_model("mlp", ds.sample_shape, ds.num_classes, seed=3).parameters()),
    )
