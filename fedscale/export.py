"""Export a torch model to ONNX, and refuse any export that does not compute what torch does.

Every model fedscale writes into a model directory (:mod:`fedscale.modelstore`)
comes from here. An export is the model traced by torch's TorchScript-based
exporter at a pinned opset, with a dynamic batch axis, then checked: a real
onnxruntime session runs fresh random inputs at batch sizes 1, 32 and 1000 and
its outputs must match the torch model's (in eval mode, on a CPU copy) within
``abs 1e-5 + rel 1e-4`` elementwise. A model whose ONNX graph computes something
else (a forward that depends on a Python value or branch the tracer froze, such
as the batch size) is refused with :class:`~fedscale.exceptions.ExportError`.

Optionally the checked fp32 model is quantized to int8 with onnxruntime's
dynamic quantization, restricted to ``MatMul``/``Gemm``: quantized convolutions
run several times slower than fp32 ones on CPU (a LeNet measured 4x slower), so
they stay fp32. Quantization changes outputs on purpose, so instead of the fp32
tolerance an int8 export reports its accuracy drift on a labelled test split.

The model takes one batch of samples and returns one tensor (the class
logits). Samples are float32 by default (fedscale's image and tabular datasets);
a model over integer codes (characters, tokens) is exported for its data's
dtype, with parity inputs drawn from the range of codes its data holds
(:meth:`OnnxExporter.for_data`).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch
from torch import nn

from .exceptions import ExportError
from .modelstore import (
    DEFAULT_MODEL_NAME,
    ORT_DATATYPES,
    Manifest,
    ModelDirectory,
    TensorSpec,
    sha256_hex,
)

__all__ = [
    "INT8_OP_TYPES",
    "ONNX_OPSET",
    "PARITY_ATOL",
    "PARITY_BATCH_SIZES",
    "PARITY_RTOL",
    "QUANTIZATIONS",
    "OnnxExport",
    "OnnxExporter",
    "ParityCheck",
    "QuantizationDrift",
    "export_onnx",
]

log = logging.getLogger(__name__)

# Pinned so that a model exported today loads on every device that runs an
# onnxruntime from the last few years (opset 17: onnxruntime >= 1.13).
ONNX_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
PARITY_BATCH_SIZES = (1, 32, 1000)
PARITY_ATOL = 1e-5
PARITY_RTOL = 1e-4
# Where int8 dynamic quantization pays on CPU. Convolutions are left in fp32.
INT8_OP_TYPES = ("MatMul", "Gemm")
QUANTIZATIONS = ("int8",)

# torch.onnx.export traces through process-wide state (the exporter's globals,
# the warnings filters we set around it): one export at a time per process.
_EXPORT_LOCK = threading.Lock()


@dataclass(frozen=True)
class ParityCheck:
    """The largest elementwise difference between onnxruntime and torch at one batch size."""

    batch_size: int
    max_abs_error: float


@dataclass(frozen=True)
class QuantizationDrift:
    """How an int8 model's predictions compare with its fp32 model's on a test split."""

    num_examples: int
    fp32_accuracy: float
    int8_accuracy: float
    agreement: float
    """Share of test examples on which both models predict the same class."""

    @property
    def accuracy_change(self) -> float:
        """int8 accuracy minus fp32 accuracy (negative: int8 is worse)."""
        return self.int8_accuracy - self.fp32_accuracy


@dataclass(frozen=True)
class OnnxExport:
    """A checked ONNX model, ready to write or to publish into a model directory."""

    model: bytes
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parity: tuple[ParityCheck, ...]
    """fp32 parity with torch at each batch size (for int8: that of the fp32 source)."""
    quantization: str | None = None
    drift: QuantizationDrift | None = None

    @property
    def sha256(self) -> str:
        """SHA-256 of the model bytes, as in a manifest."""
        return sha256_hex(self.model)

    def publish(
        self,
        directory: ModelDirectory | str | Path,
        *,
        server_round: int,
        metrics: Mapping[str, float] | None = None,
        keep: int = 5,
        name: str = DEFAULT_MODEL_NAME,
    ) -> Manifest:
        """Publish this model as round ``server_round``'s model of ``directory``."""
        if not isinstance(directory, ModelDirectory):
            directory = ModelDirectory(directory)
        return directory.publish(
            self.model,
            server_round=server_round,
            opset=self.opset,
            inputs=self.inputs,
            outputs=self.outputs,
            metrics=metrics,
            name=name,
            keep=keep,
        )


