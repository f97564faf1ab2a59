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
) -> None:
    """Serve a model directory's newest model over KServe v2 REST and gRPC (onnxruntime)."""
    from .main import _errors

    _setup_logging()
    with _errors():
        from fedscale.exceptions import ConfigError
        from fedscale.processes import is_loopback
        from fedscale.serving import Limits, ModelServer, ServeOptions, SessionSettings

        if model_dir is None and model_url is None:
            raise ConfigError("serve: expected --model-dir DIR, --model-url URL, or both")
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
                limits=Limits(max_batch=max_batch, max_body_bytes=max_body_bytes),
                poll_interval=poll_interval,
            )
            if not is_loopback(host):
                logging.getLogger("fedscale.serving").warning(
                    "listening on %s: plaintext HTTP and gRPC, reachable from other machines",
                    host,
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
