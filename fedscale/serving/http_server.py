"""The Open Inference Protocol's REST endpoints on asyncio and httptools.

Routes (``{name}`` may be followed by ``/versions/{version}``)::

    GET  /v2                          server metadata
    GET  /v2/health/live              200 while the process serves
    GET  /v2/health/ready             200 once a model is loaded, else 400
    GET  /v2/models/{name}            model metadata
    GET  /v2/models/{name}/ready      200 if that model is loaded, else 404
    POST /v2/models/{name}/infer      inference (JSON, or the binary tensor extension)
    GET  /metrics                     Prometheus metrics (with :class:`ServingMetrics`)

Why no web framework: at one connection the HTTP layer, not a small model, is
what a request costs (a FastAPI with pydantic answers about 1,200 requests/s on
two cores where onnxruntime needs 16 us per LeNet call). Here each connection is
an :class:`asyncio.Protocol` fed to httptools' C parser, and a cheap request is
handled inline in the event loop (validation, onnxruntime, the response) with
no task, future or thread handoff, and written back with one ``write``.
Keep-alive and pipelining work; a body over the limit is refused with 413 from
its ``Content-Length`` alone, before it is read; headers are limited too.

Hardening (:mod:`.hardening`): a thread handoff costs about 60 us, four LeNet
calls, so inference runs inline only while the model's measured cost is under
:data:`INLINE_COST_S` and the body is small; then a watchdog stops an inline run
that overruns :data:`INLINE_GUARD_S` and it is run again on a worker thread, so the
loop (health, metadata, other connections) is never held longer than that. Any
other inference waits for a slot of the shared :class:`ConcurrencyLimiter` and
runs on a worker thread, terminated at the request's deadline (504); a full
queue answers 503 with ``Retry-After`` at once. A request still being received
``request_timeout`` seconds after its first byte gets 408 and the connection is
closed (slow senders, slowloris); idle keep-alive connections are closed after
``idle_timeout``. With an API key, everything but ``/v2/health/*`` and
``/metrics`` needs ``Authorization: Bearer <key>`` (401 otherwise).
"""

from __future__ import annotations

import asyncio
import logging
import math
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from time import monotonic, perf_counter
from typing import Any
from urllib.parse import unquote

import httptools
import orjson

from fedscale import __version__

from .hardening import (
    RETRY_AFTER_S,
    ApiKey,
    ConcurrencyLimiter,
    DeadlineExceeded,
    Overloaded,
    Unauthorized,
    Watchdog,
    default_max_concurrency,
    default_max_queue,
    run_with_deadline,
)
from .metrics import CONTENT_TYPE, UNKNOWN_MODEL, ServingMetrics
from .protocol import (
    InferRequest,
    RequestError,
    error_body,
    json_response,
    parse_json_request,
    resolve_model,
)
from .repository import LoadedModel, ModelRepository

__all__ = ["EXTENSIONS", "HttpApp", "HttpServer", "Limits", "Response"]

log = logging.getLogger("fedscale.serving")

EXTENSIONS = ["binary_tensor_data"]
_JSON = b"application/json"
_OCTETS = b"application/octet-stream"
_REASONS = {
    100: b"Continue",
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    415: b"Unsupported Media Type",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}
_MAX_HEADER_BYTES = 64 * 1024
_LINGER_S = 2.0  # after refusing a request, read (and drop) what the client still sends

INLINE_COST_S = 0.001
"""Run a model inline in the event loop while its average run takes less than this."""
INLINE_GUARD_S = 0.05
"""Longest an inline run may hold the event loop before it is stopped and rerun on a thread."""
INLINE_BODY_BYTES = 64 * 1024
"""Larger bodies are parsed on a worker thread too: parsing them would hold the loop."""


@dataclass(frozen=True)
class Limits:
    """What one request may hold and how long; the concurrency the server allows.

    ``max_batch`` 0 means no batch limit. ``request_timeout``: seconds from a
    request's first byte to its answer (receiving it, waiting for a slot,
    inference). ``idle_timeout``: seconds a keep-alive connection may sit idle.
    ``max_concurrency`` inferences run at once (REST and gRPC together), and
    ``max_queue`` more may wait for a slot.
    """

    max_batch: int = 1024
    max_body_bytes: int = 32 * 1024 * 1024
    request_timeout: float = 30.0
    idle_timeout: float = 60.0
    max_concurrency: int = field(default_factory=default_max_concurrency)
    max_queue: int = field(default_factory=lambda: default_max_queue(default_max_concurrency()))


