"""One serving process: REST and gRPC endpoints over one hot-reloaded model.

:class:`ModelServer` ties the pieces together: a :class:`ModelRepository` over
the model directory, a watcher thread that polls it (and, with ``model_url``,
first pulls from the publishing server), the asyncio REST server in the
calling thread and grpcio's server on its own threads. :meth:`ModelServer.run`
is what ``fedscale serve`` calls: it blocks until SIGTERM or SIGINT, then stops
both servers and returns. :meth:`ModelServer.start` runs the same server on a
background thread, for embedding and tests.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedscale.exceptions import ConfigError, LaunchError
from fedscale.processes import join_address

from .hardening import ApiKey, ConcurrencyLimiter, Watchdog
from .http_server import HttpApp, HttpServer, Limits
from .metrics import ServingMetrics
from .pull import ModelPuller
from .repository import ModelRepository, SessionSettings

__all__ = ["ModelServer", "ServeOptions"]

log = logging.getLogger("fedscale.serving")


@dataclass(frozen=True)
class ServeOptions:
    """What ``fedscale serve`` was asked for; see ``docs/serving.md``."""

    model_dir: Path
    model_url: str | None = None
    host: str = "127.0.0.1"
    http_port: int = 8080
    grpc_port: int = 8081  # 0: no gRPC server
    session: SessionSettings = field(default_factory=SessionSettings)
    limits: Limits = field(default_factory=Limits)
    poll_interval: float = 0.5
    api_key: ApiKey | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("http_port", "grpc_port"):
            port = getattr(self, name)
            if not isinstance(port, int) or not 0 <= port <= 65535:
                raise ConfigError(
                    f"--{name.replace('_', '-')}: expected a port in 0-65535, got {port!r}"
                )
        if not math.isfinite(self.poll_interval) or not 0.01 <= self.poll_interval <= 3600:
            raise ConfigError(
                f"--poll-interval: expected seconds in [0.01, 3600], got {self.poll_interval!r}"
            )
        if self.limits.max_batch < 0:
            raise ConfigError(
                f"--max-batch: expected a whole number >= 0 (0: no limit), "
                f"got {self.limits.max_batch}"
            )
        if self.limits.max_body_bytes < 1024:
            raise ConfigError(
                f"--max-body-bytes: expected at least 1024, got {self.limits.max_body_bytes}"
            )
        for name, low in (("request_timeout", 0.01), ("idle_timeout", 0.01)):
            value = getattr(self.limits, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < low:
                raise ConfigError(
                    f"--{name.replace('_', '-')}: expected seconds >= {low:g}, got {value!r}"
                )
        for name, low in (("max_concurrency", 1), ("max_queue", 0)):
            value = getattr(self.limits, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 4096:
                raise ConfigError(
                    f"--{name.replace('_', '-')}: expected a whole number in [{low}, 4096], "
                    f"got {value!r}"
                )


class ModelServer:
    """Serve the model of one model directory over REST and gRPC until stopped."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.metrics = ServingMetrics()
        self.repository = ModelRepository(options.model_dir, options.session, self.metrics)
        self.puller = (
            ModelPuller(options.model_url, options.model_dir, base_delay=options.poll_interval)
            if options.model_url
            else None
        )
        limits = options.limits
        # One limiter for REST and gRPC: --max-concurrency bounds the process, not a port.
        self.limiter = ConcurrencyLimiter(limits.max_concurrency, limits.max_queue)
        self.metrics.inflight.set_function(lambda: self.limiter.active)
        self.metrics.queued.set_function(lambda: self.limiter.waiting)
        self.http_port = 0
        self.grpc_port = 0
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    # ------------------------------------------------------------ public

    def run(self, on_ready: Callable[[ModelServer], None] | None = None) -> None:
        """Serve in this (main) thread until SIGTERM or SIGINT; then stop cleanly."""
        asyncio.run(self._main(on_ready, signals=True))

    def start(self, timeout: float = 30.0) -> None:
        """Serve on a background thread; return once both ports are bound."""
        self._thread = threading.Thread(
            target=self._run_in_thread, name="fedscale-serve", daemon=True
        )
        self._thread.start()
        if not self._started.wait(timeout):
            raise LaunchError(f"fedscale serve: expected to start within {timeout:g} s")
        if self._error is not None:
            raise self._error

    def _run_in_thread(self) -> None:
        try:
            asyncio.run(self._main(None, signals=False))
        except BaseException as err:  # start() re-raises it in the caller's thread
            if self._error is None:
                self._error = err
                log.exception("fedscale serve stopped with an error")
            self._started.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop a server started with :meth:`start` (or from another thread)."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:  # the loop closed meanwhile
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    def ready_line(self) -> str:
        """Return the line ``fedscale serve`` prints once it listens (parents wait for it)."""
        host = self.options.host
        grpc = join_address(host, self.grpc_port) if self.grpc_port else "off"
        return (
            f"fedscale serve listening http={join_address(host, self.http_port)} "
            f"grpc={grpc} model-dir={self.repository.directory.path}"
        )

    # ------------------------------------------------------------ internals

    async def _main(self, on_ready: Callable[[ModelServer], None] | None, signals: bool) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stopping = asyncio.Event()
        options = self.options
        http: HttpServer | None = None
        grpc_server: Any = None
        watchdog = Watchdog()
        app = HttpApp(
            self.repository, options.limits, self.metrics, options.api_key, self.limiter, watchdog
        )
        try:
            self.repository.poll()  # serve at once what is already there
            http = HttpServer(app, loop)
            try:
                self.http_port = await http.start(options.host, options.http_port)
            except OSError as err:
                raise LaunchError(
                    f"REST: could not listen on "
                    f"{join_address(options.host, options.http_port)}: {err}"
                ) from err
            if options.grpc_port:
                # Imported only when asked for: grpcio and the protobuf messages.
                from .grpc_server import GrpcServer, InferenceServicer

                servicer = InferenceServicer(
                    self.repository, options.limits, self.limiter, watchdog, self.metrics
                )
                grpc_server = GrpcServer(servicer, api_key=options.api_key)
                self.grpc_port = grpc_server.start(options.host, options.grpc_port)
            self._watcher = threading.Thread(
                target=self._watch, name="fedscale-model-watcher", daemon=True
            )
            self._watcher.start()
            if signals:
                stopping = self._stopping
                for sig in (signal.SIGTERM, signal.SIGINT):
                    try:
                        loop.add_signal_handler(sig, stopping.set)
                    except NotImplementedError:  # no loop signal handlers (Windows)
                        signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stopping.set))
        except BaseException as err:
            self._error = err
            self._started.set()
            if http is not None:
                await http.close()
            await loop.run_in_executor(None, app.close)
            watchdog.close()
            raise
        self._started.set()
        if on_ready is not None:
            on_ready(self)
        try:
            await self._stopping.wait()
        finally:
            log.info("stopping")
            self._stop.set()
            await http.close()
            watchdog.terminate_all()  # inferences in flight end now, not at their deadline
            if grpc_server is not None:
                await loop.run_in_executor(None, grpc_server.stop)
                watchdog.terminate_all()  # and gRPC calls that started meanwhile
            await loop.run_in_executor(None, app.close)
            watchdog.close()
            if self._watcher is not None:
                await loop.run_in_executor(None, self._watcher.join, 10.0)
            if signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    try:
                        loop.remove_signal_handler(sig)
                    except NotImplementedError:
                        signal.signal(sig, signal.SIG_DFL)

    def _watch(self) -> None:
        interval = self.options.poll_interval
        while not self._stop.is_set():
            try:
                if self.puller is not None:
                    self.puller.poll()
                self.repository.poll()
            except Exception:  # keep watching: the next poll may succeed
                log.exception("model watcher: unexpected error")
            self._stop.wait(interval)
