"""Run the same apps on Flower's own simulation runtime and its Ray backend.

Flower 1.42 offers two routes: ``flwr run`` against a SuperLink started with
``--simulation``, and the Python ``run_simulation`` function. We take the second
(its internal form ``_run_simulation``, behind this one adapter) because it is
the only one that accepts a Ray cluster address (``ray.init(address=...)``) for
federations bigger than one machine, and because it runs the ServerApp in this
process, so ``fedscale simulate`` reports progress the same way on both engines.
The public ``run_simulation`` gives the nodes an empty run config; the internal
form takes an app directory whose ``pyproject.toml`` carries it, so every
``Context`` holds the run config as in a deployment.

Where things run (flwr/simulation/run_simulation.py and
flwr/server/superlink/fleet/vce/ in Flower 1.42): the ServerApp runs in a thread
of this process (the Ray *driver*), so the run folder (``out``) and anything the
server reads are on this machine only. Flower builds every node's ``Context``
here too, reading the app directory here, and ships it with each message to a
Ray actor (``ClientAppActor``), which may live on any node of the cluster: the
actors need fedscale importable and the client's data readable there, nothing
else.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedscale.exceptions import ConfigError, LaunchError
from fedscale.flower_app import write_app_dir
from fedscale.processes import join_address, split_address

from ._flower import make_run, new_run_id, server_context, server_task_identity

__all__ = [
    "CONNECT_TIMEOUT_S",
    "RayRun",
    "check_ray_cluster",
    "ray_address_file",
    "resolve_ray_address",
    "run_on_ray",
]

log = logging.getLogger(__name__)

# How long to wait for a Ray cluster's GCS to answer before giving up. ray.init
# itself retries an unreachable address for minutes, so we ask first.
CONNECT_TIMEOUT_S = 10.0
# grpc.health.v1.HealthCheckResponse{status: SERVING}, as the GCS answers it.
_HEALTH_SERVING = b"\x08\x01"


@dataclass(frozen=True)
class RayRun:
    """What a Ray run leaves: its id and the server's context."""

    run_id: int
    server_context: Context


def run_on_ray(
    server_app: ServerApp,
    client_app: ClientApp,
    *,
    num_nodes: int,
    run_config: Mapping[str, Any],
    address: str | None = None,
    num_cpus: int | None = None,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
    connect_timeout: float = CONNECT_TIMEOUT_S,
) -> RayRun:
    """Run ``server_app`` with ``num_nodes`` virtual nodes on Flower's Ray engine.

    Parameters
    ----------
    address
        A running Ray cluster to run the ClientApps on: ``HOST:PORT`` of its head
        (the GCS address ``ray start --head --port`` prints), or ``auto`` for the
        ``RAY_ADDRESS`` environment variable, else the cluster ``ray start`` last
        started on this machine. The cluster is left running afterwards. By
        default a private local Ray instance is started and shut down afterwards
        (even when ``RAY_ADDRESS`` is set or a ``ray start`` cluster runs here).
    num_cpus
        CPUs for a local Ray instance (default: all). With ``cpus_per_client`` they
        set how many ClientApp actors run at once. A cluster's CPUs are set by
        ``ray start --num-cpus`` on each node instead.
    connect_timeout
        Seconds to wait for the cluster at ``address`` to answer.

    """
    try:
        import ray
        from flwr.simulation.run_simulation import _run_simulation
        from flwr.supercore.telemetry import EventType
    except ImportError as err:  # pragma: no cover - depends on the install
        raise LaunchError(
            "engine ray: expected Flower's simulation extra (ray) to be installed, "
            f"got: {err}; pip install 'flwr[simulation]'"
        ) from err

    init_args: dict[str, Any]
    if address is None:
        # "local": always a new instance; ray.init() with no address would join
        # RAY_ADDRESS or a `ray start` cluster found on this machine instead.
        init_args = {"address": "local"}
        if num_cpus is not None:
            init_args["num_cpus"] = num_cpus
    else:
        if num_cpus is not None:
            raise ConfigError(
                f"num_cpus: expected none with a Ray cluster address ({address}); a "
                f"cluster's CPUs are set by `ray start --num-cpus` on each node, got {num_cpus}"
            )
        if ray.is_initialized():
            raise LaunchError(
                f"ray address {address}: this process is already connected to Ray, and "
                "Flower would run on that connection instead; call ray.shutdown() first"
            )
        gcs = resolve_ray_address(address)
        check_ray_cluster(gcs, timeout=connect_timeout)
        init_args = {"address": gcs}
        log.info("engine ray: connecting to the Ray cluster at %s", gcs)

    # Ray warns (FutureWarning) on every actor that it overrides
    # CUDA_VISIBLE_DEVICES when a client asks for no GPU; opt in to the future
    # behaviour, which leaves the variable alone.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
        "init_args": init_args,
    }
    run_id = new_run_id()
    context = server_context(run_id, run_config)
    started_ray = not ray.is_initialized()
    with tempfile.TemporaryDirectory(prefix="fedscale-ray-app-") as app_dir:
        write_app_dir(app_dir, run_config)
        try:
            with server_task_identity(run_id):
                result = _run_simulation(
                    num_supernodes=num_nodes,
                    exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                    client_app=client_app,
                    server_app=server_app,
                    backend_name="ray",
                    backend_config=backend_config,
                    server_app_context=context,
                    app_dir=app_dir,
                    # is_app: build every node's Context from app_dir's run config
                    # (otherwise Flower leaves it empty). Flower reads app_dir in
                    # this process and ships the Contexts to the actors, so
                    # cluster nodes never need this directory.
                    is_app=True,
                    run=make_run(run_id),
                )
        finally:
            # Flower's backend calls ray.shutdown() itself when it ends; this is
            # for a run that failed before. On a cluster, ray.shutdown() only
            # disconnects this driver: the cluster's processes keep running.
            if started_ray and ray.is_initialized():
                ray.shutdown()
    return RayRun(run_id=run_id, server_context=result.context)


