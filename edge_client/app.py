"""fedscale's ClientApp: train and evaluate the global model on a node's own data.

The same ClientApp runs on every runtime: on a SuperNode at the edge, in Flower's
Ray simulation, and in fedscale's in-process engine. What it trains on comes from
the node's ``node_config`` (see :mod:`fedscale.node_data`); the run's settings
come from the run config, and per-round values (learning rate, local epochs,
batch size) from the server's ``config`` record, so a server may change them
between rounds.

A node whose ``node_config`` has ``model-dir`` also keeps a model directory
(:mod:`fedscale.modelstore`): on every train message it exports the global
model it received to ONNX and publishes it there before training, so a device
serves the federation's newest model.

A round's config with ``proximal-mu`` (Flower's FedProx sends it) adds FedProx's
proximal term to local training. A run with an ``attack`` makes its Byzantine
clients (a fixed set, see :mod:`fedscale.attacks`) reply with a malicious update
instead of the honest one, after training, on every runtime alike.

A run with client-side differential privacy (``dp`` client-fixed, client-adaptive
or local) clips (and with local DP, noises) every train reply in Flower's mods
before it leaves the node (:func:`fedscale.privacy.privacy_mod`). A run with
``compression`` then sends the update encoded (:func:`fedscale.compression.compression_mod`).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from torch import nn

from fedscale.attacks import Attack, apply_attack, is_byzantine
from fedscale.compression import compression_mod
from fedscale.exceptions import ConfigError, DataError, FedscaleError, RecordError
from fedscale.models import build_model
from fedscale.node_data import NodeData, node_data, node_device_name
from fedscale.privacy import privacy_mod
from fedscale.records import (
    arrays_to_state_dict,
    load_arrays_into,
    state_dict_to_arrays,
    train_reply_content,
)
from fedscale.settings import RunSettings
from fedscale.training import evaluate, resolve_device, shuffle_seed, train

from .secagg import secagg_mod

if TYPE_CHECKING:
    from fedscale.export import OnnxExporter

__all__ = ["MODEL_DIR_KEY", "PROXIMAL_MU_KEY", "app"]

log = logging.getLogger(__name__)

# node_config key naming the device's model directory (`edge-client --model-dir`).
MODEL_DIR_KEY = "model-dir"
# ConfigRecord key of FedProx's proximal term weight (flwr.serverapp.strategy.FedProx sets it).
PROXIMAL_MU_KEY = "proximal-mu"

app = ClientApp()


# The run's client-side differential privacy (dp client-fixed, client-adaptive,
# local), if any: Flower's mods, switched per run by the run config.
# A secagg run's train messages go through Flower's SecAgg+ mod first (.secagg), so
# client-side DP acts on the plain update before SecAgg+ masks it.
# A run with compression encodes the reply's update after the DP mod has clipped
# (and noised) it (fedscale.compression; refused together with secagg).
@app.train(mods=[secagg_mod, compression_mod, privacy_mod])
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received global model for the configured local epochs."""
    settings, config, data, device, model = _prepare(msg, context)
    if MODEL_DIR_KEY in context.node_config:
        # Before training: `model` holds the received global model until train() runs.
        _publish_received(model, settings, config, data, context)
    result = train(
        model,
        data.x_train,
        data.y_train,
        epochs=_config_int(config, "local-epochs", settings.local_epochs),
        batch_size=_config_int(config, "batch-size", settings.batch_size),
        lr=_config_float(config, "lr", settings.lr),
        device=device,
        seed=_client_seed(settings, config, context),
        proximal_mu=_proximal_mu(config),
    )
    trained = state_dict_to_arrays(model.state_dict())
    if settings.attack:
        trained = _maybe_attack(trained, msg, settings, config, context)
    return Message(train_reply_content(trained, result.num_examples, result.loss), reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the node's evaluation data."""
    _, _, data, device, model = _prepare(msg, context)
    result = evaluate(model, data.x_eval, data.y_eval, device=device)
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "eval-loss": result.loss,
            "eval-accuracy": result.accuracy,
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _prepare(
    msg: Message, context: Context
) -> tuple[RunSettings, ConfigRecord, NodeData, torch.device, nn.Module]:
    """Gather the settings, round config, node data and device, and the received model."""
    settings = RunSettings.from_run_config(context.run_config, complete=True)
    config = _config(msg)
    data = node_data(settings, context.node_config)
    device = resolve_device(node_device_name(settings, context.node_config))
    return settings, config, data, device, _global_model(msg, settings, config, data)


def _config(msg: Message) -> ConfigRecord:
    records = [r for r in msg.content.values() if isinstance(r, ConfigRecord)]
    return records[0] if records else ConfigRecord()


def _config_float(config: ConfigRecord, key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise RecordError(
            f"config {key!r}: expected a positive number from the server, got {value!r}"
        )
    return float(value)


def _config_int(config: ConfigRecord, key: str, default: int) -> int:
    value = _config_float(config, key, default)
    if value != int(value):
        raise RecordError(f"config {key!r}: expected a whole number from the server, got {value!r}")
    return int(value)


def _global_model(
    msg: Message, settings: RunSettings, config: ConfigRecord, data: NodeData
) -> nn.Module:
    arrays = [r for r in msg.content.values() if isinstance(r, ArrayRecord)]
    if len(arrays) != 1:
        raise RecordError(
            f"message: expected one ArrayRecord holding the global model, got {len(arrays)}"
        )
    if "num-classes" not in config:
        raise RecordError("config 'num-classes': expected the global model's classes, got none")
    num_classes = _config_int(config, "num-classes", 0)
    labels_max = int(data.y_train.max())
    if labels_max >= num_classes:
        raise DataError(
            f"{data.source}: expected labels below {num_classes} (the global model's "
            f"classes), got label {labels_max}"
        )
    record = arrays[0]
    model = _cached_model(settings.model, tuple(data.x_train.shape[1:]), num_classes)
    load_arrays_into(model, record)
    return model


_models = threading.local()


def _cached_model(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    # One model instance per thread and architecture, reused across messages:
    # building one costs more than a small client's training, and every call
    # loads all of the received global state (parameters and buffers) into it.
    cache: dict[tuple[str, tuple[int, ...], int], nn.Module] = _models.__dict__.setdefault(
        "by_spec", {}
    )
    key = (spec, input_shape, num_classes)
    if key not in cache:
        cache[key] = build_model(spec, input_shape, num_classes)
    return cache[key]


def _publish_received(
    model: nn.Module,
    settings: RunSettings,
    config: ConfigRecord,
    data: NodeData,
    context: Context,
) -> None:
    """Export the received global model into the node's model directory.

    The server's round ``r`` message carries the global model after round
    ``r - 1``, so it is published as round ``r - 1``: a device's
    ``model-0003.onnx`` is the server's ``model-0003.onnx``, byte for byte.
    A failure is logged and training goes on: serving must never cost the
    federation a reply.
    """
    try:
        model_dir = context.node_config[MODEL_DIR_KEY]
        if not isinstance(model_dir, str) or not model_dir:
            raise ConfigError(
                f"node config {MODEL_DIR_KEY!r}: expected a folder path, got {model_dir!r}"
            )
        if "server-round" not in config:
            raise RecordError(
                "config 'server-round': expected the round number from the server "
                "(it names the model), got none"
            )
        server_round = _config_int(config, "server-round", 1)
        exported = _cached_exporter(data.x_train).export(
            model, what=f"model {settings.model!r} of round {server_round - 1}"
        )
        exported.publish(model_dir, server_round=server_round - 1, keep=settings.keep_models)
    except (FedscaleError, OSError) as err:
        log.error("model directory not updated: %s", err)
    except Exception:
        log.exception("model directory not updated: unexpected error")


_exporters = threading.local()


def _cached_exporter(x: np.ndarray[Any, Any]) -> OnnxExporter:
    # Like the models: one exporter per thread and kind of sample, reused across
    # messages (its parity inputs and session options are built once).
    from fedscale.export import OnnxExporter  # onnxruntime loads only for a model-dir

    codes = (int(x.min()), int(x.max())) if np.issubdtype(x.dtype, np.integer) else None
    key = (tuple(x.shape[1:]), x.dtype.str, codes)
    cache: dict[object, OnnxExporter] = _exporters.__dict__.setdefault("by_data", {})
    if key not in cache:
        cache[key] = OnnxExporter.for_data(x)
    return cache[key]


def _proximal_mu(config: ConfigRecord) -> float:
    """Return FedProx's ``proximal-mu`` from the round's config (Flower's FedProx sends it)."""
    value = config.get(PROXIMAL_MU_KEY, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise RecordError(
            f"config {PROXIMAL_MU_KEY!r}: expected a number >= 0 from the server, got {value!r}"
        )
    return float(value)


def _maybe_attack(
    trained: ArrayRecord,
    msg: Message,
    settings: RunSettings,
    config: ConfigRecord,
    context: Context,
) -> ArrayRecord:
    """Replace the update by the run's attack if this client is Byzantine (see fedscale.attacks).

    After training, so every runtime attacks alike and the honest update is the
    one :func:`fedscale.training.train` gives.
    """
    attack = Attack.parse(settings.attack)
    if attack is None:
        return trained
    partition_id = context.node_config.get("partition-id")
    num_partitions = context.node_config.get("num-partitions", settings.num_clients)
    if not isinstance(partition_id, int) or not isinstance(num_partitions, int):
        raise ConfigError(
            f"attack {settings.attack!r}: expected a node with an integer partition-id and "
            f"num-partitions (a simulated or demo federation), got node config "
            f"partition-id={partition_id!r}, num-partitions={num_partitions!r}"
        )
    if not is_byzantine(settings.seed, partition_id, num_partitions, settings.attack_fraction):
        return trained
    received = next(r for r in msg.content.values() if isinstance(r, ArrayRecord))
    attacked = apply_attack(
        attack,
        {k: t.numpy() for k, t in arrays_to_state_dict(received).items()},
        {k: t.numpy() for k, t in arrays_to_state_dict(trained).items()},
        seed=settings.seed,
        server_round=_config_int(config, "server-round", 1),
        partition_id=partition_id,
    )
    return state_dict_to_arrays({k: torch.from_numpy(v) for k, v in attacked.items()})


def _client_seed(settings: RunSettings, config: ConfigRecord, context: Context) -> int:
    """Return this node's shuffle seed for the round (`fedscale.training.shuffle_seed`)."""
    who = context.node_config.get("partition-id", context.node_id)
    return shuffle_seed(settings.seed, _config_int(config, "server-round", 1), int(who))
