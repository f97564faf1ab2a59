"""Issue #3's end-to-end path: a federation writes models/, `fedscale serve` answers on it.

A short in-process federation trains an MLP on digits and leaves its model
directory; the real `fedscale serve` process serves it; tritonclient's HTTP and
gRPC clients send the whole test split, and the predicted classes must agree
with the torch model of the same round on at least 99.9% of it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedscale.datasets import load_dataset
from fedscale.models import build_model
from fedscale.modelstore import ModelDirectory
from fedscale.simulations import simulate

from .helpers import ServeProcess

pytestmark = pytest.mark.integration

AGREEMENT = 0.999


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    result = simulate(
        clients=10, num_rounds=3, clients_per_round=5, local_epochs=1, out=str(out), keep_models=2
    )
    return result


def _torch_predictions(run_dir, server_round: int, x: np.ndarray) -> np.ndarray:
    model = build_model("mlp", x.shape[1:], 10)
    state = run_dir.load_global_model(server_round)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).argmax(1).numpy()


def test_the_federation_leaves_a_model_directory_of_its_last_rounds(federation):
    directory = ModelDirectory(federation.run_dir.path / "models")
    manifest = directory.read_manifest()
    assert manifest.round == 3
    assert [p.name for p in directory.model_files()] == ["model-0002.onnx", "model-0003.onnx"]
    assert manifest.metrics["accuracy"] == pytest.approx(federation.rounds[-1]["accuracy"])
    assert directory.read_model(manifest)  # size and sha256 verified


def test_served_predictions_agree_with_torch_over_rest_and_grpc(federation, tmp_path):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    dataset = load_dataset("digits", seed=0, test_fraction=0.2)
    x = np.array(dataset.x_test, dtype=np.float32)  # a writable copy for torch
    expected = _torch_predictions(federation.run_dir, 3, x)
    manifest = ModelDirectory(federation.run_dir.path / "models").read_manifest()
    name, (spec,), (out_spec,) = manifest.name, manifest.inputs, manifest.outputs

    with ServeProcess(federation.run_dir.path / "models", tmp_path / "serve.log") as server:
        http = httpclient.InferenceServerClient(server.http_url)
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            assert http.is_model_ready(name) and grpc.is_model_ready(name)
            got = {}
            for label, client, module, binary in (
                ("rest-json", http, httpclient, False),
                ("rest-binary", http, httpclient, True),
                ("grpc", grpc, grpcclient, None),
            ):
                predictions = []
                for start in range(0, len(x), 64):
                    batch = x[start : start + 64]
                    tensor = module.InferInput(spec.name, list(batch.shape), "FP32")
                    if binary is None:
                        tensor.set_data_from_numpy(batch)
                        result = client.infer(name, [tensor])
                    else:
                        tensor.set_data_from_numpy(batch, binary_data=binary)
                        wanted = module.InferRequestedOutput(out_spec.name, binary_data=binary)
                        result = client.infer(name, [tensor], outputs=[wanted])
                    response = (
                        result.get_response(as_json=True)
                        if binary is None
                        else result.get_response()
                    )
                    assert response["model_version"] == "3", label
                    predictions.append(result.as_numpy(out_spec.name).argmax(1))
                got[label] = np.concatenate(predictions)
        finally:
            http.close()
            grpc.close()

    for label, predicted in got.items():
        assert predicted.shape == expected.shape, label
        agreement = float((predicted == expected).mean())
        assert agreement >= AGREEMENT, f"{label}: {agreement:.4f} of {len(x)} agree with torch"