def ray_address_file() -> Path:
    """Return the file where ``ray start`` records the cluster it started.

    As Ray computes it (``ray/_common/utils.py``): ``$RAY_TMPDIR``, else
    ``$TMPDIR``, else ``/tmp``, then ``ray/ray_current_cluster``. A cluster
    started with ``ray start --temp-dir DIR`` records itself in
    ``DIR/ray_current_cluster`` instead.
    """
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"  # noqa: S108
    return Path(base) / "ray" / "ray_current_cluster"


def resolve_ray_address(address: str) -> str:
    """Return the ``HOST:PORT`` of the Ray cluster that ``address`` names.

    ``auto`` means what it means to ``ray.init``: the ``RAY_ADDRESS`` environment
    variable, else the cluster that ``ray start`` last started on this machine
    (:func:`ray_address_file`). Ray's last resort (any raylet process found on
    this machine) is left out: with several clusters it picks one at random.
    """
    given = address.strip()
    value, source = given, ""
    if given == "auto":
        env = os.environ.get("RAY_ADDRESS", "").strip()
        if env and env != "auto":
            value, source = env, " from RAY_ADDRESS"
        else:
            path = ray_address_file()
            try:
                value = path.read_text(encoding="utf-8").strip()
            except OSError:
                value = ""
            if not value:
                raise LaunchError(
                    "ray address auto: expected the RAY_ADDRESS environment variable or "
                    f"a cluster started on this machine with `ray start` (recorded in "
                    f"{path}), found neither; give the head's HOST:PORT instead"
                )
            source = f" from {path}"
    if value.startswith("ray://") or "://" in value:
        raise ConfigError(
            f"ray address: expected HOST:PORT of the cluster's head (its GCS, as "
            f"`ray start --head` prints it) or auto, got {value!r}{source}; "
            "Ray Client addresses (ray://) are not supported"
        )
    try:
        host, port = split_address(value)
    except LaunchError:
        raise ConfigError(
            f"ray address: expected HOST:PORT of the cluster's head or auto, got {value!r}{source}"
        ) from None
    return join_address(host, port)


def check_ray_cluster(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail with a clear :class:`LaunchError` unless a Ray GCS answers at ``address``.

    ``ray.init`` retries an address where nothing answers for minutes; this asks
    the GCS's gRPC health service (``grpc.health.v1.Health/Check``) with a bound
    instead.
    """
    import grpc  # type: ignore[import-untyped]

    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        raise LaunchError(
            f"ray address {address}: expected a Ray cluster's head there, but nothing "
            f"accepts connections ({err.strerror or err}); start one with "
            "`ray start --head --port PORT` or check the address"
        ) from err
    channel = grpc.insecure_channel(address)
    try:
        health = channel.unary_unary("/grpc.health.v1.Health/Check")
        reply = health(b"", timeout=timeout, wait_for_ready=True)
    except grpc.RpcError as err:
        raise LaunchError(
            f"ray address {address}: something listens there but does not answer as a "
            f"Ray cluster's head (GCS health check: {err.code().name}, waited up to "
            f"{timeout:g} s); give the address `ray start --head` printed"
        ) from err
    finally:
        channel.close()
    if reply != _HEALTH_SERVING:
        raise LaunchError(
            f"ray address {address}: expected the Ray GCS to report SERVING, got "
            f"health reply {reply!r}; is the cluster still starting or shutting down?"
        )
