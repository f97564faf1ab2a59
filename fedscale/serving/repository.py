"""The model a server answers with, and its hot reload from a model directory.

A :class:`ModelRepository` watches one model directory (see
:mod:`fedscale.modelstore`). :meth:`ModelRepository.poll` is cheap when nothing
changed: one ``stat`` of ``manifest.json``. When the manifest changes it reads
it, reads the model it names and checks the model's size and sha256, builds a
new onnxruntime session, checks that the session's inputs and outputs are the
ones the manifest declares and that they equal those of the model being served,
and only then swaps :attr:`ModelRepository.current`. The swap is one attribute
assignment, so a request that took a reference to the old :class:`LoadedModel`
finishes on it, and every later request sees the new one.

A model that fails any check is refused, logged at ERROR once per manifest, and
the old model keeps serving. Only onnxruntime and numpy are imported here.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fedscale.exceptions import ConfigError, ModelStoreError
from fedscale.modelstore import DATATYPES, ORT_DATATYPES, Manifest, ModelDirectory, TensorSpec

from .metrics import ServingMetrics

__all__ = [
    "ONNX_PLATFORM",
    "LoadedModel",
    "ModelRepository",
    "SessionSettings",
]

log = logging.getLogger("fedscale.serving")

ONNX_PLATFORM = "onnxruntime_onnx"


@dataclass(frozen=True)
class SessionSettings:
    """onnxruntime threading, chosen for a small device by default.

    One intra-op thread runs each operator in the calling thread: no thread pool
    to wake, which is what a small model at batch 1 wants and what leaves the
    other cores to the HTTP and gRPC servers. ``inter_op_threads`` above 1 turns
    on onnxruntime's parallel executor (independent branches of the graph run at
    once); at 1 the graph runs sequentially.
    """

    intra_op_threads: int = 1
    inter_op_threads: int = 1

    def __post_init__(self) -> None:
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(
                    f"{name.replace('_', '-')}: expected a whole number >= 0 "
                    f"(0 lets onnxruntime choose), got {value!r}"
                )

    def session_options(self) -> ort.SessionOptions:
        """Return onnxruntime's options for these settings."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL
            if self.inter_op_threads > 1
            else ort.ExecutionMode.ORT_SEQUENTIAL
        )
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: no per-session info lines
        return options


class LoadedModel:
    """One model ready to run: its manifest, its onnxruntime session, its schema.

    Immutable once built; requests hold a reference for as long as they run.
    """

    __slots__ = (
        "manifest",
        "name",
        "version",
        "inputs",
        "outputs",
        "input_specs",
        "output_specs",
        "input_dtypes",
        "output_names",
        "batch_inputs",
        "cost_s",
        "_session",
    )

    def __init__(self, manifest: Manifest, session: ort.InferenceSession):
        self.manifest = manifest
        self.name = manifest.name
        self.version = str(manifest.round)
        self.inputs: tuple[TensorSpec, ...] = manifest.inputs
        self.outputs: tuple[TensorSpec, ...] = manifest.outputs
        self.input_specs: dict[str, TensorSpec] = {t.name: t for t in manifest.inputs}
        self.output_specs: dict[str, TensorSpec] = {t.name: t for t in manifest.outputs}
        self.input_dtypes: dict[str, np.dtype[Any]] = {
            t.name: np.dtype(DATATYPES[t.datatype]).newbyteorder("<") for t in manifest.inputs
        }
        self.output_names: list[str] = [t.name for t in manifest.outputs]
        # Inputs whose first axis is dynamic: that axis is the batch --max-batch limits.
        self.batch_inputs = frozenset(t.name for t in manifest.inputs if t.shape[:1] == (-1,))
        # Seconds a run takes, a moving average; the REST server runs a model this cheap
        # inline in its event loop. Unknown (inf) until the first run is timed.
        self.cost_s = float("inf")
        self._session = session

    @classmethod
    def build(cls, manifest: Manifest, model: bytes, settings: SessionSettings) -> LoadedModel:
        """Build a session from ``model``'s bytes and check it against ``manifest``."""
        try:
            session = ort.InferenceSession(
                model, settings.session_options(), providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own (untyped) exception classes
            raise ModelStoreError(
                f"model {manifest.file}: expected an ONNX model onnxruntime can load, "
                f"got an error: {_one_line(err)}"
            ) from err
        _check_against_manifest(session, manifest)
        return cls(manifest, session)

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        run_options: ort.RunOptions | None = None,
    ) -> list[np.ndarray]:
        """Run the model on validated ``feeds`` and return the ``outputs`` asked for.

        ``run_options`` lets a watchdog stop the run (its ``terminate`` flag).
        """
        result: list[np.ndarray] = self._session.run(list(outputs), dict(feeds), run_options)
        return result

    def metadata(self) -> dict[str, Any]:
        """Return the model's Open Inference Protocol metadata object."""
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": ONNX_PLATFORM,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:500] or type(err).__name__


def _session_specs(
    args: Sequence[Any], where: str
) -> dict[str, tuple[str, tuple[int, ...] | None]]:
    specs: dict[str, tuple[str, tuple[int, ...] | None]] = {}
    for arg in args:
        datatype = ORT_DATATYPES.get(arg.type)
        if datatype is None:
            raise ModelStoreError(
                f"{where} {arg.name!r}: expected a tensor of one of {sorted(ORT_DATATYPES)}, "
                f"got {arg.type}"
            )
        shape = arg.shape
        dims = (
            None
            if shape is None
            else tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)
        )
        specs[arg.name] = (datatype, dims)
    return specs


