"""``fedscale serve --model-url``: pull models a server publishes over HTTP.

A server publishes its model directory as plain files: ``URL/manifest.json``
and ``URL/model-0007.onnx``. Each :meth:`ModelPuller.poll` reads the remote
manifest; when it names a model the local directory does not hold yet, the
puller downloads it (at most the manifest's ``size`` bytes), checks its size and
sha256 against the manifest, and publishes it into the local model directory
with :meth:`fedscale.modelstore.ModelDirectory.publish`, whose atomic manifest
rename the server's hot reload then picks up, with all of its own checks.

A failed pull (server down, unreadable manifest, truncated download, hash
mismatch) is logged and retried on a later poll, waiting longer after each
failure in a row (up to 30 s); the local directory, and so the model being
served, is left as it was. Only the standard library's urllib is used: http and
https, no proxies, no other schemes.
"""

from __future__ import annotations

import http.client
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from fedscale.exceptions import ConfigError, ModelStoreError
from fedscale.modelstore import MANIFEST_NAME, Manifest, ModelDirectory, verify_model_bytes

__all__ = ["ModelPuller", "normalize_url"]

log = logging.getLogger("fedscale.serving")

_MAX_MANIFEST_BYTES = 1024 * 1024
_MAX_BACKOFF_S = 30.0


def normalize_url(url: str) -> str:
    """Return the published directory's URL, ending in ``/``; refuse non-HTTP URLs."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"--model-url: expected an http:// or https:// URL of a published model "
            f"directory, got {url!r}"
        )
    path = parts.path
    if path.endswith("/" + MANIFEST_NAME):
        path = path[: -len(MANIFEST_NAME)]
    if not path.endswith("/"):
        path += "/"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _opener() -> urllib.request.OpenerDirector:
    # Only HTTP(S) and redirects between them: no file://, ftp:// or proxies.
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


class ModelPuller:
    """Copy the model a remote model directory names into a local one."""

    def __init__(
        self,
        url: str,
        directory: str | Path | ModelDirectory,
        *,
        timeout: float = 10.0,
        keep: int = 5,
        base_delay: float = 0.5,
    ):
        self.url = normalize_url(url)
        self.directory = (
            directory if isinstance(directory, ModelDirectory) else ModelDirectory(directory)
        )
        self.timeout = timeout
        self.keep = keep
        self.base_delay = base_delay
        self.last_error: str | None = None
        self.failures = 0
        self._not_before = 0.0
        self._etag: str | None = None
        self._opener = _opener()

    def poll(self) -> bool:
        """Pull the remote's current model if it is new; return whether one was published."""
        now = time.monotonic()
        if now < self._not_before:
            return False
        try:
            published = self._pull()
        except (ModelStoreError, OSError, http.client.HTTPException, ValueError, TypeError) as err:
            self.failures += 1
            delay = min(self.base_delay * 2 ** (self.failures - 1), _MAX_BACKOFF_S)
            self._not_before = now + delay
            reason = " ".join(str(err).split()) or type(err).__name__
            if reason != self.last_error:
                log.warning(
                    "could not pull a model from %s: %s; retrying in %.1f s and after",
                    self.url,
                    reason,
                    delay,
                )
            self.last_error = reason
            return False
        if self.failures or self.last_error:
            log.info("pulling from %s works again", self.url)
        self.failures = 0
        self.last_error = None
        return published

    def _get(
        self, name: str, limit: int, etag: str | None = None
    ) -> tuple[bytes | None, str | None]:
        """GET ``name`` (at most ``limit`` bytes); ``None`` when the ETag still matches."""
        url = urllib.parse.urljoin(self.url, name)
        headers = {"Cache-Control": "no-cache"}
        if etag is not None:
            headers["If-None-Match"] = etag
        request = urllib.request.Request(url, headers=headers)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                declared = response.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    raise ModelStoreError(
                        f"{url}: expected at most {limit} bytes, the server announces {declared}"
                    )
                data: bytes = response.read(limit + 1)
                new_etag = response.headers.get("ETag")
        except urllib.error.HTTPError as err:
            if err.code == 304 and etag is not None:
                return None, etag
            raise ModelStoreError(f"{url}: expected 200 OK, got HTTP {err.code}") from None
        except urllib.error.URLError as err:
            raise ModelStoreError(f"{url}: unreachable ({err.reason})") from None
        if len(data) > limit:
            raise ModelStoreError(f"{url}: expected at most {limit} bytes, got more")
        return data, new_etag

    def _pull(self) -> bool:
        # A publisher that sends ETags (fedscale's does) answers an unchanged
        # manifest with an empty 304; the ETag is kept only once handled.
        data, etag = self._get(MANIFEST_NAME, _MAX_MANIFEST_BYTES, self._etag)
        if data is None:
            return False
        manifest = Manifest.loads(data, where=self.url + MANIFEST_NAME)
        if self._holds(manifest):
            self._etag = etag
            return False
        model, _ = self._get(manifest.file, manifest.size)
        assert model is not None  # no If-None-Match was sent
        verify_model_bytes(model, manifest, where=self.url + manifest.file)
        self.directory.publish(
            model,
            server_round=manifest.round,
            opset=manifest.opset,
            inputs=manifest.inputs,
            outputs=manifest.outputs,
            metrics=manifest.metrics,
            name=manifest.name,
            keep=self.keep,
        )
        self._etag = etag
        log.info(
            "pulled model %r round %d from %s into %s",
            manifest.name,
            manifest.round,
            self.url,
            self.directory.path,
        )
        return True

    def _holds(self, manifest: Manifest) -> bool:
        try:
            local = self.directory.read_manifest()
        except ModelStoreError:
            return False
        return local.sha256 == manifest.sha256 and local.round == manifest.round
