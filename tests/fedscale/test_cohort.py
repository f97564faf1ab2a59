import numpy as np
import pytest
import torch
from torch import nn

from fedscale.cohort import CohortTrained, cohort_support, register_cohort_model, train_cohort
from fedscale.datasets import load_dataset
from fedscale.exceptions import ConfigError, DataError, ModelError
from fedscale.models import build_model
from fedscale.training import train

CPU = torch.device("cpu")
RTOL, ATOL = 1e-4, 1e-5
# Unequal clients: one sample, smaller than a batch, exactly one batch, a partial
# last batch (17 = 16 + 1), several batches with a partial one (45), many (130).
SIZES = (45, 1, 17, 130, 7, 16)
SEEDS = (11, 7, 2**63 + 5, 0, 123456789, 42)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0, test_fraction=0.2)


def _clients(ds, sizes=SIZES, image=False):
    order = np.random.default_rng(3).permutation(len(ds.y_train))
    out, start = [], 0
    for n in sizes:
        idx = order[start : start + n]
        start += n
        x = ds.x_train[idx]
        out.append((x if image else x.reshape(n, -1), ds.y_train[idx]))
    return out


def _sequential(spec, shape, classes, data, seeds, *, epochs, batch_size, lr):
    """What the general path does: the global model loaded, then train() per client."""
    global_state = build_model(spec, shape, classes, seed=0).state_dict()
    out = []
    for (x, y), seed in zip(data, seeds, strict=True):
        model = build_model(spec, shape, classes)
        model.load_state_dict(global_state)
        result = train(
            model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, device=CPU, seed=seed
        )
        out.append((model.state_dict(), result))
    return out


def _assert_same(cohort: CohortTrained, expected):
    assert len(cohort) == len(expected)
    worst = 0.0
    for (params, result), (state, want) in zip(cohort, expected, strict=True):
        assert params.keys() == state.keys()
        for name, tensor in state.items():
            torch.testing.assert_close(params[name], tensor, rtol=RTOL, atol=ATOL)
            worst = max(worst, float((params[name] - tensor).abs().max()))
        assert (result.num_examples, result.steps) == (want.num_examples, want.steps)
        assert result.loss == pytest.approx(want.loss, rel=RTOL, abs=ATOL)
    return worst


@pytest.mark.parametrize("method", ["linear", "vmap"])
def test_mlp_cohort_matches_training_each_client_alone(digits, method):
    data = _clients(digits)
    shape = (64,)
    kwargs = dict(epochs=3, batch_size=16, lr=0.1)
    expected = _sequential("mlp", shape, 10, data, SEEDS, **kwargs)
    model = build_model("mlp", shape, 10, seed=0)
    cohort = train_cohort(model, data, seeds=SEEDS, device=CPU, method=method, **kwargs)
    _assert_same(cohort, expected)
    # Training moved every client away from the global model.
    start = model.state_dict()
    assert all(not torch.equal(p["net.1.weight"], start["net.1.weight"]) for p, _ in cohort)
    assert [r.steps for _, r in cohort] == [3 * -(-n // 16) for n in SIZES]


def test_cnn_cohort_matches_training_each_client_alone(digits):
    data = _clients(digits, sizes=(20, 1, 17, 33), image=True)
    seeds = (5, 6, 7, 8)
    kwargs = dict(epochs=2, batch_size=16, lr=0.05)
    expected = _sequential("cnn", digits.sample_shape, 10, data, seeds, **kwargs)
    model = build_model("cnn", digits.sample_shape, 10, seed=0)
    assert cohort_support(model).method == "vmap"
    cohort = train_cohort(model, data, seeds=seeds, device=CPU, **kwargs)
    _assert_same(cohort, expected)


def test_clients_in_any_order_and_in_chunks_give_the_same_results(digits):
    data = _clients(digits)
    kwargs = dict(epochs=2, batch_size=8, lr=0.1, device=CPU)
    model = build_model("mlp", (64,), 10, seed=0)
    whole = train_cohort(model, data, seeds=SEEDS, **kwargs)
    # Sorted by size, longest first: trained in place, no reordering.
    by_size = np.argsort([-n for n in SIZES], kind="stable")
    sorted_run = train_cohort(
        model, [data[i] for i in by_size], seeds=[SEEDS[i] for i in by_size], **kwargs
    )
    chunked = train_cohort(model, data, seeds=SEEDS, chunk_size=2, **kwargs)
    at_once = train_cohort(model, data, seeds=SEEDS, chunk_size=None, **kwargs)
    for i, j in enumerate(by_size):
        for name, tensor in whole.state_dict(int(j)).items():
            torch.testing.assert_close(sorted_run.state_dict(i)[name], tensor, rtol=0, atol=1e-6)
    for name, stacked in whole.parameters.items():
        torch.testing.assert_close(chunked.parameters[name], stacked, rtol=0, atol=1e-6)
        torch.testing.assert_close(at_once.parameters[name], stacked, rtol=0, atol=1e-6)
    # Other batch-mates change the rounding of a client's sums, nothing more.
    for got, want in zip(chunked.results, whole.results, strict=True):
        assert (got.num_examples, got.steps) == (want.num_examples, want.steps)
        assert got.loss == pytest.approx(want.loss, rel=1e-6)


def test_the_same_inputs_give_identical_results(digits):
    data = _clients(digits)
    kwargs = dict(epochs=2, batch_size=16, lr=0.1, seeds=SEEDS, device=CPU)
    model = build_model("mlp", (64,), 10, seed=0)
    a = train_cohort(model, data, **kwargs)
    b = train_cohort(model, data, **kwargs)
    assert all(torch.equal(a.parameters[k], b.parameters[k]) for k in a.parameters)
    assert a.results == b.results
    other = train_cohort(model, data, **{**kwargs, "seeds": [s + 1 for s in SEEDS]})
    assert not torch.equal(other.parameters["net.1.weight"], a.parameters["net.1.weight"])


def test_starting_state_is_the_global_model_and_the_model_is_left_alone(digits):
    data = _clients(digits, sizes=(30, 9))
    seeds = (1, 2)
    model = build_model("mlp", (64,), 10, seed=0)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    global_state = build_model("mlp", (64,), 10, seed=99).state_dict()
    cohort = train_cohort(
        model, data, epochs=1, batch_size=16, lr=0.1, seeds=seeds, device=CPU, state=global_state
    )
    assert not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    for i, ((x, y), seed) in enumerate(zip(data, seeds, strict=True)):
        alone = build_model("mlp", (64,), 10)
        alone.load_state_dict(global_state)
        train(alone, x, y, epochs=1, batch_size=16, lr=0.1, device=CPU, seed=seed)
        trained = build_model("mlp", (64,), 10)
        trained.load_state_dict(cohort.state_dict(i))  # a complete state dict
        for name, tensor in alone.state_dict().items():
            torch.testing.assert_close(trained.state_dict()[name], tensor, rtol=RTOL, atol=ATOL)


class _Tanh(nn.Module):
    supports_cohort = True

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 20)
        self.b = nn.Linear(20, 10)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class _Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 20)
        self.norm = nn.BatchNorm1d(20)
        self.b = nn.Linear(20, 10)

    def forward(self, x):
        return self.b(torch.relu(self.norm(self.a(x))))


