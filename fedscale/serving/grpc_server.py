"""The Open Inference Protocol's gRPC service, ``inference.GRPCInferenceService``.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and
ModelInfer, on grpcio's thread-pool server. Inputs arrive as
``raw_input_contents`` (little-endian row-major bytes, one entry per input, what
tritonclient sends) or as the typed ``contents`` field of each input
(``fp32_contents`` for FP32, ``int64_contents`` for INT64, ...); outputs always
go back as ``raw_output_contents``, as Triton answers. Validation is
:mod:`fedscale.serving.protocol`'s; a refused request ends with
INVALID_ARGUMENT (HTTP's 400), NOT_FOUND (404) or RESOURCE_EXHAUSTED (413 —
grpcio itself refuses a message over ``--max-body-bytes`` with it).

Hardening, as on REST: ModelInfer takes a slot of the shared
:class:`~.hardening.ConcurrencyLimiter` (RESOURCE_EXHAUSTED when the queue is
full, or the wait outlives the deadline) and runs until the earlier of the
client's own gRPC deadline and ``--request-timeout`` (then DEADLINE_EXCEEDED).
With an API key, every method but ServerLive and ServerReady needs the metadata
``authorization: Bearer <key>`` (UNAUTHENTICATED otherwise). The thread pool has
a thread for every slot and queue place plus a few for health and metadata, and
grpcio refuses calls beyond that with RESOURCE_EXHAUSTED rather than queueing them.

The generated messages register the ``inference.*`` protobuf names in
protobuf's default pool, as tritonclient.grpc's do, so one Python process holds
either this server or tritonclient's gRPC client, not both (their definitions
differ): run the server as its own process, which ``fedscale serve`` is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from time import monotonic
from typing import Any, NoReturn, TypeVar

import grpc  # type: ignore[import-untyped]
import numpy as np

from fedscale import __version__
from fedscale.exceptions import LaunchError
from fedscale.processes import join_address

from .hardening import (
    ApiKey,
    ConcurrencyLimiter,
    DeadlineExceeded,
    Overloaded,
    Unauthorized,
    Watchdog,
    run_with_deadline,
)
from .http_server import EXTENSIONS, Limits
from .metrics import UNKNOWN_MODEL, ServingMetrics
from .proto import grpc_predict_v2_pb2 as pb
from .proto import grpc_predict_v2_pb2_grpc as pb_grpc
from .protocol import (
    InferRequest,
    RequestError,
    array_from_bytes,
    array_from_values,
    check_complete,
    check_datatype,
    check_shape,
    input_spec,
    output_names,
    resolve_model,
)
from .repository import LoadedModel, ModelRepository

__all__ = ["GrpcServer", "InferenceServicer", "parse_grpc_request"]

log = logging.getLogger("fedscale.serving")

_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.RESOURCE_EXHAUSTED,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_SERVICE = "/inference.GRPCInferenceService/"
_OPEN_METHODS = frozenset({_SERVICE + "ServerLive", _SERVICE + "ServerReady"})
_SPARE_THREADS = 4  # for health and metadata calls while every slot and queue place is taken

# The typed field of InferTensorContents that carries each datatype (FP16: raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_ALL_FIELDS = sorted(set(_CONTENTS_FIELD.values()) | {"bytes_contents"})


def parse_grpc_request(
    model: LoadedModel, request: pb.ModelInferRequest, max_batch: int
) -> InferRequest:
    """Validate a ``ModelInferRequest`` against ``model`` and build its arrays."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise RequestError(
            400,
            f"raw_input_contents: expected one entry per input ({len(request.inputs)}), "
            f"got {len(raw)}",
        )
    if not request.inputs:
        raise RequestError(400, "inputs: expected at least one input tensor, got none")
    feeds: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        spec = input_spec(model, tensor.name, feeds)
        check_datatype(spec, tensor.datatype)
        shape = check_shape(spec, list(tensor.shape), max_batch, tensor.name in model.batch_inputs)
        dtype = model.input_dtypes[spec.name]
        has_contents = tensor.HasField("contents")
        if raw:
            if has_contents:
                raise RequestError(
                    400,
                    f"input {spec.name!r}: expected contents or raw_input_contents, got both",
                )
            feeds[spec.name] = array_from_bytes(spec, dtype, shape, raw[index])
            continue
        field = _CONTENTS_FIELD.get(spec.datatype)
        if not has_contents or field is None:
            raise RequestError(
                400,
                f"input {spec.name!r}: expected "
                + (f"contents.{field} or " if field else "")
                + "raw_input_contents, got neither",
            )
        for other in _ALL_FIELDS:
            if other != field and len(getattr(tensor.contents, other)):
                raise RequestError(
                    400,
                    f"input {spec.name!r} contents: expected {field} for datatype "
                    f"{spec.datatype}, got {other}",
                )
        feeds[spec.name] = array_from_values(spec, dtype, shape, getattr(tensor.contents, field))
    check_complete(model, feeds)
    names = output_names(model, [o.name for o in request.outputs]) or model.output_names
    for requested in request.outputs:
        choice = requested.parameters.get("classification")
        if choice is not None and choice.WhichOneof("parameter_choice") is not None:
            raise RequestError(
                400,
                f"output {requested.name!r} classification: this server does not support "
                "the classification extension; ask for the raw output",
            )
    return InferRequest(
        id=request.id or None, feeds=feeds, outputs=list(names), binary=[True] * len(names)
    )


