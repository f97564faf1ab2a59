"""The model publisher: a real HTTP server on 127.0.0.1, read-only, two kinds of path."""

import hashlib
import http.client
import json
import socket
import subprocess
import sys

import pytest

from fedscale.exceptions import ConfigError
from fedscale.model_publisher import ModelPublisher
from fedscale.modelstore import Manifest, ModelDirectory, TensorSpec
from fedscale.processes import free_port

pytestmark = pytest.mark.integration

INPUTS = (TensorSpec("input", "FP32", (-1, 1, 8, 8)),)
OUTPUTS = (TensorSpec("logits", "FP32", (-1, 10)),)


def _publish(directory: ModelDirectory, server_round: int, data: bytes, keep: int = 5) -> Manifest:
    return directory.publish(
        data, server_round=server_round, opset=17, inputs=INPUTS, outputs=OUTPUTS, keep=keep
    )


def _get(publisher, path, method="GET", headers=None, body=None):
    connection = http.client.HTTPConnection("127.0.0.1", publisher.port, timeout=10)
    try:
        # http.client sends the path exactly as given: no normalization.
        connection.putrequest(method, path, skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            connection.putheader(key, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "run"
    directory = ModelDirectory(root / "models")
    (root / "config.toml").parent.mkdir(parents=True, exist_ok=True)
    (root / "config.toml").write_text("secret = true\n")
    with ModelPublisher(directory.path, port=0) as publisher:
        yield directory, publisher


def test_serves_manifest_and_model_with_etag_and_length(served):
    directory, publisher = served
    model = bytes(range(256)) * 40
    manifest = _publish(directory, 7, model)

    status, headers, body = _get(publisher, "/manifest.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert Manifest.loads(body) == manifest
    assert int(headers["Content-Length"]) == len(body)
    assert headers["ETag"] == f'"{hashlib.sha256(body).hexdigest()}"'

    status, headers, body = _get(publisher, f"/{manifest.file}")
    assert status == 200 and body == model
    assert headers["Content-Type"] == "application/octet-stream"
    assert int(headers["Content-Length"]) == len(model)
    assert headers["ETag"] == f'"{manifest.sha256}"'
    assert hashlib.sha256(body).hexdigest() == manifest.sha256

    status, headers, body = _get(publisher, f"/{manifest.file}", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) == len(model)

    status, _, body = _get(publisher, "/manifest.json?poll=1")
    assert status == 200 and Manifest.loads(body) == manifest


def test_if_none_match_answers_304_until_a_new_model_lands(served):
    directory, publisher = served
    _publish(directory, 1, b"one")
    _, headers, _ = _get(publisher, "/manifest.json")
    etag = headers["ETag"]
    status, headers, body = _get(publisher, "/manifest.json", headers={"If-None-Match": etag})
    assert status == 304 and body == b"" and headers["ETag"] == etag

    new = _publish(directory, 2, b"two")
    status, headers, body = _get(publisher, "/manifest.json", headers={"If-None-Match": etag})
    assert status == 200 and Manifest.loads(body) == new and headers["ETag"] != etag
    status, _, _ = _get(publisher, "/model-0002.onnx", headers={"If-None-Match": f'"{new.sha256}"'})
    assert status == 304


def test_nothing_published_yet_is_404(served):
    _, publisher = served
    status, headers, body = _get(publisher, "/manifest.json")
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert "no model published yet" in json.loads(body)["error"]


def test_pruned_models_are_gone(served):
    directory, publisher = served
    for r in range(1, 5):
        _publish(directory, r, f"model {r}".encode(), keep=2)
    assert _get(publisher, "/model-0001.onnx")[0] == 404
    assert _get(publisher, "/model-0004.onnx")[2] == b"model 4"


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/models/",
        "/models/manifest.json",
        "/../config.toml",
        "/..%2fconfig.toml",
        "/%2e%2e/config.toml",
        "/%2E%2E%2Fconfig.toml",
        "/model-0001.onnx/../../config.toml",
        "/./manifest.json",
        "/manifest.json/",
        "/MANIFEST.JSON",
        "/manifest.json%00",
        "/model-0001.onnx.tmp",
        "/.model-0001.onnx.abc.tmp",
        "/model-1.onnx",
        "/model-0001.ONNX",
        "/config.toml",
        "/etc/passwd",
        "/model-0001.onnx%2f..%2f..%2fconfig.toml",
    ],
)
def test_anything_else_is_404_and_traversal_finds_nothing(served, path):
    directory, publisher = served
    _publish(directory, 1, b"model one")
    status, headers, body = _get(publisher, path)
    assert status == 404, (path, body)
    assert b"secret" not in body
    assert json.loads(body)["error"].startswith("not found")


@pytest.mark.parametrize(
    "raw_path",
    ["/model-00\u0660\u0661.onnx".encode(), b"/manifest.json\x00", b"/model-0001.onnx\xff"],
)
def test_malformed_request_paths_are_refused(served, raw_path):
    directory, publisher = served
    _publish(directory, 1, b"model one")
    with socket.create_connection(("127.0.0.1", publisher.port), timeout=10) as sock:
        sock.sendall(b"GET " + raw_path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    # http.server itself answers 400 to a request line it cannot parse; 404 otherwise.
    assert reply.split(b" ", 2)[1] in (b"400", b"404"), reply[:100]
    assert b"model one" not in reply


def test_a_symbolic_link_under_a_model_name_is_not_followed(served, tmp_path):
    directory, publisher = served
    _publish(directory, 1, b"model one")
    (directory.path / "model-0009.onnx").symlink_to(tmp_path / "run" / "config.toml")
    assert _get(publisher, "/model-0009.onnx")[0] == 404
    (directory.path / "model-0008.onnx").mkdir()
    assert _get(publisher, "/model-0008.onnx")[0] == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_writes_are_405(served, method):
    directory, publisher = served
    _publish(directory, 1, b"model one")
    status, headers, body = _get(publisher, "/manifest.json", method=method, body=b"{}")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert "read-only" in json.loads(body)["error"]
    assert _get(publisher, "/model-0001.onnx")[2] == b"model one"


def test_stop_releases_the_port(tmp_path):
    port = free_port()
    publisher = ModelPublisher(tmp_path, port=port).start()
    assert publisher.url == f"http://127.0.0.1:{port}"
    assert _get(publisher, "/manifest.json")[0] == 404
    publisher.stop()
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=5).connect()
    # And the port can be bound again.
    with ModelPublisher(tmp_path, port=port) as again:
        assert again.port == port


def test_bad_port_and_taken_port_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"models port: expected 0-65535"):
        ModelPublisher(tmp_path, port=70000)
    with ModelPublisher(tmp_path) as first:
        with pytest.raises(ConfigError, match=rf"listen on 127.0.0.1:{first.port}"):
            ModelPublisher(tmp_path, port=first.port).start()


def test_the_publisher_needs_neither_torch_nor_onnxruntime_nor_flwr():
    code = (
        "import sys, fedscale.model_publisher as m; "
        "print(sorted(k for k in ('torch', 'flwr', 'onnxruntime', 'onnx') if k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
