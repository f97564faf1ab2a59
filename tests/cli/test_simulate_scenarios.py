"""`fedscale simulate SCENARIO [options]`: the file sets the run, options given win."""

import tomllib

from typer.testing import CliRunner

from fedscale.cli.main import app
from fedscale.runs import RunDirectory

runner = CliRunner()

TINY = """\
num-clients = 4
clients-per-round = 2
num-rounds = 3
local-epochs = 1
lr = 0.05
export-onnx = false
"""


def _config(run):
    return tomllib.loads((run / "config.toml").read_text())


def test_options_given_on_the_command_line_win_over_the_file(tmp_path):
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    run = tmp_path / "run"
    # --lr 0.1 is also the option's default: given explicitly, it still wins.
    result = runner.invoke(
        app, ["simulate", str(scenario), "--rounds", "1", "--lr", "0.1", "--out", str(run)]
    )
    assert result.exit_code == 0, result.output
    config = _config(run)
    assert config["num-rounds"] == 1 and config["lr"] == 0.1
    # Options left out keep the file's values, not the options' defaults.
    assert config["num-clients"] == 4 and config["local-epochs"] == 1
    assert config["clients-per-round"] == 2 and config["export-onnx"] is False
    assert [r["clients_replied"] for r in RunDirectory(run).read_metrics()] == [0, 2]


def test_a_shipped_scenario_runs_by_name_with_overrides(tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "simulate",
            "quickstart",
            "--rounds",
            "2",
            "--clients",
            "20",
            "--per-round",
            "4",
            "--no-export-onnx",
            "--out",
            str(run),
        ],
    )
    assert result.exit_code == 0, result.output
    config = _config(run)
    assert (config["num-rounds"], config["num-clients"], config["clients-per-round"]) == (2, 20, 4)
    assert config["dataset"] == "digits"
    assert result.output.strip().splitlines()[-1].startswith("final test accuracy: ")


def test_an_unknown_key_is_one_clear_line_and_exit_2(tmp_path):
    scenario = tmp_path / "typo.toml"
    scenario.write_text("num-round = 3\n")
    result = runner.invoke(app, ["simulate", str(scenario), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "unknown key(s) num-round; allowed keys are:" in result.output
    assert not (tmp_path / "r").exists()


def test_a_scenario_and_third_party_apps_do_not_mix(tmp_path):
    result = runner.invoke(
        app, ["simulate", "quickstart", "--server-app", "a:b", "--client-app", "c:d"]
    )
    assert result.exit_code == 2 and "either a scenario or third-party apps" in result.output


def test_the_summary_reports_simulated_time_and_time_to_accuracy(tmp_path):
    trace = tmp_path / "devices.csv"
    trace.write_text(
        "client_id,compute_speed,download_kbps,upload_kbps\n0,50,1000,500\n1,20,2000,400\n"
    )
    scenario = tmp_path / "timed.toml"
    scenario.write_text(TINY + f'device-mix = "{trace}"\ndeadline = 600.0\novercommit = 0.5\n')
    run = tmp_path / "run"
    result = runner.invoke(
        app, ["simulate", str(scenario), "--target-accuracy", "0.01", "--out", str(run)]
    )
    assert result.exit_code == 0, result.output
    rows = RunDirectory(run).read_metrics()
    assert rows[-1]["sim_elapsed"] > rows[1]["sim_elapsed"] > 0
    assert "simulated time" in result.output
    # Round 0's model already scores 1%: reached at 0 s of simulated time.
    assert "time to accuracy 0.0100" in result.output and "(round 0)" in result.output
    assert "clients dropped per round" in result.output
