"""``fedscale serve``: the Open Inference Protocol server of a model directory.

Imports nothing heavy at module import: the command imports
:mod:`fedscale.serving` (onnxruntime, numpy, the HTTP and gRPC stack) when it
runs, and never torch or flwr, so it runs on a serve-only install.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register", "serve"]


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the ``fedscale`` command."""
    app.command("serve")(serve)


def serve(
    model_dir: Annotated[
        Path | None,
        typer.Option(
            help="Model directory to serve (manifest.json + model-*.onnx); with --model-url, "
            "where pulled models land (default: a temporary directory)."
        ),
    ] = None,
    model_url: Annotated[
        str | None,
        typer.Option(help="Pull new models from a server publishing a model directory (HTTP)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="REST port (0: any free port).")] = 8080,
    grpc_port: Annotated[int, typer.Option(help="gRPC port (0: no gRPC server).")] = 8081,
    intra_op_threads: Annotated[
        int, typer.Option(help="onnxruntime threads inside one operator (0: all cores).")
    ] = 1,
    inter_op_threads: Annotated[
        int,
        typer.Option(help="onnxruntime threads across operators; above 1 runs them in parallel."),
    ] = 1,
    max_batch: Annotated[
        int, typer.Option(help="Largest batch one request may send (0: no limit).")
    ] = 1024,
    max_body_bytes: Annotated[
        int, typer.Option(help="Largest request body (and gRPC message) in bytes.")
    ] = 32 * 1024 * 1024,
    poll_interval: Annotated[
        float, typer.Option(help="Seconds between checks for a new model (and pulls).")
    ] = 0.5,
    request_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds from a request's first byte to its answer: receiving it (else 408), "
            "waiting for a slot (else 503), inference (else 504); gRPC: the client's deadline "
            "if earlier."
        ),
    ] = 30.0,
    idle_timeout: Annotated[
        float, typer.Option(help="Seconds an idle keep-alive HTTP connection stays open.")
    ] = 60.0,
    max_concurrency: Annotated[
        int | None,
        typer.Option(
            help="Inferences running at once, REST and gRPC together "
            "(default: 4 per core, 4 to 64).",
            show_default=False,
        ),
    ] = None,
    max_queue: Annotated[
        int | None,
        typer.Option(
            help="Requests that may wait for a slot; beyond, 503 with Retry-After "
            "(gRPC RESOURCE_EXHAUSTED) at once (default: 4 per slot, at least 64).",
            show_default=False,
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            help="Require 'Authorization: Bearer <key>' for inference and metadata; the key is "
            "this file's content (or $FEDSCALE_SERVE_API_KEY). Health and /metrics stay open."
        ),
    ] = None,
) -> None:
    """Serve a model directory's newest model over KServe v2 REST and gRPC (onnxruntime)."""
    from .main import _errors

    _setup_logging()
    with _errors():
        from fedscale.exceptions import ConfigError
        from fedscale.processes import is_loopback
        from fedscale.serving import Limits, ModelServer, ServeOptions, SessionSettings
        from fedscale.serving.hardening import (
            ApiKey,
            default_max_concurrency,
            default_max_queue,
        )

        if model_dir is None and model_url is None:
            raise ConfigError("serve: expected --model-dir DIR, --model-url URL, or both")
        concurrency = default_max_concurrency() if max_concurrency is None else max_concurrency
        temporary = None
        if model_dir is None:
            temporary = Path(tempfile.mkdtemp(prefix="fedscale-serve-"))
            model_dir = temporary
        try:
            options = ServeOptions(
                model_dir=model_dir.absolute(),
                model_url=model_url,
                host=host,
                http_port=http_port,
                grpc_port=grpc_port,
                session=SessionSettings(
                    intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads
                ),
                limits=Limits(
                    max_batch=max_batch,
                    max_body_bytes=max_body_bytes,
                    request_timeout=request_timeout,
                    idle_timeout=idle_timeout,
                    max_concurrency=concurrency,
                    max_queue=default_max_queue(concurrency) if max_queue is None else max_queue,
                ),
                poll_interval=poll_interval,
                api_key=ApiKey.load(api_key_file),
            )
            logger = logging.getLogger("fedscale.serving")
            if not is_loopback(host):
                logger.warning(
                    "listening on %s: plaintext HTTP and gRPC, reachable from other machines%s",
                    host,
                    "" if options.api_key else " and without an API key (--api-key-file)",
                )
            if options.api_key is not None:
                logger.info(
                    "API key from %s required (health and /metrics open)", options.api_key.source
                )
            ModelServer(options).run(on_ready=lambda server: print(server.ready_line(), flush=True))
        finally:
            if temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("fedscale")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
