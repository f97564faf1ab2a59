"""Publish one model directory over HTTP, read-only, for devices that only serve.

``fedscale server --models-port P`` runs one beside the SuperLink; a serve-only
device (``fedscale serve --model-url URL``) polls ``GET URL/manifest.json`` and
fetches the file it names with ``GET URL/model-0007.onnx``, checking its sha256.

Exactly two kinds of path exist: ``/manifest.json`` and ``/model-NNNN.onnx``
(as :mod:`fedscale.modelstore` names model files). Anything else, including
``/`` (no listing), dotted, encoded or nested paths and files that are not
regular files in the directory itself (a symbolic link), is 404; methods other
than GET and HEAD are 405. Responses carry ``Content-Length`` and an ``ETag``
(the sha256 of the bytes), and ``If-None-Match`` answers 304, so a poller that
sends back its ETag costs one small response per poll.

Standard library only: no torch, onnxruntime or flwr.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from .exceptions import ConfigError
from .modelstore import MANIFEST_NAME

__all__ = ["ModelPublisher"]

log = logging.getLogger(__name__)

_MODEL_PATH = re.compile(r"^/model-[0-9]{4,}\.onnx$")
_CHUNK = 1 << 20


class ModelPublisher:
    """A read-only HTTP server for one model directory; start it, then stop it.

    ``port`` 0 lets the system choose; :attr:`port` tells which it chose.
    """

    def __init__(self, directory: str | Path, *, host: str = "127.0.0.1", port: int = 0):
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < 65536:
            raise ConfigError(f"models port: expected 0-65535 (0: any free port), got {port!r}")
        self.directory = Path(directory).absolute()
        self.host = host
        self._requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port the server listens on (after :meth:`start`)."""
        if self._server is None:
            raise ConfigError("model publisher: expected a started publisher, got a stopped one")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The base URL devices pull from (``URL/manifest.json``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> ModelPublisher:
        """Bind the port and serve in a background thread."""
        if self._server is not None:
            return self
        server_class = _Server6 if ":" in self.host else _Server
        try:
            server = server_class((self.host, self._requested_port), _Handler)
        except OSError as err:
            raise ConfigError(
                f"models port: expected to listen on {self.host}:{self._requested_port}, "
                f"but could not: {err}"
            ) from err
        server.directory = self.directory
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"model-publisher-{self.port}",
            daemon=True,
        )
        self._thread.start()
        log.info("publishing %s at %s/%s", self.directory, self.url, MANIFEST_NAME)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; requests in flight finish first."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> ModelPublisher:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Replies are small and the handler is short: don't let a slow client
    # pile up threads forever (see _Handler.timeout too).
    request_queue_size = 64
    directory: Path

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]):
        super().__init__(address, handler)
        # (path, inode, size, mtime) -> sha256: a model file is hashed once, not per request.
        self.etags: dict[tuple[str, int, int, int], str] = {}
        self.etags_lock = threading.Lock()


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds an idle keep-alive connection may hold a thread
    server_version = "fedscale-models"
    sys_version = ""

    def do_GET(self) -> None:
        """Send the manifest or a model file."""
        self._serve(body=True)

    def do_HEAD(self) -> None:
        """Send the headers a GET would send."""
        self._serve(body=False)

    def _not_allowed(self) -> None:
        self._error(
            HTTPStatus.METHOD_NOT_ALLOWED,
            f"method {self.command}: expected GET or HEAD (the model directory is read-only)",
            extra={"Allow": "GET, HEAD", "Connection": "close"},
        )
        # A request body we did not read must not be taken for the next request.
        self.close_connection = True

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _serve(self, body: bool) -> None:
        path = urlsplit(self.path).path
        if path == f"/{MANIFEST_NAME}":
            content_type = "application/json"
        elif _MODEL_PATH.match(path):
            content_type = "application/octet-stream"
        else:
            self._error(
                HTTPStatus.NOT_FOUND,
                f"not found: {path[:200]!r}; expected /{MANIFEST_NAME} or /model-NNNN.onnx",
            )
            return
        handle = self._open(path[1:])
        if handle is None:
            what = "no model published yet" if path == f"/{MANIFEST_NAME}" else "no such model"
            self._error(HTTPStatus.NOT_FOUND, f"not found: {path}: {what}")
            return
        with handle:
            info = os.fstat(handle.fileno())
            if path == f"/{MANIFEST_NAME}":
                # Small and replaced often: read it whole, so body and ETag agree.
                data: bytes | None = handle.read()
                etag = _quote(hashlib.sha256(data or b"").hexdigest())
                size = len(data or b"")
            else:
                data = None
                etag = _quote(self._model_etag(path, handle, info))
                size = info.st_size
            if _matches(self.headers.get("If-None-Match"), etag):
                self.send_response(HTTPStatus.NOT_MODIFIED)
                self.send_header("ETag", etag)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(size))
            self.send_header("ETag", etag)
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            if not body:
                return
            if data is not None:
                self.wfile.write(data)
            else:
                handle.seek(0)
                shutil.copyfileobj(handle, self.wfile, _CHUNK)

    def _open(self, name: str) -> BinaryIO | None:
        # Only a regular file directly in the directory: O_NOFOLLOW refuses a
        # symbolic link planted under a model's name.
        try:
            fd = os.open(self.server.directory / name, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return os.fdopen(fd, "rb")

    def _model_etag(self, path: str, handle: BinaryIO, info: os.stat_result) -> str:
        # Publishing renames a new file into place, so the same name with the
        # same inode, size and mtime is the same bytes.
        key = (path, info.st_ino, info.st_size, info.st_mtime_ns)
        with self.server.etags_lock:
            known = self.server.etags.get(key)
        if known is not None:
            return known
        digest = hashlib.sha256()
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
        value = digest.hexdigest()
        with self.server.etags_lock:
            if len(self.server.etags) > 256:  # files come and go with keep-K
                self.server.etags.clear()
            self.server.etags[key] = value
        return value

    def _error(self, status: HTTPStatus, message: str, extra: dict[str, str] | None = None) -> None:
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Log requests at debug level instead of writing every one to stderr."""
        log.debug("%s %s", self.address_string(), format % args)


def _quote(digest: str) -> str:
    return f'"{digest}"'


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or etag in tags
