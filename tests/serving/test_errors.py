"""Every bad request gets its exact 4xx (REST) or status code (gRPC), naming the problem.

One `fedscale serve` with a two-input model (`image` FP32 [-1, 4], `mask` INT64
[-1, 4]), `--max-batch 8` and `--max-body-bytes 4096`. After every table the
server must still answer, and its log must hold no traceback: no request crashes
it or gets a 5xx.
"""

from __future__ import annotations

import gzip
import json
import socket
import zlib
from collections.abc import Callable

import numpy as np
import pytest

from .helpers import ServeProcess, publish_two_input, request

pytest.importorskip("onnx")  # builds the two-input test model

grpc = pytest.importorskip("grpc")
pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402

pytestmark = pytest.mark.integration

INFER = "/v2/models/fedscale/infer"
MAX_BATCH = 8
MAX_BODY = 4096
IMAGE = {"name": "image", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}
MASK = {"name": "mask", "shape": [1, 4], "datatype": "INT64", "data": [1, 0, 1, 0]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    publish_two_input(root / "models")
    process = ServeProcess(
        root / "models",
        root / "serve.log",
        "--max-batch",
        str(MAX_BATCH),
        "--max-body-bytes",
        str(MAX_BODY),
    )
    with process:
        yield process
    assert "Traceback" not in process.log()


def _json(*inputs: dict, **extra: object) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def _with(tensor: dict, **changes: object) -> dict:
    changed = {**tensor, **changes}
    return {k: v for k, v in changed.items() if v is not None}


def _binary(json_header: dict, blob: bytes, length: str | None = None) -> tuple[bytes, dict]:
    header = json.dumps(json_header).encode()
    return header + blob, {"Inference-Header-Content-Length": length or str(len(header))}


_F32 = np.arange(4, dtype="<f4").tobytes()
_BIN_IMAGE = {"name": "image", "shape": [1, 4], "datatype": "FP32"}


def _bin_image(size: int) -> dict:
    return {**_BIN_IMAGE, "parameters": {"binary_data_size": size}}


# (id, method, path, body, headers, status, what the error must say)
HTTP_CASES: list[tuple[str, str, str, bytes | None, dict, int, str]] = [
    ("malformed-json", "POST", INFER, b'{"inputs": [', {}, 400, "malformed JSON"),
    ("not-an-object", "POST", INFER, b"[1, 2]", {}, 400, "expected a JSON object, got a list"),
    ("no-inputs", "POST", INFER, b"{}", {}, 400, "inputs: expected a non-empty list"),
    ("unknown-model", "POST", "/v2/models/nope/infer", _json(IMAGE, MASK), {}, 404,
     "unknown model 'nope'"),
    ("unknown-version", "POST", "/v2/models/fedscale/versions/7/infer", _json(IMAGE, MASK), {},
     404, "unknown version '7'"),
    ("unknown-model-metadata", "GET", "/v2/models/nope", None, {}, 404, "unknown model 'nope'"),
    ("unknown-model-ready", "GET", "/v2/models/nope/ready", None, {}, 404, "unknown model"),
    ("missing-input", "POST", INFER, _json(IMAGE), {}, 400, "missing input 'mask'"),
    ("unknown-input", "POST", INFER,
     _json(IMAGE, MASK, _with(IMAGE, name="extra")), {}, 400, "unknown input 'extra'"),
    ("repeated-input", "POST", INFER, _json(IMAGE, IMAGE, MASK), {}, 400,
     "input 'image': expected once"),
    ("wrong-rank", "POST", INFER, _json(_with(IMAGE, shape=[4]), MASK), {}, 400,
     "input 'image' shape: expected [-1, 4]"),
    ("wrong-dimension", "POST", INFER,
     _json(_with(IMAGE, shape=[1, 5], data=[1, 2, 3, 4, 5]), MASK), {}, 400,
     "input 'image' shape: expected [-1, 4]"),
    ("zero-dimension", "POST", INFER, _json(_with(IMAGE, shape=[0, 4], data=[]), MASK), {}, 400,
     "whole numbers >= 1"),
    ("shape-not-a-list", "POST", INFER, _json(_with(IMAGE, shape="1x4"), MASK), {}, 400,
     "input 'image' shape"),
    ("wrong-datatype", "POST", INFER, _json(_with(IMAGE, datatype="FP64"), MASK), {}, 400,
     "input 'image' datatype: expected FP32, got 'FP64'"),
    ("floats-for-int64", "POST", INFER, _json(IMAGE, _with(MASK, data=[1.5, 0, 1, 0])), {}, 400,
     "input 'mask' data: expected integers for datatype INT64"),
    ("strings-for-fp32", "POST", INFER, _json(_with(IMAGE, data=["a", "b", "c", "d"]), MASK), {},
     400, "got strings"),
    ("int64-out-of-range", "POST", INFER, _json(IMAGE, _with(MASK, data=[2**63, 0, 1, 0])), {},
     400, "expected INT64 values in"),
    ("too-few-values", "POST", INFER, _json(_with(IMAGE, data=[1.0, 2.0, 3.0]), MASK), {}, 400,
     "input 'image' data: expected 4 values for shape [1, 4], got 3"),
    ("too-many-values", "POST", INFER, _json(IMAGE, _with(MASK, data=[1, 0, 1, 0, 1])), {}, 400,
     "input 'mask' data: expected 4 values for shape [1, 4], got 5"),
    ("ragged-nested-data", "POST", INFER,
     _json(_with(IMAGE, shape=[2, 4], data=[[1, 2, 3, 4], [1, 2]]), MASK), {}, 400,
     "nested evenly"),
    ("no-data", "POST", INFER, _json(_with(IMAGE, data=None), MASK), {}, 400,
     "input 'image' data: expected a list"),
    ("batch-over-max-batch", "POST", INFER,
     _json(_with(IMAGE, shape=[9, 4], data=[0.0] * 36), _with(MASK, shape=[9, 4], data=[1] * 36)),
     {}, 400, "batch: expected at most 8 (the server's --max-batch), got 9"),
    ("body-over-max-body-bytes", "POST", INFER, b" " * (MAX_BODY + 1), {}, 413,
     "expected at most 4096 bytes (the server's --max-body-bytes)"),
    ("header-length-not-a-number", "POST", INFER,
     *_binary({"inputs": [_bin_image(16), MASK]}, _F32, "abc"), 400,
     "Inference-Header-Content-Length: expected the JSON header's length"),
    ("header-length-beyond-body", "POST", INFER,
     *_binary({"inputs": [_bin_image(16), MASK]}, _F32, "999"), 400,
     "Inference-Header-Content-Length: expected at most the body's"),
    ("binary-size-not-the-shape", "POST", INFER,
     *_binary({"inputs": [_bin_image(12), MASK]}, _F32[:12]), 400,
     "input 'image' binary data: expected 16 bytes for shape [1, 4] FP32, got 12"),
    ("binary-bytes-left-over", "POST", INFER,
     *_binary({"inputs": [_bin_image(16), MASK]}, _F32 + b"\0" * 8), 400,
     "binary data: the inputs' binary_data_size add up to 16 bytes, but 24 bytes follow"),
    ("binary-size-beyond-body", "POST", INFER,
     *_binary({"inputs": [_bin_image(32), MASK]}, _F32), 400,
     "binary_data_size: expected at most the 16 bytes left"),
    ("binary-size-negative", "POST", INFER,
     *_binary({"inputs": [_bin_image(-4), MASK]}, _F32), 400,
     "binary_data_size: expected a whole number of bytes"),
    ("binary-without-header-length", "POST", INFER,
     _binary({"inputs": [_bin_image(16), MASK]}, _F32)[0], {}, 400,
     "binary tensors needs the Inference-Header-Content-Length header"),
    ("binary-size-without-header-length", "POST", INFER,
     _json(_bin_image(0), MASK), {}, 400,
     "binary tensors need the Inference-Header-Content-Length header"),
    ("data-and-binary", "POST", INFER,
     *_binary({"inputs": [{**_bin_image(16), "data": [1, 2, 3, 4]}, MASK]}, _F32), 400,
     "expected data or binary_data_size, got both"),
    ("unknown-output", "POST", INFER, _json(IMAGE, MASK, outputs=[{"name": "nope"}]), {}, 400,
     "unknown output 'nope'"),
    ("classification", "POST", INFER,
     _json(IMAGE, MASK, outputs=[{"name": "score", "parameters": {"classification": 2}}]), {},
     400, "classification extension"),
    ("binary-data-not-a-flag", "POST", INFER,
     _json(IMAGE, MASK, outputs=[{"name": "score", "parameters": {"binary_data": "yes"}}]), {},
     400, "binary_data: expected true or false"),
    ("id-not-a-string", "POST", INFER, _json(IMAGE, MASK, id=7), {}, 400,
     "id: expected a string"),
    ("unknown-route", "GET", "/v3/health", None, {}, 404, "unknown route '/v3/health'"),
    ("unknown-model-action", "POST", "/v2/models/fedscale/explain", b"{}", {}, 404,
     "unknown route"),
    ("infer-with-get", "GET", INFER, None, {}, 405, "method GET on '/v2/models/fedscale/infer': "
     "expected POST"),
    ("post-to-health", "POST", "/v2/health/live", b"", {}, 405, "expected GET, HEAD"),
    ("delete-model", "DELETE", "/v2/models/fedscale", None, {}, 405, "method DELETE"),
    ("unknown-content-encoding", "POST", INFER, _json(IMAGE, MASK), {"Content-Encoding": "br"},
     415, "Content-Encoding: expected identity, gzip or deflate, got 'br'"),
    ("gzip-over-max-body-bytes", "POST", INFER, gzip.compress(b" " * 100_000),
     {"Content-Encoding": "gzip"}, 413, "once decompressed"),
    ("corrupt-gzip", "POST", INFER, b"\x1f\x8bnot gzip at all", {"Content-Encoding": "gzip"}, 400,
     "does not decompress"),
    ("truncated-deflate", "POST", INFER, zlib.compress(_json(IMAGE, MASK))[:-6],
     {"Content-Encoding": "deflate"}, 400, "truncated"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "message"),
    [case[1:] for case in HTTP_CASES],
    ids=[case[0] for case in HTTP_CASES],
)
def test_bad_http_requests(server, method, path, body, headers, status, message):
    got, response_headers, content = request(server.http_url, method, path, body, headers)
    assert got == status, content
    assert response_headers["Content-Type"] == "application/json"
    error = json.loads(content)
    assert list(error) == ["error"]
    assert message in error["error"]
    if status == 405:
        assert response_headers["Allow"] in ("POST", "GET, HEAD")


def test_good_request_for_contrast(server):
    """The same server answers the well-formed version of those requests."""
    status, _, content = request(server.http_url, "POST", INFER, _json(IMAGE, MASK))
    assert status == 200
    (output,) = json.loads(content)["outputs"]
    assert output["data"] == [1.5, -1.0, 5.0, 0.0]  # image * mask + [0.5, -1, 2, 0]


def _raw_exchange(server, payload: bytes) -> bytes:
    host, port = server.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(payload)
        data = b""
        while True:  # the server closes after refusing
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk


def test_oversized_body_is_refused_from_its_headers_alone(server):
    # 10 GB announced, not one byte sent: the answer cannot come from reading it.
    answer = _raw_exchange(
        server,
        b"POST /v2/models/fedscale/infer HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 10000000000\r\n\r\n",
    )
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in head
    assert "got Content-Length 10000000000" in json.loads(body)["error"]


def test_oversized_chunked_body_is_refused(server):
    chunk = b"x" * 3000
    answer = _raw_exchange(
        server,
        b"POST /v2/models/fedscale/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2,
    )
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert "--max-body-bytes" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"THIS IS NOT HTTP\r\n\r\n", "malformed HTTP request"),
        (b"GET /v2 HTTP/1.1\r\nBad Header Line\r\n\r\n", "malformed HTTP request"),
        (b"GET /v2 HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", "request headers"),
    ],
    ids=["not-http", "bad-header", "huge-header"],
)
def test_malformed_http_is_a_4xx(server, payload, message):
    answer = _raw_exchange(server, payload)
    status = int(answer.split(b" ", 2)[1])
    assert status in (400, 431)
    assert message in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]