@dataclass(slots=True)
class Response:
    """Status, body, content type, and extra header lines each ending in CRLF."""

    status: int
    body: bytes = b""
    content_type: bytes = _JSON
    headers: bytes = b""


def _error(status: int, message: str, headers: bytes = b"") -> Response:
    return Response(status, error_body(message), _JSON, headers)


_RETRY_AFTER = b"Retry-After: %d\r\n" % RETRY_AFTER_S
_WWW_AUTHENTICATE = b'WWW-Authenticate: Bearer realm="fedscale"\r\n'


def _rejection(err: RequestError) -> str | None:
    """Name the metrics reason of a refusal by the server's own protection, if it is one."""
    if isinstance(err, Overloaded):
        return "overloaded"
    if isinstance(err, DeadlineExceeded):
        return "timeout"
    if isinstance(err, Unauthorized):
        return "unauthorized"
    return None


class _Job:
    """An inference to finish on a worker thread: parse (if not yet), run, answer."""

    __slots__ = (
        "app",
        "model",
        "name",
        "body",
        "header_length",
        "encoding",
        "request",
        "deadline",
        "started",
    )

    def __init__(
        self,
        app: HttpApp,
        model: LoadedModel,
        name: str,
        deadline: float,
        started: float,
        request: InferRequest | None = None,
        body: bytes = b"",
        header_length: bytes | None = None,
        encoding: bytes | None = None,
    ):
        self.app = app
        self.model = model
        self.name = name
        self.deadline = deadline
        self.started = started
        self.request = request
        self.body = body
        self.header_length = header_length
        self.encoding = encoding

    def run(self) -> Response:
        """Parse if needed, run to the deadline, and build the answer (a worker thread)."""
        app, model = self.app, self.model
        request = self.request
        if request is None:
            request = app._parse(model, self.body, self.header_length, self.encoding)
        results = run_with_deadline(app.watchdog, model, request, self.deadline)
        return app._answer(model, request, results)


_OK_EMPTY = Response(200)
_GET = (b"GET", b"HEAD")
_POST = (b"POST",)