def _check_against_manifest(session: ort.InferenceSession, manifest: Manifest) -> None:
    """Refuse a model whose real inputs and outputs differ from what its manifest says.

    The manifest is what requests are validated against; a dimension the
    manifest leaves dynamic (-1) must be dynamic in the model too, or a request
    that passes validation could still fail inside onnxruntime.
    """
    for where, declared, actual in (
        ("input", manifest.inputs, _session_specs(session.get_inputs(), "input")),
        ("output", manifest.outputs, _session_specs(session.get_outputs(), "output")),
    ):
        names = [t.name for t in declared]
        if sorted(names) != sorted(actual):
            raise ModelStoreError(
                f"model {manifest.file}: manifest declares {where}s {names}, "
                f"the model has {sorted(actual)}"
            )
        for spec in declared:
            datatype, dims = actual[spec.name]
            if datatype != spec.datatype:
                raise ModelStoreError(
                    f"model {manifest.file} {where} {spec.name!r}: manifest declares "
                    f"{spec.datatype}, the model has {datatype}"
                )
            if dims is None:
                continue
            fits = len(dims) == len(spec.shape) and all(
                d == -1 or d == m for d, m in zip(dims, spec.shape, strict=True)
            )
            if not fits:
                raise ModelStoreError(
                    f"model {manifest.file} {where} {spec.name!r}: manifest declares shape "
                    f"{list(spec.shape)}, the model has {list(dims)} (-1 is dynamic)"
                )


class ModelRepository:
    """The model being served from one model directory, reloaded when it changes.

    :attr:`current` is ``None`` until a first model loads. :meth:`poll` is
    called by one watcher thread; requests only read :attr:`current`.
    """

    def __init__(
        self,
        directory: str | Path,
        settings: SessionSettings | None = None,
        metrics: ServingMetrics | None = None,
    ):
        self.directory = ModelDirectory(directory)
        self.settings = settings or SessionSettings()
        self.metrics = metrics
        self.current: LoadedModel | None = None
        self.last_error: str | None = None
        self._seen: tuple[int, int, int] | None = None  # stat of the manifest last handled
        self._lock = threading.Lock()  # one poll at a time

    @property
    def ready(self) -> bool:
        """Whether a model is loaded."""
        return self.current is not None

    def poll(self) -> bool:
        """Load the manifest's model if the manifest changed; return whether it swapped.

        Never raises for a bad model: it is logged, remembered as
        :attr:`last_error`, and not retried until the manifest changes again.
        """
        with self._lock:
            try:
                stat = os.stat(self.directory.manifest_path)
            except FileNotFoundError:
                return False
            except OSError as err:
                self._refuse(f"cannot stat the manifest: {err}")
                return False
            key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if key == self._seen:
                return False
            self._seen = key
            try:
                loaded = self._load()
            except (ModelStoreError, OSError) as err:
                if self.metrics is not None:
                    self.metrics.refused()
                self._refuse(str(err))
                return False
            if loaded is None:
                return False
            previous, self.current = self.current, loaded
            if self.metrics is not None:
                self.metrics.loaded(loaded.name, loaded.version)
            self.last_error = None
            if previous is None:
                log.info(
                    "serving model %r version %s (%s)", loaded.name, loaded.version, self._where
                )
            else:
                log.info(
                    "reloaded model %r: version %s -> %s",
                    loaded.name,
                    previous.version,
                    loaded.version,
                )
            return True

    @property
    def _where(self) -> str:
        return str(self.directory.path)

    def _load(self) -> LoadedModel | None:
        manifest = self.directory.read_manifest()
        current = self.current
        if current is not None and (
            manifest.sha256 == current.manifest.sha256 and manifest.round == current.manifest.round
        ):
            return None  # rewritten, same model
        if current is not None:
            if manifest.name != current.name:
                raise ModelStoreError(
                    f"{self.directory.manifest_path}: expected model name {current.name!r} "
                    f"(the one being served), got {manifest.name!r}"
                )
            if manifest.signature != current.manifest.signature:
                raise ModelStoreError(
                    f"{self.directory.manifest_path}: round {manifest.round} changes the "
                    f"model's inputs/outputs from {_schema(current.manifest)} to "
                    f"{_schema(manifest)}; a running server keeps its schema"
                )
        model = self.directory.read_model(manifest)
        return LoadedModel.build(manifest, model, self.settings)

    def _refuse(self, reason: str) -> None:
        if reason == self.last_error:
            return  # logged already
        self.last_error = reason
        serving = self.current
        keep = f"; still serving version {serving.version}" if serving else "; no model loaded yet"
        log.error("refused new model in %s: %s%s", self._where, reason, keep)


def _schema(manifest: Manifest) -> str:
    def side(specs: tuple[TensorSpec, ...]) -> str:
        return ", ".join(f"{t.name}:{t.datatype}{list(t.shape)}" for t in specs)

    return f"({side(manifest.inputs)} -> {side(manifest.outputs)})"
