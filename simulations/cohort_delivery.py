"""The in-process engine's fast path: a round's train messages trained as one cohort.

fedscale's own ClientApp (:mod:`fedscale.edge_client.app`) trains the received
global model on the node's data with :func:`fedscale.training.train`. When the
in-process grid is asked for the replies to many such train messages at once, and
the model can be trained as a cohort (:func:`fedscale.cohort.cohort_support`),
:func:`deliver_cohorts` trains them together with
:func:`fedscale.cohort.train_cohort` and builds exactly the replies the ClientApp
would: the same inputs (the node's data, the round's config, the same shuffle
seed from :func:`fedscale.training.shuffle_seed`), the same reply records, in the
same key order and dtypes, equal within float rounding. With ``compression`` the
replies are encoded by the same :func:`fedscale.compression.compress_reply` the
ClientApp's mod calls, top-k's residual kept in the node's ``Context.state``.

Everything else is left to the grid's general path, unchanged: evaluate and
other messages, other ClientApps, a ClientApp given mods, models that are not
eligible, nodes with a model directory (those export before training), messages
with FedProx's ``proximal-mu`` above 0, every message of a run with an ``attack``
(its Byzantine clients change their replies after training) or with client-side
differential privacy (the ClientApp's train mod clips its replies), and any
message whose inputs the ClientApp would refuse (so its error reply is the one
the general path gives). Nodes that do not exist or are offline get the grid's
own error replies.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from torch import nn

from fedscale.cohort import cohort_support, train_cohort
from fedscale.compression import Compression, base_round_of, compress_reply
from fedscale.exceptions import DataError, FedscaleError, RecordError
from fedscale.node_data import node_data, node_device_name
from fedscale.privacy import CLIENT_SIDE_MODES
from fedscale.records import load_arrays_into, stacked_to_arrays, train_reply_content
from fedscale.settings import RunSettings
from fedscale.training import resolve_device, shuffle_seed

from ._flower import set_message_id

if TYPE_CHECKING:
    from .grid import BatchDelivery, InProcessGrid

__all__ = ["deliver_cohorts", "fast_path_for"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class _Client:
    message: Message
    x: npt.NDArray[Any]
    y: npt.NDArray[np.int64]
    seed: int


# What a cohort shares: the global model (the very record the strategy sent),
# the round's training settings, the device, and the shape of a sample.
_GroupKey = tuple[int, float, int, int, int, str, tuple[int, ...]]


def fast_path_for(client_app: Any) -> BatchDelivery | None:
    """Return the grid's batch delivery for ``client_app``, or ``None`` if it has none.

    Only fedscale's own ClientApp, without mods (a mod may change what a
    message or reply holds), has one: :func:`deliver_cohorts`.
    """
    from fedscale.edge_client.app import app

    if client_app is app and not client_app._mods:
        return deliver_cohorts
    return None


def deliver_cohorts(grid: InProcessGrid, messages: list[Message]) -> dict[str, Message]:
    """Train the eligible train messages among ``messages`` as cohorts; return their replies.

    Replies are keyed by the message's id and have ids of their own, as the
    grid's general path gives them. Messages not answered are left to it.
    """
    from fedscale.edge_client.app import MODEL_DIR_KEY

    train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
    if len(train) < 2:  # one client gains nothing from batching
        return {}
    try:
        settings = RunSettings.from_run_config(grid.run_config, complete=True)
    except FedscaleError:
        return {}  # the ClientApp refuses these settings: let it say so per message
    if settings.attack:
        return {}  # Byzantine clients change their replies after training: the ClientApp's job
    if settings.dp in CLIENT_SIDE_MODES:
        return {}  # the ClientApp's train mod clips (and noises) every reply
    if settings.secagg:
        return {}  # SecAgg+ messages: the ClientApp's train mod runs the protocol and masks
    replies: dict[str, Message] = {}
    groups: dict[_GroupKey, list[_Client]] = {}
    records: dict[int, ArrayRecord] = {}
    parsed: dict[tuple[int, str], _Parsed] = {}  # a round's messages share one config record
    for message in train:
        node_config = grid.node_config(message.metadata.dst_node_id)
        if MODEL_DIR_KEY in node_config:
            continue
        unavailable = grid.unavailable_reply(message)
        if unavailable is not None:
            grid.stats.messages += 1
            replies[message.metadata.message_id] = unavailable
            continue
        try:
            key, client, record = _client(message, settings, node_config, parsed)
        except Exception:  # noqa: BLE001  # the general path gives the ClientApp's own error
            continue
        records[key[0]] = record
        groups.setdefault(key, []).append(client)
    for key, clients in groups.items():
        replies.update(_train_group(grid, settings, key, records[key[0]], clients))
    return replies


# What a config record and a device name give every client that shares them.
_Parsed = tuple[float, int, int, int, int, str]


def _client(
    message: Message,
    settings: RunSettings,
    node_config: dict[str, Any],
    parsed: dict[tuple[int, str], _Parsed],
) -> tuple[_GroupKey, _Client, ArrayRecord]:
    """Gather what the ClientApp's train handler reads, checked as it checks it.

    ``parsed`` remembers, for the duration of one batch, each (config record,
    device name) pair's checked values: the round's messages share both.
    """
    from fedscale.edge_client.app import PROXIMAL_MU_KEY, _config, _config_float, _config_int

    config: ConfigRecord = _config(message)
    arrays = [r for r in message.content.values() if isinstance(r, ArrayRecord)]
    if len(arrays) != 1 or "num-classes" not in config:
        raise RecordError("not a train message fedscale's ClientApp accepts")
    device_name = node_device_name(settings, node_config)
    memo = (id(config), device_name)
    values = parsed.get(memo)
    if values is None:
        if config.get(PROXIMAL_MU_KEY, 0.0) != 0.0:
            # FedProx's proximal term is not part of cohort training: the ClientApp adds it.
            raise RecordError("a proximal term: trained by the ClientApp")
        values = (
            _config_float(config, "lr", settings.lr),
            _config_int(config, "local-epochs", settings.local_epochs),
            _config_int(config, "batch-size", settings.batch_size),
            _config_int(config, "num-classes", 0),
            _config_int(config, "server-round", 1),
            str(resolve_device(device_name)),
        )
        parsed[memo] = values
    lr, epochs, batch_size, num_classes, server_round, device = values
    data = node_data(settings, node_config)
    if int(data.y_train.max()) >= num_classes:
        raise DataError(f"{data.source}: labels beyond the model's {num_classes} classes")
    who = node_config.get("partition-id", message.metadata.dst_node_id)
    seed = shuffle_seed(settings.seed, server_round, int(who))
    key: _GroupKey = (
        id(arrays[0]),
        lr,
        epochs,
        batch_size,
        num_classes,
        device,
        tuple(data.x_train.shape[1:]),
    )
    return key, _Client(message, data.x_train, data.y_train, seed), arrays[0]


def _train_group(
    grid: InProcessGrid,
    settings: RunSettings,
    key: _GroupKey,
    record: ArrayRecord,
    clients: list[_Client],
) -> dict[str, Message]:
    """Train one cohort and build its replies; nothing if the model is not eligible."""
    from fedscale.edge_client.app import _cached_model

    _, lr, epochs, batch_size, num_classes, device, input_shape = key
    compression = Compression.parse(settings.compression)
    started = time.perf_counter()
    model: nn.Module = _cached_model(settings.model, input_shape, num_classes)
    if len(clients) < 2 or not cohort_support(model):
        return {}
    # Most steps first, then most samples (stable): train_cohort's own order, so it
    # trains in its output without copying the cohort's parameters back into place.
    # Replies are keyed by message, so the order of training is free.
    clients = sorted(clients, key=lambda c: ((-len(c.y)) // batch_size, -len(c.y)))
    try:
        load_arrays_into(model, record)
        trained = train_cohort(
            model,
            [(c.x, c.y) for c in clients],
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seeds=[c.seed for c in clients],
            device=torch.device(device),
        )
    except Exception as err:  # noqa: BLE001  # each client then fails or not on its own
        log.debug("fast path declined a cohort of %d: %s", len(clients), err)
        return {}
    replies: dict[str, Message] = {}
    arrays = stacked_to_arrays(trained.parameters)
    for client, trained_arrays, result in zip(clients, arrays, trained.results, strict=True):
        content = train_reply_content(trained_arrays, result.num_examples, result.loss)
        if compression is not None:
            encoded = _compress(grid, client.message, content, record, compression)
            if encoded is None:
                continue  # the general path gives the ClientApp's error reply
            content = encoded
        reply = Message(content, reply_to=client.message)
        set_message_id(reply, uuid.uuid4().hex)
        replies[client.message.metadata.message_id] = reply
    grid.stats.messages += len(replies)
    grid.stats.client_seconds += time.perf_counter() - started
    return replies


def _compress(
    grid: InProcessGrid,
    message: Message,
    content: RecordDict,
    record: ArrayRecord,
    compression: Compression,
) -> RecordDict | None:
    """Encode a reply as the ClientApp's ``compression_mod`` does, with the node's context.

    Top-k's residual is read from and written to the node's ``Context.state``,
    kept by the grid as for a ClientApp call; ``None`` (and the context left
    as it was) when the encoder refuses the update.
    """
    node_id = message.metadata.dst_node_id
    context = grid.node_context(node_id)
    try:
        encoded = compress_reply(
            content, record, compression, context.state, base_round=base_round_of(message.content)
        )
    except FedscaleError as err:
        log.debug("fast path left node %d's reply to the ClientApp: %s", node_id, err)
        return None
    grid.commit_context(node_id, context)
    return encoded
