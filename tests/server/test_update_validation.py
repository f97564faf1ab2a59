"""A federation with clients that send malformed updates: none is averaged, the run goes on.

The server is fedscale's round loop on the in-process engine; honest nodes run
fedscale's own ClientApp code; the others send real Flower replies
(``Message(content, reply_to=msg)``) that are malformed in one of many ways.
The strategy is a real FedAvg that records every reply it is given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SType
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

import fedscale.simulations.cohort_delivery as cohort_delivery
from fedscale.edge_client.app import evaluate_handler, train_handler
from fedscale.node_data import node_data
from fedscale.runs import RunDirectory
from fedscale.server.federation import run_federation
from fedscale.settings import RunSettings
from fedscale.simulations import run_apps, simulate

CLIENTS = 12
ROUNDS = 4
BASE = RunSettings(
    num_rounds=ROUNDS,
    num_clients=CLIENTS,
    clients_per_round=CLIENTS,
    min_clients=CLIENTS,
    local_epochs=2,
    batch_size=16,
    lr=0.1,
    seed=3,
    dataset="digits",
    model="mlp",
    device="cpu",
    export_onnx=False,
)
MALFORMATIONS = (
    "nan",
    "inf",
    "shape",
    "dtype",
    "missing",
    "extra",
    "renamed",
    "lying-bytes",
    "zero-examples",
    "absurd-examples",
    "fractional-examples",
    "oversized",
    "two-array-records",
    "nan-loss",
)


class RecordingFedAvg(FedAvg):
    """Flower's FedAvg, remembering which node's content each aggregation was given."""

    def __init__(self) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=CLIENTS,
            min_available_nodes=CLIENTS,
        )
        self.received: list[tuple[int, int]] = []  # (round, node) of each content reply

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            if not reply.has_error():
                self.received.append((server_round, reply.metadata.src_node_id))
        return super().aggregate_train(server_round, replies)


class Federation:
    """One run's apps: bad partitions reply with malformed updates, the others honestly."""

    def __init__(self, bad_partitions: set[int]) -> None:
        self.bad_partitions = bad_partitions
        self.sent_malformed: list[tuple[int, int, str]] = []  # (round, node, kind)
        self.strategy = RecordingFedAvg()
        self.client = ClientApp()
        self.server = ServerApp()
        self.client.train()(self._train)
        self.client.evaluate()(evaluate_handler)
        self.server.main()(self._main)

    def _main(self, grid: Grid, context: Context) -> None:
        settings = RunSettings.from_run_config(context.run_config, complete=True)
        run_federation(grid, settings, out=settings.out, strategy=self.strategy)

    def _train(self, msg: Message, context: Context) -> Message:
        honest = train_handler(msg, context)
        partition = int(context.node_config["partition-id"])
        if partition not in self.bad_partitions:
            return honest
        server_round = int(msg.content["config"]["server-round"])
        kind = MALFORMATIONS[(partition + 5 * server_round) % len(MALFORMATIONS)]
        self.sent_malformed.append((server_round, context.node_id, kind))
        return Message(_malformed(honest.content, kind), reply_to=msg)


def _malformed(content: RecordDict, kind: str) -> RecordDict:
    arrays = {k: v.numpy() for k, v in content["arrays"].items()}
    metrics = dict(content["metrics"])
    first = next(iter(arrays))
    records: dict[str, ArrayRecord | MetricRecord] = {}
    if kind in ("nan", "inf"):
        arrays[first].flat[0] = math.nan if kind == "nan" else -math.inf
    elif kind == "shape":
        arrays[first] = arrays[first].T.copy()
    elif kind == "dtype":
        arrays[first] = arrays[first].astype(np.float64)
    elif kind == "missing":
        del arrays[first]
    elif kind == "extra":
        arrays["backdoor.weight"] = np.ones(3, np.float32)
    elif kind == "renamed":
        arrays["renamed"] = arrays.pop(first)
    elif kind == "zero-examples":
        metrics["num-examples"] = 0
    elif kind == "absurd-examples":
        metrics["num-examples"] = 10**12
    elif kind == "fractional-examples":
        metrics["num-examples"] = 0.5
    elif kind == "nan-loss":
        metrics["train-loss"] = math.nan
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    if kind == "lying-bytes":
        real = Array(np.zeros(arrays[first].size, np.float32)).data  # flat, not the model's shape
        declared = record[first]
        record[first] = Array(
            dtype=declared.dtype, shape=tuple(declared.shape), stype=SType.NUMPY, data=real
        )
    elif kind == "oversized":
        declared = record[first]
        record[first] = Array(
            dtype=declared.dtype,
            shape=tuple(declared.shape),
            stype=SType.NUMPY,
            data=declared.data + bytes(4 << 20),  # beyond twice the model plus 1 MiB
        )
    records["arrays"] = record
    if kind == "two-array-records":
        records["more-arrays"] = record
    records["metrics"] = MetricRecord(metrics)
    return RecordDict(records)


