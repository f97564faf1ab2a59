"""``fedscale server``: a Flower SuperLink running fedscale's ServerApp.

Starts ``flower-superlink`` (its Fleet and Control APIs share one HTTP port),
submits the run with ``flwr run`` against it, follows ``metrics.jsonl`` to report
each round, and stops every process it started, by PID, when the run ends or
fails. The SuperLink runs with ``--disable-runtime-dependency-installation``:
the SuperLink and every SuperNode use the fedscale installed beside them.

With ``certificates`` the SuperLink serves TLS on that port, and ``flwr run``
trusts the CA; with ``auth_keys`` it admits only the SuperNodes whose public
keys it registered (``flwr supernode register``) as soon as it listened.

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

from fedscale.certs import ServerCertificates, node_public_keys, server_certificates
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

__all__ = [
    "ServerOptions",
    "flwr_home_config",
    "register_supernodes",
    "serve_federation",
    "superlink_argv",
]

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
    certificates: str | None = None
    """A folder with ``ca.crt``, ``server.pem`` and ``server.key``: serve over TLS."""
    auth_keys: str | None = None
    """SuperNode public keys (a ``.pub`` file or a folder of them): only these may join."""

    def __post_init__(self) -> None:
        if self.certificates is not None and self.insecure:
            raise ConfigError(
                "--insecure: expected either --certificates DIR (TLS) or --insecure "
                "(plaintext), got both"
            )
        if self.certificates is None and not is_loopback(self.host) and not self.insecure:
            raise ConfigError(
                f"host: expected a loopback address for a plaintext server, got "
                f"{self.host!r}; pass --insecure to serve other machines without TLS, "
                "or --certificates DIR to serve them over TLS"
            )
        if self.auth_keys is not None and self.certificates is None:
            raise ConfigError(
                "--auth-keys: expected --certificates DIR too (Flower authenticates "
                "SuperNodes over TLS only), got --auth-keys alone"
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
        if self.certificates is not None:
            # Checked now, so that a wrong folder fails before any process starts.
            server_certificates(self.certificates, host=self.connect_host)
        if self.auth_keys is not None:
            node_public_keys(self.auth_keys)

    @property
    def tls(self) -> ServerCertificates | None:
        """The SuperLink's TLS files, or None for plaintext."""
        if self.certificates is None:
            return None
        return server_certificates(self.certificates)

    @property
    def connect_host(self) -> str:
        """The address local clients (``flwr run``) use to reach the SuperLink."""
        if self.host in ("0.0.0.0", ""):
            return "127.0.0.1"
        return "::1" if self.host == "::" else self.host


def flwr_home_config(address: str, *, root_certificates: Path | str | None = None) -> str:
    """Return the ``$FLWR_HOME/config.toml`` naming our SuperLink as a connection.

    With ``root_certificates`` (the CA's certificate) ``flwr`` connects over TLS
    and trusts that CA; without, in plaintext.
    """
    lines = [
        "[superlink]",
        f'default = "{CONNECTION_NAME}"',
        "",
        f"[superlink.{CONNECTION_NAME}]",
        f"address = {json.dumps(address)}",
    ]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        # json.dumps of a str is a valid TOML basic string (quotes, backslashes).
        lines += [
            f"root-certificates = {json.dumps(str(Path(root_certificates).absolute()))}",
            "insecure = false",
        ]
    return "\n".join(lines) + "\n"


def superlink_argv(
    port: int,
    *,
    host: str | None = None,
    tls: ServerCertificates | None = None,
    supernode_auth: bool = False,
) -> list[str]:
    """Return the ``flower-superlink`` command line fedscale runs, with no installs.

    Plaintext without ``tls``; with it, TLS on the one port the Fleet, Control
    and Runtime APIs share. ``supernode_auth`` admits only SuperNodes whose
    public key was registered (``flwr supernode register``); Flower allows it
    with TLS only. Runtime dependency installation stays off: the code comes
    from the installed fedscale, and installing an app's dependencies per run
    would pull CUDA torch.
    """
    if supernode_auth and tls is None:
        raise ConfigError("SuperNode authentication: expected TLS certificates, got none")
    argv = [flower_executable("flower-superlink")]
    if tls is None:
        argv.append("--insecure")
    else:
        argv += [
            "--ssl-ca-certfile",
            str(tls.ca_cert.absolute()),
            "--ssl-certfile",
            str(tls.server_cert.absolute()),
            "--ssl-keyfile",
            str(tls.server_key.absolute()),
        ]
    if supernode_auth:
        argv.append("--enable-supernode-auth")
    argv.append("--disable-runtime-dependency-installation")
    if host is not None:
        argv += ["--host", host]
    return [*argv, "--port", str(port)]


