import json

import numpy as np
import pytest

from fedscale.exceptions import ConfigError, DataError
from fedscale.runs import METRICS_SCHEMA_VERSION, RoundRecord, RunDirectory


def record(r, acc=0.5):
    return RoundRecord(
        round=r,
        loss=float("nan") if r == 2 else 0.1,
        accuracy=acc,
        train_loss=None,
        clients_sampled=3,
        clients_replied=2,
        clients_failed=1,
        seconds=0.5,
        elapsed=r * 0.5,
    )


def test_metrics_lines_follow_the_schema(tmp_path):
    run = RunDirectory(tmp_path / "r").create()
    for r in range(3):
        run.append_metrics(record(r))
    rows = run.read_metrics()
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert set(rows[0]) == {
        "schema",
        "round",
        "loss",
        "accuracy",
        "train_loss",
        "clients_sampled",
        "clients_replied",
        "clients_failed",
        "seconds",
        "elapsed",
        "federated_loss",
        "federated_accuracy",
        "sim_seconds",
        "sim_elapsed",
        "clients_dropped",
        "dropped",
        "clients_rejected",
        "bytes_sent",
        "bytes_received",
        "aggregate_seconds",
        "dp_epsilon",
        "dp_delta",
        "time",
    }
    assert rows[0]["schema"] == METRICS_SCHEMA_VERSION
    # Without a device model the virtual clock's fields are null.
    assert {rows[0][k] for k in ("sim_seconds", "sim_elapsed", "clients_dropped", "dropped")} == {
        None
    }
    assert rows[2]["loss"] is None, (
        "a non-finite loss is written as null, the file stays valid JSON"
    )
    for line in run.metrics_path.read_text().splitlines():
        json.loads(line)


def test_global_model_checkpoint_round_trip_keeps_order_and_bits(tmp_path):
    run = RunDirectory(tmp_path).create()
    arrays = {
        "z.weight": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32),
        "a.bias": np.arange(4, dtype=np.int64),
    }
    path = run.save_global_model(7, arrays)
    assert path.name == "round-0007.safetensors"
    back = run.load_global_model(7)
    assert list(back) == ["z.weight", "a.bias"]
    assert all(
        np.array_equal(back[k], arrays[k]) and back[k].dtype == arrays[k].dtype for k in arrays
    )
    assert not list(run.checkpoints.glob("*.tmp")), "no temporary files are left behind"


def test_an_existing_run_is_never_overwritten(tmp_path):
    run = RunDirectory(tmp_path).create()
    run.append_metrics(record(0))
    before = run.metrics_path.read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        RunDirectory(tmp_path).create()
    assert run.metrics_path.read_bytes() == before


def test_config_is_written_as_toml(tmp_path):
    import tomllib

    run = RunDirectory(tmp_path).create()
    run.write_config({"lr": 0.1, "dataset": "digits"})
    assert tomllib.loads(run.config_path.read_text()) == {
        "lr": 0.1,
        "dataset": "digits",
    }


def test_checkpoints_keep_zero_dimensional_arrays(tmp_path):
    # A BatchNorm's num_batches_tracked is 0-d; np.ascontiguousarray would make it (1,).
    run = RunDirectory(tmp_path / "run").create()
    arrays = {"counter": np.array(7, dtype=np.int64), "w": np.ones((2, 3), dtype=np.float32).T}
    run.save_global_model(1, arrays)
    loaded = run.load_global_model(1)
    assert loaded["counter"].shape == () and int(loaded["counter"]) == 7
    np.testing.assert_array_equal(loaded["w"], arrays["w"])


def test_a_torn_metrics_line_is_an_error_naming_the_line(tmp_path):
    run = RunDirectory(tmp_path / "run").create()
    run.append_metrics(RoundRecord(0, 2.3, 0.1, None, 0, 0, 0, 0.0, 0.0))
    with open(run.metrics_path, "a", encoding="utf-8") as handle:
        handle.write('{"schema": 1, "round": 1, "loss"')
    with pytest.raises(DataError, match=r"metrics\.jsonl line 2: expected one JSON object"):
        run.read_metrics()
