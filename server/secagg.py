"""Secure aggregation: FedAvg through Flower's SecAgg+ workflow, fedscale's run folder around it.

Flower 1.42 implements SecAgg+ only on its legacy path: ``SecAggPlusWorkflow``
run as the fit step of ``DefaultWorkflow``, with a legacy ``Strategy`` in a
``LegacyContext``, and ``secaggplus_mod`` on the clients. Its four stages (keys,
key shares, masked vectors, unmasking) need control of every message of a round,
which no Message API strategy gives, so fedscale runs that one path as it is and
keeps all of its contact with the legacy API in this module (and its
client-side counterpart, :mod:`fedscale.edge_client.secagg`).

What the run still produces is fedscale's: ``config.toml``, one ``metrics.jsonl``
line per round (the global model evaluated on the server's test split, through
the legacy strategy's ``evaluate`` hook, which the workflow calls after every
round), the global model of every round under ``checkpoints/``, and its ONNX
export under ``models/``. The server only ever holds the sum of a round's
masked, quantized updates: it cannot validate, clip or screen an individual
update, so settings that need one are refused by
:class:`fedscale.settings.RunSettings` (see docs/secagg.md).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from numpy.typing import NDArray

from fedscale.exceptions import ConfigError, ExportError
from fedscale.models import build_model
from fedscale.records import serialized_bytes, state_dict_to_arrays
from fedscale.runs import RoundRecord, RunDirectory
from fedscale.settings import RunSettings
from fedscale.training import evaluate, resolve_device

from .federation import (
    FederationResult,
    emit,
    evaluate_global,
    make_exporter,
    numpy_arrays,
    publish,
    round_record,
    server_data,
    wait_for_nodes,
)

if TYPE_CHECKING:
    from flwr.common import FitRes, Parameters, Scalar
    from flwr.server.client_manager import ClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.supercore.privacy_accounting import PrivacyAccountant

__all__ = ["ARRAY_NAMES_KEY", "ObservedGrid", "run_secagg_federation", "secagg_workflow"]

log = logging.getLogger(__name__)

# Must match fedscale.edge_client.secagg.ARRAY_NAMES_KEY (the apps may not import each other).
ARRAY_NAMES_KEY = "array-names"
# Fewer clients than this in a round would let one of them learn another's update
# from the sum and its own: such a round is skipped.
MIN_SECAGG_CLIENTS = 3


def secagg_workflow(settings: RunSettings) -> Any:
    """Return Flower's ``DefaultWorkflow`` with SecAgg+ as its fit step, per the settings."""
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    try:
        fit = SecAggPlusWorkflow(
            num_shares=_count_or_fraction(settings.secagg_num_shares),
            reconstruction_threshold=_count_or_fraction(settings.secagg_reconstruction_threshold),
            max_weight=settings.secagg_max_weight,
            clipping_range=settings.secagg_clipping_range,
            quantization_range=settings.secagg_quantization_range,
            timeout=settings.round_timeout,
        )
    except (TypeError, ValueError) as err:  # Flower's own checks of the same values
        raise ConfigError(f"secagg: {err}") from err
    return DefaultWorkflow(fit_workflow=fit)


