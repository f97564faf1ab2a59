"""Hot reload on a running `fedscale serve`: under load, and with bad models.

A client thread sends requests back to back (tritonclient's HTTP client, keep-alive,
alternating JSON and binary tensors) while new rounds' models land in the model
directory. No request may fail, the served version may only move forward, and
every answer must be exactly what onnxruntime gives for the version the answer
names: a request never mixes two models.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fedscale.files import atomic_write
from fedscale.modelstore import ModelDirectory

from .helpers import (
    ServeProcess,
    lenet,
    lenet_input,
    ort_outputs,
    publish_export,
    small_mlp,
    wait_until,
)

pytest.importorskip("torch")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")

pytestmark = pytest.mark.integration

ROUNDS = range(1, 7)  # six models: round r is LeNet with seed r
MAX_REQUESTS = 200_000  # bounds the client loop whatever happens


def _served_version(client) -> str:
    return client.get_model_metadata("fedscale")["versions"][0]


def test_reload_under_load_fails_no_request_and_moves_forward(tmp_path):
    models = tmp_path / "models"
    x = lenet_input(42)
    expected = {
        str(r): ort_outputs(lenet(r)[0].model, {"input": x})[0] for r in ROUNDS
    }  # computed before the server starts: the references
    publish_export(models, lenet(ROUNDS[0])[0], ROUNDS[0], keep=3)
    with ServeProcess(models, tmp_path / "serve.log") as server:
        stop = threading.Event()
        answers: list[tuple[str, np.ndarray]] = []  # both clients, in arrival order
        streams: dict[str, list[int]] = {"http": [], "grpc": []}  # versions per client
        failures: list[BaseException] = []

        def load(protocol: str) -> None:
            if protocol == "http":
                client = httpclient.InferenceServerClient(server.http_url, network_timeout=30)
                module = httpclient
            else:
                client = grpcclient.InferenceServerClient(server.grpc_url)
                module = grpcclient
            try:
                for i in range(MAX_REQUESTS):
                    if stop.is_set():
                        break
                    given = module.InferInput("input", list(x.shape), "FP32")
                    if protocol == "http":
                        given.set_data_from_numpy(x, binary_data=bool(i % 2))
                    else:
                        given.set_data_from_numpy(x)
                    try:
                        result = client.infer("fedscale", [given])
                        response = result.get_response()
                        version = (
                            response["model_version"]
                            if protocol == "http"
                            else response.model_version
                        )
                        answers.append((version, result.as_numpy("logits")))
                        streams[protocol].append(int(version))
                    except Exception as err:  # every failure counts; the loop goes on
                        failures.append(err)
            finally:
                client.close()

        threads = [threading.Thread(target=load, args=(p,)) for p in ("http", "grpc")]
        for thread in threads:
            thread.start()
        probe = httpclient.InferenceServerClient(server.http_url)
        try:

            def each_client_answered(more: int = 10) -> None:
                base = {p: len(v) for p, v in streams.items()}
                wait_until(
                    lambda: all(len(v) >= base[p] + more for p, v in streams.items()),
                    60,
                    f"{more} more answers to each client",
                )

            for server_round in ROUNDS[1:]:
                each_client_answered()
                publish_export(models, lenet(server_round)[0], server_round, keep=3)
                wait_until(
                    lambda r=server_round: _served_version(probe) == str(r),
                    60,
                    f"version {server_round} to be served",
                )
            each_client_answered()
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            probe.close()

    assert failures == []
    for protocol, versions in streams.items():
        # Each client saw every model, in order: the version only moves forward.
        assert versions == sorted(versions), protocol
        assert set(versions) == set(ROUNDS) and versions[-1] == ROUNDS[-1], protocol
    for version, logits in answers:
        np.testing.assert_array_equal(logits, expected[version])
    log = server.log()
    for server_round in ROUNDS[1:]:
        assert f"version {server_round - 1} -> {server_round}" in log


def test_versions_seen_by_one_client_only_move_forward(tmp_path):
    models = tmp_path / "models"
    publish_export(models, lenet(1)[0], 1)
    x = lenet_input(1)
    with ServeProcess(models, tmp_path / "serve.log", grpc=False) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            seen: list[int] = []
            given = httpclient.InferInput("input", list(x.shape), "FP32")
            given.set_data_from_numpy(x)
            for server_round in (2, 3, 4):
                publish_export(models, lenet(server_round)[0], server_round)
                for _ in range(2000):  # bounded: until this round is served
                    version = int(client.infer("fedscale", [given]).get_response()["model_version"])
                    seen.append(version)
                    if version == server_round:
                        break
            assert seen == sorted(seen) and seen[-1] == 4
        finally:
            client.close()


def test_bad_models_are_refused_by_a_running_server(tmp_path):
    """Each bad model kind lands on a live server; it keeps answering with round 1."""
    models = tmp_path / "models"
    good = lenet(1)[0]
    publish_export(models, good, 1)
    x = lenet_input(5)
    reference = ort_outputs(good.model, {"input": x})[0]
    directory = ModelDirectory(models)

    def corrupt() -> str:
        directory.publish(
            b"\x08\x07garbage", server_round=2, opset=17, inputs=good.inputs, outputs=good.outputs
        )
        return "expected an ONNX model onnxruntime can load"

    def hash_mismatch() -> str:
        other = lenet(2)[0]
        manifest = directory.publish(
            other.model, server_round=3, opset=17, inputs=good.inputs, outputs=good.outputs
        )
        atomic_write(models / manifest.file, other.model[:-1] + b"\0")  # same size, other bytes
        # Rewrite the manifest (new inode) so the server looks again.
        atomic_write(directory.manifest_path, manifest.dumps())
        return f"expected sha256 {manifest.sha256}"

    def other_schema() -> str:
        publish_export(models, small_mlp()[0], 4)
        return "changes the model's inputs/outputs"

    def unreadable() -> str:
        atomic_write(directory.manifest_path, b"not json at all")
        return "expected JSON"

    with ServeProcess(models, tmp_path / "serve.log") as server:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            for make_bad in (corrupt, hash_mismatch, other_schema, unreadable):
                refusals = server.log().count("refused new model")
                reason = make_bad()
                wait_until(
                    lambda n=refusals: server.log().count("refused new model") > n,
                    30,
                    f"the server to refuse the {make_bad.__name__} model",
                )
                line = server.log().splitlines()[-1]
                assert " ERROR " in line and reason in line and "still serving version 1" in line
                assert client.is_server_ready() and client.is_model_ready("fedscale", "1")
                given = httpclient.InferInput("input", list(x.shape), "FP32")
                given.set_data_from_numpy(x)
                result = client.infer("fedscale", [given])
                assert result.get_response()["model_version"] == "1"
                np.testing.assert_array_equal(result.as_numpy("logits"), reference)
            # And a good model after all of them is served.
            publish_export(models, lenet(3)[0], 5)
            wait_until(lambda: client.is_model_ready("fedscale", "5"), 30, "round 5 served")
        finally:
            client.close()