_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def _abort(context: Any, err: RequestError) -> NoReturn:
    context.abort(_STATUS.get(err.status, grpc.StatusCode.INVALID_ARGUMENT), err.message)
    raise AssertionError("grpc context.abort returns only by raising")  # pragma: no cover


def _guard(
    method: Callable[[InferenceServicer, _Req, Any], _Resp],
) -> Callable[[InferenceServicer, _Req, Any], _Resp]:
    """Turn refusals into gRPC status codes, and bugs into INTERNAL with a log line."""

    def wrapped(self: InferenceServicer, request: _Req, context: Any) -> _Resp:
        started = monotonic()
        code = grpc.StatusCode.OK
        try:
            return method(self, request, context)
        except RequestError as err:
            code = _STATUS.get(err.status, grpc.StatusCode.INVALID_ARGUMENT)
            if self.metrics is not None:
                if isinstance(err, Overloaded):
                    self.metrics.rejected("grpc", "overloaded")
                elif isinstance(err, DeadlineExceeded):
                    self.metrics.rejected("grpc", "timeout")
            _abort(context, err)
        except Exception as err:
            code = grpc.StatusCode.INTERNAL
            log.exception("gRPC %s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}")
            raise  # pragma: no cover - abort raised
        finally:
            if self.metrics is not None and method.__name__ == "ModelInfer":
                self._count(request, code, monotonic() - started)

    wrapped.__name__ = method.__name__
    wrapped.__doc__ = method.__doc__
    return wrapped


