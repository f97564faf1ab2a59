"""Shared pieces of the serving tests: real models, real `fedscale serve` processes.

Every server here is the real command (`python -m fedscale.cli serve`) in its own
process group on 127.0.0.1, stopped by PID with fedscale.processes.stop. The gRPC
server always runs in such a process: its protobuf messages and tritonclient's
share the `inference.*` names of protobuf's default pool, so the test process
imports tritonclient's only.
"""

from __future__ import annotations

import functools
import http.client
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fedscale.modelstore import ModelDirectory, TensorSpec
from fedscale.processes import free_port, stop

LENET_SHAPE = (1, 28, 28)
READY = re.compile(r"^fedscale serve listening http=(\S+):(\d+) grpc=(\S+) model-dir=(.+)$")


@functools.cache
def lenet(seed: int) -> Any:
    """LeNet (`build_model("cnn", (1, 28, 28), 10)`) exported by fedscale.export.

    Returns (OnnxExport, torch model); one export per seed per test session.
    """
    from fedscale.export import export_onnx
    from fedscale.models import build_model

    model = build_model("cnn", LENET_SHAPE, 10, seed=seed).eval()
    return export_onnx(model, LENET_SHAPE, seed=seed), model


@functools.cache
def small_mlp(seed: int = 0) -> Any:
    """An MLP on 8x8 inputs: a model whose input schema differs from LeNet's."""
    from fedscale.export import export_onnx
    from fedscale.models import build_model

    model = build_model("mlp", (1, 8, 8), 10, seed=seed).eval()
    return export_onnx(model, (1, 8, 8), seed=seed), model


@functools.cache
def two_input_model() -> tuple[bytes, tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """`score = image * mask + bias`: FP32 image and INT64 mask, both [-1, 4]."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["image", "mask_f"], ["product"]),
            helper.make_node("Add", ["product", "bias"], ["score"]),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", 4]),
        ],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("bias", TensorProto.FLOAT, [4], [0.5, -1.0, 2.0, 0.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    inputs = (
        TensorSpec("image", "FP32", (-1, 4)),
        TensorSpec("mask", "INT64", (-1, 4)),
    )
    outputs = (TensorSpec("score", "FP32", (-1, 4)),)
    return model.SerializeToString(), inputs, outputs


@functools.cache
def slow_model() -> tuple[bytes, tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """`y = tanh(y @ W)` repeated `steps` times on `x` (FP32 [-1, 64]; `steps` INT64 [1]).

    A real model whose cost the request chooses: a huge `steps` runs until something
    stops it (the server's deadline), so tests hold inference slots without mocks.
    """
    import onnx
    from onnx import TensorProto, helper

    weights = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32) * 0.1
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["y_in", "W"], ["product"]),
            helper.make_node("Tanh", ["product"], ["y_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "step",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("y_in", TensorProto.FLOAT, ["batch", 64]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("y_out", TensorProto.FLOAT, ["batch", 64]),
        ],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Squeeze", ["steps"], ["trips"]),
            helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body),
        ],
        "slow",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64]),
            helper.make_tensor_value_info("steps", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor("W", TensorProto.FLOAT, [64, 64], weights.ravel().tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    inputs = (TensorSpec("x", "FP32", (-1, 64)), TensorSpec("steps", "INT64", (1,)))
    outputs = (TensorSpec("y", "FP32", (-1, 64)),)
    return model.SerializeToString(), inputs, outputs


def publish_slow(directory: Path, server_round: int = 1) -> Any:
    model, inputs, outputs = slow_model()
    return ModelDirectory(directory).publish(
        model, server_round=server_round, opset=17, inputs=inputs, outputs=outputs
    )


def slow_request(steps: int) -> bytes:
    """A JSON inference request for `slow_model` running `steps` steps."""
    import json

    return json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64},
                {"name": "steps", "shape": [1], "datatype": "INT64", "data": [steps]},
            ]
        }
    ).encode()


def publish_export(directory: Path, exported: Any, server_round: int, keep: int = 5) -> Any:
    return ModelDirectory(directory).publish(
        exported.model,
        server_round=server_round,
        opset=exported.opset,
        inputs=exported.inputs,
        outputs=exported.outputs,
        keep=keep,
    )


def publish_two_input(directory: Path, server_round: int = 1) -> Any:
    model, inputs, outputs = two_input_model()
    return ModelDirectory(directory).publish(
        model, server_round=server_round, opset=17, inputs=inputs, outputs=outputs
    )


def ort_outputs(model: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run `model` in a fresh onnxruntime session: the reference a server must match."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {what} within {timeout:g} s; it did not happen")
        time.sleep(0.05)


def serve_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServeProcess:
    """`fedscale serve` in its own process group; knows its ports once it is listening."""

    def __init__(
        self,
        model_dir: Path | None,
        log_file: Path,
        *extra: str,
        grpc: bool = True,
        argv: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
    ):
        self.log_file = log_file
        self.grpc_port = free_port() if grpc else 0
        if argv is None:
            argv = [sys.executable, "-m", "fedscale.cli", "serve"]
        args = [*argv]
        if model_dir is not None:
            args += ["--model-dir", str(model_dir)]
        args += ["--http-port", "0", "--grpc-port", str(self.grpc_port), "--poll-interval", "0.1"]
        args += list(extra)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        with open(log_file, "wb") as log:
            self.process = subprocess.Popen(
                args,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env={**serve_env(), **(env or {})},
                start_new_session=True,
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.http_port = 0

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.stdout.append(line)
            self.lines.put(line)

    def wait_ready(self, timeout: float = 60.0) -> ServeProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    raise AssertionError(
                        f"fedscale serve exited with {self.process.returncode}:\n{self.log()}"
                    ) from None
                continue
            match = READY.match(line)
            if match:
                self.http_port = int(match.group(2))
                grpc = match.group(3)
                assert grpc == ("off" if not self.grpc_port else f"127.0.0.1:{self.grpc_port}")
                return self
        raise AssertionError(f"fedscale serve printed no ready line in {timeout} s:\n{self.log()}")

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self) -> int | None:
        code = stop(self.process)
        self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code

    def __enter__(self) -> ServeProcess:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def request(
    address: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request on a fresh connection: (status, headers, body)."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def lenet_input(seed: int, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *LENET_SHAPE), dtype=np.float32)
