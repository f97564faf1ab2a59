"""ModelRepository: first load, hot reload, and every kind of bad new model refused."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnxruntime as ort
import pytest

from fedscale.exceptions import ConfigError, ModelStoreError
from fedscale.files import atomic_write
from fedscale.modelstore import Manifest, ModelDirectory, TensorSpec, sha256_hex
from fedscale.serving import LoadedModel, ModelRepository, SessionSettings

from .helpers import lenet, lenet_input, ort_outputs, publish_export, small_mlp

pytest.importorskip("torch")


def _run(repository: ModelRepository, x: np.ndarray) -> np.ndarray:
    model = repository.current
    assert model is not None
    return model.run({"input": x}, ["logits"])[0]


@pytest.fixture
def served(tmp_path):
    """A repository serving LeNet (seed 0) as round 1."""
    publish_export(tmp_path, lenet(0)[0], 1)
    repository = ModelRepository(tmp_path)
    assert repository.poll() is True
    return repository


def test_empty_directory_is_not_ready_and_polls_cheaply(tmp_path):
    repository = ModelRepository(tmp_path / "not-yet")
    assert repository.poll() is False and not repository.ready and repository.current is None
    publish_export(tmp_path / "not-yet", lenet(0)[0], 1)
    assert repository.poll() is True and repository.ready
    assert repository.current is not None and repository.current.version == "1"
    assert repository.poll() is False  # unchanged manifest: nothing to do


def test_reload_swaps_to_the_new_model_and_old_references_keep_working(served, tmp_path):
    x = lenet_input(3)
    old = served.current
    publish_export(tmp_path, lenet(1)[0], 2)
    assert served.poll() is True
    assert served.current is not old and served.current.version == "2"
    np.testing.assert_array_equal(_run(served, x), ort_outputs(lenet(1)[0].model, {"input": x})[0])
    # A request that took the old model before the swap finishes on it.
    np.testing.assert_array_equal(
        old.run({"input": x}, ["logits"])[0], ort_outputs(lenet(0)[0].model, {"input": x})[0]
    )


def test_same_model_rewritten_is_not_reloaded(served, tmp_path):
    current = served.current
    manifest = ModelDirectory(tmp_path).read_manifest()
    atomic_write(ModelDirectory(tmp_path).manifest_path, manifest.dumps())  # new inode
    assert served.poll() is False and served.current is current


def _write_manifest(directory, manifest: Manifest) -> None:
    atomic_write(ModelDirectory(directory).manifest_path, manifest.dumps())


def _corrupt_file(directory):
    ModelDirectory(directory).publish(
        b"this is not an ONNX model",
        server_round=2,
        opset=17,
        inputs=lenet(0)[0].inputs,
        outputs=lenet(0)[0].outputs,
    )
    return "expected an ONNX model onnxruntime can load"


def _hash_mismatch(directory):
    good = lenet(1)[0].model
    atomic_write(directory / "model-0002.onnx", good)
    manifest = dataclasses.replace(
        ModelDirectory(directory).read_manifest(),
        round=2,
        file="model-0002.onnx",
        sha256=sha256_hex(b"other bytes"),
        size=len(good),
    )
    _write_manifest(directory, manifest)
    return f"expected sha256 {sha256_hex(b'other bytes')}"


def _size_mismatch(directory):
    good = lenet(1)[0].model
    atomic_write(directory / "model-0002.onnx", good[:-100])  # a truncated copy
    manifest = dataclasses.replace(
        ModelDirectory(directory).read_manifest(),
        round=2,
        file="model-0002.onnx",
        sha256=sha256_hex(good),
        size=len(good),
    )
    _write_manifest(directory, manifest)
    return f"expected {len(good)} bytes (manifest), got {len(good) - 100}"


def _other_schema(directory):
    publish_export(directory, small_mlp()[0], 2)
    return "changes the model's inputs/outputs"


def _manifest_lies(directory):
    # The manifest declares LeNet's schema, the file is the 8x8 MLP.
    mlp = small_mlp()[0]
    ModelDirectory(directory).publish(
        mlp.model,
        server_round=2,
        opset=17,
        inputs=lenet(0)[0].inputs,
        outputs=lenet(0)[0].outputs,
    )
    return "manifest declares shape [-1, 1, 28, 28], the model has [-1, 1, 8, 8]"


def _unreadable_manifest(directory):
    atomic_write(ModelDirectory(directory).manifest_path, b"{this is not json")
    return "expected JSON"


def _missing_file(directory):
    manifest = dataclasses.replace(
        ModelDirectory(directory).read_manifest(), round=2, file="model-0002.onnx"
    )
    _write_manifest(directory, manifest)
    return "named by the manifest, but not there"


def _other_name(directory):
    exported = lenet(1)[0]
    ModelDirectory(directory).publish(
        exported.model,
        server_round=2,
        opset=17,
        inputs=exported.inputs,
        outputs=exported.outputs,
        name="renamed",
    )
    return "expected model name 'fedscale' (the one being served), got 'renamed'"


BAD_MODELS = {
    "corrupt-file": _corrupt_file,
    "hash-mismatch": _hash_mismatch,
    "truncated-file": _size_mismatch,
    "different-input-schema": _other_schema,
    "manifest-lies-about-schema": _manifest_lies,
    "unreadable-manifest": _unreadable_manifest,
    "missing-file": _missing_file,
    "different-name": _other_name,
}


@pytest.mark.parametrize("make_bad", BAD_MODELS.values(), ids=BAD_MODELS.keys())
def test_bad_new_model_is_refused_and_logged_and_old_keeps_serving(
    served, tmp_path, caplog, make_bad
):
    x = lenet_input(4)
    before = _run(served, x)
    with caplog.at_level(logging.INFO, logger="fedscale.serving"):
        reason = make_bad(tmp_path)
        assert served.poll() is False
    assert served.current is not None and served.current.version == "1"
    np.testing.assert_array_equal(_run(served, x), before)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "refused new model" in errors[0].getMessage()
    assert reason in errors[0].getMessage() and "still serving version 1" in errors[0].getMessage()
    assert reason in (served.last_error or "")
    # Polling the same bad manifest again neither reloads nor logs again.
    caplog.clear()
    assert served.poll() is False and not caplog.records
    # A good model after the bad one is taken.
    publish_export(tmp_path, lenet(2)[0], 3)
    assert served.poll() is True and served.current.version == "3"
    assert served.last_error is None


def test_a_bad_first_model_leaves_the_server_not_ready_until_a_good_one(tmp_path, caplog):
    repository = ModelRepository(tmp_path)
    with caplog.at_level(logging.ERROR, logger="fedscale.serving"):
        _corrupt_file(tmp_path)
        assert repository.poll() is False
    assert not repository.ready and "no model loaded yet" in caplog.text
    publish_export(tmp_path, lenet(0)[0], 3)
    assert repository.poll() is True and repository.ready


def test_loaded_model_build_checks_the_session_against_its_manifest():
    exported = lenet(0)[0]
    manifest = Manifest(
        round=1,
        file="model-0001.onnx",
        sha256=exported.sha256,
        size=len(exported.model),
        opset=17,
        inputs=(TensorSpec("input", "INT64", (-1, 1, 28, 28)),),
        outputs=exported.outputs,
    )
    with pytest.raises(ModelStoreError, match="manifest declares INT64, the model has FP32"):
        LoadedModel.build(manifest, exported.model, SessionSettings())
    renamed = dataclasses.replace(manifest, inputs=(TensorSpec("x", "FP32", (-1, 1, 28, 28)),))
    with pytest.raises(ModelStoreError, match=r"manifest declares inputs \['x'\]"):
        LoadedModel.build(renamed, exported.model, SessionSettings())
    good = dataclasses.replace(manifest, inputs=exported.inputs)
    model = LoadedModel.build(good, exported.model, SessionSettings())
    assert model.metadata()["platform"] == "onnxruntime_onnx"
    assert model.batch_inputs == {"input"}


def test_session_settings():
    options = SessionSettings().session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    parallel = SessionSettings(intra_op_threads=2, inter_op_threads=3).session_options()
    assert parallel.intra_op_num_threads == 2 and parallel.inter_op_num_threads == 3
    assert parallel.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    with pytest.raises(ConfigError, match="intra-op-threads: expected a whole number >= 0"):
        SessionSettings(intra_op_threads=-1)
    # The threads a session really uses follow the settings: 3 intra-op threads
    # give the same answers as 1.
    exported = lenet(0)[0]
    x = lenet_input(8, 16)
    manifest = Manifest(
        round=1,
        file="model-0001.onnx",
        sha256=exported.sha256,
        size=len(exported.model),
        opset=17,
        inputs=exported.inputs,
        outputs=exported.outputs,
    )
    one = LoadedModel.build(manifest, exported.model, SessionSettings()).run(
        {"input": x}, ["logits"]
    )
    three = LoadedModel.build(
        manifest, exported.model, SessionSettings(intra_op_threads=3, inter_op_threads=2)
    ).run({"input": x}, ["logits"])
    np.testing.assert_allclose(one[0], three[0], rtol=1e-5, atol=1e-6)
