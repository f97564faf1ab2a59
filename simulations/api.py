"""``simulate``: run a fedscale federation from Python (a notebook, a script)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fedscale.datasets import register_dataset
from fedscale.exceptions import ConfigError
from fedscale.loading import load_object
from fedscale.models import register_model
from fedscale.node_data import node_data
from fedscale.runs import RunDirectory
from fedscale.settings import RunSettings

from .workers import AUTO, Workers

if TYPE_CHECKING:
    from .system import SimulatedSystem

__all__ = ["Engine", "SimulationResult", "run_apps", "simulate"]

Engine = Literal["inprocess", "ray"]
# Names for functions passed to simulate(): unique for the process's lifetime
# (an id() could be reused by a later object, and names are never rebound).
_REGISTRATIONS = itertools.count(1)
ENGINES: tuple[str, ...] = ("inprocess", "ray")


@dataclass(frozen=True)
class SimulationResult:
    """A finished simulated federation: its folder and its ``metrics.jsonl`` rows."""

    run_dir: RunDirectory
    rounds: list[dict[str, Any]]

    @property
    def final_accuracy(self) -> float:
        """Test accuracy of the final global model."""
        return float(self.rounds[-1]["accuracy"])


def simulate(
    settings: RunSettings | None = None,
    *,
    clients: int | None = None,
    engine: Engine = "inprocess",
    ray_address: str | None = None,
    dataset: str | Callable[[], Any] | None = None,
    model: str | Callable[..., Any] | None = None,
    fast_path: bool = True,
    workers: Workers = AUTO,
    **overrides: Any,
) -> SimulationResult:
    """Simulate a federation of ``clients`` nodes running fedscale's apps.

    ``clients`` defaults to the settings' ``num-clients``. ``overrides`` are
    :class:`RunSettings` fields (``num_rounds=5``, ``lr=0.1``,
    ``partition="dirichlet:0.5"``, ``device_mix="mobile"``, ...). ``dataset`` and
    ``model`` may be given as functions (a function returning ``(x, y)``; a model
    factory) with the in-process engine. With a ``device-mix`` the in-process
    engine simulates the clients' devices on a virtual clock (see
    :mod:`fedscale.simulations.system`). ``fast_path`` (in-process engine, on by
    default) trains each round's clients as one cohort when the model allows it,
    with the same results as one by one within float rounding (see
    :mod:`fedscale.simulations.cohort_delivery`); ``False`` trains them one by one.
    ``workers`` (in-process engine) runs the clients the fast path leaves in
    worker processes, with the same results: ``auto`` (the default) one per CPU
    core once a client's call costs 8x or more its message's wire form, a count that
    many (1: this process alone, 0: one per core); see
    :mod:`fedscale.simulations.workers`.
    """
    if dataset is not None:
        overrides["dataset"] = _register(dataset, engine, register_dataset, "dataset")
    if model is not None:
        overrides["model"] = _register(model, engine, register_model, "model")
    if clients is not None:
        if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
            raise ConfigError(f"clients: expected an integer >= 1, got {clients!r}")
        overrides["num_clients"] = clients
    settings = (settings or RunSettings()).replace(**overrides)
    clients = settings.num_clients
    if settings.device_mix and engine != "inprocess":
        raise ConfigError(
            f"device-mix: simulated devices need the in-process engine, got engine {engine!r}; "
            "leave device-mix, deadline and overcommit unset on Ray"
        )
    if settings.clients_per_round > clients:
        raise ConfigError(
            f"clients-per-round: expected at most the number of clients ({clients}), "
            f"got {settings.clients_per_round}"
        )
    # Every virtual node is there from the start: never wait for more.
    settings = settings.replace(min_clients=min(settings.min_clients, clients))
    if settings.resume and not settings.out:
        raise ConfigError("resume: expected out, the run folder to continue, got none")
    if not settings.out:
        from fedscale.server.app import default_run_dir

        settings = settings.replace(out=str(default_run_dir(settings)))
    # Fail before the run starts if the data cannot be split this way (or has
    # fewer natural clients), or the device model cannot be read.
    node_data(settings, {"partition-id": 0, "num-partitions": clients})
    system = None
    if engine == "inprocess":
        from .system import system_for

        system = system_for(settings)

    from fedscale.edge_client.app import app as client_app
    from fedscale.server.app import app as server_app

    run_apps(
        server_app,
        client_app,
        clients=clients,
        run_config=settings.to_run_config(),
        engine=engine,
        ray_address=ray_address,
        system=system,
        fast_path=fast_path,
        workers=workers,
    )
    run_dir = RunDirectory(settings.out)
    return SimulationResult(run_dir=run_dir, rounds=run_dir.read_metrics())


def run_apps(
    server_app: Any,
    client_app: Any,
    *,
    clients: int,
    run_config: Mapping[str, Any],
    engine: Engine = "inprocess",
    ray_address: str | None = None,
    system: SimulatedSystem | None = None,
    fast_path: bool = True,
    workers: Workers = AUTO,
) -> None:
    """Run any Flower ServerApp and ClientApp (objects or ``MODULE:ATTR``) together.

    ``system`` (in-process engine only) gives the nodes simulated devices on a
    virtual clock: only online nodes are offered to the strategy. ``fast_path``
    (in-process engine only) applies to fedscale's own ClientApp; see
    :func:`~fedscale.simulations.engine.run_in_process`, as does ``workers``
    (worker processes: ``auto``, or a count; 1: this process alone).
    """
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    server = _resolve(server_app, ServerApp, "server app")
    client = _resolve(client_app, ClientApp, "client app")
    if engine == "inprocess":
        from .engine import run_in_process

        run_in_process(
            server,
            client,
            num_nodes=clients,
            run_config=run_config,
            system=system,
            fast_path=fast_path,
            workers=workers,
        )
    elif engine == "ray":
        if system is not None:
            raise ConfigError("system: simulated devices need the in-process engine, got ray")
        if workers not in (1, AUTO):
            raise ConfigError(
                f"workers: worker processes belong to the in-process engine, got {workers} "
                "with engine 'ray' (Ray runs its own actors)"
            )
        from .ray_engine import run_on_ray

        run_on_ray(
            server,
            client,
            num_nodes=clients,
            run_config=run_config,
            address=ray_address,
        )
    else:
        raise ConfigError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")


def _resolve(obj: Any, kind: type, what: str) -> Any:
    if isinstance(obj, str):
        obj = load_object(obj, what=what)
    if not isinstance(obj, kind):
        raise ConfigError(f"{what}: expected a flwr {kind.__name__}, got {type(obj).__name__}")
    return obj


def _register(value: Any, engine: str, register: Callable[[str, Any], None], what: str) -> str:
    if isinstance(value, str):
        return value
    if not callable(value):
        raise ConfigError(f"{what}: expected a name, MODULE:ATTR or a function, got {value!r}")
    if engine != "inprocess":
        raise ConfigError(
            f"{what}: a function works only with the in-process engine (other "
            "processes cannot see it); give MODULE:ATTR instead"
        )
    name = f"user-{what}-{getattr(value, '__qualname__', 'fn')}-{next(_REGISTRATIONS)}"
    register(name, value)
    return name
