"""The server's round loop: sample, train, aggregate, evaluate, record.

It drives any Flower ``Strategy`` through its four hooks (``configure_train``,
``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate``) instead of
calling ``Strategy.start``, because the server must act between rounds: evaluate
the global model on its held-out split, store it, and write ``metrics.jsonl``
before the next round begins (``start`` only returns at the end).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from numpy.typing import NDArray

from fedscale.datasets import Dataset, load_dataset
from fedscale.exceptions import LaunchError
from fedscale.models import build_model
from fedscale.records import load_arrays_into, state_dict_to_arrays
from fedscale.runs import RoundRecord, RunDirectory
from fedscale.settings import RunSettings
from fedscale.training import EvalResult, evaluate, resolve_device

__all__ = ["FederationResult", "ROUND_EXTRA_KEY", "run_federation", "wait_for_nodes"]

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


def default_strategy(settings: RunSettings, available: int) -> FedAvg:
    """FedAvg sampling ``clients-per-round`` of the ``available`` nodes."""
    per_round = min(settings.clients_per_round, available)
    if per_round < settings.clients_per_round:
        log.warning(
            "clients-per-round is %d but only %d nodes are connected; sampling %d",
            settings.clients_per_round,
            available,
            per_round,
        )
    evaluate_nodes = max(1, round(settings.fraction_evaluate * available))
    return FedAvg(
        # FedAvg samples max(int(fraction * connected), min_train_nodes) nodes.
        fraction_train=per_round / available,
        min_train_nodes=per_round,
        # With fraction-evaluate 0 the round loop never asks for federated
        # evaluation; FedAvg's own 0.0 would only log a warning every run.
        fraction_evaluate=settings.fraction_evaluate or 1.0,
        min_evaluate_nodes=evaluate_nodes,
        min_available_nodes=min(settings.min_clients, available),
    )


def run_federation(
    grid: Grid,
    settings: RunSettings,
    *,
    out: str | Path,
    strategy: Strategy | None = None,
) -> FederationResult:
    """Run ``settings.num_rounds`` rounds of federated training on ``grid``.

    Writes ``config.toml``, ``metrics.jsonl`` and one checkpoint per round into
    ``out`` and returns the result.
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

    available = wait_for_nodes(grid, settings.min_clients, settings.round_timeout)
    strategy = strategy or default_strategy(settings, len(available))
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
    _emit(run_dir, records[-1], settings.num_rounds)

    for server_round in range(1, settings.num_rounds + 1):
        round_start = time.monotonic()
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
            arrays = new_arrays
        failed = sum(r.has_error() for r in replies) + len(messages) - len(replies)

        if settings.fraction_evaluate > 0:
            eval_config = ConfigRecord({"num-classes": dataset.num_classes})
            eval_messages = list(
                strategy.configure_evaluate(server_round, arrays, eval_config, grid)
            )
            eval_replies = _send(grid, eval_messages, settings.round_timeout)
            strategy.aggregate_evaluate(server_round, eval_replies)

        result = _evaluate_global(model, arrays, dataset, device)
        run_dir.save_global_model(server_round, _numpy(arrays))
        train_loss = train_metrics.get("train-loss") if train_metrics else None
        now = time.monotonic()
        record = _record(
            server_round,
            result,
            float(train_loss) if isinstance(train_loss, int | float) else None,
            len(messages),
            len(messages) - failed,
            failed,
            now - round_start,
            now - started,
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
