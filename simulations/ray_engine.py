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
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedscale.exceptions import LaunchError
from fedscale.flower_app import write_app_dir

from ._flower import make_run, new_run_id, server_context, server_task_identity

__all__ = ["RayRun", "run_on_ray"]

log = logging.getLogger(__name__)


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
) -> RayRun:
    """Run ``server_app`` with ``num_nodes`` virtual nodes on Flower's Ray engine.

    Parameters
    ----------
    address
        A running Ray cluster's address (``ray://host:10001`` or ``host:6379``);
        by default a local Ray instance is started and shut down afterwards.
    num_cpus
        CPUs for a local Ray instance (default: all). With ``cpus_per_client`` they
        set how many ClientApp actors run at once.

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

    # Ray warns (FutureWarning) on every actor that it overrides
    # CUDA_VISIBLE_DEVICES when a client asks for no GPU; opt in to the future
    # behaviour, which leaves the variable alone.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    init_args: dict[str, Any] = {"address": address} if address else {}
    if num_cpus is not None and not address:
        init_args["num_cpus"] = num_cpus
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
                    # (otherwise Flower leaves it empty).
                    is_app=True,
                    run=make_run(run_id),
                )
        finally:
            if started_ray and ray.is_initialized():
                ray.shutdown()
    return RayRun(run_id=run_id, server_context=result.context)