class HttpApp:
    """Answer one parsed HTTP request; knows nothing of sockets.

    :meth:`handle` answers at once (a :class:`Response`) or hands back a
    :class:`_Job` for an inference that must wait for a slot or run off the
    event loop; :meth:`complete` finishes such a job.
    """

    def __init__(
        self,
        repository: ModelRepository,
        limits: Limits,
        metrics: ServingMetrics | None = None,
        api_key: ApiKey | None = None,
        limiter: ConcurrencyLimiter | None = None,
        watchdog: Watchdog | None = None,
    ):
        self.repository = repository
        self.limits = limits
        self.metrics = metrics
        self.api_key = api_key
        self.limiter = limiter or ConcurrencyLimiter(limits.max_concurrency, limits.max_queue)
        self._own_watchdog = watchdog is None
        self.watchdog = watchdog or Watchdog()
        self.executor = ThreadPoolExecutor(
            max_workers=limits.max_concurrency, thread_name_prefix="rest-infer"
        )

    def close(self) -> None:
        """Stop the worker threads (after the jobs they run) and an own watchdog."""
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self._own_watchdog:
            self.watchdog.close()

    def handle(
        self,
        method: bytes,
        path: str,
        body: bytes,
        header_length: bytes | None,
        encoding: bytes | None,
        authorization: bytes | None = None,
        deadline: float = math.inf,
    ) -> Response | _Job:
        """Route the request and turn every refusal into a JSON error response.

        ``deadline`` (``time.monotonic`` seconds) bounds the wait for a slot and
        the inference.
        """
        try:
            return self._route(method, path, body, header_length, encoding, authorization, deadline)
        except _MethodNotAllowed as err:
            return _error(err.status, err.message, b"Allow: %s\r\n" % err.allow)
        except RequestError as err:
            return self.refusal(err)
        except Exception as err:  # a bug or a failing model: answer, log, keep serving
            log.exception("request %s %s failed", method.decode("latin-1"), path)
            return _error(500, f"internal error: {type(err).__name__}: {err}")

    def refusal(self, err: RequestError) -> Response:
        """Answer a refusal, with the headers and the count its kind calls for."""
        reason = _rejection(err)
        if reason is None:
            return _error(err.status, err.message)
        if self.metrics is not None:
            self.metrics.rejected("rest", reason)
        if err.status == 503:
            return _error(503, err.message, _RETRY_AFTER)
        if err.status == 401:
            return _error(401, err.message, _WWW_AUTHENTICATE)
        return _error(err.status, err.message)

    async def complete(self, job: _Job) -> Response:
        """Wait for a slot (bounded by the job's deadline), run the job on a worker thread."""
        code = 500
        try:
            try:
                await self.limiter.acquire_async(job.deadline - monotonic())
                try:
                    loop = asyncio.get_running_loop()
                    response = await loop.run_in_executor(self.executor, job.run)
                finally:
                    self.limiter.release()
            except RequestError as err:
                response = self.refusal(err)
            except Exception as err:
                log.exception("inference on a worker thread failed")
                response = _error(500, f"internal error: {type(err).__name__}: {err}")
            code = response.status
            return response
        finally:
            if self.metrics is not None:
                self._count(job.name, code, perf_counter() - job.started)

    def _count(self, name: str, code: int, seconds: float) -> None:
        assert self.metrics is not None
        current = self.repository.current
        model = name if current is not None and name == current.name else UNKNOWN_MODEL
        self.metrics.request(model, code, seconds)

    def _authorize(self, authorization: bytes | None) -> None:
        if self.api_key is not None:
            self.api_key.check(authorization)

    def _route(
        self,
        method: bytes,
        path: str,
        body: bytes,
        header_length: bytes | None,
        encoding: bytes | None,
        authorization: bytes | None,
        deadline: float,
    ) -> Response | _Job:
        parts = path.rstrip("/").split("/") if path != "/" else [""]
        # ["", "v2", "models", name, ("versions", version,) action?]
        if len(parts) >= 4 and parts[1] == "v2" and parts[2] == "models":
            name = parts[3]
            rest = parts[4:]
            version = ""
            if len(rest) >= 2 and rest[0] == "versions":
                version, rest = rest[1], rest[2:]
            if not rest:
                self._allow(method, _GET, path)
                self._authorize(authorization)
                model = resolve_model(self.repository.current, name, version)
                return Response(200, orjson.dumps(model.metadata()))
            if rest == ["infer"]:
                self._allow(method, _POST, path)
                if self.metrics is None:
                    self._authorize(authorization)
                    return self._infer(name, version, body, header_length, encoding, deadline)
                return self._counted_infer(
                    name, version, body, header_length, encoding, authorization, deadline
                )
            if rest == ["ready"]:
                self._allow(method, _GET, path)
                self._authorize(authorization)
                resolve_model(self.repository.current, name, version)
                return _OK_EMPTY
        elif parts[:3] == ["", "v2", "health"] and len(parts) == 4:
            if parts[3] == "live":
                self._allow(method, _GET, path)
                return _OK_EMPTY
            if parts[3] == "ready":
                self._allow(method, _GET, path)
                if self.repository.ready:
                    return _OK_EMPTY
                reason = self.repository.last_error
                return _error(
                    400,
                    "not ready: no model loaded yet from "
                    f"{self.repository.directory.path}" + (f" ({reason})" if reason else ""),
                )
        elif parts == ["", "metrics"] and self.metrics is not None:
            self._allow(method, _GET, path)
            return Response(200, self.metrics.exposition(), CONTENT_TYPE)
        elif parts == ["", "v2"]:
            self._allow(method, _GET, path)
            self._authorize(authorization)
            return Response(
                200,
                orjson.dumps(
                    {"name": "fedscale", "version": __version__, "extensions": EXTENSIONS}
                ),
            )
        raise RequestError(
            404,
            f"unknown route {path!r}: expected /v2, /v2/health/live, /v2/health/ready or "
            "/v2/models/{name}[/versions/{version}][/ready|/infer]",
        )

    @staticmethod
    def _allow(method: bytes, allowed: tuple[bytes, ...], path: str) -> None:
        if method not in allowed:
            raise _MethodNotAllowed(method, allowed, path)

    def _counted_infer(
        self,
        name: str,
        version: str,
        body: bytes,
        header_length: bytes | None,
        encoding: bytes | None,
        authorization: bytes | None,
        deadline: float,
    ) -> Response | _Job:
        started = perf_counter()
        code = 500  # an unexpected exception: handle() answers 500
        try:
            self._authorize(authorization)
            result = self._infer(name, version, body, header_length, encoding, deadline, started)
            if isinstance(result, _Job):
                code = 0  # complete() counts it when it is answered
                return result
            code = result.status
            return result
        except RequestError as err:
            code = err.status
            raise
        finally:
            if code:
                self._count(name, code, perf_counter() - started)

    def _infer(
        self,
        name: str,
        version: str,
        body: bytes,
        header_length: bytes | None,
        encoding: bytes | None,
        deadline: float,
        started: float = 0.0,
    ) -> Response | _Job:
        model = resolve_model(self.repository.current, name, version)
        if len(body) > INLINE_BODY_BYTES or model.cost_s > INLINE_COST_S:
            return _Job(self, model, name, deadline, started, None, body, header_length, encoding)
        request = self._parse(model, body, header_length, encoding)
        limiter = self.limiter
        if limiter.try_acquire():
            guard = min(deadline, monotonic() + INLINE_GUARD_S)
            try:
                results = run_with_deadline(self.watchdog, model, request, guard, perf_counter)
            except DeadlineExceeded:
                if guard >= deadline:
                    raise
                # Slower than its average said: mark it so and finish it off the loop.
                model.cost_s = max(model.cost_s, INLINE_GUARD_S)
            else:
                return self._answer(model, request, results)
            finally:
                limiter.release()
        return _Job(self, model, name, deadline, started, request)

    def _parse(
        self, model: LoadedModel, body: bytes, header_length: bytes | None, encoding: bytes | None
    ) -> InferRequest:
        if encoding is not None:
            body = self._decode(body, encoding)
        length: int | None = None
        if header_length is not None:
            text = header_length.strip()
            if not text.isdigit():
                raise RequestError(
                    400,
                    "Inference-Header-Content-Length: expected the JSON header's length in "
                    f"bytes, got {header_length.decode('latin-1')!r}",
                )
            length = int(text)
        return parse_json_request(model, body, length, self.limits.max_batch)

    @staticmethod
    def _answer(model: LoadedModel, request: InferRequest, results: list[Any]) -> Response:
        content, json_length = json_response(model, request, results)
        if json_length is None:
            return Response(200, content)
        return Response(
            200, content, _OCTETS, b"Inference-Header-Content-Length: %d\r\n" % json_length
        )

    def _decode(self, body: bytes, encoding: bytes) -> bytes:
        name = encoding.strip().lower()
        if name in (b"", b"identity"):
            return body
        if name not in (b"gzip", b"deflate"):
            raise RequestError(
                415,
                "Content-Encoding: expected identity, gzip or deflate, got "
                f"{encoding.decode('latin-1')!r}",
            )
        limit = self.limits.max_body_bytes
        inflater = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip or a zlib header
        try:
            data = inflater.decompress(body, limit + 1)
        except zlib.error as err:
            raise RequestError(
                400, f"Content-Encoding {name.decode()}: the body does not decompress ({err})"
            ) from None
        if len(data) > limit:
            raise RequestError(
                413,
                f"request body: expected at most {limit} bytes (the server's --max-body-bytes) "
                "once decompressed, got more",
            )
        if not inflater.eof:
            raise RequestError(
                400, f"Content-Encoding {name.decode()}: the compressed body is truncated"
            )
        return data


