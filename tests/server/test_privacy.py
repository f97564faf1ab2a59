"""Differential privacy: clipped updates, calibrated noise, the epsilon, resume, errors.

Real runs on the in-process engine with fedscale's own ClientApp (its train mod
applies Flower's client-side DP mods) and Flower's DP strategy wrappers. The
reported epsilon is checked against opacus' RDP accountant, an implementation
independent of the one Flower wraps (Google's dp-accounting).

Flower draws DP noise from numpy's global generator, which fedscale leaves
unseeded (a deployment's noise must be unpredictable); these tests seed it, so
runs repeat.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from fedscale.edge_client.app import app as client_app
from fedscale.exceptions import ConfigError
from fedscale.privacy import effective_delta, local_epsilon
from fedscale.runs import RunDirectory
from fedscale.server.federation import run_federation
from fedscale.server.strategies import privatize, strategy_state
from fedscale.settings import RunSettings
from fedscale.simulations import run_apps, simulate

CLIENTS = 20
PER_ROUND = 10
ROUNDS = 4
BASE = RunSettings(
    num_rounds=ROUNDS,
    num_clients=CLIENTS,
    clients_per_round=PER_ROUND,
    local_epochs=2,
    batch_size=16,
    lr=0.1,
    seed=1,
    dataset="digits",
    model="mlp",
    device="cpu",
    export_onnx=False,
)
MODES = ("server-fixed", "server-adaptive", "client-fixed", "client-adaptive", "local")


def _flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(v, np.float64).ravel() for v in arrays.values()])


class RecordingFedAvg(FedAvg):
    """Flower's FedAvg, keeping each round's global model and the replies it aggregates.

    It taps ``_check_and_log_replies`` (where ``FedAvg.aggregate_train`` starts),
    not ``aggregate_train``: Flower's accounted DP wrappers require FedAvg's own.
    """

    def __init__(self) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=CLIENTS,
            min_available_nodes=CLIENTS,
        )
        self.global_models: dict[int, np.ndarray] = {}
        self.updates: dict[int, list[np.ndarray]] = {}
        self._round = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round = server_round
        self.global_models[server_round] = _flat({k: v.numpy() for k, v in arrays.items()})
        return super().configure_train(server_round, arrays, config, grid)

    def _check_and_log_replies(
        self, replies: Iterable[Message], is_train: bool, validate: bool = True
    ) -> tuple[list[Message], list[Message]]:
        replies = list(replies)
        if is_train:
            self.updates[self._round] = [
                _flat({k: v.numpy() for k, v in r.content["arrays"].items()})
                for r in replies
                if not r.has_error()
            ]
        return super()._check_and_log_replies(replies, is_train, validate)


def _clipped_run(tmp_path, mode: str, norm: float, noise: float):
    settings = BASE.replace(
        clients_per_round=CLIENTS,
        dp=mode,
        dp_clipping_norm=norm,
        dp_noise_multiplier=noise,
        out=str(tmp_path / mode),
    )
    inner = RecordingFedAvg()
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        run = RunSettings.from_run_config(context.run_config, complete=True)
        run_federation(grid, run, out=run.out, strategy=privatize(inner, run))

    np.random.seed(11)
    run_apps(server, client_app, clients=CLIENTS, run_config=settings.to_run_config())
    return inner, RunDirectory(settings.out)


@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed"])
def test_every_update_that_reaches_aggregation_is_within_the_clipping_norm(tmp_path, mode):
    norm, noise = 0.3, 0.5
    inner, run = _clipped_run(tmp_path, mode, norm, noise)
    assert sorted(inner.updates) == list(range(1, ROUNDS + 1))
    at_bound = 0
    for server_round, updates in inner.updates.items():
        assert len(updates) == CLIENTS
        start = inner.global_models[server_round]
        norms = [float(np.linalg.norm(u - start)) for u in updates]
        # float32 parameters: the clipped delta is exact to a few ulps of the weights.
        assert max(norms) <= norm * (1 + 1e-4), f"round {server_round}: {max(norms)} > {norm}"
        at_bound += sum(n > norm * (1 - 1e-3) for n in norms)
        # What was released: the equal-weight mean of the clipped updates plus
        # Gaussian noise of std noise * norm / m on every parameter.
        released = _flat(run.load_global_model(server_round))
        residual = released - np.mean(updates, axis=0)
        assert np.std(residual) == pytest.approx(noise * norm / CLIENTS, rel=0.1)
        assert abs(np.mean(residual)) < 5 * noise * norm / CLIENTS / math.sqrt(residual.size)
    # Training moves the clients further than 0.3: the bound did the clipping.
    assert at_bound >= CLIENTS * ROUNDS // 2


def _opacus_epsilon(noise: float, rounds: int, delta: float) -> float:
    # No amplification by sampling: a sampling rate of 1 every round.
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = opacus_rdp.compute_rdp(q=1.0, noise_multiplier=noise, steps=rounds, orders=orders)
    epsilon, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(epsilon)


@pytest.mark.parametrize(
    ("mode", "noise"), [("server-fixed", 0.8), ("client-adaptive", 1.3), ("local", 2.0)]
)
def test_reported_epsilon_matches_opacus_rdp_accountant(tmp_path, mode, noise):
    np.random.seed(3)
    result = simulate(
        BASE.replace(dp=mode, dp_noise_multiplier=noise, dp_clipping_norm=0.5),
        out=str(tmp_path / "run"),
    )
    rows = result.rounds
    assert rows[0]["dp_epsilon"] == 0.0
    assert {r["dp_delta"] for r in rows} == {1e-5}
    for row in rows[1:]:
        expected = _opacus_epsilon(noise, row["round"], 1e-5)
        assert row["dp_epsilon"] == pytest.approx(expected, rel=0.01), row["round"]
    epsilons = [r["dp_epsilon"] for r in rows]
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == len(epsilons)


def test_runs_without_dp_report_no_privacy(tmp_path):
    rows = simulate(BASE.replace(num_rounds=1), out=str(tmp_path / "run")).rounds
    assert all(r["dp_epsilon"] is None and r["dp_delta"] is None for r in rows)


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_trains_a_model_that_learns(tmp_path, mode):
    # Mild noise: central modes add it once to the mean of 10 clients, local
    # DP to each client's update (so it needs less to train as well).
    noise = 0.05 if mode == "local" else 0.3
    np.random.seed(5)
    result = simulate(
        BASE.replace(num_rounds=8, dp=mode, dp_noise_multiplier=noise, dp_clipping_norm=0.5),
        out=str(tmp_path / mode),
    )
    rows = result.rounds
    assert all(r["clients_replied"] == PER_ROUND for r in rows[1:])
    assert all(math.isfinite(r["loss"]) for r in rows)
    # Seen: 0.10 -> 0.80-0.85 in 8 rounds in every mode (digits, MLP).
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.4
    assert rows[-1]["dp_epsilon"] > rows[1]["dp_epsilon"] > 0


def test_client_side_clipping_releases_what_server_side_clipping_does(tmp_path):
    # Same clients, same clipping, same noise: only where the clipping runs differs.
    models = {}
    for mode in ("server-fixed", "client-fixed"):
        np.random.seed(9)
        result = simulate(
            BASE.replace(dp=mode, dp_noise_multiplier=0.5, dp_clipping_norm=0.3),
            out=str(tmp_path / mode),
        )
        models[mode] = _flat(result.run_dir.load_global_model(ROUNDS))
    np.testing.assert_allclose(models["server-fixed"], models["client-fixed"], atol=1e-5)


@pytest.mark.parametrize("mode", ["server-adaptive", "client-fixed", "local"])
def test_an_interrupted_dp_run_resumed_equals_the_uninterrupted_one(tmp_path, mode):
    run = BASE.replace(dp=mode, dp_noise_multiplier=0.5, dp_clipping_norm=0.3, num_rounds=5)
    np.random.seed(21)
    whole = simulate(run, out=str(tmp_path / "whole"))
    np.random.seed(21)
    simulate(run.replace(num_rounds=2), out=str(tmp_path / "part"))
    np.random.seed(1234)  # whatever the process did since, the checkpoint's state counts
    stored = RunDirectory(tmp_path / "part").read_config()
    resumed = simulate(RunSettings.from_run_config(stored).replace(num_rounds=5, resume=True))
    assert [r["round"] for r in resumed.rounds] == [0, 1, 2, 3, 4, 5]
    keep = ("round", "accuracy", "loss", "dp_epsilon", "dp_delta")
    assert [{k: r[k] for k in keep} for r in resumed.rounds] == [
        {k: r[k] for k in keep} for r in whole.rounds
    ]
    a, b = whole.run_dir.load_global_model(5), resumed.run_dir.load_global_model(5)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_strategy_state_holds_the_wrapper_the_inner_strategy_and_the_accountant():
    settings = BASE.replace(dp="server-adaptive", dp_noise_multiplier=0.5, strategy="fedprox")
    from fedscale.server.strategies import build_strategy

    wrapped = privatize(build_strategy(settings), settings)
    meta, _ = strategy_state(wrapped)
    assert meta["clipping_norm"] == {"kind": "value", "value": 1.0}
    assert meta["strategy"]["class"] == "FedProx"
    assert meta["strategy"]["meta"]["proximal_mu"]["kind"] == "value"
    assert meta["accountant"]["kind"] == "accountant"
    assert meta["accountant"]["state"]["config"]["sampling_method"] == "no-amplification"


def test_delta_defaults_below_one_over_the_population():
    assert effective_delta(0.0, 100) == 1e-5
    assert effective_delta(0.0, 1_000_000) == pytest.approx(1_000_000**-1.1)
    assert effective_delta(0.0, 1_000_000) < 1 / 1_000_000
    assert effective_delta(3e-4, 100) == 3e-4


def test_local_dp_noise_is_the_noise_multiplier_times_the_norm():
    # LocalDpMod's std: sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon.
    for noise, delta in ((0.05, 1e-5), (1.0, 1e-6), (3.0, 0.01)):
        std = 0.7 * math.sqrt(2 * math.log(1.25 / delta)) / local_epsilon(noise, delta)
        assert std == pytest.approx(noise * 0.7)


# ---------------------------------------------------------------- errors


def test_an_unknown_mode_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        RunSettings(dp="central")
    message = str(err.value)
    assert "got 'central'" in message
    for mode in MODES:
        assert repr(mode) in message


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"dp": "server-fixed", "dp_noise_multiplier": -0.5}, "dp-noise-multiplier: expected"),
        ({"dp": "local", "dp_noise_multiplier": 0.0}, "dp-noise-multiplier: expected a number > 0"),
        ({"dp": "server-fixed", "dp_clipping_norm": 0.0}, "dp-clipping-norm: expected an L2"),
        ({"dp": "server-fixed", "dp_delta": 1.0}, r"dp-delta: expected 0 \(the default"),
        ({"dp": "server-fixed", "dp_delta": 0.05}, "dp-delta: expected a number below 1 / num"),
        ({"dp_noise_multiplier": 0.5}, "dp-noise-multiplier: expected 1.0 unless dp is set"),
        (
            {"dp": "server-fixed", "dp_target_quantile": 0.9},
            "dp-target-quantile: expected 0.5 unless dp is adaptive",
        ),
        ({"dp": "server-adaptive", "dp_target_quantile": 1.5}, "dp-target-quantile: expected a"),
        ({"dp": "client-adaptive", "dp_clip_lr": 0.0}, "dp-clip-lr: expected a learning rate"),
        (
            {"dp": "server-adaptive", "dp_clipped_count_stddev": -1.0},
            "dp-clipped-count-stddev: expected a number >= 0",
        ),
        (
            {"dp": "server-adaptive", "dp_clipped_count_stddev": 0.4},
            r"dp-noise-multiplier: expected a number below 2 x dp-clipped-count-stddev = 0.8",
        ),
        ({"dp": "server-fixed", "strategy": "krum"}, "strategy: expected one of fedavg, fedprox"),
        (
            {"dp": "client-fixed", "device_mix": "uniform", "overcommit": 0.5},
            "overcommit: expected 0 with dp 'client-fixed'",
        ),
    ],
)
def test_bad_settings_are_refused_naming_what_was_expected(changes, match):
    with pytest.raises(ConfigError, match=match):
        BASE.replace(**changes)


def test_local_dp_works_with_any_strategy(tmp_path):
    settings = BASE.replace(
        num_rounds=1, dp="local", dp_noise_multiplier=0.05, strategy="fedmedian"
    )
    rows = simulate(settings, out=str(tmp_path / "run")).rounds
    assert rows[-1]["dp_epsilon"] == pytest.approx(_opacus_epsilon(0.05, 1, 1e-5), rel=0.01)


def test_a_strategy_passed_in_must_average_with_fedavgs_mean():
    from flwr.serverapp.strategy import FedMedian

    with pytest.raises(ConfigError, match="dp server-fixed: expected a strategy that averages"):
        privatize(FedMedian(), BASE.replace(dp="server-fixed"))


@pytest.mark.integration
def test_client_side_dp_on_flowers_ray_engine_matches_the_in_process_engine(tmp_path):
    # Every client in every round, as Ray's own engine test does: the same clients
    # train the same models, the ClientApp's mod clips them in Ray's actors, and the
    # server adds the same noise (its generator seeded alike).
    run = BASE.replace(
        num_rounds=2,
        num_clients=6,
        clients_per_round=6,
        local_epochs=1,
        dp="client-fixed",
        dp_noise_multiplier=0.5,
        dp_clipping_norm=0.3,
    )
    results = {}
    for engine in ("inprocess", "ray"):
        np.random.seed(17)
        results[engine] = simulate(run, engine=engine, out=str(tmp_path / engine))
    rows = {engine: result.rounds for engine, result in results.items()}
    assert [r["clients_replied"] for r in rows["ray"]] == [0, 6, 6]
    assert [r["dp_epsilon"] for r in rows["ray"]] == [r["dp_epsilon"] for r in rows["inprocess"]]
    for server_round in (1, 2):
        np.testing.assert_allclose(
            _flat(results["ray"].run_dir.load_global_model(server_round)),
            _flat(results["inprocess"].run_dir.load_global_model(server_round)),
            atol=1e-4,
        )


def test_the_cli_takes_the_dp_options_and_prints_the_final_epsilon(tmp_path):
    import json

    from typer.testing import CliRunner

    from fedscale.cli.main import app

    args = ["simulate", "--clients", "20", "--rounds", "2", "--no-export-onnx"]
    dp = ["--dp", "client-adaptive", "--dp-noise-multiplier", "0.7", "--dp-delta", "1e-6"]
    runner = CliRunner()
    result = runner.invoke(app, [*args, *dp, "--json", "--out", str(tmp_path / "json")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.splitlines()[-1])
    rows = RunDirectory(tmp_path / "json").read_metrics()
    assert summary["dp_epsilon"] == rows[-1]["dp_epsilon"]
    assert summary["dp_epsilon"] == pytest.approx(_opacus_epsilon(0.7, 2, 1e-6), rel=0.01)
    assert summary["dp_delta"] == 1e-6

    result = runner.invoke(app, [*args, *dp, "--out", str(tmp_path / "human")])
    assert result.exit_code == 0, result.output
    assert f"epsilon {summary['dp_epsilon']:.4g} at delta 1e-06" in result.stdout

    result = runner.invoke(app, [*args, "--dp", "gaussian", "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2
    assert "dp: expected one of" in " ".join(result.output.split())


@pytest.mark.integration
@pytest.mark.slow
def test_central_dp_on_a_superlink_with_three_edge_clients_reports_opacus_epsilon(tmp_path):
    from tests.server.deployment import run_deployment

    run = run_deployment(
        tmp_path,
        *("--rounds", "2", "--per-round", "3", "--no-export-onnx"),
        *("--dp", "client-fixed", "--dp-noise-multiplier", "0.8", "--dp-clipping-norm", "0.5"),
    )
    rows = RunDirectory(run).read_metrics()
    assert [r["clients_replied"] for r in rows] == [0, 3, 3]
    delta = rows[-1]["dp_delta"]
    for row in rows[1:]:
        expected = _opacus_epsilon(0.8, row["round"], delta)
        assert row["dp_epsilon"] == pytest.approx(expected, rel=0.01)