def _run(tmp_path, name: str, bad: set[int], **settings) -> tuple[Federation, list[dict]]:
    federation = Federation(bad)
    out = tmp_path / name
    run_apps(
        federation.server,
        federation.client,
        clients=CLIENTS,
        run_config=BASE.replace(out=str(out), **settings).to_run_config(),
    )
    return federation, RunDirectory(out).read_metrics()


def test_malformed_updates_never_reach_aggregation_and_the_run_completes(tmp_path, caplog):
    bad = {1, 4, 7, 10}
    caplog.set_level("WARNING", logger="fedscale.server.federation")
    attacked, rows = _run(tmp_path, "attacked", bad)
    clean, clean_rows = _run(tmp_path, "clean", set())

    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    sent = attacked.sent_malformed
    assert len(sent) == len(bad) * ROUNDS
    assert len({kind for _, _, kind in sent}) >= 10  # many kinds of fault, not one
    bad_nodes = {node for _, node, _ in sent}
    # Nothing a bad node sent was handed to the strategy; every honest reply was.
    assert {node for _, node in attacked.strategy.received}.isdisjoint(bad_nodes)
    assert len(attacked.strategy.received) == (CLIENTS - len(bad)) * ROUNDS
    for row in rows[1:]:
        assert row["clients_rejected"] == len(bad)
        assert row["clients_replied"] == CLIENTS - len(bad)
        assert row["clients_failed"] == 0
        assert row["clients_sampled"] == CLIENTS
    assert rows[0]["clients_rejected"] == 0
    # One warning per rejected reply, naming the node.
    warnings = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(warnings) == len(sent)
    assert all(any(f"node {node} " in w for w in warnings) for node in bad_nodes)

    assert all(r["clients_rejected"] == 0 for r in clean_rows)
    assert clean.sent_malformed == []
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert clean_rows[-1]["accuracy"] > clean_rows[0]["accuracy"] + 0.3
    # Two thirds of the honest data trains as well, within a few points.
    assert rows[-1]["accuracy"] == pytest.approx(clean_rows[-1]["accuracy"], abs=0.05)


def test_a_round_whose_every_update_is_rejected_keeps_the_global_model(tmp_path):
    federation, rows = _run(tmp_path, "all-bad", set(range(CLIENTS)))
    assert federation.strategy.received == []
    run = RunDirectory(tmp_path / "all-bad")
    first = run.load_global_model(0)
    last = run.load_global_model(ROUNDS)
    assert list(first) == list(last)
    for key in first:
        np.testing.assert_array_equal(first[key], last[key])
    assert [r["clients_rejected"] for r in rows] == [0] + [CLIENTS] * ROUNDS
    assert all(r["clients_replied"] == 0 for r in rows)
    assert {r["accuracy"] for r in rows} == {rows[0]["accuracy"]}


def test_a_round_with_fewer_usable_replies_than_min_replies_keeps_the_global_model(
    tmp_path, caplog
):
    bad = {0, 1, 2, 3}
    caplog.set_level("WARNING", logger="fedscale.server.federation")
    federation, rows = _run(tmp_path, "strict", bad, min_replies=CLIENTS - len(bad) + 1)
    assert federation.strategy.received == [], "no round reached aggregation"
    run = RunDirectory(tmp_path / "strict")
    first, last = run.load_global_model(0), run.load_global_model(ROUNDS)
    assert all(np.array_equal(first[k], last[k]) for k in first)
    assert all(r["clients_replied"] == CLIENTS - len(bad) for r in rows[1:])
    warned = [r.getMessage() for r in caplog.records if "fewer than min-replies" in r.getMessage()]
    assert len(warned) == ROUNDS

    # Exactly enough usable replies: the rounds aggregate them.
    federation, rows = _run(tmp_path, "enough", bad, min_replies=CLIENTS - len(bad))
    assert len(federation.strategy.received) == ROUNDS * (CLIENTS - len(bad))
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]


@pytest.fixture
def cohorts(monkeypatch):
    """Count the cohorts the fast path trains (the real trainer does the work)."""
    calls = []
    real = cohort_delivery.train_cohort

    def counting(model, datasets, **kwargs):
        calls.append(len(datasets))
        return real(model, datasets, **kwargs)

    monkeypatch.setattr(cohort_delivery, "train_cohort", counting)
    return calls


def test_replies_of_the_fast_path_are_validated_too(tmp_path, cohorts):
    # Non-IID shards give the clients different sizes; max-examples sits in between.
    settings = BASE.replace(partition="dirichlet:0.3", min_clients=2)
    sizes = [
        len(node_data(settings, {"partition-id": p, "num-partitions": CLIENTS}).x_train)
        for p in range(CLIENTS)
    ]
    limit = sorted(sizes)[CLIENTS // 2]
    too_many = sum(n > limit for n in sizes)
    assert 0 < too_many < CLIENTS
    result = simulate(settings, out=str(tmp_path / "fast"), fast_path=True, max_examples=limit)
    assert cohorts == [CLIENTS] * ROUNDS  # every reply came from the cohort trainer
    for row in result.rounds[1:]:
        assert row["clients_rejected"] == too_many
        assert row["clients_replied"] == CLIENTS - too_many
    assert result.rounds[-1]["accuracy"] > result.rounds[0]["accuracy"]
