"""Synthetic(alpha, beta): per-client determinism, the generating law, spec parsing."""

import math

import numpy as np
import pytest

from fedscale.datasets import load_dataset
from fedscale.exceptions import DataError
from fedscale.population import data_provider
from fedscale.synthetic import (
    Synthetic,
    SyntheticSpec,
    is_synthetic_spec,
    parse_synthetic_spec,
)


def _same(a, b):
    return all(
        np.array_equal(getattr(a, f), getattr(b, f))
        for f in ("x_train", "y_train", "x_test", "y_test")
    )


def test_a_client_is_the_same_whatever_was_generated_before():
    alone = Synthetic(1.0, 1.0, seed=3).client_data(17)
    other = Synthetic(1.0, 1.0, seed=3)
    for cid in (0, 1, 2, 99, 18, 16):
        other.client_data(cid)
    assert _same(alone, other.client_data(17))
    assert _same(alone, Synthetic(1.0, 1.0, seed=3).client_data(17))


def test_seed_and_client_id_both_change_the_data():
    base = Synthetic(1.0, 1.0, seed=3)
    a, b = base.client_data(5), base.client_data(6)
    c = Synthetic(1.0, 1.0, seed=4).client_data(5)
    assert not np.array_equal(a.x_train[:5], b.x_train[:5])
    assert not np.array_equal(a.x_train[:5], c.x_train[:5])


def test_arrays_are_read_only_float32_features_and_int64_labels():
    data = Synthetic(0.5, 0.5).client_data(0)
    assert data.x_train.dtype == np.float32 and data.x_train.shape[1:] == (60,)
    assert data.y_train.dtype == np.int64
    for a in (data.x_train, data.y_train, data.x_test, data.y_test):
        assert not a.flags.writeable
    assert set(np.unique(data.y_train)) <= set(range(10))


def test_labels_are_the_argmax_of_the_clients_own_linear_model():
    syn = Synthetic(1.0, 1.0, seed=11)
    for cid in (0, 3, 42):
        params = syn.parameters(cid)
        data = syn.client_data(cid)
        x = np.concatenate([data.x_train, data.x_test]).astype(np.float64)
        y = np.concatenate([data.y_train, data.y_test])
        logits = x @ params.weights.T + params.bias
        # softmax by hand: argmax of the probabilities is the label
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        assert np.array_equal(np.argmax(probs, axis=1), y)
        # another client's model labels the same inputs differently
        other = syn.parameters(cid + 1)
        assert np.mean(np.argmax(x @ other.weights.T + other.bias, axis=1) != y) > 0.2


def test_the_generating_parameters_follow_the_definition():
    alpha, beta = 2.0, 0.5
    syn = Synthetic(alpha, beta, seed=1)
    params = [syn.parameters(cid) for cid in range(2000)]
    u = np.array([p.u for p in params])
    b_means = np.array([p.b_mean for p in params])
    assert np.mean(u) == pytest.approx(0.0, abs=0.15)
    assert np.std(u) == pytest.approx(alpha, rel=0.06)
    assert np.std(b_means) == pytest.approx(beta, rel=0.06)
    # W_k and b_k entries ~ N(u_k, 1); v_k entries ~ N(B_k, 1)
    w_resid = np.concatenate([(p.weights - p.u).ravel() for p in params[:300]])
    b_resid = np.concatenate([p.bias - p.u for p in params[:300]])
    v_resid = np.concatenate([p.input_mean - p.b_mean for p in params[:300]])
    assert params[0].weights.shape == (10, 60) and params[0].input_mean.shape == (60,)
    for resid in (w_resid, b_resid, v_resid):
        assert np.mean(resid) == pytest.approx(0.0, abs=0.05)
        assert np.std(resid) == pytest.approx(1.0, rel=0.05)


def test_inputs_have_the_clients_mean_and_the_diagonal_power_law_covariance():
    syn = Synthetic(1.0, 1.0, seed=2, max_samples=3000)
    resid = []
    for cid in range(60):
        p = syn.parameters(cid)
        d = syn.client_data(cid)
        resid.append(np.concatenate([d.x_train, d.x_test]).astype(np.float64) - p.input_mean)
    r = np.concatenate(resid)
    assert len(r) > 10_000
    expected_var = np.arange(1, 61, dtype=np.float64) ** -1.2
    np.testing.assert_allclose(r.var(axis=0), expected_var, rtol=0.06)
    np.testing.assert_allclose(r.mean(axis=0) / np.sqrt(expected_var), 0.0, atol=0.05)
    # diagonal: no correlation between dimensions
    corr = np.corrcoef(r[:, :5].T)
    assert np.max(np.abs(corr - np.eye(5))) < 0.05


