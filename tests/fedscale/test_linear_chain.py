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
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    mu: float = 0.0,
) -> float:
    """torch.optim.SGD on autograd with train()'s batches; return the last epoch's mean loss.

    With ``mu``, each batch's loss has FedProx's ``mu/2 ||w - w_start||^2`` added.
    """
    anchor = [p.detach().clone() for p in model.parameters()]
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
            pull = sum(
                ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
            )
            (loss + mu / 2 * pull).backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
    return total / len(inputs)


def _odd_chain(features: int, classes: int) -> nn.Sequential:
    # A relu on the input, two linear layers in a row, two relus in a row.
    torch.manual_seed(12)
    return nn.Sequential(
        nn.Flatten(),
        nn.ReLU(),
        nn.Linear(features, 24),
        nn.Linear(24, 20, bias=False),
        nn.ReLU(),
        nn.ReLU(),
        nn.Linear(20, classes),
    )


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


@pytest.mark.parametrize(
    "model_name", ["mlp-digits", "mlp-synthetic", "sequential", "odd-sequential"]
)
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
        if model_name == "odd-sequential":
            return _odd_chain(int(np.prod(shape)), classes)
        return build_model("mlp", shape, classes, seed=3)

    ours, reference = fresh(), fresh()
    inputs, targets = torch.from_numpy(x.copy()), torch.from_numpy(y.copy())
    assert _chain_without_autograd(ours, inputs, targets), (
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
    # Training moved every parameter: the comparison is not of untouched models.
    start = fresh().state_dict()
    assert all(not torch.equal(v, start[k]) for k, v in ours.state_dict().items())


# One sample (no shuffle to draw), one partial batch, exactly one full batch: the
# shapes of most clients of a digits federation, each a shortcut of train_chain;
# and two full batches (no partial one). With and without the proximal term.
@pytest.mark.parametrize("mu", [0.0, 0.5])
@pytest.mark.parametrize("size", [1, 5, 16, 32])
def test_small_clients_on_a_chain_match_torch_sgd_on_autograd(size, mu):
    ds = load_dataset("digits", seed=0, test_fraction=0.2)
    x, y = ds.x_train[:size], ds.y_train[:size]
    ours, reference = (build_model("mlp", ds.sample_shape, ds.num_classes, seed=5) for _ in "ab")
    result = train(ours, x, y, epochs=3, batch_size=16, lr=0.05, device=CPU, seed=8, proximal_mu=mu)
    expected_loss = _autograd_reference(reference, x, y, epochs=3, batch=16, lr=0.05, seed=8, mu=mu)
    assert (result.steps, result.num_examples) == (3 * -(-size // 16), size)
    assert result.loss == pytest.approx(expected_loss, rel=1e-5)
    for (name, got), expected in zip(
        ours.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=name)
        assert not torch.equal(
            got, build_model("mlp", ds.sample_shape, 10, seed=5).state_dict()[name]
        )


def test_the_proximal_term_on_a_chain_with_and_without_biases_matches_autograd():
    ds = load_dataset("digits", seed=0, test_fraction=0.2)
    x, y = ds.x_train[:150], ds.y_train[:150]
    ours, reference = _odd_chain(64, 10), _odd_chain(64, 10)
    result = train(ours, x, y, epochs=2, batch_size=16, lr=0.1, device=CPU, seed=6, proximal_mu=0.5)
    expected = _autograd_reference(reference, x, y, epochs=2, batch=16, lr=0.1, seed=6, mu=0.5)
    assert result.loss == pytest.approx(expected, rel=1e-5)  # the loss is the cross-entropy alone
    plain = _odd_chain(64, 10)
    train(plain, x, y, epochs=2, batch_size=16, lr=0.1, device=CPU, seed=6)
    for (name, got), want, free in zip(
        ours.state_dict().items(),
        reference.state_dict().values(),
        plain.state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
        assert not torch.allclose(got, free, atol=1e-4), name  # the term changed training


def test_only_chains_autograd_would_train_alike_take_the_hand_written_pass():
    ds = load_dataset("digits", seed=0, test_fraction=0.2)
    x = torch.from_numpy(ds.x_train[:20].copy())
    y = torch.from_numpy(ds.y_train[:20].copy())

    def mlp() -> nn.Module:
        return build_model("mlp", ds.sample_shape, ds.num_classes, seed=0)

    def _without_autograd(model, x, y):
        return _chain_without_autograd(model, x, y)

    assert _without_autograd(mlp(), x, y) is not None
    frozen = mlp()
    next(frozen.parameters()).requires_grad_(False)
    hooked = mlp()
    hooked.net[2].register_forward_hook(lambda module, args, out: None)
    extra = mlp()
    extra.register_parameter("scale", nn.Parameter(torch.ones(1)))  # trained by autograd only
    on_relu = mlp()
    on_relu.net[2].register_parameter("slope", nn.Parameter(torch.ones(1)))
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 10))
    assert linear_chain(conv) is None
    assert _without_autograd(frozen, x, y) is None and _without_autograd(hooked, x, y) is None
    assert _without_autograd(extra, x, y) is None and _without_autograd(on_relu, x, y) is None
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
