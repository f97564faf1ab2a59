"""ONNX export: parity with torch on real onnxruntime sessions, refusal, int8 quantization."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from fedscale import models
from fedscale.datasets import load_dataset
from fedscale.exceptions import ExportError, ModelError
from fedscale.export import (
    INT8_OP_TYPES,
    ONNX_OPSET,
    PARITY_BATCH_SIZES,
    OnnxExporter,
    export_onnx,
)
from fedscale.models import BUILTIN_MODELS, build_model
from fedscale.modelstore import ModelDirectory, TensorSpec
from fedscale.training import evaluate, train

# Every model fedscale ships, on the sample shapes of its built-in datasets.
SHAPES = {"digits": (1, 8, 8), "mnist5k": (1, 28, 28)}
CASES = [(spec, shape) for spec in BUILTIN_MODELS for shape in SHAPES.values()]


def _session(data: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _perturbed(spec, shape, seed):
    # Larger-than-init weights, so the check is not only near zero.
    model = build_model(spec, shape, 10, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0).add_(0.05 * torch.randn_like(p))
    return model


# Models over integer codes (characters), where the project ships them: uint8
# codes of a 96-symbol vocabulary, sequences of 80.
TEXT_MODELS = dict(getattr(models, "TEXT_MODELS", {}))
VOCAB, SEQ = 96, 80


def test_every_shipped_float_model_is_covered():
    assert set(BUILTIN_MODELS) == {"mlp", "cnn"}


@pytest.mark.parametrize(("spec", "shape"), CASES)
def test_export_matches_torch_at_batch_1_32_and_1000(spec, shape):
    model = _perturbed(spec, shape, seed=3)
    exported = export_onnx(model, shape)
    assert [c.batch_size for c in exported.parity] == [1, 32, 1000] == list(PARITY_BATCH_SIZES)
    # The exporter's own elementwise check passed (it raises otherwise); its
    # reported errors are real, small numbers.
    assert all(0.0 <= c.max_abs_error < 1e-2 for c in exported.parity)

    # Independently of the exporter's own check: a fresh session, fresh inputs.
    session = _session(exported.model)
    rng = np.random.default_rng(123)
    model.eval()
    for batch in PARITY_BATCH_SIZES:
        x = rng.uniform(-2, 2, size=(batch, *shape)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        (got,) = session.run(None, {"input": x})
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "spec",
    # The full-size LSTM takes seconds at batch 1000 in torch and onnxruntime.
    [pytest.param(s, marks=pytest.mark.slow) if s == "char-lstm" else s for s in TEXT_MODELS],
)
def test_text_models_export_for_their_integer_codes(spec):
    codes = np.random.default_rng(0).integers(1, VOCAB, size=(200, SEQ)).astype(np.uint8)
    model = build_model(spec, (SEQ,), VOCAB, seed=0)
    exported = OnnxExporter.for_data(codes, seed=0).export(model)
    assert exported.inputs == (TensorSpec("input", "UINT8", (-1, SEQ)),)
    assert exported.outputs == (TensorSpec("logits", "FP32", (-1, VOCAB)),)
    session = _session(exported.model)
    rng = np.random.default_rng(5)
    model.eval()
    for batch in PARITY_BATCH_SIZES:
        x = rng.integers(0, VOCAB, size=(batch, SEQ)).astype(np.uint8)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(session.run(None, {"input": x})[0], want, rtol=1e-4, atol=1e-5)


class CodeBag(nn.Module):
    """Embeds integer codes and averages them: a model whose input is not float."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.embed(x.long()).mean(dim=1))


def test_integer_inputs_are_drawn_from_the_datas_codes():
    codes = np.random.default_rng(0).integers(0, 20, size=(50, 6)).astype(np.int64)
    exporter = OnnxExporter.for_data(codes, seed=0)
    assert exporter.input_dtype == np.int64
    exported = exporter.export(CodeBag())
    assert exported.inputs == (TensorSpec("input", "INT64", (-1, 6)),)
    # Out-of-range codes would make torch's embedding fail: none were drawn.
    assert all(c.max_abs_error < 1e-5 for c in exported.parity)
    with pytest.raises(ExportError, match=r"expected a range \(low, high\) of valid int64 codes"):
        OnnxExporter((6,), input_dtype=np.int64)
    with pytest.raises(ExportError, match=r"expected a non-empty batch of samples"):
        OnnxExporter.for_data(np.zeros((0, 6), np.int64))