class OnnxExporter:
    """Export models that take samples of one shape; reuse it for every round of a run.

    The random parity inputs and the onnxruntime session options are built once
    per exporter, so a server exporting every round pays only for the export
    and the parity runs themselves.
    """

    def __init__(
        self,
        sample_shape: Sequence[int],
        *,
        opset: int = ONNX_OPSET,
        batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
        atol: float = PARITY_ATOL,
        rtol: float = PARITY_RTOL,
        seed: int | None = None,
        input_dtype: npt.DTypeLike = np.float32,
        input_range: tuple[int, int] | None = None,
    ):
        shape = tuple(sample_shape)
        if not shape or not all(
            isinstance(d, int | np.integer) and not isinstance(d, bool) and d >= 1 for d in shape
        ):
            raise ExportError(
                f"sample shape: expected positive whole numbers such as (1, 8, 8), got {shape!r}"
            )
        if not batch_sizes or not all(int(b) >= 1 for b in batch_sizes):
            raise ExportError(
                f"parity batch sizes: expected whole numbers >= 1, got {list(batch_sizes)!r}"
            )
        self.sample_shape: tuple[int, ...] = tuple(int(d) for d in shape)
        self.input_dtype = np.dtype(input_dtype)
        self.opset = opset
        self.batch_sizes = tuple(int(b) for b in batch_sizes)
        self.atol = atol
        self.rtol = rtol
        # Inputs are drawn once per exporter (fresh for each run) and reused
        # every round.
        rng = np.random.default_rng(seed)
        self._inputs = {
            b: _random_inputs(rng, (b, *self.sample_shape), self.input_dtype, input_range)
            for b in self.batch_sizes
        }
        self._session_options = _session_options()

    @classmethod
    def for_data(cls, x: npt.NDArray[Any], **kwargs: Any) -> OnnxExporter:
        """Build an exporter for models fed samples like ``x`` (a batch): same shape, dtype.

        Integer samples are codes (characters, tokens, categories) that index
        tables: parity inputs are drawn from ``x.min()`` to ``x.max()``.
        """
        x = np.asarray(x)
        if x.ndim < 2 or len(x) == 0:
            raise ExportError(
                f"sample data: expected a non-empty batch of samples (N, ...), got shape {x.shape}"
            )
        if np.issubdtype(x.dtype, np.integer):
            kwargs.setdefault("input_range", (int(x.min()), int(x.max()) + 1))
        return cls(tuple(int(d) for d in x.shape[1:]), input_dtype=x.dtype, **kwargs)

    def export(self, model: nn.Module, *, what: str = "model") -> OnnxExport:
        """Export ``model`` to fp32 ONNX and check it against torch; raise if it differs.

        ``model`` itself is left as it was (device, train or eval mode,
        weights): the export traces an eval-mode CPU copy.
        """
        reference = _cpu_eval_copy(model, what)
        data, hints = self._trace(reference, what)
        session = self._session(data, what)
        inputs, outputs = _specs(session, what)
        checks = []
        for batch_size, x in self._inputs.items():
            with torch.inference_mode():
                expected = reference(torch.from_numpy(x)).numpy()
            got = self._run(session, x, batch_size, what, hints)
            checks.append(self._compare(got, expected, batch_size, what, hints))
        return OnnxExport(
            model=data, opset=self.opset, inputs=inputs, outputs=outputs, parity=tuple(checks)
        )

    def quantize(
        self,
        exported: OnnxExport,
        x_test: npt.NDArray[Any],
        y_test: npt.NDArray[np.integer[Any]],
        *,
        mode: str = "int8",
        what: str = "model",
    ) -> OnnxExport:
        """Quantize a checked fp32 export to int8 and measure its drift on ``(x_test, y_test)``.

        Only ``MatMul``/``Gemm`` weights are quantized (:data:`INT8_OP_TYPES`).
        The int8 model must still run at every parity batch size.
        """
        if mode not in QUANTIZATIONS:
            raise ExportError(f"quantize: expected one of {', '.join(QUANTIZATIONS)}, got {mode!r}")
        if exported.quantization is not None:
            raise ExportError(
                f"{what}: expected an fp32 export to quantize, got one already "
                f"quantized ({exported.quantization})"
            )
        x_test, y_test = _check_test_split(x_test, y_test, self.sample_shape, self.input_dtype)
        data = _quantize_int8(exported.model, what)
        session = self._session(data, what)
        inputs, outputs = _specs(session, what)
        if (inputs, outputs) != (exported.inputs, exported.outputs):
            raise ExportError(
                f"{what}: int8 quantization changed the model's signature from "
                f"{exported.inputs + exported.outputs} to {inputs + outputs}"
            )
        for batch_size, x in self._inputs.items():
            got = self._run(session, x, batch_size, what, ())
            if got.ndim != len(outputs[0].shape) or got.shape[0] != batch_size:
                raise ExportError(
                    f"{what} (int8): at batch size {batch_size} expected an output of shape "
                    f"{(batch_size, *outputs[0].shape[1:])}, got {got.shape}"
                )
        fp32 = self._session(exported.model, what)
        fp32_pred = _predict(fp32, x_test)
        int8_pred = _predict(session, x_test)
        drift = QuantizationDrift(
            num_examples=len(y_test),
            fp32_accuracy=float(np.mean(fp32_pred == y_test)),
            int8_accuracy=float(np.mean(int8_pred == y_test)),
            agreement=float(np.mean(fp32_pred == int8_pred)),
        )
        return OnnxExport(
            model=data,
            opset=exported.opset,
            inputs=inputs,
            outputs=outputs,
            parity=exported.parity,
            quantization=mode,
            drift=drift,
        )

    # ------------------------------------------------------------------ steps

    def _trace(self, reference: nn.Module, what: str) -> tuple[bytes, tuple[str, ...]]:
        example = torch.from_numpy(self._inputs[self.batch_sizes[0]][:1].copy())
        with (
            _EXPORT_LOCK,
            tempfile.TemporaryDirectory(prefix="fedscale-export-") as scratch,
            warnings.catch_warnings(record=True) as caught,
        ):
            path = Path(scratch) / "model.onnx"
            # Record, don't raise: the legacy exporter's own deprecation notice
            # is expected, and tracer warnings explain a parity failure later.
            warnings.simplefilter("always")
            try:
                torch.onnx.export(
                    reference,
                    (example,),
                    path,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    opset_version=self.opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
                data = path.read_bytes()
            except Exception as err:
                raise ExportError(
                    f"{what}: torch could not export it to ONNX (opset {self.opset}, input "
                    f"{self.input_dtype} {(-1, *self.sample_shape)}): {type(err).__name__}: {err}"
                ) from err
        hints = []
        for w in caught:
            if w.category.__name__ == "TracerWarning":
                hints.append(str(w.message).splitlines()[0])
            else:
                log.debug("torch.onnx.export: %s: %s", w.category.__name__, w.message)
        return data, tuple(dict.fromkeys(hints))

    def _session(self, data: bytes, what: str) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(
                data, sess_options=self._session_options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:
            raise ExportError(
                f"{what}: onnxruntime could not load the exported model: {err}"
            ) from err

    def _run(
        self,
        session: ort.InferenceSession,
        x: npt.NDArray[Any],
        batch_size: int,
        what: str,
        hints: tuple[str, ...],
    ) -> npt.NDArray[Any]:
        try:
            out: npt.NDArray[Any] = session.run(None, {INPUT_NAME: x})[0]
        except Exception as err:
            raise ExportError(
                f"{what}: the ONNX model fails at batch size {batch_size}: {err}"
                + _hint_text(hints)
            ) from err
        return out

    def _compare(
        self,
        got: npt.NDArray[Any],
        expected: npt.NDArray[Any],
        batch_size: int,
        what: str,
        hints: tuple[str, ...],
    ) -> ParityCheck:
        if got.shape != expected.shape:
            raise ExportError(
                f"{what}: at batch size {batch_size} the ONNX model returns shape "
                f"{got.shape}, torch returns {expected.shape}" + _hint_text(hints)
            )
        got64 = got.astype(np.float64)
        want64 = expected.astype(np.float64)
        # np.testing.assert_allclose's rule, NaN matching NaN; a NaN against a
        # number is an infinite error.
        both_nan = np.isnan(got64) & np.isnan(want64)
        error = np.nan_to_num(np.abs(got64 - want64), nan=np.inf)
        error[both_nan | (got64 == want64)] = 0.0  # equal infinities match too
        bad = error > self.atol + self.rtol * np.nan_to_num(np.abs(want64))
        max_error = float(error.max(initial=0.0))
        if bad.any():
            raise ExportError(
                f"{what}: the ONNX export differs from torch at batch size {batch_size}: "
                f"max abs error {max_error:.3g} on {int(bad.sum())} of {bad.size} outputs "
                f"(allowed: abs {self.atol:g} + rel {self.rtol:g}); refusing to write it"
                + _hint_text(hints)
            )
        return ParityCheck(batch_size=batch_size, max_abs_error=max_error)


def export_onnx(
    model: nn.Module,
    sample_shape: Sequence[int],
    *,
    quantize: str | None = None,
    test_data: tuple[npt.NDArray[Any], npt.NDArray[np.integer[Any]]] | None = None,
    opset: int = ONNX_OPSET,
    seed: int | None = None,
    what: str = "model",
) -> OnnxExport:
    """Export ``model`` for samples of ``sample_shape``, checked against torch.

    With ``quantize="int8"``, ``test_data`` (``x_test, y_test``) is required:
    the int8 model's accuracy drift is measured on it.
    """
    exporter = OnnxExporter(sample_shape, opset=opset, seed=seed)
    exported = exporter.export(model, what=what)
    if quantize is None:
        return exported
    if test_data is None:
        raise ExportError(
            f"quantize {quantize}: expected a test split (x_test, y_test) to measure "
            "accuracy drift on, got none"
        )
    return exporter.quantize(exported, *test_data, mode=quantize, what=what)


# ---------------------------------------------------------------------- helpers


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    # Parity runs share the machine with training: one thread, no spinning.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only; they also reach us as exceptions
    return options


def _cpu_eval_copy(model: nn.Module, what: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ExportError(f"{what}: expected a torch.nn.Module, got {type(model).__name__}")
    try:
        reference = copy.deepcopy(model)
    except Exception as err:
        raise ExportError(
            f"{what}: expected a model that can be copied for export, but copy.deepcopy "
            f"failed: {type(err).__name__}: {err}"
        ) from err
    reference = reference.to("cpu").eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    return reference


def _specs(
    session: ort.InferenceSession, what: str
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    if len(session.get_inputs()) != 1 or len(session.get_outputs()) != 1:
        raise ExportError(
            f"{what}: expected a model with one input and one output (the class "
            f"logits), got {len(session.get_inputs())} inputs and "
            f"{len(session.get_outputs())} outputs"
        )
    return (
        tuple(_spec(arg, what) for arg in session.get_inputs()),
        tuple(_spec(arg, what) for arg in session.get_outputs()),
    )


def _spec(arg: Any, what: str) -> TensorSpec:
    datatype = ORT_DATATYPES.get(arg.type)
    if datatype is None:
        raise ExportError(
            f"{what}: tensor {arg.name!r} has type {arg.type}, expected one of "
            f"{', '.join(sorted(ORT_DATATYPES))}"
        )
    # A named or unknown dimension is dynamic: only the batch axis is, here.
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(name=arg.name, datatype=datatype, shape=shape)


def _hint_text(hints: tuple[str, ...]) -> str:
    if not hints:
        return ""
    return "; the tracer warned: " + " | ".join(hints)


def _random_inputs(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    value_range: tuple[int, int] | None,
) -> npt.NDArray[Any]:
    if np.issubdtype(dtype, np.floating):
        # Standard normal samples reach both sides of every ReLU.
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        if value_range is None or value_range[0] >= value_range[1]:
            raise ExportError(
                f"parity inputs: expected a range (low, high) of valid {dtype} codes, "
                f"got {value_range!r}"
            )
        return rng.integers(*value_range, size=shape).astype(dtype)
    raise ExportError(f"parity inputs: expected a float, integer or bool dtype, got {dtype}")


def _check_test_split(
    x: npt.NDArray[Any], y: npt.NDArray[Any], sample_shape: tuple[int, ...], dtype: np.dtype[Any]
) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 1 or tuple(x.shape[1:]) != sample_shape or len(x) == 0:
        raise ExportError(
            f"test split: expected x of shape (N, {', '.join(map(str, sample_shape))}) with "
            f"N >= 1, got {x.shape}"
        )
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ExportError(
            f"test split: expected {len(x)} integer labels, got {y.dtype} of shape {y.shape}"
        )
    return np.ascontiguousarray(x, dtype=dtype), y.astype(np.int64, copy=False)


def _predict(
    session: ort.InferenceSession, x: npt.NDArray[Any], chunk: int = 1000
) -> npt.NDArray[np.int64]:
    predictions = [
        np.argmax(session.run(None, {INPUT_NAME: x[i : i + chunk]})[0], axis=1)
        for i in range(0, len(x), chunk)
    ]
    return np.concatenate(predictions).astype(np.int64)


def _quantize_int8(model: bytes, what: str) -> bytes:
    # Imported here: only `fedscale export --quantize int8` needs them.
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="fedscale-quantize-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quantized = Path(scratch) / "int8.onnx"
        try:
            # Shape inference only (onnxruntime's recommended pre-processing
            # without its graph optimizer, which would add vendor op domains).
            quant_pre_process(onnx.load_from_string(model), prepared, skip_optimization=True)
            quantize_dynamic(
                prepared,
                quantized,
                op_types_to_quantize=list(INT8_OP_TYPES),
                weight_type=QuantType.QInt8,
            )
        except Exception as err:
            raise ExportError(
                f"{what}: onnxruntime could not quantize it to int8: {type(err).__name__}: {err}"
            ) from err
        return quantized.read_bytes()