def run_secagg_federation(
    grid: Grid, context: Context, settings: RunSettings, *, out: str | Path
) -> FederationResult:
    """Run ``settings.num_rounds`` rounds of FedAvg with SecAgg+ on ``grid``.

    Writes what :func:`fedscale.server.federation.run_federation` writes:
    ``config.toml``, ``metrics.jsonl`` (round 0 is the initial model), the
    global model of every round, and its ONNX export unless ``export-onnx`` is
    false. Returns the result.
    """
    if not settings.secagg:
        raise ConfigError("secagg: expected a run with secagg = true, got secagg = false")
    workflow = secagg_workflow(settings)  # Flower's checks, before anything is written
    random.seed(settings.seed)  # Flower's legacy sampling and SecAgg+'s neighbours draw from it
    torch.manual_seed(settings.seed)
    dataset = server_data(settings)
    device = resolve_device(settings.device)
    model = build_model(
        settings.model, dataset.sample_shape, dataset.num_classes, seed=settings.seed
    )
    arrays = state_dict_to_arrays(model.state_dict())
    _check_float_arrays(arrays, settings)
    run_dir = RunDirectory(out).create()
    run_dir.write_config(settings.replace(out=str(run_dir.path)).to_run_config())
    exporter = make_exporter(settings, dataset)
    counted = _CountingGrid(grid)
    available = wait_for_nodes(counted, settings.min_clients, settings.round_timeout)
    log.info(
        "run %s: %d rounds of FedAvg with SecAgg+ on %s, %d nodes connected",
        run_dir.path.name,
        settings.num_rounds,
        settings.dataset,
        len(available),
    )

    started = time.monotonic()
    initial = evaluate(model, dataset.x_test, dataset.y_test, device=device)
    accountant = _local_dp_accountant(settings)
    records = [round_record(0, initial, None, 0, 0, 0, 0.0, 0.0, **_dp(accountant))]
    run_dir.save_global_model(0, numpy_arrays(arrays))
    if exporter is not None:
        try:
            publish(exporter, model, run_dir, 0, initial, settings)
        except ExportError as err:
            raise ExportError(
                f"{err}; set export-onnx = false (--no-export-onnx) to train without ONNX models"
            ) from err
    emit(run_dir, records[-1], settings.num_rounds)

    state = _RunState(arrays=arrays, started=started, records=records)

    def evaluate_round(
        server_round: int, ndarrays: list[NDArray[Any]], config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Record round ``server_round``: the legacy workflow's hook after every round."""
        if server_round == 0:  # the initial model, recorded above
            return initial.loss, {"accuracy": initial.accuracy}
        state.arrays = _named(ndarrays, state.arrays)
        result = evaluate_global(model, state.arrays, dataset, device)
        now = time.monotonic()
        current = state.round
        if current.sampled and not current.aggregated:
            log.warning(
                "round %d: SecAgg+ did not complete (too few clients answered a stage); the "
                "global model stays as it was",
                server_round,
            )
        record = round_record(
            server_round,
            result,
            current.train_loss,
            current.sampled,
            current.replied,
            current.sampled - current.replied,
            now - current.started,
            now - state.started,
            bytes_sent=counted.bytes_sent - current.bytes_sent_before,
            bytes_received=counted.bytes_received - current.bytes_received_before,
            aggregate_seconds=current.aggregate_seconds,
            **_dp(accountant),
        )
        run_dir.save_global_model(server_round, numpy_arrays(state.arrays))
        if exporter is not None:
            try:
                publish(exporter, model, run_dir, server_round, result, settings)
            except ExportError as err:
                log.error("round %d: global model not published: %s", server_round, err)
        state.records.append(record)
        emit(run_dir, record, settings.num_rounds)
        return result.loss, {"accuracy": result.accuracy}

    strategy = _secagg_fedavg(settings, state, counted, accountant, evaluate_round, dataset)
    from flwr.server import LegacyContext, ServerConfig

    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=settings.num_rounds, round_timeout=settings.round_timeout),
        strategy=strategy,
        client_manager=_bounded_client_manager(settings.round_timeout),
    )
    workflow(counted, legacy)
    return FederationResult(run_dir=run_dir, rounds=state.records, arrays=state.arrays)


@dataclass
class _Round:
    started: float = 0.0
    sampled: int = 0
    replied: int = 0
    aggregated: bool = False
    train_loss: float | None = None
    aggregate_seconds: float | None = None
    bytes_sent_before: int = 0
    bytes_received_before: int = 0


@dataclass
class _RunState:
    arrays: ArrayRecord
    started: float
    records: list[RoundRecord]
    round: _Round = field(default_factory=_Round)


