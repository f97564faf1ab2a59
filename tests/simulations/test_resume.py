"""Checkpoint and resume on the in-process engine: a killed run resumes to the same model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedscale.exceptions import ConfigError, DataError
from fedscale.runs import RunDirectory
from fedscale.settings import RunSettings
from fedscale.simulations import simulate

# FedAdam keeps server-optimizer moments across rounds: a resume that lost them
# would end on another model.
SMALL = {
    "num_rounds": 5,
    "clients_per_round": 5,
    "local_epochs": 1,
    "strategy": "fedadam",
    "strategy_args": "eta=0.05",
    "export_onnx": False,
}


FEDSCALE = [sys.executable, "-m", "fedscale.cli"]


def _cli_args(out: Path, rounds: int) -> list[str]:
    return [
        *FEDSCALE,
        "simulate",
        "--clients",
        "20",
        "--per-round",
        "5",
        "--rounds",
        str(rounds),
        "--local-epochs",
        "3",
        "--model",
        "cnn",
        "--no-fast-path",
        "--strategy",
        "fedadam",
        "--strategy-arg",
        "eta=0.05",
        "--no-export-onnx",
        "--out",
        str(out),
    ]


def _rounds(run: Path) -> list[int]:
    return [row["round"] for row in RunDirectory(run).read_metrics()]


def _final(run: Path, server_round: int) -> dict[str, np.ndarray]:
    return RunDirectory(run).load_global_model(server_round)


def _kill_after_round(args: list[str], run: Path, server_round: int, timeout: float) -> None:
    """Start ``args``, SIGKILL it as soon as ``server_round``'s metrics line is written."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + timeout
        metrics = run / "metrics.jsonl"
        while time.monotonic() < deadline and process.poll() is None:
            if metrics.exists() and f'"round": {server_round},' in metrics.read_text():
                os.killpg(process.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"round {server_round} was not reached within {timeout} s")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.mark.integration
