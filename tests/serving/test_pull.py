"""`--model-url`: pull models from a real HTTP server into a local model directory.

The remote is the standard library's ThreadingHTTPServer serving a directory
(SimpleHTTPRequestHandler) and fedscale's own ModelPublisher, on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from fedscale.exceptions import ConfigError
from fedscale.files import atomic_write
from fedscale.model_publisher import ModelPublisher
from fedscale.modelstore import ModelDirectory, sha256_hex
from fedscale.processes import free_port
from fedscale.serving import ModelPuller
from fedscale.serving.pull import normalize_url

from .helpers import ServeProcess, lenet, lenet_input, ort_outputs, publish_export, wait_until

pytest.importorskip("torch")


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class FileServer:
    """ThreadingHTTPServer + SimpleHTTPRequestHandler on a directory, 127.0.0.1."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        handler = functools.partial(_Quiet, directory=str(directory))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/models/"

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def remote(tmp_path):
    """A real HTTP server whose /models/ is a model directory."""
    with FileServer(tmp_path / "remote") as server:
        yield tmp_path / "remote" / "models", server.url


def _puller(url: str, local: Path) -> ModelPuller:
    return ModelPuller(url, local, timeout=10, base_delay=0.001)


def test_pull_publishes_the_remote_model_locally_once(remote, tmp_path):
    remote_dir, url = remote
    published = publish_export(remote_dir, lenet(0)[0], 7)
    puller = _puller(url, tmp_path / "local")
    assert puller.poll() is True
    local = ModelDirectory(tmp_path / "local").read_manifest()
    assert (local.round, local.sha256, local.inputs) == (7, published.sha256, published.inputs)
    assert puller.poll() is False  # nothing new
    publish_export(remote_dir, lenet(1)[0], 8)
    assert puller.poll() is True
    assert ModelDirectory(tmp_path / "local").read_manifest().round == 8


def _break_hash(remote_dir: Path) -> str:
    directory = ModelDirectory(remote_dir)
    manifest = dataclasses.replace(directory.read_manifest(), sha256=sha256_hex(b"x"))
    atomic_write(directory.manifest_path, manifest.dumps())
    return "expected sha256"