def register_supernodes(
    public_keys: list[Path], env: dict[str, str], *, timeout: float = 60.0
) -> list[int]:
    """Register each SuperNode public key with the SuperLink ``env``'s FLWR_HOME names.

    Runs Flower's own ``flwr supernode register KEY fedscale`` (the Control API)
    for all keys at once, so that the time in which the SuperLink is up but a
    key not yet registered stays short, and returns the node ids the SuperLink
    assigned, in key order. A SuperNode whose key is not registered is refused
    when it connects.
    """
    flwr = flower_executable("flwr")
    running = []
    try:
        for key in public_keys:
            argv = [flwr, "supernode", "register", str(key.absolute()), CONNECTION_NAME]
            running.append(
                subprocess.Popen(
                    [*argv, "--format", "json"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        deadline = time.monotonic() + timeout
        node_ids = []
        for key, process in zip(public_keys, running, strict=True):
            try:
                output, _ = process.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired as err:
                raise LaunchError(
                    f"flwr supernode register {key}: expected an answer within "
                    f"{timeout:g} s, got none"
                ) from err
            node_id = _registered_node_id(output)
            if process.returncode != 0 or node_id is None:
                raise LaunchError(
                    f"flwr supernode register {key}: expected a node id, got exit code "
                    f"{process.returncode}: {output.strip()[-2000:]}"
                )
            log.info("registered SuperNode key %s as node %d", key, node_id)
            node_ids.append(node_id)
        return node_ids
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
            process.wait()
            if process.stdout is not None:
                process.stdout.close()


def _registered_node_id(stdout: str) -> int | None:
    # `--format json` prints one JSON object ({"success": true, "node-id": N}) last.
    start_at = stdout.rfind("{")
    if start_at < 0:
        return None
    try:
        reply = json.loads(stdout[start_at:])
    except json.JSONDecodeError:
        return None
    node_id = reply.get("node-id") if isinstance(reply, dict) else None
    return int(node_id) if isinstance(node_id, int) and reply.get("success") else None


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
    resume_after = _resume_point(run_dir, settings)
    logs = run_dir.path / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="fedscale-server-"))
    env = {**os.environ, "FLWR_HOME": str(scratch / "flwr-home")}
    (scratch / "flwr-home").mkdir()
    address = join_address(options.connect_host, options.port)
    tls = options.tls
    (scratch / "flwr-home" / "config.toml").write_text(
        flwr_home_config(address, root_certificates=tls.ca_cert if tls else None)
    )
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
            superlink_argv(
                options.port, host=options.host, tls=tls, supernode_auth=bool(options.auth_keys)
            ),
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
        if options.auth_keys:
            register_supernodes(node_public_keys(options.auth_keys), env)
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
        _follow(run_dir, submit, on_round, after_round=resume_after)
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


def _resume_point(run_dir: RunDirectory, settings: RunSettings) -> int:
    """Return the round a run continues after: -1 for a new run, the last committed on resume."""
    if not settings.resume:
        if run_dir.metrics_path.exists():
            raise ConfigError(
                f"run folder {run_dir.path}: expected a new folder, but it already holds a "
                "run; pass --resume to continue it, or choose another --out"
            )
        return -1
    last = run_dir.checkpoint_store.latest_round()
    if last is None:
        raise ConfigError(
            f"resume: expected a run folder with a checkpoint "
            f"({run_dir.checkpoint_store.latest_path}), found none in {run_dir.path}"
        )
    return last


def _follow(
    run_dir: RunDirectory,
    process: subprocess.Popen[bytes],
    on_round: RoundCallback | None,
    *,
    after_round: int = -1,
) -> None:
    # metrics.jsonl is the record of progress: report each round past the last
    # reported until the submitting `flwr run --stream` exits with the run. By
    # round number, not line count: a resume rewinds the file first.
    while True:
        finished = process.poll() is not None
        for row in _read_new(run_dir, 0):
            number = row.get("round")
            if isinstance(number, int) and number > after_round:
                after_round = number
                if on_round is not None:
                    on_round(row)
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