@pytest.mark.parametrize("spec", list(BUILTIN_MODELS))
def test_signature_opset_and_dynamic_batch(spec):
    exported = export_onnx(build_model(spec, (1, 8, 8), 7, seed=0), (1, 8, 8))
    assert exported.opset == ONNX_OPSET == 17
    assert exported.inputs == (TensorSpec("input", "FP32", (-1, 1, 8, 8)),)
    assert exported.outputs == (TensorSpec("logits", "FP32", (-1, 7)),)
    graph = onnx.load_from_string(exported.model)
    onnx.checker.check_model(graph)
    assert {o.domain: o.version for o in graph.opset_import}[""] == 17
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch" and not batch_dim.HasField("dim_value")
    assert exported.quantization is None and exported.drift is None


def test_export_bytes_depend_only_on_the_weights():
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    a = OnnxExporter((1, 8, 8), seed=1).export(model)
    b = OnnxExporter((1, 8, 8), seed=2).export(build_model("mlp", (1, 8, 8), 10, seed=0))
    c = OnnxExporter((1, 8, 8), seed=1).export(build_model("mlp", (1, 8, 8), 10, seed=1))
    assert a.model == b.model and a.sha256 == b.sha256
    assert c.sha256 != a.sha256


def test_callers_model_keeps_its_mode_device_and_weights():
    model = build_model("cnn", (1, 8, 8), 10, seed=0).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, (1, 8, 8))
    assert model.training
    assert all(p.requires_grad for p in model.parameters())
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


class BatchScaled(nn.Module):
    """Scales logits by the batch size: a Python int the tracer freezes at export time."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        return self.linear(x.flatten(1)) * int(x.shape[0])


def test_model_whose_trace_freezes_a_python_value_is_refused():
    model = BatchScaled()
    x = torch.randn(32, 1, 8, 8)
    # The torch model is fine: it really scales by the batch size.
    assert torch.allclose(model(x), model.linear(x.flatten(1)) * 32)
    with pytest.raises(ExportError) as caught:
        export_onnx(model, (1, 8, 8))
    message = str(caught.value)
    # Batch 1 (the traced size) passes; batch 32 is the first to differ.
    assert "differs from torch at batch size 32" in message
    assert "max abs error" in message and "refusing to write it" in message
    assert "Converting a tensor to a Python integer" in message
    assert isinstance(caught.value, ModelError)


class FlattenOnlyBatchOne(nn.Module):
    """Reshapes with the traced batch size baked in: fails to run at other batch sizes."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        return self.linear(x.reshape(int(x.shape[0]), 64))


def test_model_whose_onnx_graph_fails_at_another_batch_size_is_refused():
    with pytest.raises(ExportError, match=r"fails at batch size 32"):
        export_onnx(FlattenOnlyBatchOne(), (1, 8, 8))


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        y = self.linear(x.flatten(1))
        return y, y.softmax(dim=1)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: export_onnx(TwoOutputs(), (1, 8, 8)), r"expected a model with one input and one"),
        (lambda: export_onnx("mlp", (1, 8, 8)), r"expected a torch.nn.Module, got str"),
        (lambda: OnnxExporter((1, 0, 8)), r"sample shape: expected positive whole numbers"),
        (
            lambda: export_onnx(build_model("mlp", (1, 8, 8), 10), (1, 4, 4)),
            r"torch could not export it to ONNX",
        ),
        (
            lambda: export_onnx(build_model("mlp", (1, 8, 8), 10), (1, 8, 8), quantize="int8"),
            r"expected a test split",
        ),
        (
            lambda: export_onnx(
                build_model("mlp", (1, 8, 8), 10),
                (1, 8, 8),
                quantize="int4",
                test_data=(np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.int64)),
            ),
            r"quantize: expected one of int8, got 'int4'",
        ),
        (
            lambda: export_onnx(
                build_model("mlp", (1, 8, 8), 10),
                (1, 8, 8),
                quantize="int8",
                test_data=(np.zeros((2, 64), np.float32), np.zeros(2, np.int64)),
            ),
            r"test split: expected x of shape \(N, 1, 8, 8\)",
        ),
    ],
)
def test_bad_input_is_a_clear_export_error(call, message):
    with pytest.raises(ExportError, match=message):
        call()


