"""FedProx's proximal term in local training (fedscale.training.train's proximal_mu)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedscale.exceptions import ConfigError
from fedscale.models import build_model
from fedscale.training import train

CPU = torch.device("cpu")


def _data(n: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=n).astype(np.int64)
    return x, y


def _trained(mu: float | None, *, epochs: int = 3, anchor=None) -> dict[str, torch.Tensor]:
    model = build_model("mlp", (1, 8, 8), 10, seed=3)
    x, y = _data()
    kwargs = {} if mu is None else {"proximal_mu": mu}
    if anchor is not None:
        kwargs["global_params"] = anchor
    train(model, x, y, epochs=epochs, batch_size=16, lr=0.1, device=CPU, seed=5, **kwargs)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5)


def test_mu_zero_is_exactly_plain_training():
    plain, zero = _trained(None), _trained(0.0)
    assert all(torch.equal(plain[k], zero[k]) for k in plain)


def test_mu_tending_to_zero_tends_to_fedavgs_training():
    plain = _trained(0.0)
    for mu, tol in ((1e-3, 1e-3), (1e-6, 1e-6), (1e-9, 1e-8)):
        near = _trained(mu)
        assert _distance(near, plain) < tol * max(1.0, _distance(plain, _start()))
    assert _distance(_trained(1e-9), plain) < _distance(_trained(1e-3), plain)


def _start() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in build_model("mlp", (1, 8, 8), 10, seed=3).state_dict().items()}


def test_the_proximal_term_changes_training_and_keeps_it_near_the_global_model():
    start, plain, prox = _start(), _trained(0.0), _trained(1.0)
    assert _distance(prox, plain) > 1e-3
    assert _distance(prox, start) < _distance(plain, start)


def test_each_step_is_sgd_on_cross_entropy_plus_the_proximal_term():
    """Reference: autograd of ``CE + mu/2 ||w - w_g||^2`` and torch.optim.SGD, batch by batch."""
    mu, lr, batch = 0.7, 0.1, 16
    x, y = _data(48)
    model = build_model("mlp", (1, 8, 8), 10, seed=3)
    reference = copy.deepcopy(model)
    anchor = [p.detach().clone() for p in reference.parameters()]
    train(model, x, y, epochs=2, batch_size=batch, lr=lr, device=CPU, seed=9, proximal_mu=mu)

    optimizer = torch.optim.SGD(reference.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(9)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(2):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            optimizer.zero_grad()
            loss = F.cross_entropy(reference(inputs[idx]), targets[idx])
            prox = sum(
                ((p - a) ** 2).sum() for p, a in zip(reference.parameters(), anchor, strict=True)
            )
            (loss + mu / 2 * prox).backward()
            optimizer.step()
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_global_params_given_explicitly_are_the_anchor():
    far = [torch.full_like(p, 0.5) for p in build_model("mlp", (1, 8, 8), 10, seed=3).parameters()]
    pulled = _trained(5.0, anchor=far)
    default = _trained(5.0)
    assert _distance(pulled, default) > 1e-2
    # Pulled towards 0.5 everywhere: closer to it than training anchored at the start.
    half = {k: torch.full_like(v, 0.5) for k, v in pulled.items()}
    assert _distance(pulled, half) < _distance(default, half)


@pytest.mark.parametrize("mu", [-0.1, float("nan"), float("inf")])
def test_bad_mu_is_refused(mu):
    with pytest.raises(ConfigError, match=r"proximal-mu: expected a finite number >= 0"):
        _trained(mu)


def test_anchor_of_the_wrong_shape_is_refused():
    with pytest.raises(ConfigError, match=r"global_params: expected 4 tensors shaped like"):
        _trained(0.1, anchor=[torch.zeros(3)])
