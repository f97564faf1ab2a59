"""The server's round loop: sample, train, aggregate, evaluate, record.

It drives any Flower ``Strategy`` through its four hooks (``configure_train``,
``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate``) instead of
calling ``Strategy.start``, because the server must act between rounds: evaluate
the global model on its held-out split, store it, export it to the run's model
directory, and write ``metrics.jsonl`` before the next round begins (``start``
only returns at the end). Every training reply is checked against the global
model before the strategy sees it (:mod:`fedscale.validation`); a rejected one
costs a log line and a count in ``metrics.jsonl``, never the round.

A grid with a simulated system (``grid.system``, as fedscale's in-process engine
sets it when a run has a ``device-mix``) also runs a virtual clock: the round
samples ``ceil(k * (1 + overcommit))`` of the nodes online now, asks the system
which of them the round keeps (the first ``k`` to finish, within the deadline,
still online), sends the train message to those only, and moves the clock to the
round's end. Any other grid (a SuperLink, Flower's Ray engine) runs as before.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast, get_args

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from numpy.typing import NDArray

from fedscale.checkpoint import (
    BackgroundCommits,
    Checkpoint,
    check_resumable,
    config_hash,
    restore_rng_state,
    rng_state,
)
from fedscale.clock import DropReason, RoundTiming
from fedscale.compression import decode_replies, update_bytes
from fedscale.datasets import load_dataset
from fedscale.exceptions import ConfigError, ExportError, LaunchError, ModelStoreError
from fedscale.models import build_model
from fedscale.modelstore import ModelDirectory
from fedscale.node_data import has_natural_clients, natural_provider
from fedscale.records import (
    conform_dtypes,
    load_arrays_into,
    serialized_bytes,
    state_dict_to_arrays,
)
from fedscale.runs import RoundRecord, RunDirectory
from fedscale.settings import RunSettings
from fedscale.training import EvalResult, evaluate, resolve_device
from fedscale.validation import WEIGHT_KEY, screen_replies, update_byte_limit

from .strategies import (
    build_strategy,
    inner_strategy,
    privacy_spent,
    privatize,
    restore_strategy_state,
    set_sample_size,
    strategy_state,
)

if TYPE_CHECKING:
    from fedscale.export import OnnxExporter

__all__ = [
    "ROUND_EXTRA_KEY",
    "FederationResult",
    "RoundPlanView",
    "ServerData",
    "SimulatedSystemView",
    "arrays_like",
    "default_strategy",
    "emit",
    "evaluate_global",
    "make_exporter",
    "numpy_arrays",
    "publish",
    "published_round",
    "resume_run",
    "round_record",
    "run_federation",
    "server_data",
    "size_for_round",
    "wait_for_nodes",
]

log = logging.getLogger(__name__)

# Each round's log record carries its RoundRecord under this `extra` key, so a
# front end (the CLI's progress bar) can follow a run without parsing text.
ROUND_EXTRA_KEY = "fedscale_round"


@dataclass(frozen=True)
class FederationResult:
    """What a finished federation leaves: its folder, its rounds, its model."""

    run_dir: RunDirectory
    rounds: list[RoundRecord]
    arrays: ArrayRecord

    @property
    def final_accuracy(self) -> float | None:
        """Test accuracy of the final global model."""
        return self.rounds[-1].accuracy


class RoundPlanView(Protocol):
    """What the round loop reads of a simulated system's round plan."""

    @property
    def timing(self) -> RoundTiming:
        """The round in virtual time."""
        ...

    @property
    def accepted_nodes(self) -> frozenset[int]:
        """Nodes whose updates the round keeps: the only ones sent the train message."""
        ...

    @property
    def dropped(self) -> Mapping[str, int]:
        """Dropped clients by reason."""
        ...

    @property
    def clients_dropped(self) -> int:
        """Dropped clients in all."""
        ...


class SimulatedSystemView(Protocol):
    """What the round loop asks of a grid's simulated system (``grid.system``)."""

    @property
    def now(self) -> float:
        """The virtual clock, in seconds."""
        ...

    def offer_count(self, k: int) -> int:
        """Clients to offer work to for ``k`` updates."""
        ...

    def wait_for_clients(self) -> float:
        """Advance the clock until a client is online."""
        ...

    def plan_round(
        self,
        server_round: int,
        node_ids: Sequence[int],
        *,
        k: int,
        model_bytes: int,
        update_bytes: int,
        local_epochs: int,
    ) -> RoundPlanView:
        """Decide which offered nodes the round keeps."""
        ...

    def finish_round(self, plan: Any) -> float:
        """Advance the clock to the planned round's end."""
        ...

    def resume_at(self, now: float) -> None:
        """Set the clock to a checkpoint's time (resuming a run)."""
        ...


