"""The ClientApp keeps the device's model directory: the received global model, as ONNX."""

import logging
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fedscale.edge_client.app import MODEL_DIR_KEY, app
from fedscale.export import OnnxExporter
from fedscale.models import build_model
from fedscale.modelstore import ModelDirectory
from fedscale.records import arrays_to_state_dict, state_dict_to_arrays
from fedscale.settings import RunSettings

from .messages import incoming_message

SHAPE = (1, 8, 8)


def _context(node_config, settings) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config=node_config,
        state=RecordDict(),
        run_config=settings.to_run_config(),
    )


def _content(model: torch.nn.Module, server_round: int | None) -> RecordDict:
    values = {"lr": 0.1, "local-epochs": 1, "batch-size": 16, "num-classes": 10}
    if server_round is not None:
        values["server-round"] = server_round
    return RecordDict(
        {"arrays": state_dict_to_arrays(model.state_dict()), "config": ConfigRecord(values)}
    )


@pytest.mark.parametrize("spec", ["mlp", "cnn"])
def test_train_publishes_the_received_model_before_training(tmp_path, spec):
    settings = RunSettings(local_epochs=1, model=spec)
    received = build_model(spec, SHAPE, 10, seed=5).eval()
    node = {"partition-id": 1, "num-partitions": 4, MODEL_DIR_KEY: str(tmp_path / "models")}
    reply = app(incoming_message(_content(received, server_round=4)), _context(node, settings))

    # The reply is the trained model, as without a model directory.
    assert not reply.has_error() and reply.content["metrics"]["num-examples"] > 0
    trained = arrays_to_state_dict(reply.content["arrays"])
    first = next(iter(trained))
    assert not torch.equal(trained[first], received.state_dict()[first])

    # The directory holds the received model: round 4's message carries round 3's model.
    directory = ModelDirectory(tmp_path / "models")
    manifest = directory.read_manifest()
    assert manifest.round == 3 and manifest.file == "model-0003.onnx" and manifest.opset == 17
    assert manifest.metrics == {}
    data = directory.read_model(manifest)
    x = np.random.default_rng(0).standard_normal((50, *SHAPE), dtype=np.float32)
    with torch.no_grad():
        want = received(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Byte for byte what the server publishes for the same weights.
    assert data == OnnxExporter(SHAPE).export(received).model


def test_rounds_accumulate_and_keep_models_applies(tmp_path):
    settings = RunSettings(local_epochs=1, keep_models=2)
    node = {"partition-id": 0, "num-partitions": 4, MODEL_DIR_KEY: str(tmp_path / "m")}
    for server_round in range(1, 5):
        model = build_model("mlp", SHAPE, 10, seed=server_round)
        app(incoming_message(_content(model, server_round)), _context(node, settings))
    directory = ModelDirectory(tmp_path / "m")
    assert [p.name for p in directory.model_files()] == ["model-0002.onnx", "model-0003.onnx"]
    assert directory.read_manifest().round == 3


def test_without_a_model_dir_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reply = app(
        incoming_message(_content(build_model("mlp", SHAPE, 10, seed=0), 1)),
        _context({"partition-id": 0, "num-partitions": 4}, RunSettings(local_epochs=1)),
    )
    assert not reply.has_error()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("make_dir", "server_round", "message"),
    [
        # A file where the folder should be: publishing fails on the file system.
        (lambda p: (p / "taken").write_text("x") and str(p / "taken"), 2, r"File exists|Not a dir"),
        (lambda p: "", 2, r"model-dir': expected a folder path, got ''"),
        (lambda p: str(p / "models"), None, r"'server-round': expected the round number"),
    ],
)
def test_a_failed_publish_is_logged_and_the_training_reply_survives(
    tmp_path, caplog, make_dir, server_round, message
):
    caplog.set_level(logging.ERROR, logger="fedscale.edge_client.app")
    node = {"partition-id": 0, "num-partitions": 4, MODEL_DIR_KEY: make_dir(tmp_path)}
    reply = app(
        incoming_message(_content(build_model("mlp", SHAPE, 10, seed=0), server_round)),
        _context(node, RunSettings(local_epochs=1)),
    )
    assert not reply.has_error() and reply.content["metrics"]["num-examples"] > 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("model directory not updated")
    assert re.search(message, errors[0]), errors[0]
    assert not (tmp_path / "models").exists()


def test_evaluate_messages_do_not_publish(tmp_path):
    node = {"partition-id": 0, "num-partitions": 4, MODEL_DIR_KEY: str(tmp_path / "models")}
    app(
        incoming_message(_content(build_model("mlp", SHAPE, 10, seed=0), 1), "evaluate"),
        _context(node, RunSettings(local_epochs=1)),
    )
    assert not (tmp_path / "models").exists()
