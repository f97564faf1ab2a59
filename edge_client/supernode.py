"""``fedscale edge-client``: a Flower SuperNode that trains with fedscale's ClientApp.

The SuperNode connects to the server's SuperLink, receives each run's app bundle
and runs fedscale's ClientApp (from the fedscale installed on this device) in a
process of its own for every message. What the node trains on is its
``node_config``: a demo partition (``--partition-id``/``--num-partitions``) or
the device's own data (``--data-path``), the device to train on, and the model
directory the ClientApp writes each received global model to (``--model-dir``).

The SuperNode talks to the SuperLink over TLS with ``--root-certificates`` (the
server's CA certificate), and proves who it is with ``--auth-key`` (its private
key, whose public half the server registered); plaintext is for a loopback
server only, unless ``--insecure`` says otherwise. The Runtime API between the
SuperNode and its ClientApp processes stays on 127.0.0.1.

One command runs up to three processes, each a child of ``fedscale edge-client``
and stopped with it (:func:`run_edge_client`):

- ``flower-supernode``; warm (the default) with ``--isolation process``, so it
  starts no SuperExec of its own;
- warm: fedscale's SuperExec (:mod:`fedscale.edge_client.warm`), which runs each
  message's ClientApp in a fork of one process that imported torch once; not
  warm: Flower's own SuperExec, a fresh interpreter per message;
- with ``--serve-port``: ``fedscale serve`` on the model directory.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedscale.certs import check_node_private_key, check_root_certificate
from fedscale.exceptions import ConfigError, LaunchError
from fedscale.processes import (
    flower_executable,
    is_loopback,
    join_address,
    split_address,
    start,
    stop,
)
from fedscale.settings import parse_device_name

__all__ = [
    "MODEL_DIR",
    "Child",
    "EdgeClientOptions",
    "edge_client_children",
    "node_config_arg",
    "run_edge_client",
    "serve_argv",
    "supernode_argv",
    "warm_argv",
]

log = logging.getLogger(__name__)

# node_config key of the device's model directory (fedscale.edge_client.app reads it).
MODEL_DIR = "model-dir"
# The SuperNode's Runtime API listens here (flower-supernode --host's default).
RUNTIME_HOST = "127.0.0.1"
SUPERNODE = "flower-supernode"
# fedscale serve options edge-client sets itself (from --model-dir and --serve-*).
_SERVE_OWN = frozenset({"--model-dir", "--host", "--http-port", "--grpc-port", "--model-url"})
# Longest wait before a SuperNode the server dropped joins again (doubling from 1 s).
REJOIN_MAX_DELAY = 30.0


@dataclass(frozen=True)
class EdgeClientOptions:
    """One edge device's SuperNode, and what runs beside it.

    ``clientappio_port`` is the SuperNode's Runtime API port (``flower-supernode
    --port``), where its ClientApp processes (and a warm SuperExec) connect.
    """

    server: str
    clientappio_port: int
    partition_id: int | None = None
    num_partitions: int | None = None
    data_path: str | None = None
    device: str | None = None
    insecure: bool = False
    max_wait_time: float | None = None
    warm: bool = True
    model_dir: str | None = None
    serve_port: int | None = None
    serve_grpc_port: int = 0
    serve_host: str = "127.0.0.1"
    serve_args: tuple[str, ...] = ()
    """More options for ``fedscale serve`` (``--api-key-file=PATH``, ``--max-concurrency=N``)."""
    root_certificates: str | None = None
    """The server's CA certificate: connect over TLS and trust that CA."""
    auth_key: str | None = None
    """This SuperNode's private key (OpenSSH ECDSA), for a server with node authentication."""

    def __post_init__(self) -> None:
        host, _ = split_address(self.server)
        if self.root_certificates is not None and self.insecure:
            raise ConfigError(
                "--insecure: expected either --root-certificates CA (TLS) or --insecure "
                "(plaintext), got both"
            )
        if self.root_certificates is None and not is_loopback(host) and not self.insecure:
            raise ConfigError(
                f"server: expected a loopback address for a plaintext connection, got "
                f"{self.server!r}; pass --insecure to connect without TLS, or "
                "--root-certificates CA to connect over TLS"
            )
        if self.root_certificates is not None:
            check_root_certificate(self.root_certificates)
        if self.auth_key is not None:
            if self.root_certificates is None:
                raise ConfigError(
                    "--auth-key: expected --root-certificates CA too (Flower authenticates "
                    "SuperNodes over TLS only), got --auth-key alone"
                )
            check_node_private_key(self.auth_key)
        has_partition = self.partition_id is not None or self.num_partitions is not None
        if has_partition == (self.data_path is not None):
            raise ConfigError(
                "edge client data: expected either --data-path FILE or both "
                "--partition-id and --num-partitions, got "
                + ("both" if has_partition else "neither")
            )
        if has_partition:
            if self.partition_id is None or self.num_partitions is None:
                raise ConfigError(
                    "edge client data: expected both --partition-id and --num-partitions"
                )
            if not 0 <= self.partition_id < self.num_partitions:
                raise ConfigError(
                    f"--partition-id: expected 0 <= id < --num-partitions "
                    f"({self.num_partitions}), got {self.partition_id}"
                )
        if self.data_path is not None and not Path(self.data_path).is_file():
            raise ConfigError(f"--data-path: expected a file, found nothing at {self.data_path}")
        if self.device is not None:
            parse_device_name(self.device)
        if self.warm and not hasattr(os, "fork"):
            raise ConfigError(
                "--warm: expected a platform with fork() (Linux, macOS), this has none; "
                "pass --no-warm"
            )
        self._check_serving()

    def _check_serving(self) -> None:
        if self.model_dir is not None and Path(self.model_dir).exists():
            if not Path(self.model_dir).is_dir():
                raise ConfigError(
                    f"--model-dir: expected a directory, found a file at {self.model_dir}"
                )
        if self.serve_port is None:
            if self.serve_grpc_port:
                raise ConfigError(
                    f"--serve-grpc-port: expected --serve-port too, got only "
                    f"--serve-grpc-port {self.serve_grpc_port}"
                )
            if self.serve_args:
                raise ConfigError(
                    f"--serve-arg: expected --serve-port too, got only --serve-arg "
                    f"{self.serve_args[0]}"
                )
            return
        for arg in self.serve_args:
            # Options only, each one token: --name=value. A bare value or another
            # command would change what the device runs, not how it serves.
            if not arg.startswith("--") or arg.split("=", 1)[0] in _SERVE_OWN:
                raise ConfigError(
                    f"--serve-arg: expected a fedscale serve option as --name=value other "
                    f"than {', '.join(sorted(_SERVE_OWN))} (set by edge-client itself), got {arg!r}"
                )
        if self.model_dir is None:
            raise ConfigError(
                f"--serve-port: expected --model-dir DIR to serve, got --serve-port "
                f"{self.serve_port} alone"
            )
        if not 0 < self.serve_port < 65536:
            raise ConfigError(f"--serve-port: expected 1-65535, got {self.serve_port}")
        if not 0 <= self.serve_grpc_port < 65536:
            raise ConfigError(
                f"--serve-grpc-port: expected 1-65535 (or 0 for no gRPC), got "
                f"{self.serve_grpc_port}"
            )
        if self.serve_grpc_port == self.serve_port:
            raise ConfigError(
                f"--serve-grpc-port: expected a port other than --serve-port, got "
                f"{self.serve_port} for both"
            )

    @property
    def node_config(self) -> dict[str, str | int]:
        """The SuperNode's ``node_config`` (read by fedscale.node_data)."""
        config: dict[str, str | int] = {}
        if self.data_path is not None:
            config["data-path"] = str(Path(self.data_path).absolute())
        else:
            assert self.partition_id is not None and self.num_partitions is not None
            config["partition-id"] = self.partition_id
            config["num-partitions"] = self.num_partitions
        if self.device is not None:
            config["device"] = self.device
        if self.model_dir is not None:
            config[MODEL_DIR] = str(Path(self.model_dir).absolute())
        return config

    @property
    def runtime_api_address(self) -> str:
        """Where the SuperNode's Runtime API listens (for the warm SuperExec)."""
        return join_address(RUNTIME_HOST, self.clientappio_port)