@dataclass(frozen=True)
class ServerData:
    """What the server knows of the data: sample shape, classes, its test set."""

    sample_shape: tuple[int, ...]
    num_classes: int
    x_test: NDArray[Any]
    y_test: NDArray[Any]
    # Samples like the clients' (for the ONNX exporter's parity inputs).
    x_sample: NDArray[Any]


def server_data(settings: RunSettings) -> ServerData:
    """Load what the server needs of the run's dataset.

    A dataset with natural clients (synthetic, shakespeare) gives the held-out
    samples of its first clients (``num-clients`` bounds them); any other is
    split into train and test, and the server keeps the test split.
    """
    if has_natural_clients(settings.dataset):
        provider = natural_provider(settings)
        x, y = provider.test_set(settings.num_clients)
        return ServerData(provider.sample_shape, provider.num_classes, x, y, x)
    dataset = load_dataset(
        settings.dataset,
        seed=settings.seed,
        test_fraction=settings.test_fraction,
        label_column=settings.label_column,
    )
    return ServerData(
        dataset.sample_shape, dataset.num_classes, dataset.x_test, dataset.y_test, dataset.x_train
    )


def wait_for_nodes(grid: Grid, count: int, timeout: float, poll: float = 1.0) -> list[int]:
    """Wait until ``count`` nodes are connected; give up after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() >= deadline:
            raise LaunchError(
                f"expected at least {count} connected SuperNodes within {timeout:g} s, "
                f"got {len(nodes)}"
            )
        log.info("waiting for SuperNodes: %d of %d connected", len(nodes), count)
        time.sleep(poll)


def default_strategy(settings: RunSettings) -> Strategy:
    """Return the run's strategy (``strategy``, ``strategy-args``, ``dp``), sized each round.

    Every strategy of :mod:`fedscale.server.strategies` is Flower's, derives
    from ``FedAvg`` and is sized by :func:`size_for_round`; with ``dp`` it is
    wrapped in Flower's differential privacy (:func:`~.strategies.privatize`).
    """
    return privatize(build_strategy(settings), settings)


def size_for_round(
    strategy: Strategy, settings: RunSettings, connected: int, *, sample: int | None = None
) -> int:
    """Make a FedAvg-derived strategy sample exactly ``min(sample, connected)`` nodes.

    ``sample`` defaults to ``clients-per-round`` (more with over-commitment).
    FedAvg samples ``max(int(fraction_train * connected), min_train_nodes)`` and
    waits while fewer than ``min_available_nodes`` are connected; set from the
    nodes connected now, every round, so nodes that join or leave change the
    pool but never the number sampled. A DP wrapper's FedAvg is sized, and the
    wrapper calibrates its noise to that number. Returns that number.
    """
    per_round = min(settings.clients_per_round if sample is None else sample, connected)
    fedavg = cast(FedAvg, inner_strategy(strategy))
    fedavg.fraction_train = per_round / connected
    fedavg.min_train_nodes = per_round
    fedavg.min_available_nodes = per_round
    if settings.fraction_evaluate > 0:
        fedavg.min_evaluate_nodes = max(1, int(settings.fraction_evaluate * connected))
    set_sample_size(strategy, per_round)
    return per_round


def run_federation(
    grid: Grid,
    settings: RunSettings,
    *,
    out: str | Path,
    strategy: Strategy | None = None,
) -> FederationResult:
    """Run ``settings.num_rounds`` rounds of federated training on ``grid``.

    Writes ``config.toml``, ``metrics.jsonl`` and one checkpoint per round into
    ``out``, and (unless ``export-onnx`` is false) each round's global model as
    ONNX into ``out/models``, keeping the newest ``keep-models``; returns the
    result.
    """
    with BackgroundCommits(RunDirectory(out).checkpoint_store) as checkpoints:
        return _run_federation(grid, settings, out, strategy, checkpoints)


def _run_federation(
    grid: Grid,
    settings: RunSettings,
    out: str | Path,
    strategy: Strategy | None,
    checkpoints: BackgroundCommits,
) -> FederationResult:
    # Before anything is written: a misconfigured strategy fails the run at once.
    sized_here = strategy is None
    strategy = default_strategy(settings) if strategy is None else strategy
    # Flower's samplers draw from the `random` module: seed it for repeatable runs.
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    dataset = server_data(settings)
    device = resolve_device(settings.device)
    model = build_model(
        settings.model, dataset.sample_shape, dataset.num_classes, seed=settings.seed
    )
    arrays = state_dict_to_arrays(model.state_dict())
    run_dir = RunDirectory(out)
    run_config = settings.replace(out=str(run_dir.path)).to_run_config()
    fingerprint = config_hash(run_config)
    exporter = make_exporter(settings, dataset)
    system = _system(grid)

    resumed = resume_run(run_dir, run_config, strategy, system) if settings.resume else None
    if resumed is None:
        run_dir.create()
    run_dir.write_config(run_config)

    if system is None:
        if settings.device_mix:
            log.warning(
                "device-mix %r is simulated by fedscale's in-process engine only; this "
                "runtime's nodes are real or have no device model, so it is ignored",
                settings.device_mix,
            )
        available = wait_for_nodes(grid, settings.min_clients, settings.round_timeout)
    else:
        # Simulated nodes never connect late; whoever is offline now may be online later.
        available = list(grid.get_node_ids())
    log.info(
        "run %s: %s rounds of %s on %s, %d nodes connected",
        run_dir.path.name,
        settings.num_rounds
        if resumed is None
        else f"rounds {resumed.round + 1}-{settings.num_rounds} of {settings.num_rounds}",
        type(strategy).__name__,
        settings.dataset,
        len(available),
    )

    def commit(server_round: int, record: RoundRecord) -> None:
        # The round's commit point (written now, or in the background on a slow disk:
        # BackgroundCommits); once it lands, a crash loses nothing of this round.
        strategy_meta, strategy_arrays = strategy_state(strategy)
        rng_meta, rng_arrays = rng_state()
        checkpoints.commit(
            Checkpoint(
                round=server_round,
                config_hash=fingerprint,
                global_arrays=numpy_arrays(arrays),
                record=record.to_json(),
                strategy_meta=strategy_meta,
                strategy_arrays=strategy_arrays,
                rng_meta=rng_meta,
                rng_arrays=rng_arrays,
                sim_now=None if system is None else system.now,
            )
        )

    if resumed is None:
        started = time.monotonic()
        initial = evaluate(model, dataset.x_test, dataset.y_test, device=device)
        records = [
            round_record(
                0, initial, None, 0, 0, 0, 0.0, 0.0, **_simulated(system, None), **_dp(strategy)
            )
        ]
        commit(0, records[-1])
        if exporter is not None:
            try:
                publish(exporter, model, run_dir, 0, initial, settings)
            except ExportError as err:
                # Refuse the run before any training: every later round would be refused too.
                raise ExportError(
                    f"{err}; set export-onnx = false (--no-export-onnx) to train without "
                    "ONNX models"
                ) from err
        emit(run_dir, records[-1], settings.num_rounds)
        first_round = 1
    else:
        arrays = arrays_like(resumed.global_arrays, arrays)
        records = [RoundRecord.from_json(row) for row in run_dir.read_metrics()]
        # `elapsed` goes on from where the run stopped; the downtime is not counted.
        started = time.monotonic() - (records[-1].elapsed if records else 0.0)
        if exporter is not None and published_round(run_dir) < resumed.round:
            # The crash came between the commit and the export: export it now.
            result = evaluate_global(model, arrays, dataset, device)
            publish(exporter, model, run_dir, resumed.round, result, settings)
        first_round = resumed.round + 1

    for server_round in range(first_round, settings.num_rounds + 1):
        round_start = time.monotonic()
        if system is not None and not list(grid.get_node_ids()):
            system.wait_for_clients()
        if sized_here:
            if system is None:
                connected = len(wait_for_nodes(grid, 1, settings.round_timeout))
                sample = settings.clients_per_round
            else:
                connected = len(list(grid.get_node_ids()))
                sample = system.offer_count(settings.clients_per_round)
            per_round = size_for_round(strategy, settings, connected, sample=sample)
            if per_round < sample:
                log.warning(
                    "round %d: %d clients to sample but %d nodes are %s",
                    server_round,
                    sample,
                    connected,
                    "connected" if system is None else "online",
                )
        train_config = ConfigRecord(
            {
                "lr": settings.lr,
                "local-epochs": settings.local_epochs,
                "batch-size": settings.batch_size,
                "num-classes": dataset.num_classes,
            }
        )
        messages = list(strategy.configure_train(server_round, arrays, train_config, grid))
        plan = _plan(system, server_round, messages, arrays, settings)
        # Clients the round drops never hear from it: they cost no training.
        sent = messages if plan is None else _accepted(messages, plan)
        replies = _send(grid, sent, settings.round_timeout)
        # Measured after sending: the grid stamps run id, sender and time into each message.
        bytes_sent = serialized_bytes(sent)
        bytes_received = serialized_bytes(replies)
        # Error replies and missing replies are failures; content that fails
        # validation is rejected. Neither reaches the strategy's averaging.
        failed = sum(r.has_error() for r in replies) + len(sent) - len(replies)
        replies, rejected = _screen(server_round, replies, arrays, settings, strategy)
        usable = sum(not r.has_error() for r in replies)
        train_metrics = None
        aggregate_seconds = None
        if usable >= settings.min_replies:
            aggregation_start = time.perf_counter()
            new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
            if new_arrays is not None:
                arrays = conform_dtypes(new_arrays, arrays)
            aggregate_seconds = time.perf_counter() - aggregation_start
        else:
            log.warning(
                "round %d: %d usable replies of %d sent, fewer than min-replies %d; the "
                "global model stays as it was",
                server_round,
                usable,
                len(sent),
                settings.min_replies,
            )

        federated = None
        if settings.fraction_evaluate > 0:
            eval_config = ConfigRecord({"num-classes": dataset.num_classes})
            eval_messages = list(
                strategy.configure_evaluate(server_round, arrays, eval_config, grid)
            )
            eval_replies = _send(grid, eval_messages, settings.round_timeout)
            bytes_sent += serialized_bytes(eval_messages)
            bytes_received += serialized_bytes(eval_replies)
            federated = strategy.aggregate_evaluate(server_round, eval_replies)
        if plan is not None:
            # After federated evaluation, which is not timed: it samples the nodes
            # online when the round started, as the strategy was sized for them.
            cast(SimulatedSystemView, system).finish_round(plan)

        result = evaluate_global(model, arrays, dataset, device)
        now = time.monotonic()
        record = round_record(
            server_round,
            result,
            _metric(train_metrics, "train-loss"),
            len(messages),
            len(sent) - failed - rejected,
            failed,
            now - round_start,
            now - started,
            federated_loss=_metric(federated, "eval-loss"),
            federated_accuracy=_metric(federated, "eval-accuracy"),
            rejected=rejected,
            bytes_sent=bytes_sent,
            bytes_received=bytes_received,
            aggregate_seconds=aggregate_seconds,
            **_simulated(system, plan),
            **_dp(strategy),
        )
        commit(server_round, record)
        if exporter is not None:
            try:
                publish(exporter, model, run_dir, server_round, result, settings)
            except ExportError as err:
                # The model directory keeps the last model that passed; training goes on.
                log.error("round %d: global model not published: %s", server_round, err)
        records.append(record)
        emit(run_dir, record, settings.num_rounds)

    return FederationResult(run_dir=run_dir, rounds=records, arrays=arrays)


@dataclass(frozen=True)
class _Resumed:
    round: int
    global_arrays: dict[str, NDArray[Any]]


def resume_run(
    run_dir: RunDirectory,
    run_config: Mapping[str, Any],
    strategy: Strategy,
    system: SimulatedSystemView | None,
) -> _Resumed:
    """Load the run's last checkpoint into ``strategy``, the RNGs and ``system``.

    Refuses a run folder without a checkpoint, a checkpoint whose files fail
    their sha256, and settings that differ from the run's other than
    ``num-rounds`` (naming each difference). ``metrics.jsonl`` is rewound to the
    checkpoint's round: rounds begun after it are redone.
    """
    store = run_dir.checkpoint_store
    checkpoint = store.load_latest()
    stored = run_dir.read_config() if run_dir.config_path.exists() else {}
    check_resumable(checkpoint.config_hash, stored, run_config)
    last = checkpoint.round
    if last >= int(run_config["num-rounds"]):
        raise ConfigError(
            f"resume: the run in {run_dir.path} has completed {last} rounds, expected "
            f"num-rounds above that to train further, got {run_config['num-rounds']}"
        )
    restore_strategy_state(strategy, checkpoint.strategy_meta, checkpoint.strategy_arrays)
    restore_rng_state(checkpoint.rng_meta, checkpoint.rng_arrays)
    if system is not None:
        if checkpoint.sim_now is None:
            raise ConfigError(
                f"resume: the checkpoint in {store.folder} has no virtual clock, but this "
                "runtime simulates devices; resume it on the runtime it ran on"
            )
        system.resume_at(float(checkpoint.sim_now))
    run_dir.rewind_metrics(last, checkpoint.record)
    log.info("resuming %s after round %d", run_dir.path, last)
    return _Resumed(round=last, global_arrays=checkpoint.global_arrays)


def arrays_like(stored: Mapping[str, NDArray[Any]], template: ArrayRecord) -> ArrayRecord:
    """Return the checkpoint's global model as the run's ArrayRecord, checked against the model."""
    if list(stored) != list(template):
        raise ConfigError(
            f"resume: the checkpoint holds arrays {list(stored)}, the run's model has "
            f"{list(template)}"
        )
    for key, array in template.items():
        got = stored[key]
        if tuple(got.shape) != tuple(array.shape) or str(got.dtype) != array.dtype:
            raise ConfigError(
                f"resume: checkpoint array {key!r}: expected {array.dtype}{list(array.shape)}, "
                f"got {got.dtype}{list(got.shape)}"
            )
    return ArrayRecord({key: Array(np.array(value)) for key, value in stored.items()})


def published_round(run_dir: RunDirectory) -> int:
    """Return the round of the model the run's model directory serves (-1: none)."""
    try:
        return ModelDirectory(run_dir.models).read_manifest().round
    except ModelStoreError:
        return -1


