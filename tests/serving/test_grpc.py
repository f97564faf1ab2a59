"""The gRPC service, driven by tritonclient's gRPC client and by Triton's own stubs.

The server runs in its own process (see helpers); this process holds only
tritonclient's copy of the `inference.*` messages, so every call here is a
third-party v2 client talking to fedscale serve.
"""

from __future__ import annotations

import numpy as np
import pytest

from .helpers import ServeProcess, lenet, lenet_input, ort_outputs, publish_export

torch = pytest.importorskip("torch")
grpcclient = pytest.importorskip("tritonclient.grpc")
import grpc  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402

pytestmark = pytest.mark.integration

ROUND = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc")
    publish_export(root / "models", lenet(1)[0], ROUND)
    with ServeProcess(root / "models", root / "serve.log") as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def test_health_and_metadata_through_tritonclient(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("fedscale")
    assert client.is_model_ready("fedscale", str(ROUND))
    assert not client.is_model_ready("fedscale", "99")
    assert not client.is_model_ready("other")
    meta = client.get_model_metadata("fedscale", as_json=True)
    assert meta["name"] == "fedscale"
    assert meta["versions"] == [str(ROUND)]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": ["-1", "1", "28", "28"]}
    ]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]
    server_meta = client.get_server_metadata(as_json=True)
    assert server_meta["name"] == "fedscale" and "binary_tensor_data" in server_meta["extensions"]


@pytest.mark.parametrize("batch", [1, 32, 1000])
def test_infer_matches_onnxruntime_and_torch(client, batch):
    exported, model = lenet(1)
    x = lenet_input(100 + batch, batch)
    given = grpcclient.InferInput("input", list(x.shape), "FP32")
    given.set_data_from_numpy(x)
    wanted = grpcclient.InferRequestedOutput("logits")
    result = client.infer("fedscale", [given], outputs=[wanted], request_id=f"g{batch}")
    got = result.as_numpy("logits")
    response = result.get_response()
    assert response.model_name == "fedscale" and response.model_version == str(ROUND)
    assert response.id == f"g{batch}"
    np.testing.assert_array_equal(got, ort_outputs(exported.model, {"input": x})[0])
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_typed_contents_and_version_addressing(stub):
    """`contents.fp32_contents` instead of raw bytes; outputs come back raw."""
    exported, _ = lenet(1)
    x = lenet_input(9, 2)
    request = service_pb2.ModelInferRequest(model_name="fedscale", model_version=str(ROUND))
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "input", "FP32"
    tensor.shape.extend(x.shape)
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    response = stub.ModelInfer(request, timeout=30)
    (output,) = response.outputs
    assert output.name == "logits" and output.datatype == "FP32"
    assert list(output.shape) == [2, 10]
    got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 10)
    np.testing.assert_array_equal(got, ort_outputs(exported.model, {"input": x})[0])


def test_model_ready_rpc_says_false_for_unknown_models(stub):
    ready = stub.ModelReady(service_pb2.ModelReadyRequest(name="nope"), timeout=10)
    assert ready.ready is False
    live = stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10)
    assert live.live is True
