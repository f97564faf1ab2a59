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
an :class:`asyncio.Protocol` fed to httptools' C parser; the whole request is
handled inline in the event loop (validation, onnxruntime, the response) with
no task, future or thread handoff, and written back with one ``write``.
Keep-alive and pipelining work; a body over the limit is refused with 413 from
its ``Content-Length`` alone, before it is read; headers are limited too, and
idle connections are closed after a while.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from dataclasses import dataclass
from time import perf_counter
from urllib.parse import unquote

import httptools
import orjson

from fedscale import __version__

from .metrics import CONTENT_TYPE, UNKNOWN_MODEL, ServingMetrics
from .protocol import (
    RequestError,
    error_body,
    json_response,
    parse_json_request,
    resolve_model,
    run_inference,
)
from .repository import ModelRepository

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
}
_MAX_HEADER_BYTES = 64 * 1024
_IDLE_TIMEOUT_S = 120.0
_LINGER_S = 2.0  # after refusing a request, read (and drop) what the client still sends


@dataclass(frozen=True)
class Limits:
    """What one request may hold: ``max_batch`` 0 means no batch limit."""

    max_batch: int = 1024
    max_body_bytes: int = 32 * 1024 * 1024


@dataclass(slots=True)
class Response:
    """Status, body, content type, and extra header lines each ending in CRLF."""

    status: int
    body: bytes = b""
    content_type: bytes = _JSON
    headers: bytes = b""


def _error(status: int, message: str, headers: bytes = b"") -> Response:
    return Response(status, error_body(message), _JSON, headers)


_OK_EMPTY = Response(200)
_GET = (b"GET", b"HEAD")
_POST = (b"POST",)


class HttpApp:
    """Answer one parsed HTTP request; knows nothing of sockets."""

    def __init__(
        self,
        repository: ModelRepository,
        limits: Limits,
        metrics: ServingMetrics | None = None,
    ):
        self.repository = repository
        self.limits = limits
        self.metrics = metrics

    def handle(
        self,
        method: bytes,
        path: str,
        body: bytes,
        header_length: bytes | None,
        encoding: bytes | None,
    ) -> Response:
        """Route the request and turn every refusal into a JSON error response."""
        try:
            return self._route(method, path, body, header_length, encoding)
        except _MethodNotAllowed as err:
            return _error(err.status, err.message, b"Allow: %s\r\n" % err.allow)
        except RequestError as err:
            return _error(err.status, err.message)
        except Exception as err:  # a bug or a failing model: answer, log, keep serving
            log.exception("request %s %s failed", method.decode("latin-1"), path)
            return _error(500, f"internal error: {type(err).__name__}: {err}")

    def _route(
        self,
        method: bytes,
        path: str,
        body: bytes,
        header_length: bytes | None,
        encoding: bytes | None,
    ) -> Response:
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
                model = resolve_model(self.repository.current, name, version)
                return Response(200, orjson.dumps(model.metadata()))
            if rest == ["infer"]:
                self._allow(method, _POST, path)
                if self.metrics is None:
                    return self._infer(name, version, body, header_length, encoding)
                return self._counted_infer(name, version, body, header_length, encoding)
            if rest == ["ready"]:
                self._allow(method, _GET, path)
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
    ) -> Response:
        metrics = self.metrics
        assert metrics is not None
        started = perf_counter()
        code = 500  # an unexpected exception: handle() answers 500
        try:
            response = self._infer(name, version, body, header_length, encoding)
            code = response.status
            return response
        except RequestError as err:
            code = err.status
            raise
        finally:
            current = self.repository.current
            model = name if current is not None and name == current.name else UNKNOWN_MODEL
            metrics.request(model, code, perf_counter() - started)

    def _infer(
        self,
        name: str,
        version: str,
        body: bytes,
        header_length: bytes | None,
        encoding: bytes | None,
    ) -> Response:
        model = resolve_model(self.repository.current, name, version)
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
        request = parse_json_request(model, body, length, self.limits.max_batch)
        results = run_inference(model, request)
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


class _Connection(asyncio.Protocol):
    """One client connection: httptools parses, :class:`HttpApp` answers."""

    def __init__(self, server: HttpServer):
        self.server = server
        self.app = server.app
        self.max_body = server.app.limits.max_body_bytes
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.closing = False
        self.last_active = 0.0
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.header_bytes = 0
        self.body: list[bytes] = []
        self.body_size = 0
        self.header_length: bytes | None = None
        self.encoding: bytes | None = None
        self.expect_continue = False

    # ------------------------------------------------------------ asyncio side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.last_active = self.server.loop.time()
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # lingering after a refusal: drop what still arrives
        self.last_active = self.server.loop.time()
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

    def pause_writing(self) -> None:
        # A client that sends without reading its answers waits for us to drain.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def _refuse(self, status: int, message: str) -> None:
        """Answer with an error, then close without reading the rest of the request."""
        transport = self.transport
        if transport is None or self.closing:
            return
        self.closing = True
        body = error_body(message)
        transport.write(_head(status, _JSON, len(body), b"Connection: close\r\n") + body)
        if transport.can_write_eof():
            transport.write_eof()
        # Closing at once with unread request bytes would make the kernel send a
        # reset, which can destroy the answer before the client reads it.
        self.server.loop.call_later(_LINGER_S, transport.close)

    # ------------------------------------------------------------ httptools side

    def on_message_begin(self) -> None:
        self._reset()

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
        parser = self.parser
        method = parser.get_method()
        url = self.url
        query = url.find(b"?")
        path = (url if query < 0 else url[:query]).decode("latin-1")
        if "%" in path:
            path = unquote(path)
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        response = self.app.handle(method, path, body, self.header_length, self.encoding)
        keep_alive = parser.should_keep_alive()
        extra = response.headers
        if not keep_alive:
            extra += b"Connection: close\r\n"
        elif parser.get_http_version() == "1.0":
            extra += b"Connection: keep-alive\r\n"
        payload = response.body
        head = _head(response.status, response.content_type, len(payload), extra)
        transport.write(head if method == b"HEAD" else head + payload)
        if not keep_alive:
            self.closing = True
            transport.close()
            raise _Abort


class HttpServer:
    """Listen on ``host:port`` and serve :class:`HttpApp` to every connection."""

    def __init__(self, app: HttpApp, loop: asyncio.AbstractEventLoop):
        self.app = app
        self.loop = loop
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int) -> int:
        """Bind and start accepting; return the bound port (``port`` 0: a free one)."""
        self._server = await self.loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True, backlog=1024
        )
        self._sweeper = self.loop.call_later(_IDLE_TIMEOUT_S / 4, self._sweep)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    def _sweep(self) -> None:
        deadline = self.loop.time() - _IDLE_TIMEOUT_S
        for connection in [c for c in self.connections if c.last_active < deadline]:
            if connection.transport is not None:
                connection.transport.close()
        self._sweeper = self.loop.call_later(_IDLE_TIMEOUT_S / 4, self._sweep)

    async def close(self) -> None:
        """Stop accepting, close every connection, and wait for the listener to go."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