def _truncate(remote_dir: Path) -> str:
    directory = ModelDirectory(remote_dir)
    manifest = directory.read_manifest()
    data = (remote_dir / manifest.file).read_bytes()
    atomic_write(remote_dir / manifest.file, data[: len(data) // 2])
    return f"expected {len(data)} bytes (manifest), got {len(data) // 2}"


def _unreadable_manifest(remote_dir: Path) -> str:
    atomic_write(ModelDirectory(remote_dir).manifest_path, b"<html>not a manifest</html>")
    return "expected JSON"


def _missing_file(remote_dir: Path) -> str:
    manifest = ModelDirectory(remote_dir).read_manifest()
    (remote_dir / manifest.file).unlink()
    return "expected 200 OK, got HTTP 404"


BAD_DOWNLOADS = {
    "hash-mismatch": _break_hash,
    "truncated": _truncate,
    "unreadable-manifest": _unreadable_manifest,
    "missing-model-file": _missing_file,
}


@pytest.mark.parametrize("make_bad", BAD_DOWNLOADS.values(), ids=BAD_DOWNLOADS.keys())
def test_bad_download_is_logged_retried_and_leaves_the_local_model(
    remote, tmp_path, caplog, make_bad
):
    remote_dir, url = remote
    publish_export(remote_dir, lenet(0)[0], 1)
    puller = _puller(url, tmp_path / "local")
    assert puller.poll() is True
    publish_export(remote_dir, lenet(1)[0], 2)
    with caplog.at_level(logging.WARNING, logger="fedscale.serving"):
        reason = make_bad(remote_dir)
        assert puller.poll() is False
    assert reason in caplog.text and "retrying" in caplog.text
    assert puller.failures == 1 and reason in (puller.last_error or "")
    assert ModelDirectory(tmp_path / "local").read_manifest().round == 1  # untouched
    # Fixed on the remote: the next poll (after a short backoff) publishes it.
    good = publish_export(remote_dir, lenet(2)[0], 3)
    wait_until(puller.poll, 10, "the puller to retry and publish round 3")
    assert ModelDirectory(tmp_path / "local").read_manifest().sha256 == good.sha256
    assert puller.failures == 0 and puller.last_error is None


def test_server_down_is_a_logged_failure(tmp_path, caplog):
    puller = _puller(f"http://127.0.0.1:{free_port()}/", tmp_path / "local")
    with caplog.at_level(logging.WARNING, logger="fedscale.serving"):
        assert puller.poll() is False
    assert "unreachable" in caplog.text
    assert not (tmp_path / "local").exists()


def test_etags_of_the_fedscale_publisher_make_unchanged_polls_cheap(tmp_path):
    publish_export(tmp_path / "remote", lenet(0)[0], 1)
    with ModelPublisher(tmp_path / "remote") as publisher:
        puller = _puller(publisher.url, tmp_path / "local")
        assert puller.poll() is True
        etag = puller._etag
        assert etag is not None  # the publisher sends one; it is sent back as If-None-Match
        assert puller.poll() is False and puller.last_error is None
        publish_export(tmp_path / "remote", lenet(1)[0], 2)
        assert puller.poll() is True and puller._etag != etag
        assert ModelDirectory(tmp_path / "local").read_manifest().round == 2


@pytest.mark.parametrize(
    ("url", "normalized"),
    [
        ("http://host:8000", "http://host:8000/"),
        ("http://host:8000/models", "http://host:8000/models/"),
        ("https://host/models/manifest.json", "https://host/models/"),
    ],
)
def test_urls_are_normalized(url, normalized):
    assert normalize_url(url) == normalized


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://host/models", "host:8000", ""])
def test_non_http_urls_are_refused(url):
    with pytest.raises(ConfigError, match="expected an http:// or https:// URL"):
        normalize_url(url)


@pytest.mark.integration
def test_fedscale_serve_with_model_url_follows_the_remote(remote, tmp_path):
    httpclient = pytest.importorskip("tritonclient.http")
    remote_dir, url = remote
    publish_export(remote_dir, lenet(0)[0], 1)
    x = lenet_input(3)
    with ServeProcess(
        tmp_path / "local", tmp_path / "serve.log", "--model-url", url, grpc=False
    ) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            wait_until(lambda: client.is_model_ready("fedscale", "1"), 30, "round 1 pulled")
            publish_export(remote_dir, lenet(1)[0], 2)
            wait_until(lambda: client.is_model_ready("fedscale", "2"), 30, "round 2 pulled")
            # A corrupt round 3 on the remote: refused, round 2 keeps serving.
            publish_export(remote_dir, lenet(2)[0], 3)
            _break_hash(remote_dir)
            wait_until(lambda: "expected sha256" in server.log(), 30, "the bad pull to be logged")
            given = httpclient.InferInput("input", list(x.shape), "FP32")
            given.set_data_from_numpy(x)
            result = client.infer("fedscale", [given])
            assert result.get_response()["model_version"] == "2"
            np.testing.assert_array_equal(
                result.as_numpy("logits"), ort_outputs(lenet(1)[0].model, {"input": x})[0]
            )
        finally:
            client.close()
    assert " WARNING " in server.log()


@pytest.mark.integration
def test_model_url_without_model_dir_uses_a_temporary_directory(remote, tmp_path):
    remote_dir, url = remote
    publish_export(remote_dir, lenet(0)[0], 4)
    server = ServeProcess(None, tmp_path / "serve.log", "--model-url", url, grpc=False)
    with server:
        from .helpers import request

        wait_until(
            lambda: (
                request(server.http_url, "GET", "/v2/models/fedscale/versions/4/ready")[0] == 200
            ),
            30,
            "round 4 pulled",
        )
        temporary = Path(server.stdout[0].split("model-dir=", 1)[1])
        assert temporary.name.startswith("fedscale-serve-") and temporary.is_dir()
    assert server.process.returncode == 0
    assert not temporary.exists()  # removed on exit
