"""The strategy registry: Flower's strategies by name, their parameters, and real runs."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import strategy as flower_strategies

from fedscale.edge_client.app import app as client_app
from fedscale.exceptions import ConfigError
from fedscale.server.federation import size_for_round
from fedscale.server.strategies import (
    STRATEGIES,
    build_strategy,
    check_round_size,
    strategy_params,
)
from fedscale.settings import RunSettings
from fedscale.simulations import simulate
from fedscale.simulations._flower import server_task_identity
from fedscale.simulations.grid import InProcessGrid

NAMES = [
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "qfedavg",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
]


def _build(strategy: str, args: str = "", **settings: object) -> flower_strategies.FedAvg:
    return build_strategy(RunSettings(strategy=strategy, strategy_args=args, **settings))  # type: ignore[arg-type]


def test_every_named_strategy_is_flowers_own_and_derives_from_fedavg():
    assert list(STRATEGIES) == NAMES
    for name, cls in STRATEGIES.items():
        # The Message-API class itself, not a legacy flwr.server.strategy one.
        assert getattr(flower_strategies, cls.__name__) is cls
        assert cls.__module__.startswith("flwr.serverapp.strategy.")
        assert issubclass(cls, flower_strategies.FedAvg)
        assert type(_build(name)) is cls


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"strategy: expected one of fedavg, fedprox, .*bulyan"):
        _build("fedsgd")


def test_unknown_parameter_lists_the_valid_keys():
    with pytest.raises(
        ConfigError,
        match=r"unknown key\(s\) mu for strategy fedprox; valid keys are: proximal-mu",
    ):
        _build("fedprox", "mu=0.1")
    with pytest.raises(ConfigError, match=r"valid keys are: none"):
        _build("fedavg", "beta=0.1")


def test_arguments_are_converted_to_the_constructors_types():
    prox = _build("fedprox", "proximal-mu=0.25")
    assert prox.proximal_mu == 0.25 and isinstance(prox.proximal_mu, float)
    adam = _build("fedadam", "eta=1e-2 beta-1=0.5 tau=1e-9")
    assert (adam.eta, adam.beta_1, adam.tau) == (0.01, 0.5, 1e-9)
    krum = _build("multikrum", "num-malicious-nodes=2 num-nodes-to-select=4")
    assert (krum.num_malicious_nodes, krum.num_nodes_to_select) == (2, 4)
    assert isinstance(krum.num_malicious_nodes, int)
    trimmed = _build("fedtrimmedavg", "beta=0.1")
    assert trimmed.beta == 0.1
    avgm = _build("fedavgm", "server-momentum=0.9 server-learning-rate=1")
    assert (avgm.server_momentum, avgm.server_learning_rate) == (0.9, 1.0)


def test_qfedavg_learns_the_clients_rate_and_reads_fedscales_loss_key():
    q = _build("qfedavg", lr=0.05)
    assert q.client_learning_rate == 0.05 and q.train_loss_key == "train-loss"
    assert _build("qfedavg", "client-learning-rate=0.2 q=0.5").client_learning_rate == 0.2


def test_sampling_parameters_belong_to_the_run_not_the_strategy():
    params = strategy_params("fedavg")
    assert params == {}
    assert set(strategy_params("bulyan")) == {"num-malicious-nodes"}
    with pytest.raises(ConfigError, match=r"unknown key\(s\) fraction-train"):
        _build("fedavg", "fraction-train=0.5")


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("fedprox", "proximal-mu=abc", r"proximal-mu \(for fedprox\): expected a finite number"),
        ("fedprox", "proximal-mu=nan", r"expected a finite number, got 'nan'"),
        ("fedprox", "proximal-mu=-1", r"expected a number >= 0, got '-1'"),
        ("krum", "num-malicious-nodes=1.5", r"expected an integer, got '1.5'"),
        ("krum", "num-malicious-nodes=-1", r"expected a number >= 0"),
        (
            "fedtrimmedavg",
            "beta=0.5",
            r"beta \(for fedtrimmedavg\): expected a number in \[0, 0.5\)",
        ),
        ("fedadam", "beta-2=1", r"expected a number in \[0, 1\)"),
        ("fedyogi", "eta=0", r"eta \(for fedyogi\): expected a number > 0"),
    ],
)
def test_bad_values_name_the_parameter_the_expectation_and_the_value(name, args, message):
    with pytest.raises(ConfigError, match=message):
        _build(name, args)


def test_strategy_args_syntax_is_checked_by_the_settings():
    with pytest.raises(ConfigError, match=r"strategy-args: expected space-separated key=value"):
        RunSettings(strategy_args="proximal-mu")
    with pytest.raises(ConfigError, match=r"expected each key once, got 'q' twice"):
        RunSettings(strategy_args="q=1 q=2")
    with pytest.raises(ConfigError, match=r"strategy: expected a strategy name"):
        RunSettings(strategy="")


def test_robust_strategies_refuse_too_few_clients_per_round():
    with pytest.raises(
        ConfigError,
        match=r"bulyan with num-malicious-nodes 2: expected clients-per-round at least "
        r"4f \+ 3 = 11, got 10",
    ):
        _build("bulyan", "num-malicious-nodes=2", clients_per_round=10)
    _build("bulyan", "num-malicious-nodes=2", clients_per_round=11)
    with pytest.raises(ConfigError, match=r"krum with num-malicious-nodes 4: .* 2f \+ 3 = 11"):
        _build("krum", "num-malicious-nodes=4", clients_per_round=10)
    with pytest.raises(ConfigError, match=r"num-nodes-to-select at most .* = 8, got 9"):
        _build("multikrum", "num-malicious-nodes=2 num-nodes-to-select=9", clients_per_round=10)
    check_round_size(_build("krum", "num-malicious-nodes=3"), 9)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("connected", [10, 37])
def test_size_for_round_keeps_clients_per_round_exact_for_every_strategy(name, connected):
    settings = RunSettings(strategy=name, clients_per_round=7)
    strategy = build_strategy(settings)
    assert size_for_round(strategy, settings, connected) == 7
    # A real in-process grid of `connected` nodes; configure_train only samples them.
    grid = InProcessGrid(client_app, connected, run_id=1, run_config=settings.to_run_config())
    with server_task_identity(1):
        messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert len({m.metadata.dst_node_id for m in messages}) == len(messages) == 7


# Parameters for the robust strategies at 10 clients per round; the rest take Flower's defaults.
RUN_ARGS = {
    "fedprox": "proximal-mu=0.1",
    "krum": "num-malicious-nodes=1",
    "multikrum": "num-malicious-nodes=1 num-nodes-to-select=5",
    "bulyan": "num-malicious-nodes=1",
}


@pytest.mark.parametrize("name", NAMES)
def test_every_strategy_learns_digits_in_five_rounds(name, tmp_path):
    result = simulate(
        clients=20,
        clients_per_round=10,
        num_rounds=5,
        local_epochs=1,
        export_onnx=False,
        device="cpu",
        strategy=name,
        strategy_args=RUN_ARGS.get(name, ""),
        out=str(tmp_path / "run"),
    )
    rounds = result.rounds
    assert len(rounds) == 6
    assert all(r["clients_replied"] == 10 and r["clients_failed"] == 0 for r in rounds[1:])
    gain = rounds[-1]["accuracy"] - rounds[0]["accuracy"]
    assert gain >= 0.15, (
        f"{name}: accuracy {rounds[0]['accuracy']:.3f} -> {rounds[-1]['accuracy']:.3f}"
    )


def test_a_bad_strategy_fails_the_run_before_it_writes_anything(tmp_path):
    with pytest.raises(ConfigError, match=r"strategy: expected one of"):
        simulate(
            clients=4,
            clients_per_round=2,
            num_rounds=1,
            export_onnx=False,
            strategy="nope",
            out=str(tmp_path / "run"),
        )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
