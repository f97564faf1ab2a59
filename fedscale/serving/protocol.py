"""Open Inference Protocol (KServe v2) requests: parsing, validation, responses.

The REST side reads the JSON inference request, in whole or as the JSON header
of the binary tensor data extension::

    POST /v2/models/{name}/infer
    Inference-Header-Content-Length: 187          (binary extension only)

    {"id": "42",
     "inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                 "data": [0.0, 0.1, ...]}                    (JSON tensor), or
                {..., "parameters": {"binary_data_size": 3136}}    (binary tensor)],
     "outputs": [{"name": "logits", "parameters": {"binary_data": true}}],
     "parameters": {"binary_data_output": true}}
    <3136 bytes of little-endian float32, for each binary input in order>

and answers ``{"model_name", "model_version", "id", "outputs": [...]}``, with
binary outputs appended after the JSON the same way. The gRPC service
(:mod:`fedscale.serving.grpc_server`) shares the checks here: every input named
once, no unknown input, the model's datatype, the model's shape (fixed axes
equal, the batch at most ``max_batch``), and exactly as many values (or bytes)
as the shape holds. Each failure is a :class:`RequestError` whose HTTP status
(400, 404, 413) maps to a gRPC status code, and whose message names the tensor,
what was expected and what arrived.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from fedscale.exceptions import FedscaleError
from fedscale.modelstore import TensorSpec

from .repository import LoadedModel

__all__ = [
    "InferRequest",
    "RequestError",
    "array_from_bytes",
    "array_from_values",
    "check_shape",
    "error_body",
    "json_response",
    "parse_json_request",
    "resolve_model",
    "run_inference",
]

# Array kinds a JSON (or typed protobuf) value list may arrive as, per datatype.
_FLOAT_KINDS = frozenset("fiu")
_INT_KINDS = frozenset("iu")
_BOOL_KINDS = frozenset("b")
_KIND_NAMES = {"f": "numbers", "i": "integers", "u": "integers", "b": "booleans"}


class RequestError(FedscaleError, ValueError):
    """A request the server refuses, with the HTTP status that says why.

    400: malformed or not matching the model; 404: unknown model, version or
    route; 413: over a size limit. The gRPC server maps the same statuses to
    INVALID_ARGUMENT, NOT_FOUND and RESOURCE_EXHAUSTED.
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def error_body(message: str) -> bytes:
    """Return the protocol's error object, ``{"error": message}``, as JSON bytes."""
    return orjson.dumps({"error": message})


def resolve_model(current: LoadedModel | None, name: str, version: str) -> LoadedModel:
    """Return the loaded model if it is ``name`` (at ``version``, when one is given)."""
    if current is None:
        raise RequestError(404, f"unknown model {name!r}: no model is loaded yet")
    if name != current.name:
        raise RequestError(404, f"unknown model {name!r}: this server serves {current.name!r}")
    if version and version != current.version:
        raise RequestError(
            404,
            f"unknown version {version!r} of model {name!r}: serving version {current.version}",
        )
    return current


@dataclass(slots=True)
class InferRequest:
    """A validated inference request: arrays ready for onnxruntime, outputs to return."""

    id: str | None
    feeds: dict[str, np.ndarray]
    outputs: list[str]
    binary: list[bool]


def check_shape(spec: TensorSpec, shape: object, max_batch: int, batched: bool) -> list[int]:
    """Check a request's ``shape`` for the model input ``spec``; return it as a list.

    ``batched`` says the first axis is the model's dynamic batch axis, limited
    to ``max_batch`` (0: no limit).
    """
    if (
        not isinstance(shape, list)
        or not shape
        or not all(type(d) is int and d >= 1 for d in shape)
    ):
        raise RequestError(
            400,
            f"input {spec.name!r} shape: expected a non-empty list of whole numbers >= 1 "
            f"like {_example_shape(spec)}, got {shape!r}",
        )
    expected = spec.shape
    if len(shape) != len(expected) or any(
        e != -1 and e != d for e, d in zip(expected, shape, strict=True)
    ):
        raise RequestError(
            400,
            f"input {spec.name!r} shape: expected {list(expected)} (-1: any size), got {shape}",
        )
    if batched and max_batch and shape[0] > max_batch:
        raise RequestError(
            400,
            f"input {spec.name!r} batch: expected at most {max_batch} (the server's "
            f"--max-batch), got {shape[0]}",
        )
    return shape


def _example_shape(spec: TensorSpec) -> list[int]:
    return [1 if d == -1 else d for d in spec.shape]


def check_datatype(spec: TensorSpec, datatype: object) -> None:
    """Refuse a tensor whose declared datatype is not the model input's."""
    if datatype != spec.datatype:
        raise RequestError(
            400, f"input {spec.name!r} datatype: expected {spec.datatype}, got {datatype!r}"
        )