class _MethodNotAllowed(RequestError):
    def __init__(self, method: bytes, allowed: tuple[bytes, ...], path: str):
        self.allow = b", ".join(allowed)
        super().__init__(
            405, f"method {method.decode('latin-1')} on {path!r}: expected {self.allow.decode()}"
        )


class _Abort(Exception):
    """Stop parsing this connection: a response was sent and it is closing."""


def _head(status: int, content_type: bytes, length: int, extra: bytes) -> bytes:
    return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (
        status,
        _REASONS.get(status, b"Unknown"),
        content_type,
        length,
        extra,
    )


@dataclass(slots=True)
class _Request:
    """One parsed request, kept while an earlier one on its connection is answered."""

    method: bytes
    path: str
    body: bytes
    header_length: bytes | None
    encoding: bytes | None
    authorization: bytes | None
    keep_alive: bool
    http10: bool
    deadline: float


class _Connection(asyncio.Protocol):
    """One client connection: httptools parses, :class:`HttpApp` answers.

    Answers go out in request order: while an inference runs on a worker thread
    (``busy``), reading pauses and requests already parsed wait in ``pending``.
    """

    def __init__(self, server: HttpServer):
        self.server = server
        self.app = server.app
        self.max_body = server.app.limits.max_body_bytes
        self.timeout = server.app.limits.request_timeout
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.closing = False
        self.busy = False
        self.eof = False
        self.write_paused = False
        self.pending: deque[_Request] = deque()
        self.last_active = 0.0
        self.reading_since: float | None = None  # first byte of a request not yet complete
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.header_bytes = 0
        self.body: list[bytes] = []
        self.body_size = 0
        self.header_length: bytes | None = None
        self.encoding: bytes | None = None
        self.authorization: bytes | None = None
        self.expect_continue = False

    # ------------------------------------------------------------ asyncio side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.last_active = monotonic()
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # lingering after a refusal: drop what still arrives
        self.last_active = monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as err:
            if isinstance(err.__context__, _Abort):
                return
            log.exception("HTTP connection handler failed")
            self._refuse(500, "internal error while reading the request")
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrade: expected plain HTTP/1.1 requests")
        except httptools.HttpParserError as err:
            self._refuse(400, f"malformed HTTP request: {err}")

    def eof_received(self) -> bool | None:
        """Answer a request the client stopped sending halfway; finish those in hand."""
        if self.closing:
            return True  # _refuse's answer is on its way; it closes the transport
        if self.reading_since is not None:
            self._refuse(400, "request: the client closed its side before the request was complete")
            return True
        if self.busy:
            self.eof = True  # answer what was asked, then close (see _finish)
            return True
        return None  # nothing in hand: asyncio closes the transport

    def pause_writing(self) -> None:
        # A client that sends without reading its answers waits for us to drain.
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.closing and not self.busy:
            self.transport.resume_reading()

    def _refuse(self, status: int, message: str, extra: bytes = b"") -> None:
        """Answer with an error, then close without reading the rest of the request."""
        transport = self.transport
        if transport is None or self.closing:
            return
        self.closing = True
        self.pending.clear()
        body = error_body(message)
        transport.write(_head(status, _JSON, len(body), extra + b"Connection: close\r\n") + body)
        if transport.can_write_eof():
            transport.write_eof()
        # Closing at once with unread request bytes would make the kernel send a
        # reset, which can destroy the answer before the client reads it.
        self.server.loop.call_later(_LINGER_S, transport.close)

    def timed_out(self) -> None:
        """Refuse a request still being received past its deadline (the sweeper calls this)."""
        if self.app.metrics is not None:
            self.app.metrics.rejected("rest", "timeout")
        self._refuse(
            408,
            f"request: expected it complete within {self.timeout:g} s of its first byte "
            "(the server's --request-timeout), got only part of it",
        )

    # ------------------------------------------------------------ httptools side

    def on_message_begin(self) -> None:
        self._reset()
        self.reading_since = monotonic()

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.header_bytes += len(url)
        if self.header_bytes > _MAX_HEADER_BYTES:
            self._refuse(414, f"request target: expected at most {_MAX_HEADER_BYTES} bytes")
            raise _Abort

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > _MAX_HEADER_BYTES:
            self._refuse(431, f"request headers: expected at most {_MAX_HEADER_BYTES} bytes in all")
            raise _Abort
        if len(name) < 6:
            return
        key = name.lower()
        if key == b"inference-header-content-length":
            self.header_length = value
        elif key == b"content-length":
            if value.strip().isdigit() and int(value) > self.max_body:
                self._refuse(
                    413,
                    f"request body: expected at most {self.max_body} bytes (the server's "
                    f"--max-body-bytes), got Content-Length {int(value)}",
                )
                raise _Abort
        elif key == b"content-encoding":
            self.encoding = value
        elif key == b"authorization":
            self.authorization = value
        elif key == b"expect":
            self.expect_continue = value.strip().lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        if self.expect_continue and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.max_body:  # a chunked body has no Content-Length
            self._refuse(
                413,
                f"request body: expected at most {self.max_body} bytes (the server's "
                "--max-body-bytes), got more",
            )
            raise _Abort
        self.body.append(body)

    def on_message_complete(self) -> None:
        transport = self.transport
        if transport is None or self.closing:
            raise _Abort
        started = self.reading_since
        self.reading_since = None
        parser = self.parser
        url = self.url
        query = url.find(b"?")
        path = (url if query < 0 else url[:query]).decode("latin-1")
        if "%" in path:
            path = unquote(path)
        request = _Request(
            parser.get_method(),
            path,
            self.body[0] if len(self.body) == 1 else b"".join(self.body),
            self.header_length,
            self.encoding,
            self.authorization,
            parser.should_keep_alive(),
            parser.get_http_version() == "1.0",
            (started if started is not None else monotonic()) + self.timeout,
        )
        if self.busy:
            # Reading is paused while busy, so this holds at most what one read brought.
            self.pending.append(request)
            return
        if not self._serve(request):
            raise _Abort

    # ------------------------------------------------------------ answering

    def _serve(self, request: _Request) -> bool:
        """Answer ``request`` now or start its job; False once the connection is closing."""
        result = self.app.handle(
            request.method,
            request.path,
            request.body,
            request.header_length,
            request.encoding,
            request.authorization,
            request.deadline,
        )
        if isinstance(result, Response):
            return self._send(request, result)
        self.busy = True
        if self.transport is not None:
            self.transport.pause_reading()
        self.server.spawn(self._finish(request, result))
        return True

    async def _finish(self, request: _Request, job: _Job) -> None:
        response = await self.app.complete(job)
        self.busy = False
        if not self._send(request, response):
            return
        while self.pending and not self.busy:
            if not self._serve(self.pending.popleft()):
                return
        if self.busy or self.transport is None:
            return
        if self.eof:
            self.closing = True
            self.transport.close()
        elif not self.write_paused:
            self.transport.resume_reading()

    def _send(self, request: _Request, response: Response) -> bool:
        transport = self.transport
        if transport is None or self.closing:
            return False
        extra = response.headers
        keep_alive = request.keep_alive
        if not keep_alive:
            extra += b"Connection: close\r\n"
        elif request.http10:
            extra += b"Connection: keep-alive\r\n"
        payload = response.body
        head = _head(response.status, response.content_type, len(payload), extra)
        transport.write(head if request.method == b"HEAD" else head + payload)
        self.last_active = monotonic()  # idle time counts from the last answer too
        if not keep_alive:
            self.closing = True
            self.pending.clear()
            transport.close()
            return False
        return True