def _secagg_fedavg(
    settings: RunSettings,
    state: _RunState,
    counted: _CountingGrid,
    accountant: PrivacyAccountant | None,
    evaluate_fn: Any,
    dataset: Any,
) -> Any:
    """Return Flower's legacy FedAvg, sized per round and reporting to ``state``."""
    from flwr.common import Code, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg as LegacyFedAvg

    names = list(state.arrays)
    fit_config: dict[str, Scalar] = {
        "lr": settings.lr,
        "local-epochs": settings.local_epochs,
        "batch-size": settings.batch_size,
        "num-classes": dataset.num_classes,
        ARRAY_NAMES_KEY: json.dumps(names),
    }

    class SecAggFedAvg(LegacyFedAvg):
        """FedAvg whose aggregate is SecAgg+'s unmasked weighted average."""

        def num_fit_clients(self, num_available_clients: int) -> tuple[int, int]:
            # clients-per-round of the nodes connected now (as fedscale's round loop
            # sizes FedAvg), waiting for at least one.
            per_round = min(settings.clients_per_round, num_available_clients)
            return per_round, max(per_round, 1)

        def configure_fit(
            self, server_round: int, parameters: Parameters, client_manager: ClientManager
        ) -> list[tuple[ClientProxy, Any]]:
            state.round = _Round(
                started=time.monotonic(),
                bytes_sent_before=counted.bytes_sent,
                bytes_received_before=counted.bytes_received,
            )
            sampled = super().configure_fit(server_round, parameters, client_manager)
            if len(sampled) < MIN_SECAGG_CLIENTS:
                log.warning(
                    "round %d: %d clients sampled (of %d connected), fewer than SecAgg+'s %d; "
                    "round skipped",
                    server_round,
                    len(sampled),
                    client_manager.num_available(),
                    MIN_SECAGG_CLIENTS,
                )
                return []
            if len(sampled) < settings.clients_per_round:
                log.warning(
                    "round %d: %d clients to sample but %d nodes are connected",
                    server_round,
                    settings.clients_per_round,
                    len(sampled),
                )
            state.round.sampled = len(sampled)
            if accountant is not None:
                _compose_local_dp(accountant, settings, len(sampled))
            return list(sampled)

        def aggregate_fit(
            self,
            server_round: int,
            results: list[tuple[ClientProxy, FitRes]],
            failures: list[Any],
        ) -> tuple[Parameters | None, dict[str, Scalar]]:
            # SecAgg+ has put the same unmasked weighted average into every result's
            # parameters: that is the aggregate (averaging the copies again would only
            # add float rounding). It comes in float64: give the model its dtypes back,
            # or the next round would send float64 arrays the clients' model refuses.
            started = time.perf_counter()
            ok = [(proxy, res) for proxy, res in results if res.status.code == Code.OK]
            state.round.replied = len(ok)
            if len(ok) < settings.min_replies or not ok:
                log.warning(
                    "round %d: %d replies in the secure sum, fewer than min-replies %d; the "
                    "global model stays as it was",
                    server_round,
                    len(ok),
                    settings.min_replies,
                )
                return None, {}
            total = sum(res.num_examples for _, res in ok)
            losses = [
                (res.num_examples, float(loss))
                for _, res in ok
                if isinstance(loss := res.metrics.get("train-loss"), int | float)
            ]
            if losses and total > 0:
                state.round.train_loss = sum(n * x for n, x in losses) / total
            state.round.aggregated = True
            state.round.aggregate_seconds = time.perf_counter() - started
            aggregate = _named(parameters_to_ndarrays(ok[0][1].parameters), state.arrays)
            return ndarrays_to_parameters([a.numpy() for a in aggregate.values()]), {}

    return SecAggFedAvg(
        fraction_fit=0.0,
        fraction_evaluate=0.0,
        min_fit_clients=1,
        min_evaluate_clients=1,
        min_available_clients=1,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda server_round: {**fit_config, "server-round": server_round},
        initial_parameters=ndarrays_to_parameters([a.numpy() for a in state.arrays.values()]),
        accept_failures=True,
    )


def _bounded_client_manager(timeout: float) -> ClientManager:
    """Return Flower's client manager, waiting at most ``timeout`` s for nodes (not a day)."""
    from flwr.server.client_manager import SimpleClientManager

    class BoundedClientManager(SimpleClientManager):
        def wait_for(self, num_clients: int, timeout: int = 0) -> bool:
            return bool(super().wait_for(num_clients, timeout=bounded))

    bounded = max(1, int(timeout))
    manager: ClientManager = BoundedClientManager()
    return manager


