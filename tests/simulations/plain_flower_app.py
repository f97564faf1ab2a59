"""A minimal app in plain Flower API: it imports nothing from fedscale.

Its clients return known arrays, keep a call counter in ``Context.state``, edit
the message they receive in place, and one of them fails on purpose, so that a
runtime's semantics can be checked from what the ServerApp observes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

OBSERVED: dict[str, Any] = {"lifespan": 0, "rounds": []}


def client_values(partition_id: int, server_round: int) -> dict[str, np.ndarray]:
    """What partition ``partition_id`` returns in ``server_round``."""
    return {
        "w": np.array([partition_id + 1.0, 2.0 * (partition_id + 1), -partition_id]) / 3
        + server_round,
        "b": np.full((2, 2), partition_id * 0.1, dtype=np.float32),
    }


def tag_mod(msg: Message, context: Context, call_next: Any) -> Message:
    reply: Message = call_next(msg, context)
    if reply.has_content():
        reply.content["metrics"]["via-mod"] = 1
    return reply


client_app = ClientApp(mods=[tag_mod])


@client_app.lifespan()
def lifespan(context: Context) -> Iterator[None]:
    OBSERVED["lifespan"] += 1
    yield


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    calls = context.state.get("calls", MetricRecord({"n": 0}))
    calls["n"] = int(calls["n"]) + 1
    context.state["calls"] = calls
    received_w0 = float(msg.content["arrays"]["w"].numpy()[0])
    # Scribble over the received content: other nodes must not see it.
    msg.content["arrays"]["w"] = Array(np.full(3, 1e9))
    if pid == context.run_config.get("fail-partition") and server_round == context.run_config.get(
        "fail-round"
    ):
        raise RuntimeError("planned failure")
    values = client_values(pid, server_round)
    reply = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in values.items()}),
            "metrics": MetricRecord(
                {
                    "num-examples": pid + 1,
                    "calls": calls["n"],
                    "received-w0": received_w0,
                    "partition": pid,
                }
            ),
        }
    )
    return Message(reply, reply_to=msg)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    OBSERVED["rounds"] = []
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=1,
    )
    arrays = ArrayRecord({"w": Array(np.zeros(3)), "b": Array(np.zeros((2, 2), dtype=np.float32))})
    for server_round in range(1, int(context.run_config["num-rounds"]) + 1):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        ids = list(grid.push_messages(messages))
        replies = list(grid.pull_messages(ids))
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        OBSERVED["rounds"].append(
            {
                "global_w0": float(arrays["w"].numpy()[0]),
                "ids": ids,
                "replies": replies,
                "aggregate": {k: v.numpy() for k, v in aggregated.items()} if aggregated else None,
            }
        )
        if aggregated is not None:
            arrays = aggregated