# ------------------------------------------------------------------ gRPC


def _tensor(request, name: str, datatype: str, shape: list[int]):
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = name, datatype
    tensor.shape.extend(shape)
    return tensor


def _infer_request(
    *,
    model: str = "fedscale",
    version: str = "",
    image: bytes | None = _F32,
    mask: bytes | None = np.array([1, 0, 1, 0], dtype="<i8").tobytes(),
    image_shape: list[int] | None = None,
    image_datatype: str = "FP32",
    extra: bool = False,
    outputs: tuple[str, ...] = (),
):
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    if image is not None:
        _tensor(request, "image", image_datatype, image_shape or [1, 4])
        request.raw_input_contents.append(image)
    if mask is not None:
        _tensor(request, "mask", "INT64", [1, 4])
        request.raw_input_contents.append(mask)
    if extra:
        _tensor(request, "extra", "FP32", [1, 4])
        request.raw_input_contents.append(_F32)
    for name in outputs:
        request.outputs.add().name = name
    return request


def _typed(field: str, values: list, shape: tuple[int, ...] = (1, 4)):
    request = service_pb2.ModelInferRequest(model_name="fedscale")
    image = _tensor(request, "image", "FP32", list(shape))
    getattr(image.contents, field).extend(values)
    mask = _tensor(request, "mask", "INT64", [1, 4])
    mask.contents.int64_contents.extend([1, 0, 1, 0])
    return request