class ObservedGrid(Grid):
    """A grid that shows :meth:`sent` every message it sends and :meth:`received` every reply.

    Flower's legacy workflow drives the grid itself (four SecAgg+ stages a round),
    so wrapping the grid is the one place to see all of its traffic. Subclasses
    override the two hooks; everything else goes to the wrapped grid unchanged.
    """

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def sent(self, messages: list[Message]) -> None:
        """See messages after the wrapped grid sent them (with run id, sender and time)."""

    def received(self, replies: list[Message]) -> None:
        """See replies as the wrapped grid returned them."""

    def set_run(self, run: Run) -> None:
        """Set the run on the wrapped grid."""
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        """The wrapped grid's run."""
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create a message with the wrapped grid."""
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Return the wrapped grid's connected nodes."""
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push with the wrapped grid."""
        messages = list(messages)
        ids = list(self.inner.push_messages(messages))
        self.sent(messages)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull with the wrapped grid."""
        replies = list(self.inner.pull_messages(message_ids))
        self.received(replies)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send and receive with the wrapped grid."""
        messages = list(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self.sent(messages)
        self.received(replies)
        return replies


class _CountingGrid(ObservedGrid):
    """The grid, counting the bytes of every message sent and received (all four stages)."""

    def __init__(self, inner: Grid) -> None:
        super().__init__(inner)
        self.bytes_sent = 0
        self.bytes_received = 0

    def sent(self, messages: list[Message]) -> None:
        """Count the bytes Flower serializes ``messages`` to."""
        self.bytes_sent += serialized_bytes(messages)

    def received(self, replies: list[Message]) -> None:
        """Count the bytes of ``replies``."""
        self.bytes_received += serialized_bytes(replies)


def _count_or_fraction(value: float) -> int | float:
    """Flower's form of a share count: a whole number above 1 is a count, else a fraction."""
    return int(value) if value > 1 else float(value)


def _check_float_arrays(arrays: ArrayRecord, settings: RunSettings) -> None:
    # SecAgg+ quantizes every entry into [-clipping-range, clipping-range]: a counter
    # (BatchNorm's num_batches_tracked) or other integer state would not survive it.
    ints = [k for k, a in arrays.items() if not np.issubdtype(np.dtype(a.dtype), np.floating)]
    if ints:
        raise ConfigError(
            f"secagg: expected a model whose state is floating point (SecAgg+ quantizes every "
            f"entry), got model {settings.model!r} with non-float arrays {ints}"
        )


def _named(ndarrays: list[NDArray[Any]], template: ArrayRecord) -> ArrayRecord:
    """Return the legacy workflow's unnamed arrays as the model's named record, in its dtypes."""
    if len(ndarrays) != len(template):
        raise ConfigError(
            f"secagg: expected {len(template)} aggregated arrays, got {len(ndarrays)}"
        )
    named = {}
    for (key, array), value in zip(template.items(), ndarrays, strict=True):
        if tuple(value.shape) != tuple(array.shape):
            raise ConfigError(
                f"secagg: aggregated array {key!r}: expected shape {tuple(array.shape)}, "
                f"got {tuple(value.shape)}"
            )
        named[key] = Array(np.asarray(value, dtype=np.dtype(array.dtype)))
    return ArrayRecord(named)


def _local_dp_accountant(settings: RunSettings) -> PrivacyAccountant | None:
    if settings.dp != "local":
        return None
    from fedscale.privacy import new_accountant

    accountant: PrivacyAccountant = new_accountant(settings)
    return accountant


def _compose_local_dp(accountant: PrivacyAccountant, settings: RunSettings, sampled: int) -> None:
    """Account one Gaussian release per client for the round (as LocalDpAccounting does)."""
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    accountant.compose(
        GaussianPrivacyEvent(
            noise_multiplier=settings.dp_noise_multiplier,
            sample_size=min(sampled, accountant.config.population_size),
            population_size=accountant.config.population_size,
        )
    )


def _dp(accountant: PrivacyAccountant | None) -> dict[str, Any]:
    if accountant is None:
        return {}
    spent = accountant.get_privacy_spent()
    epsilon = spent.epsilon if spent.num_releases else 0.0
    return {"dp_epsilon": float(epsilon), "dp_delta": float(spent.delta)}
