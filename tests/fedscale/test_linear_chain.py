"""train() on linear chains runs a hand-written pass: it must train as autograd does."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedscale.datasets import load_dataset
from fedscale.linear_chain import linear_chain
from fedscale.models import build_model
from fedscale.synthetic import Synthetic
from fedscale.training import _chain_without_autograd, train

CPU = torch.device("cpu")


def _autograd_reference(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, batch: int, lr: float, seed: int
) -> float:
    """torch.optim.SGD on autograd with train()'s batches; return the last epoch's mean loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = torch.from_numpy(x.copy()), torch.from_numpy(y.copy())
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        total = 0.0
        for start in range(0, len(inputs), batch):
            idx = order[start : start + batch]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(inputs[idx]), targets[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
    return total / len(inputs)


def _deep_chain(features: int, classes: int) -> nn.Sequential:
    torch.manual_seed(11)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, 32),
        nn.ReLU(),
        nn.Linear(32, 16, bias=False),
        nn.ReLU(),
        nn.Identity(),
        nn.Linear(16, classes),
    )


@pytest.mark.parametrize("model_name", ["mlp-digits", "mlp-synthetic", "sequential"])
def test_train_on_a_chain_matches_torch_sgd_on_autograd(model_name):
    if model_name == "mlp-synthetic":
        data = Synthetic(1.0, 1.0, seed=2).client_data(7)
        x, y, shape, classes = data.x_train[:203], data.y_train[:203], (60,), 10
        batch = 10
    else:
        ds = load_dataset("digits", seed=0, test_fraction=0.2)
        x, y, shape, classes = ds.x_train[:301], ds.y_train[:301], ds.sample_shape, ds.num_classes
        batch = 16

    def fresh() -> nn.Module:
        if model_name == "sequential":
            return _deep_chain(int(np.prod(shape)), classes)
        return build_model("mlp", shape, classes, seed=3)

    ours, reference = fresh(), fresh()
    inputs, targets = torch.from_numpy(x.copy()), torch.from_numpy(y.copy())
    assert _chain_without_autograd(ours, list(ours.parameters()), inputs, targets), (
        "train() must take the hand-written pass here, or this test compares autograd to itself"
    )
    result = train(ours, x, y, epochs=3, batch_size=batch, lr=0.05, device=CPU, seed=4)
    expected_loss = _autograd_reference(reference, x, y, epochs=3, batch=batch, lr=0.05, seed=4)

    assert result.steps == 3 * -(-len(x) // batch)  # a partial last batch each epoch
    assert result.num_examples == len(x)
    assert result.loss == pytest.approx(expected_loss, rel=1e-5)
    for (name, got), expected in zip(
        ours.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=name)
    # Training moved the weights: the comparison is not of two untouched models.
    assert not torch.equal(
        ours.state_dict()["net.1.weight" if "mlp" in model_name else "1.weight"],
        fresh().state_dict()["net.1.weight" if "mlp" in model_name else "1.weight"],
    )


def test_only_chains_autograd_would_train_alike_take_the_hand_written_pass():
    ds = load_dataset("digits", seed=0, test_fraction=0.2)
    x = torch.from_numpy(ds.x_train[:20].copy())
    y = torch.from_numpy(ds.y_train[:20].copy())

    def mlp() -> nn.Module:
        return build_model("mlp", ds.sample_shape, ds.num_classes, seed=0)

    def _without_autograd(model, x, y):
        return _chain_without_autograd(model, list(model.parameters()), x, y)

    assert _without_autograd(mlp(), x, y) is not None
    frozen = mlp()
    next(frozen.parameters()).requires_grad_(False)
    hooked = mlp()
    hooked.net[2].register_forward_hook(lambda module, args, out: None)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 10))
    assert linear_chain(conv) is None
    assert _without_autograd(frozen, x, y) is None and _without_autograd(hooked, x, y) is None
    assert _without_autograd(mlp(), x[:0], y[:0]) is None  # no samples
    assert _without_autograd(mlp(), x.double(), y) is None  # another dtype
    assert _without_autograd(mlp(), x, y.int()) is None  # labels not int64
    assert _without_autograd(mlp(), x[..., :4], y) is None  # another width
    assert _without_autograd(mlp(), x, torch.full_like(y, 10)) is None  # not a class
    assert _without_autograd(mlp(), x, torch.full_like(y, -1)) is None


def test_labels_outside_the_classes_raise_torchs_error_as_before():
    ds = load_dataset("digits", seed=0, test_fraction=0.2)
    model = build_model("mlp", ds.sample_shape, ds.num_classes, seed=0)
    y = ds.y_train[:20].copy()
    y[3] = ds.num_classes
    with pytest.raises(IndexError, match="out of bounds"):
        train(model, ds.x_train[:20], y, epochs=1, batch_size=8, lr=0.1, device=CPU, seed=0)
