"""Run a ServerApp and a ClientApp together on the in-process grid."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from ._flower import fast_array_codec, new_run_id, server_context, server_task_identity
from .grid import GridStats, InProcessGrid, NodeConfigFn

__all__ = ["EngineRun", "run_in_process"]


@dataclass(frozen=True)
class EngineRun:
    """What an in-process run leaves: its id, the server's context, grid counters."""

    run_id: int
    server_context: Context
    stats: GridStats


def run_in_process(
    server_app: ServerApp,
    client_app: ClientApp,
    *,
    num_nodes: int,
    run_config: Mapping[str, Any],
    node_config: NodeConfigFn | None = None,
) -> EngineRun:
    """Run ``server_app`` against ``num_nodes`` virtual nodes running ``client_app``.

    Any Flower ServerApp and ClientApp pair runs here unchanged; nothing is
    serialised and no process or socket is started.
    """
    run_id = new_run_id()
    grid = InProcessGrid(
        client_app,
        num_nodes,
        run_id=run_id,
        run_config=run_config,
        node_config=node_config,
    )
    context = server_context(run_id, run_config)
    with server_task_identity(run_id), fast_array_codec():
        server_app(grid, context)
    return EngineRun(run_id=run_id, server_context=context, stats=grid.stats)