def _raw_count_mismatch():
    request = _infer_request()
    request.raw_input_contents.append(_F32)
    return request


def _neither():
    request = service_pb2.ModelInferRequest(model_name="fedscale")
    _tensor(request, "image", "FP32", [1, 4])
    _tensor(request, "mask", "INT64", [1, 4])
    return request


def _both():
    request = _infer_request()
    request.inputs[0].contents.fp32_contents.extend([1, 2, 3, 4])
    return request


def _big_batch():
    request = service_pb2.ModelInferRequest(model_name="fedscale")
    _tensor(request, "image", "FP32", [9, 4])
    _tensor(request, "mask", "INT64", [9, 4])
    request.raw_input_contents.extend([b"\0" * 144, b"\0" * 288])
    return request


def _too_large():
    return _infer_request(image=b"\0" * (MAX_BODY * 2), image_shape=[MAX_BODY // 8, 4])


G = grpc.StatusCode
GRPC_CASES: list[tuple[str, Callable, G, str]] = [
    ("unknown-model", lambda: _infer_request(model="nope"), G.NOT_FOUND, "unknown model 'nope'"),
    ("unknown-version", lambda: _infer_request(version="7"), G.NOT_FOUND, "unknown version '7'"),
    ("no-inputs", lambda: service_pb2.ModelInferRequest(model_name="fedscale"),
     G.INVALID_ARGUMENT, "expected at least one input"),
    ("missing-input", lambda: _infer_request(mask=None), G.INVALID_ARGUMENT,
     "missing input 'mask'"),
    ("unknown-input", lambda: _infer_request(extra=True), G.INVALID_ARGUMENT,
     "unknown input 'extra'"),
    ("wrong-shape", lambda: _infer_request(image_shape=[4]), G.INVALID_ARGUMENT,
     "input 'image' shape: expected [-1, 4]"),
    ("wrong-datatype", lambda: _infer_request(image_datatype="FP16"), G.INVALID_ARGUMENT,
     "input 'image' datatype: expected FP32, got 'FP16'"),
    ("raw-length-not-the-shape", lambda: _infer_request(image=_F32[:8]), G.INVALID_ARGUMENT,
     "input 'image' binary data: expected 16 bytes"),
    ("typed-count-not-the-shape", lambda: _typed("fp32_contents", [1.0, 2.0]),
     G.INVALID_ARGUMENT, "input 'image' data: expected 4 values for shape [1, 4], got 2"),
    ("typed-field-not-the-datatype", lambda: _typed("int64_contents", [1, 2, 3, 4]),
     G.INVALID_ARGUMENT, "expected fp32_contents for datatype FP32, got int64_contents"),
    ("raw-count-not-the-inputs", _raw_count_mismatch, G.INVALID_ARGUMENT,
     "raw_input_contents: expected one entry per input (2), got 3"),
    ("no-contents", _neither, G.INVALID_ARGUMENT, "got neither"),
    ("raw-and-contents", _both, G.INVALID_ARGUMENT, "got both"),
    ("batch-over-max-batch", _big_batch, G.INVALID_ARGUMENT,
     "batch: expected at most 8 (the server's --max-batch), got 9"),
    ("unknown-output", lambda: _infer_request(outputs=("nope",)), G.INVALID_ARGUMENT,
     "unknown output 'nope'"),
    ("message-over-max-body-bytes", _too_large, G.RESOURCE_EXHAUSTED, "larger than max"),
]  # fmt: skip


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.mark.parametrize(
    ("build", "code", "message"),
    [case[1:] for case in GRPC_CASES],
    ids=[case[0] for case in GRPC_CASES],
)
def test_bad_grpc_requests(stub, build, code, message):
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(build(), timeout=30)
    assert raised.value.code() == code
    assert message in raised.value.details()


def test_grpc_metadata_of_unknown_model_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="nope"), timeout=30)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown model 'nope'" in raised.value.details()


def test_grpc_good_request_for_contrast(stub):
    response = stub.ModelInfer(_infer_request(), timeout=30)
    got = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
    assert got.tolist() == [0.5, -1.0, 4.0, 0.0]  # arange(4) * [1, 0, 1, 0] + bias
    typed = stub.ModelInfer(_typed("fp32_contents", [1.0, 2.0, 3.0, 4.0]), timeout=30)
    assert np.frombuffer(typed.raw_output_contents[0], dtype="<f4").tolist() == [
        1.5, -1.0, 5.0, 0.0,
    ]  # fmt: skip


def test_server_still_serves_after_every_bad_request(server):
    status, _, _ = request(server.http_url, "GET", "/v2/health/ready")
    assert status == 200
    assert "Traceback" not in server.log()