def node_config_arg(config: Mapping[str, str | int | float]) -> str:
    """Format ``--node-config`` as Flower parses it: ``k=v`` pairs, TOML values."""
    # json.dumps of a str is a valid TOML basic string (quotes and escapes).
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in config.items())


def supernode_argv(options: EdgeClientOptions) -> list[str]:
    """Return the ``flower-supernode`` command line for ``options``."""
    argv = [flower_executable("flower-supernode")]
    if options.root_certificates is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(Path(options.root_certificates).absolute())]
    if options.auth_key is not None:
        argv += ["--auth-supernode-private-key", str(Path(options.auth_key).absolute())]
    argv += ["--superlink", options.server, "--port", str(options.clientappio_port)]
    if options.warm:
        # The SuperNode then starts no SuperExec; fedscale's warm one polls it.
        argv += ["--isolation", "process"]
    if options.max_wait_time is not None:
        argv += ["--max-wait-time", str(options.max_wait_time)]
    return [*argv, "--node-config", node_config_arg(options.node_config)]


def warm_argv(options: EdgeClientOptions, parent_pid: int) -> list[str]:
    """Return the command line of fedscale's warm SuperExec for ``options``."""
    return [
        sys.executable,
        "-m",
        "fedscale.edge_client.warm",
        "--runtime-api-address",
        options.runtime_api_address,
        "--insecure",
        "--parent-pid",
        str(parent_pid),
    ]