register_cohort_model(_Normed)  # declared, and still refused: BatchNorm


def test_a_declared_user_model_trains_through_vmap(digits):
    data = _clients(digits, sizes=(3, 40, 17))
    seeds = (4, 5, 6)
    torch.manual_seed(0)
    model = _Tanh()
    assert cohort_support(model).method == "vmap"
    cohort = train_cohort(model, data, epochs=2, batch_size=16, lr=0.1, seeds=seeds, device=CPU)
    for i, ((x, y), seed) in enumerate(zip(data, seeds, strict=True)):
        alone = _Tanh()
        alone.load_state_dict(model.state_dict())
        want = train(alone, x, y, epochs=2, batch_size=16, lr=0.1, device=CPU, seed=seed)
        params, got = cohort[i]
        for name, tensor in alone.state_dict().items():
            torch.testing.assert_close(params[name], tensor, rtol=RTOL, atol=ATOL)
        assert got.loss == pytest.approx(want.loss, rel=RTOL)


def test_a_plain_sequential_of_linear_and_relu_needs_no_declaration(digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10, bias=False))
    support = cohort_support(model)
    assert support and support.method == "linear"
    data = _clients(digits, sizes=(5, 21))
    cohort = train_cohort(model, data, epochs=2, batch_size=4, lr=0.1, seeds=(1, 2), device=CPU)
    for i, ((x, y), seed) in enumerate(zip(data, (1, 2), strict=True)):
        alone = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10, False))
        alone.load_state_dict(model.state_dict())
        train(alone, x, y, epochs=2, batch_size=4, lr=0.1, device=CPU, seed=seed)
        for name, tensor in alone.state_dict().items():
            torch.testing.assert_close(cohort.state_dict(i)[name], tensor, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (_Normed(), r"batch normalisation uses statistics of the whole batch"),
        (
            nn.Sequential(nn.Linear(64, 10), nn.Dropout(0.2)),
            r"not declared fit for cohort training",
        ),
        (build_model("char-lstm-small", (8,), 10), r"not declared fit for cohort training"),
    ],
)
def test_ineligible_models_are_refused_with_the_reason(digits, model, reason):
    support = cohort_support(model)
    assert not support and support.method is None
    assert support.reason
    with pytest.raises(ModelError, match=reason + r".*train the clients one by one"):
        train_cohort(
            model, _clients(digits, (4,)), epochs=1, batch_size=4, lr=0.1, seeds=[0], device=CPU
        )


