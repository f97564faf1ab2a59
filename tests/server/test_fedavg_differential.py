"""FedAvg's aggregation against centralised gradient descent, in closed form.

Each client holds a shard ``(X_k, y_k)`` of a linear-regression problem and takes
one full-batch gradient step on its least-squares loss
``L_k(w) = ||X_k w - y_k||^2 / (2 n_k)`` from the global ``w0``, in numpy float64.
Weighted by ``n_k``, the average of those steps is one gradient step on the union's
loss ``||X w - y||^2 / (2 N)``: ``w0 - lr X^T (X w0 - y) / N``. Weighted by any
other positive ``c_k`` it is one step on ``sum_k c_k L_k / sum_k c_k``.

What is under test is fedscale's strategy (built by the registry from the run's
settings, sized by the round loop's ``size_for_round``) and Flower's FedAvg
aggregation in it, on real train messages delivered by fedscale's in-process grid
to a ClientApp and real reply messages: the sampling, the weighting and the
averaging. MSE is not what fedscale's ClientApp trains, so the clients here are a
small ClientApp of their own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedscale.server.federation import size_for_round
from fedscale.server.strategies import build_strategy
from fedscale.settings import RunSettings
from fedscale.simulations.engine import run_in_process

DIM = 5
LR = 0.3
CASE: dict[str, Any] = {}

client_app = ClientApp()
server_app = ServerApp()


@client_app.train()
def one_gradient_step(msg: Message, context: Context) -> Message:
    """Take one full-batch gradient step of least squares on this node's shard."""
    pid = int(context.node_config["partition-id"])
    x, y = CASE["shards"][pid]
    arrays = msg.content["arrays"]
    w, b = arrays["w"].numpy(), arrays["b"].numpy()
    residual = x @ w + b - y
    lr = float(msg.content["config"]["lr"])
    new_w = w - lr * x.T @ residual / len(y)
    new_b = b - lr * np.array([residual.mean()])
    reply = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(new_w), "b": Array(new_b)}),
            "metrics": MetricRecord({"num-examples": CASE["weights"][pid]}),
        }
    )
    return Message(reply, reply_to=msg)


@server_app.main()
def one_round(grid: Grid, context: Context) -> None:
    """One round of the run's strategy over every node; keep the aggregate."""
    settings: RunSettings = CASE["settings"]
    strategy = build_strategy(settings)
    sampled = size_for_round(strategy, settings, len(list(grid.get_node_ids())))
    start = ArrayRecord({"w": Array(CASE["w0"]), "b": Array(CASE["b0"])})
    messages = list(strategy.configure_train(1, start, ConfigRecord({"lr": LR}), grid))
    replies = list(grid.send_and_receive(messages, timeout=60))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    CASE["result"] = {
        "sampled": sampled,
        "nodes": {m.metadata.dst_node_id for m in messages},
        "w": arrays["w"].numpy(),
        "b": arrays["b"].numpy(),
    }


def _shards(sizes: list[int], rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    true_w = rng.normal(size=DIM)
    shards = []
    for n in sizes:
        x = rng.normal(size=(n, DIM)) * rng.uniform(0.5, 2.0)  # shards differ in scale
        y = x @ true_w + 0.7 + rng.normal(scale=0.5, size=n)
        shards.append((x, y))
    return shards


def _centralised_step(
    shards: list[tuple[np.ndarray, np.ndarray]],
    weights: list[float],
    w0: np.ndarray,
    b0: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """One gradient step on ``sum_k c_k L_k / sum_k c_k``, written as the union's normal form.

    With ``c_k = n_k`` this is exactly ``w0 - lr X^T (X w0 - y) / N`` on the stacked union;
    otherwise each sample of shard ``k`` weighs ``c_k / n_k``: a weighted union.
    """
    x = np.vstack([xs for xs, _ in shards])
    y = np.concatenate([ys for _, ys in shards])
    sample_weight = np.concatenate(
        [np.full(len(ys), c / len(ys)) for (_, ys), c in zip(shards, weights, strict=True)]
    )
    sample_weight /= sample_weight.sum()
    residual = x @ w0 + b0 - y
    return (
        w0 - LR * x.T @ (sample_weight * residual),
        b0 - LR * np.array([np.sum(sample_weight * residual)]),
    )


SIZES = {
    "equal": lambda k, rng: [40] * k,
    "unequal": lambda k, rng: [int(n) for n in rng.integers(5, 200, size=k)],
    "skewed": lambda k, rng: [1000] + [3] * (k - 1),
}


@pytest.mark.parametrize("clients", [1, 2, 5, 17])
@pytest.mark.parametrize("sizes", sorted(SIZES))
@pytest.mark.parametrize("weighting", ["num-examples", "reported"])
def test_fedavg_step_equals_one_centralised_gradient_step(clients, sizes, weighting):
    rng = np.random.default_rng([clients, len(sizes), len(weighting)])
    shards = _shards(SIZES[sizes](clients, rng), rng)
    if weighting == "num-examples":
        weights = [float(len(y)) for _, y in shards]
    else:  # any positive weights a client reports: FedAvg minimises their mixture
        weights = [float(c) for c in rng.uniform(0.1, 10.0, size=clients)]
    CASE.clear()
    CASE.update(
        shards=shards,
        weights=weights,
        w0=rng.normal(size=DIM),
        b0=np.array([rng.normal()]),
        settings=RunSettings(num_clients=clients, clients_per_round=clients, lr=LR),
    )
    run_in_process(server_app, client_app, num_nodes=clients, run_config={})
    got = CASE["result"]
    assert got["sampled"] == clients and len(got["nodes"]) == clients
    expected_w, expected_b = _centralised_step(shards, weights, CASE["w0"], CASE["b0"])
    assert got["w"].dtype == np.float64
    np.testing.assert_allclose(got["w"], expected_w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["b"], expected_b, rtol=1e-12, atol=1e-12)
    if weighting == "num-examples":
        # And the union in its plainest form: the stacked data, no weights at all.
        x = np.vstack([xs for xs, _ in shards])
        y = np.concatenate([ys for _, ys in shards])
        plain = CASE["w0"] - LR * x.T @ (x @ CASE["w0"] + CASE["b0"] - y) / len(y)
        np.testing.assert_allclose(got["w"], plain, rtol=1e-12, atol=1e-12)


def test_the_differential_test_can_fail_unweighted_mean_is_not_the_union_step():
    """Check the reference distinguishes weightings: an unweighted mean of unequal shards misses."""
    rng = np.random.default_rng(7)
    shards = _shards([1000, 3, 3], rng)
    w0, b0 = rng.normal(size=DIM), np.array([0.0])
    union_w, _ = _centralised_step(shards, [float(len(y)) for _, y in shards], w0, b0)
    equal_w, _ = _centralised_step(shards, [1.0, 1.0, 1.0], w0, b0)
    assert np.max(np.abs(union_w - equal_w)) > 1e-3