def _system(grid: Grid) -> SimulatedSystemView | None:
    system = getattr(grid, "system", None)
    return None if system is None else cast(SimulatedSystemView, system)


def _plan(
    system: SimulatedSystemView | None,
    server_round: int,
    messages: list[Message],
    arrays: ArrayRecord,
    settings: RunSettings,
) -> RoundPlanView | None:
    if system is None or not messages:
        return None
    # Every offered client downloads the global model and uploads an update (compressed or not).
    size = sum(len(array.data) for array in arrays.values())
    return system.plan_round(
        server_round,
        [m.metadata.dst_node_id for m in messages],
        k=min(settings.clients_per_round, len(messages)),
        model_bytes=size,
        update_bytes=update_bytes(arrays, settings.compression),
        local_epochs=settings.local_epochs,
    )


def _accepted(messages: list[Message], plan: RoundPlanView) -> list[Message]:
    keep = plan.accepted_nodes
    return [m for m in messages if m.metadata.dst_node_id in keep]


def _simulated(system: SimulatedSystemView | None, plan: RoundPlanView | None) -> dict[str, Any]:
    """Return the ``metrics.jsonl`` fields of the virtual clock (none without a system)."""
    if system is None:
        return {}
    if plan is None:  # round 0, or a round that sampled nobody
        return {
            "sim_seconds": 0.0,
            "sim_elapsed": system.now,
            "clients_dropped": 0,
            "dropped": dict.fromkeys(get_args(DropReason), 0),
        }
    return {
        "sim_seconds": plan.timing.duration,
        "sim_elapsed": system.now,
        "clients_dropped": plan.clients_dropped,
        "dropped": dict(plan.dropped),
    }