def array_from_values(
    spec: TensorSpec, dtype: np.dtype[Any], shape: list[int], values: Sequence[Any]
) -> np.ndarray:
    """Build the input array from a flat or row-major nested list of values."""
    try:
        array = np.array(values)
    except (ValueError, TypeError, OverflowError) as err:
        raise RequestError(
            400,
            f"input {spec.name!r} data: expected a flat list of {spec.datatype} values, "
            f"or lists nested evenly in row-major order; got a list numpy cannot read "
            f"({' '.join(str(err).split())[:160]})",
        ) from None
    count = math.prod(shape)
    if array.size != count:
        raise RequestError(
            400,
            f"input {spec.name!r} data: expected {count} values for shape {shape}, "
            f"got {array.size}",
        )
    kind = array.dtype.kind
    datatype = spec.datatype
    if datatype.startswith("FP"):
        allowed = _FLOAT_KINDS
    elif datatype == "BOOL":
        allowed = _BOOL_KINDS
    else:
        allowed = _INT_KINDS
    if kind not in allowed and count:
        if allowed is _INT_KINDS and kind == "f" and _all_ints(values):
            # numpy reads integers beyond int64 mixed with smaller ones as floats.
            info = np.iinfo(dtype)
            raise RequestError(
                400,
                f"input {spec.name!r} data: expected {datatype} values in "
                f"[{info.min}, {info.max}], got integers beyond that range",
            )
        got = _KIND_NAMES.get(
            kind, "strings" if kind in "US" else "null, mixed or out-of-range values"
        )
        raise RequestError(
            400,
            f"input {spec.name!r} data: expected {_KIND_NAMES[next(iter(sorted(allowed)))]} "
            f"for datatype {datatype}, got {got}",
        )
    if allowed is _INT_KINDS and count and array.dtype != dtype:
        info = np.iinfo(dtype)
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            raise RequestError(
                400,
                f"input {spec.name!r} data: expected {datatype} values in "
                f"[{info.min}, {info.max}], got values in [{low}, {high}]",
            )
    return array.astype(dtype, copy=False).reshape(shape)


def _all_ints(values: Sequence[Any]) -> bool:
    flat = np.array(values, dtype=object).ravel()
    return all(type(v) is int for v in flat)


