"""`fedscale export RUN_DIR`: any round's checkpoint to a checked ONNX file."""

import hashlib
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from fedscale.cli.main import app
from fedscale.datasets import load_dataset
from fedscale.models import build_model
from fedscale.records import load_arrays_into, state_dict_to_arrays
from fedscale.runs import RunDirectory
from fedscale.simulations import simulate


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunDirectory:
    out = tmp_path_factory.mktemp("export") / "run"
    result = simulate(
        out=str(out), num_rounds=2, clients=6, clients_per_round=3, local_epochs=2, keep_models=1
    )
    return result.run_dir


def _cli(*args):
    return CliRunner().invoke(app, ["export", *map(str, args)])


def _torch(run: RunDirectory, server_round: int) -> torch.nn.Module:
    data = load_dataset("digits", seed=0, test_fraction=0.2)
    model = build_model("mlp", data.sample_shape, data.num_classes)
    state = {k: torch.from_numpy(v) for k, v in run.load_global_model(server_round).items()}
    load_arrays_into(model, state_dict_to_arrays(state))
    return model.eval()


def test_exports_the_last_round_by_default(run):
    result = _cli(run.path)
    assert result.exit_code == 0, result.output
    path = run.path / "exported" / "model-0002.onnx"
    data = path.read_bytes()
    assert f"round 2: {path}" in result.output
    assert f"sha256 {hashlib.sha256(data).hexdigest()}" in result.output
    assert "inputs input FP32 [-1, 1, 8, 8]; outputs logits FP32 [-1, 10]" in result.output
    assert re.search(r"batch 1: \S+, batch 32: \S+, batch 1000: \S+", result.output)
    # The same bytes the server published for that round.
    assert data == (run.models / "model-0002.onnx").read_bytes()


def test_any_saved_round_to_any_file(run, tmp_path):
    out = tmp_path / "round0.onnx"
    result = _cli(run.path, "--round", 0, "--out", out)
    assert result.exit_code == 0, result.output
    x = np.random.default_rng(1).standard_normal((32, 1, 8, 8), dtype=np.float32)
    session = ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = _torch(run, 0)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x})[0], want, rtol=1e-4, atol=1e-5)


def test_int8_reports_accuracy_drift(run):
    result = _cli(run.path, "--quantize", "int8")
    assert result.exit_code == 0, result.output
    path = run.path / "exported" / "model-0002-int8.onnx"
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "MatMulInteger" in ops
    assert "int8 accuracy drift on 359 test examples" in result.output
    row = re.search(
        r"│\s+(0\.\d{4})\s+│\s+(0\.\d{4})\s+│\s+([+-]\d\.\d{4})\s+│\s+([\d.]+)%", result.output
    )
    assert row, result.output
    fp32, int8, change, agree = (float(g) for g in row.groups())
    rows = run.read_metrics()
    assert fp32 == pytest.approx(rows[-1]["accuracy"], abs=1.5e-4 + 1 / 359)
    assert change == pytest.approx(int8 - fp32, abs=2e-4)
    assert 90.0 <= agree <= 100.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--round", "9"], r"--round: expected one of the saved rounds \(0, 1, 2\), got 9"),
        (["--quantize", "int4"], r"--quantize: expected one of int8, got 'int4'"),
    ],
)
def test_bad_options_are_clear_errors(run, args, message):
    result = _cli(run.path, *args)
    assert result.exit_code == 2
    assert re.search(message, " ".join(result.output.split())), result.output


def test_a_folder_without_a_run_is_a_clear_error(tmp_path):
    result = _cli(tmp_path)
    assert result.exit_code == 2
    assert "expected config.toml, found none" in " ".join(result.output.split())
    (tmp_path / "config.toml").write_text('model = "mlp"\n')
    result = _cli(tmp_path)
    assert result.exit_code == 2
    assert "expected round-NNNN.safetensors checkpoints, found none" in " ".join(
        result.output.split()
    )
