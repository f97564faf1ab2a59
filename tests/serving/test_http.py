"""The REST endpoints, driven by tritonclient's HTTP client and by raw HTTP.

Outputs are compared with a direct onnxruntime session on the same file and with
the torch model the file was exported from.
"""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from .helpers import (
    ServeProcess,
    lenet,
    lenet_input,
    ort_outputs,
    publish_export,
    request,
    wait_until,
)

torch = pytest.importorskip("torch")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.integration

ROUND = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    publish_export(root / "models", lenet(0)[0], ROUND)
    with ServeProcess(root / "models", root / "serve.log", grpc=False) as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    client = httpclient.InferenceServerClient(server.http_url)
    yield client
    client.close()


def test_health_and_metadata_through_tritonclient(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("fedscale")
    assert client.is_model_ready("fedscale", str(ROUND))
    assert not client.is_model_ready("fedscale", str(ROUND - 1))
    assert not client.is_model_ready("other")
    assert client.get_model_metadata("fedscale") == {
        "name": "fedscale",
        "versions": [str(ROUND)],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }
    assert client.get_model_metadata("fedscale", str(ROUND))["versions"] == [str(ROUND)]
    meta = client.get_server_metadata()
    assert meta["name"] == "fedscale" and "binary_tensor_data" in meta["extensions"]
    with pytest.raises(InferenceServerException, match="unknown model 'other'"):
        client.get_model_metadata("other")


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_infer_matches_onnxruntime_and_torch(client, batch, binary_in, binary_out):
    exported, model = lenet(0)
    x = lenet_input(batch, batch)
    given = httpclient.InferInput("input", list(x.shape), "FP32")
    given.set_data_from_numpy(x, binary_data=binary_in)
    wanted = httpclient.InferRequestedOutput("logits", binary_data=binary_out)
    result = client.infer("fedscale", [given], outputs=[wanted], request_id=f"req-{batch}")
    got = result.as_numpy("logits")
    response = result.get_response()
    assert response["model_name"] == "fedscale"
    assert response["model_version"] == str(ROUND)
    assert response["id"] == f"req-{batch}"
    assert got.dtype == np.float32 and got.shape == (batch, 10)
    # JSON carries each float32 in its shortest round-tripping form: bit-exact too.
    np.testing.assert_array_equal(got, ort_outputs(exported.model, {"input": x})[0])
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_large_binary_batch_and_all_outputs_by_default(client):
    exported, model = lenet(0)
    x = lenet_input(7, 1000)
    given = httpclient.InferInput("input", list(x.shape), "FP32")
    given.set_data_from_numpy(x, binary_data=True)
    # No outputs named: tritonclient asks for every output, in binary.
    result = client.infer("fedscale", [given], model_version=str(ROUND))
    got = result.as_numpy("logits")
    np.testing.assert_array_equal(got, ort_outputs(exported.model, {"input": x})[0])
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.999


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(client, algorithm):
    exported, _ = lenet(0)
    x = lenet_input(3)
    given = httpclient.InferInput("input", list(x.shape), "FP32")
    given.set_data_from_numpy(x, binary_data=False)
    result = client.infer("fedscale", [given], request_compression_algorithm=algorithm)
    np.testing.assert_array_equal(
        result.as_numpy("logits"), ort_outputs(exported.model, {"input": x})[0]
    )


def test_plain_json_with_nested_data_and_curl_style_request(server):
    exported, _ = lenet(0)
    x = lenet_input(11, 2)
    body = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": x.tolist()}
            ]
        }
    ).encode()
    status, headers, content = request(
        server.http_url,
        "POST",
        "/v2/models/fedscale/infer",
        body,
        {"Content-Type": "application/json"},
    )
    assert status == 200 and headers["Content-Type"] == "application/json"
    answer = json.loads(content)
    assert set(answer) == {"model_name", "model_version", "outputs"}  # no id: none was sent
    (output,) = answer["outputs"]
    assert output["name"] == "logits" and output["datatype"] == "FP32"
    assert output["shape"] == [2, 10]
    got = np.array(output["data"], dtype=np.float32).reshape(2, 10)
    np.testing.assert_array_equal(got, ort_outputs(exported.model, {"input": x})[0])


def test_keep_alive_pipelining_head_and_expect_continue(server):
    x = lenet_input(5)
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 28, 28],
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    ).encode()
    infer = (
        b"POST /v2/models/fedscale/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
        % len(body)
    ) + body
    live = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    head = b"HEAD /v2/models/fedscale HTTP/1.1\r\nHost: x\r\n\r\n"
    host, port = server.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        # Three requests in one write: answered in order on the same connection.
        sock.sendall(infer + live + head)
        data = _read_responses(sock, 3)
        assert [r[0] for r in data] == [200, 200, 200]
        assert json.loads(data[0][2])["model_version"] == str(ROUND)
        assert data[2][2] == b"" and int(data[2][1]["content-length"]) > 0  # HEAD: no body
        # Expect: 100-continue gets its interim answer before the body is sent.
        sock.sendall(
            b"POST /v2/models/fedscale/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        assert _recv_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        assert _read_responses(sock, 1)[0][0] == 200


def _recv_until(sock: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk and len(data) < limit, "connection closed or answer too long"
        data += chunk
    return data


def _read_responses(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """Read `count` responses; a HEAD's answer (the last here) carries no body."""
    buffer = b""
    responses = []
    for index in range(count):
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            assert chunk, "connection closed early"
            buffer += chunk
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        if index == 2:  # the HEAD request of the pipelined three
            length = 0
        while len(buffer) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed early"
            buffer += chunk
        responses.append((status, headers, buffer[:length]))
        buffer = buffer[length:]
    return responses


def test_empty_directory_is_not_ready_until_a_model_lands(tmp_path):
    models = tmp_path / "models"
    with ServeProcess(models, tmp_path / "serve.log", grpc=False) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            assert client.is_server_live()
            assert not client.is_server_ready()
            assert not client.is_model_ready("fedscale")
            status, _, body = request(server.http_url, "GET", "/v2/health/ready")
            assert status == 400 and "no model loaded yet" in json.loads(body)["error"]
            status, _, body = request(server.http_url, "POST", "/v2/models/fedscale/infer", b"{}")
            assert status == 404 and "no model is loaded yet" in json.loads(body)["error"]

            exported, _ = lenet(0)
            publish_export(models, exported, 1)
            wait_until(client.is_server_ready, 30, "the server to load the first model")
            assert client.is_model_ready("fedscale", "1")
            x = lenet_input(2)
            given = httpclient.InferInput("input", list(x.shape), "FP32")
            given.set_data_from_numpy(x)
            got = client.infer("fedscale", [given]).as_numpy("logits")
            np.testing.assert_array_equal(got, ort_outputs(exported.model, {"input": x})[0])
        finally:
            client.close()
    assert "serving model 'fedscale' version 1" in server.log()
