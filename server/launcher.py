"""``fedscale server``: a Flower SuperLink running fedscale's ServerApp.

Starts ``flower-superlink`` (its Fleet and Control APIs share one HTTP port),
submits the run with ``flwr run`` against it, follows ``metrics.jsonl`` to report
each round, and stops every process it started, by PID, when the run ends or
fails. The SuperLink runs with ``--disable-runtime-dependency-installation``:
the SuperLink and every SuperNode use the fedscale installed beside them.

With ``models_port`` it also publishes the run's model directory over HTTP
(:class:`fedscale.model_publisher.ModelPublisher`), on the SuperLink's host,
for devices that only serve; it stops with the rest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedscale.exceptions import ConfigError, LaunchError
from fedscale.flower_app import write_app_dir
from fedscale.model_publisher import ModelPublisher
from fedscale.processes import (
    flower_executable,
    is_loopback,
    join_address,
    start,
    stop,
    wait_for_port,
)
from fedscale.runs import RunDirectory
from fedscale.settings import RunSettings

__all__ = ["ServerOptions", "flwr_home_config", "serve_federation"]

log = logging.getLogger(__name__)

CONNECTION_NAME = "fedscale"
RoundCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class ServerOptions:
    """Where the SuperLink listens and how long to wait for things."""

    host: str = "127.0.0.1"
    port: int = 8000
    insecure: bool = False
    startup_timeout: float = 30.0
    models_port: int = 0
    """Publish the run's model directory over HTTP on this port; 0: don't."""

    def __post_init__(self) -> None:
        if not is_loopback(self.host) and not self.insecure:
            raise ConfigError(
                f"host: expected a loopback address for a plaintext server, got "
                f"{self.host!r}; pass --insecure to serve other machines without TLS"
            )
        if not 0 < self.port < 65536:
            raise ConfigError(f"port: expected 1-65535, got {self.port}")
        if not 0 <= self.models_port < 65536:
            raise ConfigError(
                f"models port: expected 1-65535, or 0 for none, got {self.models_port}"
            )
        if self.models_port == self.port:
            raise ConfigError(
                f"models port: expected a port other than the SuperLink's ({self.port}), "
                f"got {self.models_port}"
            )

    @property
    def connect_host(self) -> str:
        """The address local clients (``flwr run``) use to reach the SuperLink."""
        if self.host in ("0.0.0.0", ""):
            return "127.0.0.1"
        return "::1" if self.host == "::" else self.host


def flwr_home_config(address: str) -> str:
    """Return the ``$FLWR_HOME/config.toml`` naming our SuperLink as a connection."""
    return (
        "[superlink]\n"
        f'default = "{CONNECTION_NAME}"\n\n'
        f"[superlink.{CONNECTION_NAME}]\n"
        f'address = "{address}"\n'
        "insecure = true\n"
    )


def superlink_argv(port: int, *, host: str | None = None) -> list[str]:
    """Return the ``flower-superlink`` command line fedscale runs: plaintext, no installs.

    Runtime dependency installation stays off: the code comes from the installed
    fedscale, and installing an app's dependencies per run would pull CUDA torch.
    """
    argv = [
        flower_executable("flower-superlink"),
        "--insecure",
        "--disable-runtime-dependency-installation",
    ]
    if host is not None:
        argv += ["--host", host]
    return [*argv, "--port", str(port)]


def serve_federation(
    settings: RunSettings,
    options: ServerOptions,
    *,
    on_round: RoundCallback | None = None,
) -> RunDirectory:
    """Run one federation on a fresh SuperLink and return its run folder.

    ``settings.out`` must be set (an absolute path): the ServerApp runs in a
    process the SuperLink spawns and writes there.
    """
    if not settings.out or not Path(settings.out).is_absolute():
        raise ConfigError(f"out: expected an absolute run folder, got {settings.out!r}")
    run_dir = RunDirectory(settings.out)
    if run_dir.metrics_path.exists():
        raise ConfigError(
            f"run folder {run_dir.path}: expected a new folder, but it already holds a run"
        )
    logs = run_dir.path / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="fedscale-server-"))
    env = {**os.environ, "FLWR_HOME": str(scratch / "flwr-home")}
    (scratch / "flwr-home").mkdir()
    address = join_address(options.connect_host, options.port)
    (scratch / "flwr-home" / "config.toml").write_text(flwr_home_config(address))
    app_dir = write_app_dir(scratch / "app", settings.to_run_config())

    processes: list[subprocess.Popen[bytes]] = []
    publisher = None
    try:
        if options.models_port:
            # First, so that a taken port fails before any process starts.
            publisher = ModelPublisher(
                run_dir.models, host=options.host, port=options.models_port
            ).start()
        superlink_log = logs / "superlink.log"
        superlink = start(
            superlink_argv(options.port, host=options.host),
            log_file=superlink_log,
            env=env,
            # One process group with this command: stopping it stops them all.
            new_session=False,
        )
        processes.append(superlink)
        wait_for_port(
            options.connect_host,
            options.port,
            timeout=options.startup_timeout,
            process=superlink,
            what="flower-superlink",
            log_file=superlink_log,
        )
        log.info(
            "SuperLink listening on %s:%d (pid %d)",
            options.host,
            options.port,
            superlink.pid,
        )
        serverapp_log = logs / "serverapp.log"
        submit = start(
            [
                flower_executable("flwr"),
                "run",
                str(app_dir),
                CONNECTION_NAME,
                "--stream",
            ],
            log_file=serverapp_log,
            env=env,
            new_session=False,
        )
        processes.append(submit)
        _follow(run_dir, submit, on_round)
        if submit.returncode != 0:
            raise LaunchError(f"flwr run exited with code {submit.returncode}; see {serverapp_log}")
        rounds = _read_new(run_dir, 0)
        if len(rounds) != settings.num_rounds + 1:
            raise LaunchError(
                f"expected {settings.num_rounds} rounds in {run_dir.metrics_path}, the "
                f"run stopped after {max(len(rounds) - 1, 0)}; see {serverapp_log}"
            )
        return run_dir
    finally:
        for process in reversed(processes):
            stop(process)
        if publisher is not None:
            publisher.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def _follow(
    run_dir: RunDirectory,
    process: subprocess.Popen[bytes],
    on_round: RoundCallback | None,
) -> None:
    # metrics.jsonl is the record of progress: report each new line until the
    # submitting `flwr run --stream` exits with the run.
    seen = 0
    while True:
        finished = process.poll() is not None
        rows = _read_new(run_dir, seen)
        for row in rows:
            if on_round is not None:
                on_round(row)
        seen += len(rows)
        if finished:
            return
        time.sleep(0.25)


def _read_new(run_dir: RunDirectory, skip: int) -> list[dict[str, Any]]:
    if not run_dir.metrics_path.exists():
        return []
    lines = run_dir.metrics_path.read_text(encoding="utf-8").splitlines()
    # A line without its newline yet is still being written: leave it for later.
    complete = [line for line in lines[skip:] if line.endswith("}")]
    return [json.loads(line) for line in complete]
