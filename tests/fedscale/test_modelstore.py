import hashlib
import json
import threading

import pytest

from fedscale.exceptions import ModelStoreError
from fedscale.modelstore import Manifest, ModelDirectory, TensorSpec

INPUTS = (TensorSpec("input", "FP32", (-1, 1, 8, 8)),)
OUTPUTS = (TensorSpec("logits", "FP32", (-1, 10)),)


def _publish(directory: ModelDirectory, server_round: int, keep: int = 5) -> Manifest:
    return directory.publish(
        f"model bytes of round {server_round}".encode(),
        server_round=server_round,
        opset=17,
        inputs=INPUTS,
        outputs=OUTPUTS,
        metrics={"accuracy": 0.5 + server_round / 100},
        keep=keep,
    )


def test_publish_writes_model_then_manifest_that_names_it(tmp_path):
    directory = ModelDirectory(tmp_path / "models")
    written = _publish(directory, 3)
    manifest = directory.read_manifest()
    assert manifest == written
    assert manifest.file == "model-0003.onnx"
    data = directory.read_model(manifest)
    assert data == b"model bytes of round 3"
    assert manifest.sha256 == hashlib.sha256(data).hexdigest()
    on_disk = json.loads(directory.manifest_path.read_text())
    assert on_disk["format"] == "fedscale-model" and on_disk["version"] == 1
    assert on_disk["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert on_disk["metrics"] == {"accuracy": 0.53}
    assert not [p for p in directory.path.iterdir() if p.name.endswith(".tmp")]


def test_keeps_only_the_newest_k_models(tmp_path):
    directory = ModelDirectory(tmp_path)
    for r in range(7):
        _publish(directory, r, keep=3)
    assert [p.name for p in directory.model_files()] == [
        "model-0004.onnx",
        "model-0005.onnx",
        "model-0006.onnx",
    ]
    _publish(directory, 7, keep=1)
    assert [p.name for p in directory.model_files()] == ["model-0007.onnx"]
    assert directory.read_manifest().round == 7


def test_tampered_model_is_refused_with_both_hashes(tmp_path):
    directory = ModelDirectory(tmp_path)
    manifest = _publish(directory, 1)
    (tmp_path / manifest.file).write_bytes(b"model bytes of round X")
    with pytest.raises(ModelStoreError, match="expected sha256 .* got "):
        directory.read_model(manifest)
    (tmp_path / manifest.file).write_bytes(b"short")
    with pytest.raises(ModelStoreError, match="expected 22 bytes"):
        directory.read_model(manifest)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.update(format="other"), "expected format 'fedscale-model'"),
        (lambda m: m.pop("sha256"), r"expected fields \['sha256'\]"),
        (lambda m: m.update(sha256="abc"), "64 lowercase hex"),
        (lambda m: m.update(file="../../etc/passwd"), "model-0007.onnx"),
        (lambda m: m.update(round=-1), "round: expected a whole number"),
        (lambda m: m["inputs"][0].update(datatype="FLOAT"), "datatype: expected one of"),
        (lambda m: m["inputs"][0].update(shape=[-2, 3]), "shape: expected whole numbers"),
        (lambda m: m.update(inputs=[]), "at least one input"),
        (lambda m: m.update(name="a/b"), "manifest name"),
    ],
)
def test_bad_manifests_are_refused_naming_the_field(tmp_path, mutate, message):
    directory = ModelDirectory(tmp_path)
    _publish(directory, 1)
    body = json.loads(directory.manifest_path.read_text())
    mutate(body)
    directory.manifest_path.write_text(json.dumps(body))
    with pytest.raises(ModelStoreError, match=message):
        directory.read_manifest()


def test_missing_and_unreadable_manifest(tmp_path):
    directory = ModelDirectory(tmp_path)
    with pytest.raises(ModelStoreError, match="expected manifest.json, found none"):
        directory.read_manifest()
    directory.manifest_path.write_text("{not json")
    with pytest.raises(ModelStoreError, match="expected JSON"):
        directory.read_manifest()


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ModelStoreError, match="keep: expected at least 1"):
        _publish(ModelDirectory(tmp_path), 1, keep=0)
    assert not ModelDirectory(tmp_path).model_files()


def test_a_concurrent_reader_always_sees_a_complete_model(tmp_path):
    # The writer publishes rounds while a reader reads the manifest and its
    # model: every read must verify (model first, manifest last, by rename).
    directory = ModelDirectory(tmp_path)
    _publish(directory, 0, keep=2)
    done = threading.Event()
    failures: list[str] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not done.is_set() and reads < 100_000:
            try:
                manifest = directory.read_manifest()
                directory.read_model(manifest)
            except ModelStoreError as err:
                # The manifest's model may be pruned only after a newer manifest
                # replaced it, never before: a missing file here is a failure
                # unless the manifest has moved on meanwhile.
                if directory.read_manifest().file == manifest.file:
                    failures.append(str(err))
            reads += 1

    thread = threading.Thread(target=reader)
    thread.start()
    for r in range(1, 200):
        _publish(directory, r, keep=2)
    done.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert reads > 0
    assert failures == []


def test_published_files_are_readable_by_other_users(tmp_path):
    directory = ModelDirectory(tmp_path)
    manifest = _publish(directory, 1)
    for name in (manifest.file, "manifest.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