class InferenceServicer:
    """``inference.GRPCInferenceService`` over a :class:`ModelRepository`."""

    def __init__(
        self,
        repository: ModelRepository,
        limits: Limits,
        limiter: ConcurrencyLimiter | None = None,
        watchdog: Watchdog | None = None,
        metrics: ServingMetrics | None = None,
    ):
        self.repository = repository
        self.limits = limits
        self.limiter = limiter or ConcurrencyLimiter(limits.max_concurrency, limits.max_queue)
        self.watchdog = watchdog or Watchdog()
        self.metrics = metrics

    def _count(self, request: Any, code: grpc.StatusCode, seconds: float) -> None:
        assert self.metrics is not None
        current = self.repository.current
        name = getattr(request, "model_name", "")
        model = name if current is not None and name == current.name else UNKNOWN_MODEL
        self.metrics.grpc_request(model, code.name, seconds)

    def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:  # noqa: N802
        """Answer live: the process is serving."""
        return pb.ServerLiveResponse(live=True)

    def ServerReady(  # noqa: N802
        self, request: pb.ServerReadyRequest, context: Any
    ) -> pb.ServerReadyResponse:
        """Answer ready once a model is loaded."""
        return pb.ServerReadyResponse(ready=self.repository.ready)

    def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:  # noqa: N802
        """Answer whether the named model (at the version, if given) is loaded."""
        try:
            resolve_model(self.repository.current, request.name, request.version)
        except RequestError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        """Name the server, its version and the protocol extensions it speaks."""
        return pb.ServerMetadataResponse(
            name="fedscale", version=__version__, extensions=EXTENSIONS
        )

    @_guard
    def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        """Describe the model: versions, platform, inputs and outputs."""
        model = resolve_model(self.repository.current, request.name, request.version)
        meta = model.metadata()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in model.inputs],
            outputs=[
                tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in model.outputs
            ],
        )

    @_guard
    def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:  # noqa: N802
        """Run the model; outputs go back as ``raw_output_contents``."""
        started = monotonic()
        timeout = self.limits.request_timeout
        remaining = context.time_remaining()  # the client's deadline; None without one
        if remaining is not None:
            timeout = min(timeout, remaining)
        deadline = started + timeout
        model = resolve_model(self.repository.current, request.model_name, request.model_version)
        parsed = parse_grpc_request(model, request, self.limits.max_batch)
        self.limiter.acquire(deadline - monotonic())
        try:
            results = run_with_deadline(self.watchdog, model, parsed, deadline)
        finally:
            self.limiter.release()
        response = pb.ModelInferResponse(
            model_name=model.name, model_version=model.version, id=request.id
        )
        for name, array in zip(parsed.outputs, results, strict=True):
            out = response.outputs.add()
            out.name = name
            out.datatype = model.output_specs[name].datatype
            out.shape.extend(array.shape)
            response.raw_output_contents.append(
                np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            )
        return response


class _ApiKeyInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Refuse every call but the health checks unless it carries the API key."""

    def __init__(self, key: ApiKey, metrics: ServingMetrics | None):
        self.key = key
        self.metrics = metrics

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        """Pass authorized calls (and health checks) on; answer the rest UNAUTHENTICATED."""
        if details.method in _OPEN_METHODS:
            return continuation(details)
        header = None
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                header = value
                break
        try:
            self.key.check(header, "the metadata 'authorization: Bearer <key>'")
        except Unauthorized as err:
            if self.metrics is not None:
                self.metrics.rejected("grpc", "unauthorized")
            message = err.message

            def deny(request: Any, context: Any) -> None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

            return grpc.unary_unary_rpc_method_handler(deny)
        return continuation(details)


class GrpcServer:
    """grpcio's server with the inference service, on ``host:port``."""

    def __init__(
        self,
        servicer: InferenceServicer,
        workers: int | None = None,
        api_key: ApiKey | None = None,
    ):
        limits = servicer.limits
        if workers is None:
            workers = limits.max_concurrency + limits.max_queue + _SPARE_THREADS
        self._server: Any = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc-infer"),
            interceptors=[_ApiKeyInterceptor(api_key, servicer.metrics)] if api_key else None,
            options=[
                ("grpc.max_receive_message_length", limits.max_body_bytes),
                ("grpc.max_send_message_length", -1),
                # Refuse a port another process holds instead of sharing it silently.
                ("grpc.so_reuseport", 0),
            ],
            # Beyond one call per thread, refuse (RESOURCE_EXHAUSTED) instead of queueing.
            maximum_concurrent_rpcs=workers,
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)  # type: ignore[no-untyped-call]

    def start(self, host: str, port: int) -> int:
        """Bind and start; return the bound port (``port`` 0: a free one)."""
        address = join_address(host, port)
        try:
            bound = int(self._server.add_insecure_port(address))
        except RuntimeError as err:
            raise LaunchError(f"gRPC: could not listen on {address}: {err}") from err
        if bound == 0:
            raise LaunchError(f"gRPC: could not listen on {address} (in use?)")
        self._server.start()
        return bound

    def stop(self, grace: float = 1.0) -> None:
        """Stop; requests in flight get ``grace`` seconds to finish."""
        self._server.stop(grace).wait()
