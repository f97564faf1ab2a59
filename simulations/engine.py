"""Run a ServerApp and a ClientApp together on the in-process grid."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from ._flower import (
    fast_array_codec,
    fast_record_views,
    new_run_id,
    server_context,
    server_task_identity,
)
from .grid import BatchDelivery, GridStats, InProcessGrid, NodeConfigFn
from .workers import AUTO, Workers, native_threads, resolve_workers, worker_delivery

if TYPE_CHECKING:
    from .system import SimulatedSystem

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
    system: SimulatedSystem | None = None,
    torch_threads: int | None = 1,
    fast_path: bool = True,
    workers: Workers = AUTO,
) -> EngineRun:
    """Run ``server_app`` against ``num_nodes`` virtual nodes running ``client_app``.

    Any Flower ServerApp and ClientApp pair runs here unchanged; with one
    worker (the default) nothing is serialised and no process or socket is
    started. With ``system`` the nodes
    have simulated devices on a virtual clock (see :mod:`.system`).

    Clients train one after another, and a small client's minibatches are too
    small for torch's intra-op threads to pay: ``torch_threads`` (1 by default;
    ``None`` leaves torch's and the native pools' settings alone) caps them, and
    numpy's BLAS and OpenMP pools, for the run. Measured on two cores, torch's
    default of one thread per core made 1,000-client rounds of a small MLP 5-8x
    slower, and was no faster for a small LSTM or CNN; OpenBLAS's idle thread
    spun on the second core through synthetic rounds.

    ``fast_path`` (on by default) trains each round's cohort of train messages
    for fedscale's own ClientApp at once when its model allows it (see
    :mod:`.cohort_delivery`), with the same results as one by one within float
    rounding; everything else, and every other ClientApp, is delivered one
    message at a time.

    ``workers`` forks worker processes to call the ClientApp for the messages
    the fast path leaves, with the same results (see :mod:`.workers`): ``auto``
    (the default) one per CPU core once a batch shows they pay (clients that
    cost 8x or more their messages' wire form), a count that many once the apps are
    loaded (1: this process alone; 0: one per core). The grid, the nodes'
    contexts and the simulated system stay in this process.
    """
    resolve_workers(workers)  # a bad value fails before anything runs
    run_id = new_run_id()
    context = server_context(run_id, run_config)
    cohorts = _fast_path(client_app) if fast_path else None
    with (
        server_task_identity(run_id),
        _frozen_heap(),
        fast_array_codec(),
        fast_record_views(),
        _torch_threads(torch_threads),
        worker_delivery(client_app, workers) as delivery,
    ):
        grid = InProcessGrid(
            client_app,
            num_nodes,
            run_id=run_id,
            run_config=run_config,
            node_config=node_config,
            system=system,
            fast_path=cohorts if delivery is None else _then(cohorts, delivery),
        )
        server_app(grid, context)
    return EngineRun(run_id=run_id, server_context=context, stats=grid.stats)


def _then(first: BatchDelivery | None, rest: BatchDelivery) -> BatchDelivery:
    """Offer a batch to ``first``, then what it left to ``rest``."""
    if first is None:
        return rest

    def deliver(grid: InProcessGrid, messages: list[Message]) -> dict[str, Message]:
        replies = first(grid, messages)
        left = [m for m in messages if m.metadata.message_id not in replies]
        if left:
            replies.update(rest(grid, left))
        return replies

    return deliver


def _fast_path(client_app: ClientApp) -> BatchDelivery | None:
    # fedscale's ClientApp can only be this one if its module is loaded: other
    # apps never pay for importing the cohort trainer (and torch).
    ours = sys.modules.get("fedscale.edge_client.app")
    if ours is None or client_app is not getattr(ours, "app", None):
        return None
    from .cohort_delivery import fast_path_for

    return fast_path_for(client_app)


@contextmanager
def _frozen_heap() -> Iterator[None]:
    """Keep the objects that exist before the run out of garbage collection meanwhile.

    A run makes and drops many small objects a message (records, arrays,
    messages), which sets off full collections; each walks everything torch,
    Flower and the apps allocated (about 80 ms here, every few small rounds).
    ``gc.freeze`` leaves those out, and forked workers then share their pages
    instead of copying them; they are unfrozen afterwards.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """Cap torch's intra-op threads, and native pools, meanwhile; restore them after.

    The native pools (numpy's OpenBLAS, OpenMP) get the same cap
    (:func:`.workers.native_threads`): their idle threads spin on a core the
    run's other processes, or nothing, should have.
    """
    if count is None:
        yield
        return
    if count < 1:
        raise ValueError(f"torch_threads: expected an integer >= 1 or None, got {count}")
    torch = sys.modules.get("torch")  # apps that train have imported it by now
    previous = None if torch is None else torch.get_num_threads()
    if torch is not None:
        torch.set_num_threads(count)
    try:
        with native_threads(count):
            yield
    finally:
        if torch is not None and previous is not None:
            torch.set_num_threads(previous)