def _send(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    if not messages:
        return []
    return list(grid.send_and_receive(messages, timeout=timeout))


def _screen(
    server_round: int,
    replies: list[Message],
    arrays: ArrayRecord,
    settings: RunSettings,
    strategy: Strategy,
) -> tuple[list[Message], int]:
    """Drop the replies :func:`fedscale.validation.screen_replies` rejects, one log line each.

    With ``compression``, replies are first decoded into full models
    (:func:`fedscale.compression.decode_replies`); one that does not decode is
    rejected too. Returns the replies to aggregate (error replies included: the
    strategy counts them as failures) and how many were rejected.
    """
    replies, undecodable = decode_replies(replies, arrays, settings, server_round=server_round)
    kept, rejected = screen_replies(
        replies,
        arrays,
        max_examples=settings.max_examples,
        max_bytes=update_byte_limit(arrays, settings.max_update_bytes),
        weight_key=getattr(inner_strategy(strategy), "weighted_by_key", WEIGHT_KEY),
    )
    rejected = undecodable + rejected
    for reply, reason in rejected:
        log.warning(
            "round %d: update from node %d rejected: %s",
            server_round,
            reply.metadata.src_node_id,
            reason,
        )
    return kept, len(rejected)


def evaluate_global(
    model: torch.nn.Module, arrays: ArrayRecord, dataset: ServerData, device: torch.device
) -> EvalResult:
    """Load ``arrays`` into ``model`` and evaluate it on the server's test split."""
    load_arrays_into(model, arrays)
    return evaluate(model, dataset.x_test, dataset.y_test, device=device)


def make_exporter(settings: RunSettings, dataset: ServerData) -> OnnxExporter | None:
    """Return the run's ONNX exporter, or ``None`` with ``export-onnx`` false."""
    if not settings.export_onnx:
        return None
    from fedscale.export import OnnxExporter  # onnxruntime loads only when exporting

    # One exporter for the run: parity inputs and session options are built once.
    return OnnxExporter.for_data(dataset.x_sample, seed=settings.seed)


def publish(
    exporter: OnnxExporter,
    model: torch.nn.Module,
    run_dir: RunDirectory,
    server_round: int,
    result: EvalResult,
    settings: RunSettings,
) -> None:
    """Export the global model (already loaded into ``model``) and make it current."""
    started = time.perf_counter()
    exported = exporter.export(model, what=f"model {settings.model!r} of round {server_round}")
    # JSON has no NaN: a diverged loss is left out of the manifest's metrics.
    metrics = {
        key: value
        for key, value in (("accuracy", result.accuracy), ("loss", result.loss))
        if math.isfinite(value)
    }
    manifest = exported.publish(
        run_dir.models, server_round=server_round, metrics=metrics, keep=settings.keep_models
    )
    log.debug(
        "round %d: published %s (sha256 %s) in %.1f ms",
        server_round,
        manifest.file,
        manifest.sha256[:12],
        (time.perf_counter() - started) * 1e3,
    )


def _metric(metrics: MetricRecord | None, key: str) -> float | None:
    value = metrics.get(key) if metrics else None
    return float(value) if isinstance(value, int | float) else None


def numpy_arrays(arrays: ArrayRecord) -> dict[str, NDArray[Any]]:
    """Return the record's arrays as numpy arrays, by name."""
    return {key: array.numpy() for key, array in arrays.items()}


def round_record(
    server_round: int,
    result: EvalResult,
    train_loss: float | None,
    sampled: int,
    replied: int,
    failed: int,
    seconds: float,
    elapsed: float,
    *,
    federated_loss: float | None = None,
    federated_accuracy: float | None = None,
    sim_seconds: float | None = None,
    sim_elapsed: float | None = None,
    clients_dropped: int | None = None,
    dropped: dict[str, int] | None = None,
    rejected: int = 0,
    bytes_sent: int | None = None,
    bytes_received: int | None = None,
    aggregate_seconds: float | None = None,
    dp_epsilon: float | None = None,
    dp_delta: float | None = None,
) -> RoundRecord:
    """Build a round's ``metrics.jsonl`` record, times rounded as the file keeps them."""
    return RoundRecord(
        round=server_round,
        loss=result.loss,
        accuracy=result.accuracy,
        train_loss=train_loss,
        clients_sampled=sampled,
        clients_replied=replied,
        clients_failed=failed,
        seconds=round(seconds, 4),
        elapsed=round(elapsed, 4),
        federated_loss=federated_loss,
        federated_accuracy=federated_accuracy,
        sim_seconds=None if sim_seconds is None else round(sim_seconds, 6),
        sim_elapsed=None if sim_elapsed is None else round(sim_elapsed, 6),
        clients_dropped=clients_dropped,
        dropped=dropped,
        clients_rejected=rejected,
        bytes_sent=bytes_sent,
        bytes_received=bytes_received,
        aggregate_seconds=None if aggregate_seconds is None else round(aggregate_seconds, 6),
        dp_epsilon=dp_epsilon,
        dp_delta=dp_delta,
    )


def _dp(strategy: Strategy) -> dict[str, Any]:
    """Return the ``metrics.jsonl`` fields of differential privacy (none without it)."""
    spent = privacy_spent(strategy)
    return {} if spent is None else {"dp_epsilon": spent[0], "dp_delta": spent[1]}


def emit(run_dir: RunDirectory, record: RoundRecord, num_rounds: int) -> None:
    """Append ``record`` to ``metrics.jsonl`` and log it (front ends follow the log)."""
    run_dir.append_metrics(record)
    log.info(
        "round %d/%d: accuracy %.4f, loss %.4f, %d/%d clients replied, %.2f s",
        record.round,
        num_rounds,
        record.accuracy,
        record.loss,
        record.clients_replied,
        record.clients_sampled,
        record.seconds,
        extra={ROUND_EXTRA_KEY: record, "num_rounds": num_rounds},
    )