@pytest.fixture(scope="module")
def trained_digits():
    data = load_dataset("digits", seed=0, test_fraction=0.2)
    models = {}
    for spec in BUILTIN_MODELS:
        model = build_model(spec, data.sample_shape, data.num_classes, seed=0)
        train(
            model,
            data.x_train,
            data.y_train,
            epochs=4,
            batch_size=32,
            lr=0.1,
            device=torch.device("cpu"),
            seed=0,
        )
        models[spec] = model
    return data, models


@pytest.mark.parametrize("spec", list(BUILTIN_MODELS))
def test_int8_quantizes_matmul_only_and_reports_drift(spec, trained_digits):
    data, models = trained_digits
    model = models[spec]
    torch_accuracy = evaluate(model, data.x_test, data.y_test, device=torch.device("cpu")).accuracy
    exporter = OnnxExporter(data.sample_shape, seed=0)
    fp32 = exporter.export(model)
    int8 = exporter.quantize(fp32, data.x_test, data.y_test)

    assert int8.quantization == "int8" and int8.opset == fp32.opset
    assert (int8.inputs, int8.outputs) == (fp32.inputs, fp32.outputs)
    ops = [n.op_type for n in onnx.load_from_string(int8.model).graph.node]
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    assert "ConvInteger" not in ops and "Gemm" not in ops
    assert ops.count("Conv") == (2 if spec == "cnn" else 0)  # convolutions stay fp32
    assert set(INT8_OP_TYPES) == {"MatMul", "Gemm"}
    assert len(int8.model) < len(fp32.model)

    drift = int8.drift
    assert drift is not None and drift.num_examples == len(data.y_test)
    # fp32 accuracy is measured on the fp32 ONNX model: torch's, to within a tie.
    assert drift.fp32_accuracy == pytest.approx(torch_accuracy, abs=1.5 / len(data.y_test))
    assert drift.accuracy_change == pytest.approx(drift.int8_accuracy - drift.fp32_accuracy)

    # The drift figures are what a real int8 session gives on the test split.
    session = _session(int8.model)
    predictions = session.run(None, {"input": data.x_test.copy()})[0].argmax(axis=1)
    assert drift.int8_accuracy == pytest.approx(np.mean(predictions == data.y_test))
    fp32_predictions = _session(fp32.model).run(None, {"input": data.x_test.copy()})[0].argmax(1)
    assert drift.agreement == pytest.approx(np.mean(predictions == fp32_predictions))
    assert drift.agreement >= 0.95
    for batch in PARITY_BATCH_SIZES:
        x = np.zeros((batch, *data.sample_shape), np.float32)
        assert session.run(None, {"input": x})[0].shape == (batch, data.num_classes)


def test_quantizing_twice_is_refused(trained_digits):
    data, models = trained_digits
    exporter = OnnxExporter(data.sample_shape)
    int8 = exporter.quantize(exporter.export(models["mlp"]), data.x_test, data.y_test)
    with pytest.raises(ExportError, match=r"expected an fp32 export to quantize"):
        exporter.quantize(int8, data.x_test, data.y_test)


def test_publish_into_a_model_directory(tmp_path):
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    exported = export_onnx(model, (1, 8, 8))
    manifest = exported.publish(tmp_path / "models", server_round=4, metrics={"accuracy": 0.5})
    directory = ModelDirectory(tmp_path / "models")
    assert directory.read_manifest() == manifest
    assert manifest.sha256 == exported.sha256 and manifest.opset == 17
    assert manifest.inputs == exported.inputs and manifest.outputs == exported.outputs
    data = directory.read_model(manifest)
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_session(data).run(None, {"input": x})[0], want, 1e-4, 1e-5)
