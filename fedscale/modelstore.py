"""Model directories: where every global model lands as ONNX, and how readers find it.

The server, each training edge client and each serve-only device keep one::

    models/
      model-0007.onnx     the ONNX model of round 7
      model-0008.onnx
      manifest.json       names the current model: round, file, sha256, schema

Writers publish a model file first and the manifest last, each by an atomic
rename, so a reader that reads ``manifest.json`` always finds a complete model
whose bytes hash to the manifest's ``sha256``. Only the newest ``keep`` models
stay; the manifest's model is never removed.

``manifest.json`` (``format`` "fedscale-model", ``version`` 1)::

    {"format": "fedscale-model", "version": 1, "name": "fedscale",
     "round": 8, "file": "model-0008.onnx", "sha256": "<hex>", "size": 53412,
     "opset": 17,
     "inputs":  [{"name": "input",  "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
     "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
     "metrics": {"accuracy": 0.93, "loss": 0.21}, "created": "2026-11-26T15:00:00.000+00:00"}

Datatypes are the Open Inference Protocol's names (FP32, INT64, ...); -1 marks
a dynamic axis (the batch). This module needs only the standard library, so a
serve-only device imports it without torch, onnx or flwr.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .exceptions import ModelStoreError
from .files import atomic_write

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "ORT_DATATYPES",
    "DATATYPES",
    "Manifest",
    "ModelDirectory",
    "TensorSpec",
    "model_file_name",
    "sha256_hex",
    "verify_model_bytes",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "fedscale-model"
MANIFEST_VERSION = 1
DEFAULT_MODEL_NAME = "fedscale"

# Open Inference Protocol datatypes and the numpy dtype names they stand for.
DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}

# onnxruntime's element types, as its sessions report them, as Open Inference
# Protocol datatypes (what an exporter writes and a server checks).
ORT_DATATYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}

_MODEL_FILE = re.compile(r"^model-(\d{4,})\.onnx$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def model_file_name(server_round: int) -> str:
    """Return the file name of round ``server_round``'s model: ``model-0007.onnx``."""
    return f"model-{server_round:04d}.onnx"


