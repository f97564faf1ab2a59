"""The server's round loop: sample, train, aggregate, evaluate, record.

It drives any Flower ``Strategy`` through its four hooks (``configure_train``,
``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate``) instead of
calling ``Strategy.start``, because the server must act between rounds: evaluate
the global model on its held-out split, store it, export it to the run's model
directory, and write ``metrics.jsonl`` before the next round begins (``start``
only returns at the end).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from numpy.typing import NDArray

from fedscale.datasets import Dataset, load_dataset
from fedscale.exceptions import ExportError, LaunchError
from fedscale.models import build_model
from fedscale.records import conform_dtypes, load_arrays_into, state_dict_to_arrays
from fedscale.runs import RoundRecord, RunDirectory
from fedscale.settings import RunSettings
from fedscale.training import EvalResult, evaluate, resolve_device

if TYPE_CHECKING:
    from fedscale.export import OnnxExporter

__all__ = [
    "ROUND_EXTRA_KEY",
    "FederationResult",
    "default_strategy",
    "run_federation",
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


def default_strategy(settings: RunSettings) -> FedAvg:
    """Flower's FedAvg, sized each round by :func:`size_for_round`."""
    return FedAvg(
        # With fraction-evaluate 0 the round loop never asks for federated
        # evaluation; FedAvg's own 0.0 would only log a warning every run.
        fraction_evaluate=settings.fraction_evaluate or 1.0,
        min_available_nodes=1,
    )


def size_for_round(strategy: FedAvg, settings: RunSettings, connected: int) -> int:
    """Make FedAvg sample exactly ``min(clients-per-round, connected)`` nodes.

    FedAvg samples ``max(int(fraction_train * connected), min_train_nodes)`` and
    waits while fewer than ``min_available_nodes`` are connected; set from the
    nodes connected now, every round, so nodes that join or leave change the
    pool but never the number sampled. Returns that number.
    """
    per_round = min(settings.clients_per_round, connected)
    strategy.fraction_train = per_round / connected
    strategy.min_train_nodes = per_round
    strategy.min_available_nodes = per_round
    if settings.fraction_evaluate > 0:
        strategy.min_evaluate_nodes = max(1, int(settings.fraction_evaluate * connected))
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
    # Flower's samplers draw from the `random` module: seed it for repeatable runs.
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    dataset = load_dataset(
        settings.dataset,
        seed=settings.seed,
        test_fraction=settings.test_fraction,
        label_column=settings.label_column,
    )
    device = resolve_device(settings.device)
    model = build_model(
        settings.model, dataset.sample_shape, dataset.num_classes, seed=settings.seed
    )
    arrays = state_dict_to_arrays(model.state_dict())
    run_dir = RunDirectory(out).create()
    run_dir.write_config(settings.replace(out=str(run_dir.path)).to_run_config())
    exporter = _exporter(settings, dataset)

    available = wait_for_nodes(grid, settings.min_clients, settings.round_timeout)
    sized_here = strategy is None
    strategy = strategy or default_strategy(settings)
    log.info(
        "run %s: %d rounds of %s on %s, %d nodes connected",
        run_dir.path.name,
        settings.num_rounds,
        type(strategy).__name__,
        settings.dataset,
        len(available),
    )

    started = time.monotonic()
    initial = evaluate(model, dataset.x_test, dataset.y_test, device=device)
    records = [_record(0, initial, None, 0, 0, 0, 0.0, 0.0)]
    run_dir.save_global_model(0, _numpy(arrays))
    if exporter is not None:
        try:
            _publish(exporter, model, run_dir, 0, initial, settings)
        except ExportError as err:
            # Refuse the run before any training: every later round would be refused too.
            raise ExportError(
                f"{err}; set export-onnx = false (--no-export-onnx) to train without ONNX models"
            ) from err
    _emit(run_dir, records[-1], settings.num_rounds)

    for server_round in range(1, settings.num_rounds + 1):
        round_start = time.monotonic()
        if sized_here:
            connected = len(wait_for_nodes(grid, 1, settings.round_timeout))
            per_round = size_for_round(cast(FedAvg, strategy), settings, connected)
            if per_round < settings.clients_per_round:
                log.warning(
                    "round %d: clients-per-round is %d but %d nodes are connected",
                    server_round,
                    settings.clients_per_round,
                    connected,
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
        replies = _send(grid, messages, settings.round_timeout)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = conform_dtypes(new_arrays, arrays)
        failed = sum(r.has_error() for r in replies) + len(messages) - len(replies)

        federated = None
        if settings.fraction_evaluate > 0:
            eval_config = ConfigRecord({"num-classes": dataset.num_classes})
            eval_messages = list(
                strategy.configure_evaluate(server_round, arrays, eval_config, grid)
            )
            eval_replies = _send(grid, eval_messages, settings.round_timeout)
            federated = strategy.aggregate_evaluate(server_round, eval_replies)

        result = _evaluate_global(model, arrays, dataset, device)
        run_dir.save_global_model(server_round, _numpy(arrays))
        if exporter is not None:
            try:
                _publish(exporter, model, run_dir, server_round, result, settings)
            except ExportError as err:
                # The model directory keeps the last model that passed; training goes on.
                log.error("round %d: global model not published: %s", server_round, err)
        now = time.monotonic()
        record = _record(
            server_round,
            result,
            _metric(train_metrics, "train-loss"),
            len(messages),
            len(messages) - failed,
            failed,
            now - round_start,
            now - started,
            federated_loss=_metric(federated, "eval-loss"),
            federated_accuracy=_metric(federated, "eval-accuracy"),
        )
        records.append(record)
        _emit(run_dir, record, settings.num_rounds)

    return FederationResult(run_dir=run_dir, rounds=records, arrays=arrays)


def _send(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    if not messages:
        return []
    return list(grid.send_and_receive(messages, timeout=timeout))


def _evaluate_global(
    model: torch.nn.Module, arrays: ArrayRecord, dataset: Dataset, device: torch.device
) -> EvalResult:
    load_arrays_into(model, arrays)
    return evaluate(model, dataset.x_test, dataset.y_test, device=device)


def _exporter(settings: RunSettings, dataset: Dataset) -> OnnxExporter | None:
    if not settings.export_onnx:
        return None
    from fedscale.export import OnnxExporter  # onnxruntime loads only when exporting

    # One exporter for the run: parity inputs and session options are built once.
    return OnnxExporter.for_data(dataset.x_train, seed=settings.seed)


def _publish(
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


def _numpy(arrays: ArrayRecord) -> dict[str, NDArray[Any]]:
    return {key: array.numpy() for key, array in arrays.items()}


def _record(
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
) -> RoundRecord:
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
    )


def _emit(run_dir: RunDirectory, record: RoundRecord, num_rounds: int) -> None:
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
