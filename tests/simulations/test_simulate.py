"""`fedscale simulate` with its defaults learns digits, on the in-process engine."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fedscale.cli.main import app
from fedscale.exceptions import ConfigError, PartitionError
from fedscale.runs import RunDirectory
from fedscale.settings import RunSettings
from fedscale.simulations import simulate


def _cli(*args):
    return CliRunner().invoke(app, ["simulate", *args])


def test_defaults_reach_90_percent_on_digits(tmp_path):
    result = _cli("--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("final test accuracy: ")
    accuracy = float(last.split(": ")[1])
    rows = RunDirectory(tmp_path / "run").read_metrics()
    assert accuracy == pytest.approx(rows[-1]["accuracy"], abs=5e-5)
    assert accuracy >= 0.90
    assert [r["round"] for r in rows] == list(range(RunSettings().num_rounds + 1))
    assert all(r["clients_sampled"] == r["clients_replied"] == 10 for r in rows[1:])


def test_defaults_with_dirichlet_half_reach_85_percent(tmp_path):
    result = _cli("--partition", "dirichlet:0.5", "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert float(result.output.strip().splitlines()[-1].split(": ")[1]) >= 0.85


def test_run_folder_holds_config_metrics_and_every_rounds_model(tmp_path):
    import tomllib

    out = tmp_path / "run"
    result = simulate(out=str(out), num_rounds=3, clients=20, clients_per_round=5)
    assert tomllib.loads((out / "config.toml").read_text())["num-rounds"] == 3
    # Every round's model, and the resume state of the last two rounds.
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [
        "latest.json",
        *(f"round-000{i}.safetensors" for i in range(4)),
        "state-0002.safetensors",
        "state-0003.safetensors",
    ]
    final = result.run_dir.load_global_model(3)
    assert set(final) == {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        assert json.loads(line)["schema"] == 1


def test_same_seed_same_metrics(tmp_path):
    def run(name):
        result = simulate(
            out=str(tmp_path / name),
            num_rounds=4,
            clients=30,
            partition="dirichlet:0.3",
            seed=11,
        )
        return [(r["accuracy"], r["loss"], r["train_loss"]) for r in result.rounds]

    assert run("a") == run("b")


def test_user_function_dataset_and_model_in_a_notebook(tmp_path):
    from torch import nn

    def blobs():
        rng = np.random.default_rng(0)
        y = rng.integers(0, 3, 600)
        return rng.normal(size=(600, 4)) + y[:, None] * 4.0, y

    result = simulate(
        out=str(tmp_path / "run"),
        dataset=blobs,
        model=lambda input_shape, num_classes: nn.Sequential(
            nn.Linear(input_shape[0], 16), nn.ReLU(), nn.Linear(16, num_classes)
        ),
        clients=10,
        clients_per_round=5,
        num_rounds=10,
    )
    assert result.final_accuracy > 0.9


def test_impossible_partition_fails_before_the_run_starts(tmp_path):
    with pytest.raises(PartitionError, match=r"5000 clients but the data has only 14\d\d samples"):
        simulate(out=str(tmp_path / "r"), clients=5000, clients_per_round=10)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match=r"at most the number of clients \(5\)"):
        simulate(out=str(tmp_path / "r"), clients=5, clients_per_round=10)


def test_cli_errors_are_one_clear_line_and_exit_2(tmp_path):
    result = _cli("--partition", "dirichlet", "--out", str(tmp_path / "r"))
    assert result.exit_code == 2
    assert "error:" in result.output and "dirichlet:<alpha>" in result.output
    result = _cli("--engine", "spark")
    assert result.exit_code == 2 and "expected inprocess or ray" in result.output


def test_models_with_integer_buffers_survive_aggregation(tmp_path):
    from torch import nn

    def with_batchnorm(input_shape, num_classes):
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Linear(32, num_classes),
        )

    result = simulate(
        out=str(tmp_path / "r"),
        model=with_batchnorm,
        clients=6,
        clients_per_round=3,
        num_rounds=3,
        local_epochs=1,
    )
    final = result.run_dir.load_global_model(3)
    assert final["2.num_batches_tracked"].dtype == np.int64
    assert final["2.running_mean"].dtype == np.float32
    assert result.final_accuracy > result.rounds[0]["accuracy"]


def test_federated_evaluation_is_recorded(tmp_path):
    result = simulate(
        out=str(tmp_path / "r"),
        clients=10,
        clients_per_round=4,
        num_rounds=2,
        fraction_evaluate=0.5,
    )
    assert result.rounds[0]["federated_accuracy"] is None
    for row in result.rounds[1:]:
        assert 0.0 <= row["federated_accuracy"] <= 1.0 and row["federated_loss"] > 0


def test_a_single_client_federation_runs(tmp_path):
    result = simulate(out=str(tmp_path / "r"), clients=1, clients_per_round=1, num_rounds=2)
    assert [r["clients_replied"] for r in result.rounds] == [0, 1, 1]


def test_cli_takes_user_dataset_and_model_by_module_attr(tmp_path):
    result = _cli(
        "--dataset",
        "tests.fedscale.test_datasets:make_blobs",
        "--model",
        "tests.fedscale.test_models:small_net",
        "--clients",
        "4",
        "--per-round",
        "2",
        "--rounds",
        "3",
        "--out",
        str(tmp_path / "r"),
    )
    assert result.exit_code == 0, result.output
    rows = RunDirectory(tmp_path / "r").read_metrics()
    assert rows[-1]["accuracy"] > max(0.75, rows[0]["accuracy"])
    config = (tmp_path / "r" / "config.toml").read_text()
    assert 'model = "tests.fedscale.test_models:small_net"' in config


def test_metrics_count_the_bytes_of_every_message_and_the_aggregation_time(tmp_path):
    result = simulate(out=str(tmp_path / "run"), num_rounds=2, clients=20, clients_per_round=5)
    model = sum(a.nbytes for a in result.run_dir.load_global_model(0).values())
    first, *trained = result.rounds
    assert first["bytes_sent"] is None and first["aggregate_seconds"] is None
    for row in trained:
        # Five global models out and five updates back, plus headers, metadata
        # and the small records (about 2 kB a message here): within 10% of the arrays.
        for key in ("bytes_sent", "bytes_received"):
            assert 5 * model < row[key] < 5 * model * 1.10, (key, row[key], model)
        assert row["aggregate_seconds"] > 0