def test_run_killed_after_round_3_resumes_to_the_uninterrupted_model_bit_for_bit(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    subprocess.run(_cli_args(whole, 5), check=True, env=env, capture_output=True, timeout=600)

    _kill_after_round(_cli_args(killed, 5), killed, 3, timeout=600)
    committed = json.loads((killed / "checkpoints" / "latest.json").read_text())["round"]
    assert 3 <= committed < 5, "the kill must land mid-run for this test to mean anything"

    resumed = subprocess.run(
        # Engine options are not run settings: the same ones give the same bits.
        [*FEDSCALE, "simulate", "--resume", "--no-fast-path", "--out", str(killed)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    assert _rounds(killed) == [0, 1, 2, 3, 4, 5], "every round exactly once"
    a, b = _final(whole, 5), _final(killed, 5)
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype
        assert a[key].tobytes() == b[key].tobytes(), f"{key} differs after the resume"
    keep = ("round", "loss", "accuracy", "train_loss", "clients_replied")
    whole_rows = [{k: r[k] for k in keep} for r in RunDirectory(whole).read_metrics()]
    killed_rows = [{k: r[k] for k in keep} for r in RunDirectory(killed).read_metrics()]
    assert whole_rows == killed_rows


# Each keeps another kind of state: dicts of moments (fedadam, fedyogi), a list
# (fedavgm's momentum), an ArrayRecord (qfedavg's last model), nothing (krum).
@pytest.mark.parametrize(
    ("strategy", "args"),
    [
        ("fedadam", "eta=0.05"),
        ("fedyogi", "eta=0.05"),
        ("fedavgm", "server-momentum=0.9"),
        ("qfedavg", ""),
        ("krum", "num-malicious-nodes=1"),
    ],
)
def test_resume_through_the_api_raises_the_rounds_and_matches_one_long_run(
    tmp_path, strategy, args
):
    run = {**SMALL, "strategy": strategy, "strategy_args": args}
    long = simulate(out=str(tmp_path / "long"), clients=20, **run)
    short = simulate(out=str(tmp_path / "short"), clients=20, **{**run, "num_rounds": 3})
    assert [r["round"] for r in short.rounds] == [0, 1, 2, 3]
    stored = RunDirectory(tmp_path / "short").read_config()
    settings = RunSettings.from_run_config(stored).replace(num_rounds=5, resume=True)
    more = simulate(settings)
    assert [r["round"] for r in more.rounds] == [0, 1, 2, 3, 4, 5]
    a, b = long.run_dir.load_global_model(5), more.run_dir.load_global_model(5)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert more.rounds[-1]["accuracy"] == long.rounds[-1]["accuracy"]


def test_resume_refuses_a_changed_setting_and_names_it(tmp_path):
    simulate(out=str(tmp_path / "run"), clients=20, **{**SMALL, "num_rounds": 2})
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    stored = RunDirectory(tmp_path / "run").read_config()
    changed = RunSettings.from_run_config(stored).replace(num_rounds=4, lr=0.5, resume=True)
    with pytest.raises(ConfigError, match=r"lr: 0\.1 -> 0\.5"):
        simulate(changed)
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before, "nothing stored is lost"


def test_resume_refuses_a_run_that_already_has_its_rounds(tmp_path):
    simulate(out=str(tmp_path / "run"), clients=20, **{**SMALL, "num_rounds": 2})
    stored = RunDirectory(tmp_path / "run").read_config()
    again = RunSettings.from_run_config(stored).replace(resume=True)
    with pytest.raises(ConfigError, match="has completed 2 rounds, expected num-rounds above"):
        simulate(again)


def test_resume_refuses_a_checkpoint_whose_bytes_changed(tmp_path):
    simulate(out=str(tmp_path / "run"), clients=20, **{**SMALL, "num_rounds": 2})
    state = tmp_path / "run" / "checkpoints" / "state-0002.safetensors"
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF
    state.write_bytes(bytes(data))
    stored = RunDirectory(tmp_path / "run").read_config()
    settings = RunSettings.from_run_config(stored).replace(num_rounds=3, resume=True)
    with pytest.raises(DataError, match="expected sha256 .* refusing to load it"):
        simulate(settings)


def test_resume_refuses_a_folder_without_a_checkpoint(tmp_path):
    settings = RunSettings(out=str(tmp_path / "empty"), resume=True, num_clients=20)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="expected a checkpoint to resume from"):
        simulate(settings)


def test_resume_with_a_device_mix_continues_the_virtual_clock(tmp_path):
    mix = {**SMALL, "device_mix": "mobile-always-on", "strategy": "fedavg", "strategy_args": ""}
    long = simulate(out=str(tmp_path / "long"), clients=20, **mix)
    simulate(out=str(tmp_path / "short"), clients=20, **{**mix, "num_rounds": 2})
    stored = RunDirectory(tmp_path / "short").read_config()
    more = simulate(RunSettings.from_run_config(stored).replace(num_rounds=5, resume=True))
    assert [r["sim_elapsed"] for r in more.rounds] == [r["sim_elapsed"] for r in long.rounds]
    a, b = long.run_dir.load_global_model(5), more.run_dir.load_global_model(5)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_cli_resume_refuses_a_changed_option_naming_it_and_keeps_the_run(tmp_path):
    from typer.testing import CliRunner

    from fedscale.cli.main import app

    run = tmp_path / "run"
    simulate(out=str(run), clients=20, **{**SMALL, "num_rounds": 2})
    before = (run / "metrics.jsonl").read_bytes()
    result = CliRunner().invoke(
        app, ["simulate", "--resume", "--out", str(run), "--rounds", "3", "--batch-size", "8"]
    )
    assert result.exit_code == 2, result.output
    assert "batch-size: 16 -> 8" in " ".join(result.output.split())
    assert (run / "metrics.jsonl").read_bytes() == before
    result = CliRunner().invoke(app, ["simulate", "--resume", "--out", str(run), "--rounds", "3"])
    assert result.exit_code == 0, result.output
    assert _rounds(run) == [0, 1, 2, 3]


def test_cli_resume_needs_the_run_folder(tmp_path):
    from typer.testing import CliRunner

    from fedscale.cli.main import app

    result = CliRunner().invoke(app, ["simulate", "--resume"])
    assert result.exit_code == 2
    assert "expected --out naming the run folder" in " ".join(result.output.split())