def array_from_bytes(
    spec: TensorSpec, dtype: np.dtype[Any], shape: list[int], data: bytes | memoryview
) -> np.ndarray:
    """Build the input array from raw little-endian row-major bytes."""
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise RequestError(
            400,
            f"input {spec.name!r} binary data: expected {expected} bytes for shape {shape} "
            f"{spec.datatype}, got {len(data)}",
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def check_complete(model: LoadedModel, feeds: dict[str, np.ndarray]) -> None:
    """Refuse a request that leaves out one of the model's inputs."""
    if len(feeds) != len(model.inputs):
        missing = [t.name for t in model.inputs if t.name not in feeds]
        raise RequestError(
            400,
            f"missing input {missing[0]!r}: the model expects inputs "
            f"{[t.name for t in model.inputs]}, got {sorted(feeds)}",
        )


def input_spec(model: LoadedModel, name: object, seen: dict[str, np.ndarray]) -> TensorSpec:
    """Return the model input ``name``; refuse unknown and repeated inputs."""
    spec = model.input_specs.get(name) if isinstance(name, str) else None
    if spec is None:
        raise RequestError(
            400,
            f"unknown input {name!r}: the model expects inputs {[t.name for t in model.inputs]}",
        )
    if name in seen:
        raise RequestError(400, f"input {name!r}: expected once, got it twice")
    return spec


def output_names(model: LoadedModel, names: Sequence[object]) -> list[str]:
    """Check requested output names: known to the model, each once."""
    checked: list[str] = []
    for name in names:
        if not isinstance(name, str) or name not in model.output_specs:
            raise RequestError(
                400,
                f"unknown output {name!r}: the model has outputs {model.output_names}",
            )
        if name in checked:
            raise RequestError(400, f"output {name!r}: expected once, got it twice")
        checked.append(name)
    return checked


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RequestError(400, f"{where}: expected a JSON object, got {_json_kind(value)}")
    return value


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _flag(parameters: dict[str, Any], key: str, where: str) -> bool | None:
    value = parameters.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise RequestError(400, f"{where} {key}: expected true or false, got {value!r}")


def parse_json_request(
    model: LoadedModel,
    body: bytes,
    header_length: int | None,
    max_batch: int,
) -> InferRequest:
    """Parse and validate a REST inference request body.

    ``header_length`` is the ``Inference-Header-Content-Length`` header: the JSON
    occupies that many leading bytes and the binary tensors follow; ``None``:
    the whole body is JSON.
    """
    view = memoryview(body)
    extension = header_length is not None
    if header_length is None:
        header_length = len(body)
    elif header_length > len(body):
        raise RequestError(
            400,
            f"Inference-Header-Content-Length: expected at most the body's {len(body)} "
            f"bytes, got {header_length}",
        )
    try:
        request = orjson.loads(view[:header_length])
    except orjson.JSONDecodeError as err:
        hint = ""
        if not extension and b"binary_data_size" in body:
            hint = (
                "; a body with binary tensors needs the Inference-Header-Content-Length "
                "header (the JSON's length)"
            )
        raise RequestError(400, f"malformed JSON in the request body: {err}{hint}") from None
    request = _object(request, "inference request")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(
            400, f"inference request inputs: expected a non-empty list, got {_json_kind(inputs)}"
        )
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(400, f"inference request id: expected a string, got {request_id!r}")
    parameters = request.get("parameters")
    binary_default = False
    if parameters is not None:
        parameters = _object(parameters, "inference request parameters")
        binary_default = bool(_flag(parameters, "binary_data_output", "parameters"))

    feeds: dict[str, np.ndarray] = {}
    offset = header_length
    for raw in inputs:
        tensor = _object(raw, "inference request input")
        name = tensor.get("name")
        spec = input_spec(model, name, feeds)
        check_datatype(spec, tensor.get("datatype"))
        shape = check_shape(spec, tensor.get("shape"), max_batch, name in model.batch_inputs)
        dtype = model.input_dtypes[spec.name]
        tensor_parameters = tensor.get("parameters")
        size = None
        if tensor_parameters is not None:
            size = _object(tensor_parameters, f"input {name!r} parameters").get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise RequestError(
                    400,
                    f"input {name!r} binary_data_size: expected a whole number of bytes, "
                    f"got {size!r}",
                )
            if "data" in tensor:
                raise RequestError(
                    400, f"input {name!r}: expected data or binary_data_size, got both"
                )
            if not extension:
                raise RequestError(
                    400,
                    f"input {name!r} binary_data_size: binary tensors need the "
                    "Inference-Header-Content-Length header (the JSON's length), got none",
                )
            if offset + size > len(body):
                raise RequestError(
                    400,
                    f"input {name!r} binary_data_size: expected at most the {len(body) - offset} "
                    f"bytes left after the JSON header, got {size}",
                )
            feeds[spec.name] = array_from_bytes(spec, dtype, shape, view[offset : offset + size])
            offset += size
        else:
            values = tensor.get("data")
            if not isinstance(values, list):
                raise RequestError(
                    400,
                    f"input {name!r} data: expected a list of values (or binary_data_size), "
                    f"got {_json_kind(values)}",
                )
            feeds[spec.name] = array_from_values(spec, dtype, shape, values)
    check_complete(model, feeds)
    if offset != len(body):
        raise RequestError(
            400,
            f"binary data: the inputs' binary_data_size add up to {offset - header_length} "
            f"bytes, but {len(body) - header_length} bytes follow the JSON header",
        )

    requested = request.get("outputs")
    if requested is None:
        names = model.output_names
        binary = [binary_default] * len(names)
    else:
        if not isinstance(requested, list):
            raise RequestError(
                400, f"inference request outputs: expected a list, got {_json_kind(requested)}"
            )
        objects = [_object(o, "inference request output") for o in requested]
        names = output_names(model, [o.get("name") for o in objects])
        binary = []
        for obj, name in zip(objects, names, strict=True):
            flag = None
            out_parameters = obj.get("parameters")
            if out_parameters is not None:
                out_parameters = _object(out_parameters, f"output {name!r} parameters")
                if out_parameters.get("classification"):
                    raise RequestError(
                        400,
                        f"output {name!r} classification: this server does not support the "
                        "classification extension; ask for the raw output",
                    )
                flag = _flag(out_parameters, "binary_data", f"output {name!r} parameters")
            binary.append(binary_default if flag is None else flag)
    return InferRequest(id=request_id, feeds=feeds, outputs=list(names), binary=binary)


def run_inference(
    model: LoadedModel, request: InferRequest, run_options: Any = None
) -> list[np.ndarray]:
    """Run ``model`` on a validated request (``run_options``: onnxruntime's RunOptions).

    onnxruntime's own input checks (INVALID_ARGUMENT) still report a request
    problem, so they become 400 too; any other failure propagates as a server
    error.
    """
    try:
        return model.run(request.feeds, request.outputs, run_options)
    except Exception as err:
        if type(err).__name__ == "InvalidArgument":
            raise RequestError(400, f"the model refused the inputs: {err}") from None
        raise


_OPT_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def json_response(
    model: LoadedModel, request: InferRequest, results: Sequence[np.ndarray]
) -> tuple[bytes, int | None]:
    """Return the REST response body and, when outputs are binary, its JSON length.

    A JSON output carries its values flat in row-major order; a binary one
    carries ``binary_data_size`` and its bytes follow the JSON header in the
    order of the outputs.
    """
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array, binary in zip(request.outputs, results, request.binary, strict=True):
        spec = model.output_specs[name]
        entry: dict[str, Any] = {"name": name, "datatype": spec.datatype, "shape": array.shape}
        if binary:
            blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = np.ascontiguousarray(array).reshape(-1)
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = outputs
    header = orjson.dumps(response, option=_OPT_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
