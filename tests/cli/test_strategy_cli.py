"""`fedscale simulate --strategy NAME --strategy-arg k=v --attack SPEC --attack-fraction F`."""

import tomllib

from typer.testing import CliRunner

from fedscale.cli.main import app
from fedscale.runs import RunDirectory

runner = CliRunner()

TINY = ["--clients", "8", "--per-round", "5", "--rounds", "1", "--local-epochs", "1"]


def _config(run):
    return tomllib.loads((run / "config.toml").read_text())


def test_repeated_strategy_args_and_an_attack_reach_the_run_config(tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "simulate",
            *TINY,
            "--no-export-onnx",
            "--strategy",
            "multikrum",
            "--strategy-arg",
            "num-malicious-nodes=1",
            "--strategy-arg",
            "num-nodes-to-select=2",
            "--attack",
            "scale:-5",
            "--attack-fraction",
            "0.25",
            "--out",
            str(run),
        ],
    )
    assert result.exit_code == 0, result.output
    config = _config(run)
    assert config["strategy"] == "multikrum"
    assert config["strategy-args"] == "num-malicious-nodes=1 num-nodes-to-select=2"
    assert (config["attack"], config["attack-fraction"]) == ("scale:-5", 0.25)
    assert [r["clients_replied"] for r in RunDirectory(run).read_metrics()] == [0, 5]


def test_a_scenario_file_names_the_strategy_and_the_command_line_wins(tmp_path):
    scenario = tmp_path / "robust.toml"
    scenario.write_text(
        "num-clients = 8\nclients-per-round = 5\nnum-rounds = 1\nlocal-epochs = 1\n"
        'export-onnx = false\nstrategy = "fedtrimmedavg"\nstrategy-args = "beta=0.2"\n'
    )
    run = tmp_path / "run"
    result = runner.invoke(
        app, ["simulate", str(scenario), "--strategy-arg", "beta=0.4", "--out", str(run)]
    )
    assert result.exit_code == 0, result.output
    config = _config(run)
    assert (config["strategy"], config["strategy-args"]) == ("fedtrimmedavg", "beta=0.4")


def test_unknown_strategy_or_parameter_exits_2_listing_the_valid_ones(tmp_path):
    result = runner.invoke(
        app, ["simulate", *TINY, "--strategy", "fedsgd", "--out", str(tmp_path / "a")]
    )
    assert result.exit_code == 2
    assert "expected one of fedavg, fedprox" in " ".join(result.output.split())
    result = runner.invoke(
        app,
        ["simulate", *TINY, "--strategy", "krum", "--strategy-arg", "f=1", "--out", str(tmp_path)],
    )
    assert result.exit_code == 2
    assert "valid keys are: num-malicious-nodes" in " ".join(result.output.split())
    result = runner.invoke(app, ["simulate", *TINY, "--attack", "flip", "--attack-fraction", "0.2"])
    assert result.exit_code == 2
    assert "attack: expected '' (none) or one of sign-flip" in " ".join(result.output.split())