def serve_argv(options: EdgeClientOptions) -> list[str]:
    """Return the ``fedscale serve`` command line for ``options`` (with ``--serve-port``)."""
    if options.serve_port is None or options.model_dir is None:
        raise ConfigError("fedscale serve: expected --serve-port and --model-dir")
    return [
        sys.executable,
        "-m",
        "fedscale.cli",
        "serve",
        "--model-dir",
        str(Path(options.model_dir).absolute()),
        "--host",
        options.serve_host,
        "--http-port",
        str(options.serve_port),
        "--grpc-port",
        str(options.serve_grpc_port),
        *options.serve_args,
    ]


@dataclass(frozen=True)
class Child:
    """One process ``fedscale edge-client`` runs: a name for messages, and its command."""

    name: str
    argv: list[str]


def edge_client_children(options: EdgeClientOptions, parent_pid: int) -> list[Child]:
    """Return the processes to run for ``options``, in start order."""
    children = [Child(SUPERNODE, supernode_argv(options))]
    if options.warm:
        children.append(Child("warm SuperExec", warm_argv(options, parent_pid)))
    if options.serve_port is not None:
        children.append(Child("fedscale serve", serve_argv(options)))
    return children


def run_edge_client(
    options: EdgeClientOptions,
    *,
    on_started: Callable[[Child, int], None] | None = None,
    poll_interval: float = 0.2,
) -> None:
    """Run the SuperNode and what runs beside it until one of them ends.

    Each child stays in this process's group (so a signal to the group reaches
    them all) and is stopped by its PID with what it started, when this
    function leaves: on Ctrl-C, on SIGTERM (when the caller turns it into an
    exception), or when one child exits, which raises :class:`LaunchError`
    naming it. Never returns normally. The one exception: a SuperNode that
    exits 0 was dropped by the server (a restarted SuperLink forgets its
    nodes), and is started again to rejoin, with back-off.
    """
    if options.model_dir is not None:
        Path(options.model_dir).mkdir(parents=True, exist_ok=True)
    running: list[tuple[Child, subprocess.Popen[bytes]]] = []
    try:
        for child in edge_client_children(options, os.getpid()):
            process = start(child.argv, new_session=False)
            running.append((child, process))
            if on_started is not None:
                on_started(child, process.pid)
        rejoins = 0
        while True:
            for i, (child, process) in enumerate(running):
                code = process.poll()
                if code is None:
                    continue
                if child.name == SUPERNODE and code in (0, -signal.SIGINT):
                    # When the SuperLink no longer knows this node (it restarted, e.g.
                    # a server resumed after a crash, or it removed the node),
                    # flower-supernode sends itself SIGINT: it exits 0, or dies of the
                    # signal if it arrives mid-request. Join again, as a new node, with
                    # back-off. Any other exit is a failure to report.
                    delay = min(REJOIN_MAX_DELAY, 2.0**rejoins)
                    log.warning(
                        "%s (pid %d) left the federation (the server restarted or dropped "
                        "this node); joining again in %.0f s",
                        child.name,
                        process.pid,
                        delay,
                    )
                    time.sleep(delay)
                    replacement = start(child.argv, new_session=False)
                    running[i] = (child, replacement)
                    rejoins += 1
                    if on_started is not None:
                        on_started(child, replacement.pid)
                    continue
                others = [c.name for c, _ in running if c is not child]
                raise LaunchError(
                    f"{child.name} (pid {process.pid}) exited with code {code}"
                    + (f"; stopping {', '.join(others)}" if others else "")
                )
            time.sleep(poll_interval)
    finally:
        _stop_all([process for _, process in running])


def _stop_all(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    # A second Ctrl-C or SIGTERM while stopping must not leave children behind
    # (signal handlers can be set from the main thread only).
    main = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGINT, signal.SIGTERM) if main else ()
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        for process in reversed(processes):
            stop(process)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
