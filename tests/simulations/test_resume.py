"""Checkpoint and resume on the in-process engine: a killed run resumes to the same model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedscale.checkpoint import (
    INLINE_WRITE_SECONDS,
    PROBE_EVERY,
    BackgroundCommits,
    Checkpoint,
    CheckpointStore,
    EncodedCheckpoint,
)
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
    # Round 3's commit may still have been in flight (BackgroundCommits): then 2.
    assert 2 <= committed < 5, "the kill must land mid-run for this test to mean anything"

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


def _checkpoint(server_round: int, value: float) -> Checkpoint:
    return Checkpoint(
        round=server_round,
        config_hash="h",
        global_arrays={"w": np.full((2, 3), value, dtype=np.float32)},
        record={"round": server_round},
        strategy_arrays={"m": np.full(4, value)},
    )


# inline_below 0: every write goes to the writer thread; 60 s: every write is inline.
@pytest.mark.parametrize("inline_below", [0.0, 60.0])
def test_background_commits_land_in_order_and_equal_synchronous_ones(tmp_path, inline_below):
    background, direct = CheckpointStore(tmp_path / "bg"), CheckpointStore(tmp_path / "sync")
    with BackgroundCommits(background, inline_below=inline_below) as commits:
        for server_round in range(4):
            commits.commit(_checkpoint(server_round, server_round))
            direct.commit(_checkpoint(server_round, server_round))
    assert background.latest_round() == 3
    loaded = background.load_latest()
    assert loaded.round == 3 and np.all(loaded.global_arrays["w"] == 3.0)
    want = direct.load_latest()
    assert (loaded.record, loaded.config_hash) == (want.record, want.config_hash)
    for got_arrays, want_arrays in [
        (loaded.global_arrays, want.global_arrays),
        (loaded.strategy_arrays, want.strategy_arrays),
    ]:
        assert list(got_arrays) == list(want_arrays)
        assert all(np.array_equal(got_arrays[k], want_arrays[k]) for k in want_arrays)
    # Safetensors' header order varies, so compare what the files hold, not their bytes.
    assert sorted(p.name for p in background.folder.iterdir()) == sorted(
        p.name for p in direct.folder.iterdir()
    )


def test_a_background_commit_copies_the_state_when_it_is_called(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    checkpoint = _checkpoint(1, 1.0)
    with BackgroundCommits(store, inline_below=0.0) as commits:
        commits.commit(checkpoint)
        checkpoint.global_arrays["w"][:] = 99.0  # the next round changes the live arrays
        checkpoint.strategy_arrays["m"][:] = 99.0
    loaded = store.load_latest()
    assert np.all(loaded.global_arrays["w"] == 1.0) and np.all(loaded.strategy_arrays["m"] == 1.0)


def test_a_failed_background_write_is_raised_by_the_next_commit_and_by_close(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the checkpoint folder should be")
    commits = BackgroundCommits(CheckpointStore(blocked), inline_below=0.0)
    commits.commit(_checkpoint(0, 0.0))
    with pytest.raises(OSError):
        commits.commit(_checkpoint(1, 1.0))  # raises round 0's failure; round 1 is not sent
    commits.commit(_checkpoint(2, 2.0))
    with pytest.raises(OSError):
        commits.close()
    assert blocked.read_text() == "a file where the checkpoint folder should be", "nothing lost"


def test_a_failed_inline_write_is_raised_by_its_own_commit(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the checkpoint folder should be")
    commits = BackgroundCommits(CheckpointStore(blocked), inline_below=60.0)
    with pytest.raises(OSError):
        commits.commit(_checkpoint(0, 0.0))
    commits.close()
    assert blocked.read_text() == "a file where the checkpoint folder should be", "nothing lost"


class _TimedStore(CheckpointStore):
    """A store whose writes take ``seconds`` and record which thread wrote each round."""

    def __init__(self, folder: Path, seconds: float):
        super().__init__(folder)
        self.seconds = seconds
        self.writers: dict[int, str] = {}

    def write(self, encoded: EncodedCheckpoint) -> None:
        time.sleep(self.seconds)
        super().write(encoded)
        self.writers[encoded.round] = threading.current_thread().name


def test_slow_writes_move_to_the_writer_thread_and_are_probed_inline_again(tmp_path):
    store = _TimedStore(tmp_path / "ckpt", seconds=2 * INLINE_WRITE_SECONDS)
    rounds = PROBE_EVERY + 2
    with BackgroundCommits(store) as commits:
        for server_round in range(rounds):
            commits.commit(_checkpoint(server_round, server_round))
    main = threading.main_thread().name
    inline = [r for r in range(rounds) if store.writers[r] == main]
    # The first write shows the disk is slow; the probe at commit PROBE_EVERY confirms it.
    assert inline == [0, PROBE_EVERY]
    assert all(store.writers[r].startswith("fedscale-checkpoint") for r in range(1, PROBE_EVERY))
    assert store.load_latest().round == rounds - 1


def test_quick_writes_stay_on_the_callers_thread(tmp_path):
    store = _TimedStore(tmp_path / "ckpt", seconds=0.0)
    with BackgroundCommits(store, inline_below=60.0) as commits:
        for server_round in range(3):
            commits.commit(_checkpoint(server_round, server_round))
    assert set(store.writers.values()) == {threading.main_thread().name}
    assert store.load_latest().round == 2


def test_a_disk_that_got_quick_again_is_written_inline_from_the_next_probe(tmp_path):
    store = _TimedStore(tmp_path / "ckpt", seconds=2 * INLINE_WRITE_SECONDS)
    with BackgroundCommits(store) as commits:
        for server_round in range(PROBE_EVERY + 4):
            if server_round == 5:
                store.seconds = 0.0  # the disk is quick from now on
            commits.commit(_checkpoint(server_round, server_round))
    main = threading.main_thread().name
    inline = [r for r in sorted(store.writers) if store.writers[r] == main]
    # Slow at commit 0; the probe at PROBE_EVERY finds it quick, and it stays inline.
    assert inline == [0, *range(PROBE_EVERY, PROBE_EVERY + 4)]
    assert store.load_latest().round == PROBE_EVERY + 3


class _FailingStore(_TimedStore):
    def write(self, encoded: EncodedCheckpoint) -> None:
        if encoded.round == PROBE_EVERY - 1:
            raise OSError("disk gone")
        super().write(encoded)


def test_a_background_failure_is_raised_by_the_probe_commit_before_it_writes(tmp_path):
    store = _FailingStore(tmp_path / "ckpt", seconds=2 * INLINE_WRITE_SECONDS)
    commits = BackgroundCommits(store)
    for server_round in range(PROBE_EVERY):
        commits.commit(_checkpoint(server_round, server_round))  # the last one fails, unseen
    with pytest.raises(OSError, match="disk gone"):
        commits.commit(_checkpoint(PROBE_EVERY, PROBE_EVERY))  # a probe: inline, after the wait
    commits.close()
    assert PROBE_EVERY not in store.writers, "the failed round's successor was not written"
    assert store.load_latest().round == PROBE_EVERY - 2, "nothing past the failure committed"