def test_dropout_and_frozen_parameters_refused_even_when_declared():
    class Dropping(_Tanh):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)

    support = cohort_support(Dropping())
    assert not support and "dropout with p=0.5" in support.reason
    frozen = _Tanh()
    frozen.a.weight.requires_grad_(False)
    support = cohort_support(frozen)
    assert not support and "frozen parameters (a.weight)" in support.reason


def test_linear_method_refused_for_other_models(digits):
    model = build_model("cnn", digits.sample_shape, 10, seed=0)
    with pytest.raises(ModelError, match=r"method 'linear' expects a stack of Flatten, Linear"):
        train_cohort(
            model,
            _clients(digits, (4,), image=True),
            epochs=1,
            batch_size=4,
            lr=0.1,
            seeds=[0],
            device=CPU,
            method="linear",
        )


def _call(data, **overrides):
    kwargs = dict(epochs=1, batch_size=4, lr=0.1, seeds=[0] * len(data), device=CPU)
    kwargs.update(overrides)
    return train_cohort(build_model("mlp", (64,), 10, seed=0), data, **kwargs)


def test_bad_settings_are_config_errors(digits):
    data = _clients(digits, (4, 5))
    cases = [
        ({"epochs": 0}, r"expected epochs an integer >= 1, got 0"),
        ({"batch_size": 2.0}, r"expected batch_size an integer >= 1, got 2.0"),
        ({"lr": float("nan")}, r"expected lr a finite number > 0, got nan"),
        ({"lr": 0}, r"expected lr a finite number > 0, got 0"),
        ({"seeds": [1]}, r"expected one seed per client \(2\), got 1"),
        ({"seeds": [1, -1]}, r"expected seeds integers >= 0, got -1"),
        ({"method": "fast"}, r"expected method one of \('auto', 'linear', 'vmap'\), got 'fast'"),
        ({"chunk_size": 0}, r"expected chunk_size an integer >= 1, 'auto' or None, got 0"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            _call(data, **overrides)
    with pytest.raises(ConfigError, match=r"expected at least one client's data, got none"):
        _call([])


def test_bad_data_is_a_data_error(digits):
    (x, y), (x2, y2) = _clients(digits, (4, 5))
    with pytest.raises(DataError, match=r"client 1: expected at least one training sample"):
        _call([(x, y), (x2[:0], y2[:0])])
    with pytest.raises(DataError, match=r"client 1: expected as many labels as samples"):
        _call([(x, y), (x2, y2[:3])])
    with pytest.raises(DataError, match=r"client 1: expected samples like client 0's"):
        _call([(x, y), (x2.astype(np.float64), y2)])
    with pytest.raises(DataError, match=r"client 0: expected y a 1-D array of integer labels"):
        _call([(x, y.astype(np.float32))])
    with pytest.raises(DataError, match=r"expected labels in 0..9 .*, got labels from -1 to 10"):
        _call([(x, np.full(4, 10)), (x2, np.full(5, -1))])
    with pytest.raises(DataError, match=r"client 0: expected numpy arrays x and y"):
        _call([(torch.from_numpy(x), y)])


def test_bad_state_is_a_model_error(digits):
    data = _clients(digits, (4,))
    state = build_model("mlp", (64,), 10, seed=0).state_dict()
    with pytest.raises(ModelError, match=r"missing \['net.3.bias'\]"):
        _call(data, state={k: v for k, v in state.items() if k != "net.3.bias"})
    with pytest.raises(ModelError, match=r"'net.1.weight': expected a tensor of shape \(128, 64\)"):
        _call(data, state={**state, "net.1.weight": torch.zeros(3)})


def test_register_cohort_model_checks_its_argument():
    with pytest.raises(ModelError, match=r"expected a torch.nn.Module subclass, got 3"):
        register_cohort_model(3)  # type: ignore[arg-type]


def test_a_model_that_does_not_fit_the_samples_is_refused(digits):
    images = _clients(digits, (6, 3), image=True)
    kwargs = dict(epochs=1, batch_size=4, lr=0.1, seeds=(1, 2), device=CPU)
    # Linear on (1, 8, 8) samples acts on their last axis: no (batch, classes) logits.
    with pytest.raises(
        ModelError, match=r"expected the model to map a batch to \(batch, classes\)"
    ):
        train_cohort(nn.Sequential(nn.Linear(8, 10)), images, **kwargs)
    with pytest.raises(
        DataError, match=r"expected samples the model takes, but a sample of client 0"
    ):
        train_cohort(
            nn.Sequential(nn.Linear(9, 10)), [(x[:, 0, 0], y) for x, y in images], **kwargs
        )
