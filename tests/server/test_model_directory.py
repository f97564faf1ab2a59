"""The server's model directory: every round's global model as ONNX, the newest K kept."""

import logging

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fedscale.datasets import load_dataset
from fedscale.exceptions import ExportError
from fedscale.models import build_model
from fedscale.modelstore import ModelDirectory
from fedscale.records import load_arrays_into, state_dict_to_arrays
from fedscale.runs import RunDirectory
from fedscale.simulations import simulate


def _torch_model(run: RunDirectory, spec: str, server_round: int) -> torch.nn.Module:
    data = load_dataset("digits", seed=0, test_fraction=0.2)
    model = build_model(spec, data.sample_shape, data.num_classes)
    arrays = run.load_global_model(server_round)
    load_arrays_into(
        model, state_dict_to_arrays({k: torch.from_numpy(v) for k, v in arrays.items()})
    )
    return model.eval()


@pytest.mark.parametrize(("spec", "rounds", "keep"), [("mlp", 4, 3), ("cnn", 2, 5)])
def test_each_round_publishes_a_checked_model_and_keeps_the_newest(tmp_path, spec, rounds, keep):
    result = simulate(
        out=str(tmp_path / "run"),
        model=spec,
        num_rounds=rounds,
        clients=10,
        clients_per_round=3,
        local_epochs=1,
        keep_models=keep,
    )
    run = result.run_dir
    directory = ModelDirectory(run.models)
    kept = list(range(max(0, rounds + 1 - keep), rounds + 1))  # round 0 is published too
    assert [p.name for p in directory.model_files()] == [f"model-{r:04d}.onnx" for r in kept]
    assert sorted(p.name for p in directory.path.iterdir()) == sorted(
        ["manifest.json", *(f"model-{r:04d}.onnx" for r in kept)]
    )

    manifest = directory.read_manifest()
    assert manifest.round == rounds and manifest.file == f"model-{rounds:04d}.onnx"
    assert manifest.opset == 17
    assert [(t.name, t.datatype, t.shape) for t in manifest.inputs] == [
        ("input", "FP32", (-1, 1, 8, 8))
    ]
    assert [(t.name, t.datatype, t.shape) for t in manifest.outputs] == [
        ("logits", "FP32", (-1, 10))
    ]
    last = result.rounds[-1]
    assert manifest.metrics == {"accuracy": last["accuracy"], "loss": last["loss"]}

    # Every kept file is the checkpoint of its round, in onnxruntime as in torch.
    x = np.random.default_rng(7).standard_normal((64, 1, 8, 8), dtype=np.float32)
    for server_round, path in zip(kept, directory.model_files(), strict=True):
        data = path.read_bytes()
        if server_round == rounds:
            assert directory.read_model(manifest) == data  # size and sha256 verified
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        with torch.no_grad():
            want = _torch_model(run, spec, server_round)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(session.run(None, {"input": x})[0], want, rtol=1e-4, atol=1e-5)


def test_export_onnx_false_writes_no_models(tmp_path):
    result = simulate(
        out=str(tmp_path / "run"),
        num_rounds=1,
        clients=4,
        clients_per_round=2,
        local_epochs=1,
        export_onnx=False,
    )
    assert not result.run_dir.models.exists()
    assert result.run_dir.checkpoint_path(1).exists()


def batch_scaled(input_shape, num_classes):
    """A model whose forward freezes its batch size in an ONNX trace (see test_export.py)."""

    class BatchScaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(int(np.prod(input_shape)), num_classes)

        def forward(self, x):
            return self.linear(x.flatten(1)) / int(x.shape[0])

    return BatchScaled()


def test_a_model_that_cannot_be_exported_faithfully_stops_the_run_at_round_0(tmp_path):
    with pytest.raises(ExportError, match=r"batch size 32.*set export-onnx = false"):
        simulate(
            out=str(tmp_path / "run"),
            model=batch_scaled,
            num_rounds=2,
            clients=4,
            clients_per_round=2,
            local_epochs=1,
        )
    assert not (tmp_path / "run" / "models").exists()
    # ... and trains without exporting when asked to.
    result = simulate(
        out=str(tmp_path / "run2"),
        model=batch_scaled,
        num_rounds=1,
        clients=4,
        clients_per_round=2,
        local_epochs=1,
        export_onnx=False,
    )
    assert len(result.rounds) == 2


class _NanLogits(torch.nn.Module):
    """A model whose logits are NaN whatever its weights: its loss is NaN every round."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.linear = torch.nn.Linear(int(np.prod(input_shape)), num_classes)

    def forward(self, x):
        return self.linear(x.flatten(1)) * float("nan")


def test_a_diverged_run_still_publishes_and_leaves_nan_out_of_the_manifest(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="fedscale")
    result = simulate(
        out=str(tmp_path / "run"),
        num_rounds=2,
        clients=4,
        clients_per_round=2,
        local_epochs=1,
        model=_NanLogits,
    )
    assert result.rounds[-1]["loss"] is None  # NaN, written as null
    # The clients' NaN updates never reach aggregation (update validation).
    assert result.rounds[-1]["clients_rejected"] == 2
    manifest = ModelDirectory(result.run_dir.models).read_manifest()
    assert manifest.round == 2 and set(manifest.metrics) == {"accuracy"}
    # NaN weights give NaN logits in torch and in onnxruntime alike: parity holds.
    session = ort.InferenceSession(
        ModelDirectory(result.run_dir.models).read_model(manifest),
        providers=["CPUExecutionProvider"],
    )
    assert np.isnan(session.run(None, {"input": np.zeros((2, 1, 8, 8), np.float32)})[0]).all()
    assert not [r for r in caplog.records if "not published" in r.getMessage()]