def sha256_hex(data: bytes) -> str:
    """Return the SHA-256 of ``data`` as lowercase hex."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, Open Inference Protocol datatype, shape."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ModelStoreError(f"tensor name: expected a non-empty string, got {self.name!r}")
        if self.datatype not in DATATYPES:
            raise ModelStoreError(
                f"tensor {self.name!r} datatype: expected one of {sorted(DATATYPES)}, "
                f"got {self.datatype!r}"
            )
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in self.shape):
            raise ModelStoreError(
                f"tensor {self.name!r} shape: expected whole numbers >= -1 (-1 is dynamic), "
                f"got {list(self.shape)!r}"
            )

    @classmethod
    def from_json(cls, value: object, where: str) -> TensorSpec:
        """Parse one ``{"name", "datatype", "shape"}`` object."""
        if not isinstance(value, Mapping) or set(value) != {"name", "datatype", "shape"}:
            raise ModelStoreError(
                f"{where}: expected an object with name, datatype and shape, got {value!r}"
            )
        shape = value["shape"]
        if not isinstance(shape, list):
            raise ModelStoreError(f"{where} shape: expected a list, got {shape!r}")
        return cls(name=value["name"], datatype=value["datatype"], shape=tuple(shape))

    def to_json(self) -> dict[str, Any]:
        """Return the manifest's JSON object for this tensor."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` says about the current model."""

    round: int
    file: str
    sha256: str
    size: int
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    name: str = DEFAULT_MODEL_NAME
    metrics: Mapping[str, float] = field(default_factory=dict)
    created: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.round, int) or isinstance(self.round, bool) or self.round < 0:
            raise ModelStoreError(
                f"manifest round: expected a whole number >= 0, got {self.round!r}"
            )
        if not isinstance(self.file, str) or not _MODEL_FILE.match(self.file):
            raise ModelStoreError(
                f"manifest file: expected a name like model-0007.onnx, got {self.file!r}"
            )
        if not isinstance(self.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ModelStoreError(
                f"manifest sha256: expected 64 lowercase hex digits, got {self.sha256!r}"
            )
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ModelStoreError(
                f"manifest name: expected 1-64 letters, digits, '_', '.' or '-', got {self.name!r}"
            )
        if not self.inputs or not self.outputs:
            raise ModelStoreError("manifest: expected at least one input and one output")

    @property
    def signature(self) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """Inputs and outputs: what a reloading server requires to stay the same."""
        return self.inputs, self.outputs

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object written as ``manifest.json``."""
        body = asdict(self)
        body["inputs"] = [t.to_json() for t in self.inputs]
        body["outputs"] = [t.to_json() for t in self.outputs]
        body["metrics"] = dict(self.metrics)
        return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **body}

    def dumps(self) -> bytes:
        """Serialize to the bytes of ``manifest.json``."""
        return (json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n").encode()

    @classmethod
    def loads(cls, data: bytes | str, where: str = MANIFEST_NAME) -> Manifest:
        """Parse and check the bytes of a ``manifest.json``."""
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            raise ModelStoreError(f"{where}: expected JSON, got unreadable text ({err})") from err
        if not isinstance(value, dict):
            raise ModelStoreError(f"{where}: expected a JSON object, got {type(value).__name__}")
        if value.get("format") != MANIFEST_FORMAT or value.get("version") != MANIFEST_VERSION:
            raise ModelStoreError(
                f"{where}: expected format {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}, got "
                f"format {value.get('format')!r} version {value.get('version')!r}"
            )
        required = {"round", "file", "sha256", "size", "opset", "inputs", "outputs"}
        missing = sorted(required - set(value))
        if missing:
            raise ModelStoreError(f"{where}: expected fields {missing}, found none")
        for key in ("inputs", "outputs"):
            if not isinstance(value[key], list):
                raise ModelStoreError(f"{where} {key}: expected a list, got {value[key]!r}")
        metrics = value.get("metrics", {})
        if not isinstance(metrics, dict):
            raise ModelStoreError(f"{where} metrics: expected an object, got {metrics!r}")
        return cls(
            round=value["round"],
            file=value["file"],
            sha256=value["sha256"],
            size=value["size"],
            opset=value["opset"],
            inputs=tuple(
                TensorSpec.from_json(t, f"{where} inputs[{i}]")
                for i, t in enumerate(value["inputs"])
            ),
            outputs=tuple(
                TensorSpec.from_json(t, f"{where} outputs[{i}]")
                for i, t in enumerate(value["outputs"])
            ),
            name=value.get("name", DEFAULT_MODEL_NAME),
            metrics=metrics,
            created=str(value.get("created", "")),
        )


class ModelDirectory:
    """Publish models into, and read them from, one model directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()

    @property
    def manifest_path(self) -> Path:
        """``manifest.json``: names the current model."""
        return self.path / MANIFEST_NAME

    def publish(
        self,
        model: bytes,
        *,
        server_round: int,
        opset: int,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        metrics: Mapping[str, float] | None = None,
        name: str = DEFAULT_MODEL_NAME,
        keep: int = 5,
    ) -> Manifest:
        """Write ``model`` as round ``server_round``'s model and make it current.

        The model file is renamed into place first, the manifest last; then
        models beyond the newest ``keep`` are removed.
        """
        if keep < 1:
            raise ModelStoreError(f"keep: expected at least 1 model to keep, got {keep}")
        manifest = Manifest(
            round=server_round,
            file=model_file_name(server_round),
            sha256=sha256_hex(model),
            size=len(model),
            opset=opset,
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            name=name,
            metrics={k: float(v) for k, v in (metrics or {}).items()},
            created=datetime.now(UTC).isoformat(timespec="milliseconds"),
        )
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / manifest.file, model)
        atomic_write(self.manifest_path, manifest.dumps())
        self._prune(keep, current=manifest.file)
        return manifest

    def read_manifest(self) -> Manifest:
        """Read and check ``manifest.json``."""
        try:
            data = self.manifest_path.read_bytes()
        except FileNotFoundError:
            raise ModelStoreError(
                f"model directory {self.path}: expected {MANIFEST_NAME}, found none"
            ) from None
        return Manifest.loads(data, where=str(self.manifest_path))

    def read_model(self, manifest: Manifest) -> bytes:
        """Return the bytes of ``manifest``'s model, after checking size and sha256."""
        path = self.path / manifest.file
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ModelStoreError(
                f"model file {path}: named by the manifest, but not there"
            ) from None
        verify_model_bytes(data, manifest, where=str(path))
        return data

    def model_files(self) -> list[Path]:
        """Return the model files present, oldest round first."""
        if not self.path.is_dir():
            return []
        found = [
            (int(m.group(1)), p) for p in self.path.iterdir() if (m := _MODEL_FILE.match(p.name))
        ]
        return [p for _, p in sorted(found)]

    def _prune(self, keep: int, current: str) -> None:
        others = [p for p in self.model_files() if p.name != current]
        for path in others[: max(0, len(others) - (keep - 1))]:
            path.unlink(missing_ok=True)


def verify_model_bytes(data: bytes, manifest: Manifest, where: str) -> None:
    """Raise unless ``data`` has the manifest's size and sha256."""
    if len(data) != manifest.size:
        raise ModelStoreError(
            f"{where}: expected {manifest.size} bytes (manifest), got {len(data)}"
        )
    digest = sha256_hex(data)
    if digest != manifest.sha256:
        raise ModelStoreError(f"{where}: expected sha256 {manifest.sha256}, got {digest}")