def test_sample_counts_follow_the_reference_power_law_and_split_90_10():
    syn = Synthetic(1.0, 1.0, seed=5)
    counts = np.array([syn.num_samples(cid) for cid in range(4000)])
    assert counts.min() >= 50
    # int(lognormal(4, 2)) + 50: median of the lognormal part e^4 = 54.6
    assert 45 <= np.median(counts - 50) <= 65
    # P(lognormal(4, 2) > e^6) = P(z > 1) = 15.9%
    assert np.mean(counts - 50 > math.exp(6)) == pytest.approx(0.159, abs=0.02)
    for cid in (0, 1, 2):
        data = syn.client_data(cid)
        n = syn.num_samples(cid)
        assert len(data.y_train) == int(0.9 * n) == syn.num_train_samples(cid)
        assert len(data.y_train) + len(data.y_test) == n


def test_max_samples_caps_the_heavy_tail():
    capped = Synthetic(1.0, 1.0, seed=5, max_samples=200)
    free = Synthetic(1.0, 1.0, seed=5)
    counts = [capped.num_samples(c) for c in range(500)]
    assert max(counts) == 200
    assert max(free.num_samples(c) for c in range(500)) > 200
    assert all(c == min(free.num_samples(i), 200) for i, c in enumerate(counts))


def test_server_test_set_is_capped_held_out_data_of_a_fixed_set_of_clients():
    syn = Synthetic(1.0, 1.0, seed=0, test_clients=5, test_samples_per_client=3)
    x, y = syn.test_set(num_clients=1000)
    expected_x = np.concatenate([syn.client_data(c).x_test[:3] for c in range(5)])
    expected_y = np.concatenate([syn.client_data(c).y_test[:3] for c in range(5)])
    assert np.array_equal(x, expected_x) and np.array_equal(y, expected_y)
    x_small, _ = syn.test_set(num_clients=2)
    assert len(x_small) == 6


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("synthetic:1,1", SyntheticSpec(1.0, 1.0)),
        ("synthetic:0,0", SyntheticSpec(0.0, 0.0)),
        ("synthetic:0.5,2e-1", SyntheticSpec(0.5, 0.2)),
    ],
)
def test_good_specs(spec, expected):
    assert parse_synthetic_spec(spec) == expected
    assert is_synthetic_spec(spec)
    assert parse_synthetic_spec(str(expected)) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("synthetic", r"expected synthetic:<alpha>,<beta>.*got 'synthetic'"),
        ("synthetic:", r"got 'synthetic:'"),
        ("synthetic:1", r"got 'synthetic:1'"),
        ("synthetic:1,2,3", r"got 'synthetic:1,2,3'"),
        ("synthetic:a,1", r"alpha must be a number"),
        ("synthetic:1,-1", r"beta must be finite and >= 0"),
        ("synthetic:nan,1", r"alpha must be finite and >= 0"),
        ("synthetic:1,inf", r"beta must be finite and >= 0"),
    ],
)
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(DataError, match=message):
        parse_synthetic_spec(spec)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(DataError, match=r"client id to be an integer >= 0, got -1"):
        Synthetic(1.0, 1.0).client_data(-1)
    with pytest.raises(DataError, match=r"alpha finite and >= 0"):
        Synthetic(-1.0, 1.0)
    with pytest.raises(DataError, match=r"max_samples to be an integer >= 2"):
        Synthetic(1.0, 1.0, max_samples=1)


def test_dataset_spec_routes_to_the_per_client_provider():
    provider = data_provider("synthetic:1,0.5", num_clients=10, seed=7)
    assert isinstance(provider, Synthetic)
    assert (provider.alpha, provider.beta, provider.seed) == (1.0, 0.5, 7)
    assert provider.num_classes == 10 and provider.sample_shape == (60,)
    with pytest.raises(DataError, match=r"built per client.*data_provider"):
        load_dataset("synthetic:1,1", seed=0, test_fraction=0.2)
    with pytest.raises(DataError, match=r"alpha must be a number"):
        data_provider("synthetic:x,1", num_clients=10)