class HttpServer:
    """Listen on ``host:port`` and serve :class:`HttpApp` to every connection."""

    def __init__(self, app: HttpApp, loop: asyncio.AbstractEventLoop):
        self.app = app
        self.loop = loop
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        limits = app.limits
        # Timeouts are enforced by a sweep, not a timer per request: a request is
        # answered 408 between request_timeout and request_timeout + this interval.
        self.sweep_interval = min(1.0, limits.request_timeout / 4, limits.idle_timeout / 4)

    async def start(self, host: str, port: int) -> int:
        """Bind and start accepting; return the bound port (``port`` 0: a free one)."""
        self._server = await self.loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True, backlog=1024
        )
        self._sweeper = self.loop.call_later(self.sweep_interval, self._sweep)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    def spawn(self, coroutine: Any) -> None:
        """Run a connection's job as a task the server keeps (and cancels on close)."""
        task = self.loop.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _sweep(self) -> None:
        now = monotonic()
        limits = self.app.limits
        started_before = now - limits.request_timeout
        idle_before = now - limits.idle_timeout
        for connection in list(self.connections):
            if connection.transport is None or connection.closing or connection.busy:
                continue
            since = connection.reading_since
            if since is not None:
                if since < started_before:
                    connection.timed_out()
            elif connection.last_active < idle_before and not connection.pending:
                connection.transport.close()
        self._sweeper = self.loop.call_later(self.sweep_interval, self._sweep)

    async def close(self) -> None:
        """Stop accepting, close every connection, and wait for the listener to go."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
