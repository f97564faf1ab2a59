"""SecAgg+: the aggregate is the weighted average, and the server never sees a plain update.

The secure runs use fedscale's real apps on the in-process engine (Flower's
``SecAggPlusWorkflow`` and ``secaggplus_mod`` unchanged) and, in the deployment
test, a real SuperLink with three SuperNodes. The reference for the aggregate is
the same clients trained again without SecAgg+ (their training is deterministic:
the same data, seed and starting model), averaged by plain numpy.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid, ServerApp
from typer.testing import CliRunner

from fedscale.cli.main import app as cli_app
from fedscale.edge_client.app import app as client_app
from fedscale.edge_client.secagg import ARRAY_NAMES_KEY, secagg_mod, to_fedscale_message
from fedscale.exceptions import ConfigError, RecordError
from fedscale.runs import RunDirectory
from fedscale.server.app import main as fedscale_server_main
from fedscale.server.secagg import ARRAY_NAMES_KEY as SERVER_ARRAY_NAMES_KEY
from fedscale.server.secagg import ObservedGrid
from fedscale.settings import RunSettings
from fedscale.simulations import run_apps
from tests.server.deployment import run_deployment

CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 2**22
MAX_WEIGHT = 1000.0


class TapGrid(ObservedGrid):
    """Record every message the ServerApp sends and every reply it receives."""

    def __init__(self, inner: Grid) -> None:
        super().__init__(inner)
        self.sent_messages: list[Message] = []
        self.received_messages: list[Message] = []

    def sent(self, messages: list[Message]) -> None:
        self.sent_messages += messages

    def received(self, replies: list[Message]) -> None:
        self.received_messages += replies


def _secagg_settings(tmp_path: Any, **overrides: Any) -> RunSettings:
    return RunSettings(
        num_rounds=1,
        num_clients=6,
        clients_per_round=5,
        min_clients=6,
        local_epochs=1,
        partition="dirichlet:1.0",
        device="cpu",
        export_onnx=False,
        out=str(tmp_path / "run"),
        secagg=True,
        secagg_num_shares=3.0,
        secagg_reconstruction_threshold=2.0,
        secagg_clipping_range=CLIPPING_RANGE,
        secagg_quantization_range=QUANTIZATION_RANGE,
        secagg_max_weight=MAX_WEIGHT,
    ).replace(**overrides)


def _run_tapped(settings: RunSettings) -> tuple[TapGrid, Any]:
    """Run fedscale's ServerApp behind a tap, on the in-process engine; return tap and grid."""
    tapped: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def tapped_main(grid: Grid, context: Context) -> None:
        tap = TapGrid(grid)
        tapped["tap"], tapped["grid"] = tap, grid
        fedscale_server_main(tap, context)

    run_apps(server, client_app, clients=settings.num_clients, run_config=settings.to_run_config())
    return tapped["tap"], tapped["grid"]


def _stage(message: Message) -> str | None:
    configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = configs.get(Key.STAGE) if configs is not None else None
    return stage if isinstance(stage, str) else None


def _plain_updates(
    settings: RunSettings, grid: Any, node_ids: list[int], run: RunDirectory
) -> dict[int, tuple[int, dict[str, np.ndarray]]]:
    """Train the same nodes' round 1 without SecAgg+: node -> (num-examples, arrays)."""
    plain_config = settings.replace(secagg=False).to_run_config()
    global_model = run.load_global_model(0)
    updates = {}
    for node_id in node_ids:
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: _array(v) for k, v in global_model.items()}),
                "config": ConfigRecord(
                    {
                        "lr": settings.lr,
                        "local-epochs": settings.local_epochs,
                        "batch-size": settings.batch_size,
                        "num-classes": 10,
                        "server-round": 1,
                    }
                ),
            }
        )
        message = _incoming(content, node_id)
        context = Context(
            run_id=1,
            node_id=node_id,
            node_config=grid.node_config(node_id),
            state=RecordDict(),
            run_config=plain_config,
        )
        reply = client_app(message, context)
        assert not reply.has_error(), reply.error
        arrays = reply.content.array_records["arrays"]
        num_examples = reply.content.metric_records["metrics"]["num-examples"]
        assert isinstance(num_examples, int)
        updates[node_id] = (num_examples, {k: a.numpy() for k, a in arrays.items()})
    return updates


def _array(value: np.ndarray) -> Any:
    from flwr.app import Array

    return Array(np.ascontiguousarray(value))


def _incoming(content: RecordDict, node_id: int, message_type: str = "train") -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"m-{node_id}",
        src_node_id=1,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


def _everything_in(message: Message) -> Iterator[tuple[np.ndarray | None, bytes]]:
    """Yield every array a message holds (decoded where it can be) with its raw bytes."""
    if not message.has_content():
        return
    for record in message.content.values():
        if isinstance(record, ArrayRecord):
            for array in record.values():
                yield (array.numpy() if array.data else None), array.data
            continue
        assert isinstance(record, ConfigRecord | MetricRecord)
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            blobs = [v for v in items if isinstance(v, bytes)]
            for blob in blobs:
                try:
                    yield np.load(io.BytesIO(blob), allow_pickle=False), blob
                except ValueError:
                    yield None, blob
            numbers = [v for v in items if isinstance(v, int | float) and not isinstance(v, bool)]
            if numbers:
                yield np.asarray(numbers, dtype=np.float64), b""


def test_secagg_aggregate_is_the_weighted_average_and_the_server_sees_no_plain_update(tmp_path):
    settings = _secagg_settings(tmp_path)
    tap, grid = _run_tapped(settings)
    run = RunDirectory(settings.out)
    rows = run.read_metrics()
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients_sampled"] == 5 and rows[1]["clients_replied"] == 5

    # The protocol ran: four stages, each sent to and answered by the same five nodes.
    stages = [_stage(m) for m in tap.sent_messages]
    expected = [Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK]
    assert sorted(set(stages), key=expected.index) == expected
    assert all(stages.count(s) == 5 for s in expected)
    nodes = sorted(
        m.metadata.dst_node_id
        for m in tap.sent_messages
        if _stage(m) == Stage.COLLECT_MASKED_VECTORS
    )
    assert len(tap.received_messages) == 20 and not any(
        m.has_error() for m in tap.received_messages
    )

    updates = _plain_updates(settings, grid, nodes, run)
    names = list(run.load_global_model(0))
    weights = np.array([updates[n][0] for n in nodes], dtype=np.float64)
    assert len(set(weights)) > 1, "unequal client sizes, so the weighting is tested"
    stacked = {k: np.stack([updates[n][1][k].astype(np.float64) for n in nodes]) for k in names}
    reference = {k: np.tensordot(weights, v, axes=1) / weights.sum() for k, v in stacked.items()}
    unweighted = {k: v.mean(axis=0) for k, v in stacked.items()}

    # The bound SecAgg+'s quantization implies. Client i's weight is quantized to
    # d_i = round(n_i / max-weight * Q) / Q; it sends d_i * p_i clipped to [-c, c],
    # stochastically rounded to a grid of step 2c/Q (error below one step). The
    # server divides the sum by D = sum d_i, so each entry is within
    # n * 2c / (Q * D) of sum d_i p_i / D, which in turn is within
    # sum |d_i - n_i/M| * max_i |p_i - ref| / D of the plain weighted average.
    # Then the global model is float32: half an ulp more.
    q_ratio = np.round(weights / MAX_WEIGHT * QUANTIZATION_RANGE)
    d = q_ratio / QUANTIZATION_RANGE
    total = d.sum()
    n = len(nodes)
    aggregate = run.load_global_model(1)
    for key in names:
        assert np.abs(d[:, None] * stacked[key].reshape(n, -1)).max() <= CLIPPING_RANGE, (
            "the test's updates stay within the clipping range"
        )
        quantization = n * 2 * CLIPPING_RANGE / (QUANTIZATION_RANGE * total)
        spread = np.abs(stacked[key] - reference[key]).max(axis=0)
        weight_error = np.abs(d - weights / MAX_WEIGHT).sum() * spread / total
        bound = quantization + weight_error + np.spacing(np.abs(reference[key]).astype(np.float32))
        got = aggregate[key].astype(np.float64)
        assert aggregate[key].dtype == np.float32
        assert np.all(np.abs(got - reference[key]) <= bound), key
        # And it is the weighted average, not the plain mean (their gap dwarfs the bound).
        assert np.abs(got - unweighted[key]).max() > 10 * bound.max(), key

    # The tap: nothing the server received holds a client's plain update, nor its
    # quantized update before masking, nor the bytes of either.
    received = [item for m in tap.received_messages for item in _everything_in(m)]
    masked = [_masked_vector(m) for m in tap.received_messages if _masked_vector(m)]
    model_shapes = [(1,)] + [updates[nodes[0]][1][k].shape for k in names]
    assert len(masked) == 5, "every client's masked vector reached the server"
    # The masked weight factor, then one array per model array: integers mod 2**32.
    assert all([a.shape for a in vector] == model_shapes for vector in masked)
    blobs = [blob for _, blob in received if blob]
    for i, node in enumerate(nodes):
        for key, plain in updates[node][1].items():
            unmasked = (d[i] * plain.astype(np.float64) + CLIPPING_RANGE) * (
                QUANTIZATION_RANGE / (2 * CLIPPING_RANGE)
            )
            for array, _ in received:
                if array is None or array.size != plain.size:
                    continue
                values = array.astype(np.float64).reshape(plain.shape)
                assert not np.allclose(values, plain, rtol=0, atol=1e-3), (node, key)
                assert not np.allclose(values, unmasked, rtol=0, atol=2.0), (node, key)
            raw = np.ascontiguousarray(plain).tobytes()
            assert not any(raw in blob for blob in blobs), (node, key)


def _masked_vector(message: Message) -> list[np.ndarray]:
    configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
    blobs = configs.get(Key.MASKED_PARAMETERS) if configs is not None else None
    if not isinstance(blobs, list):
        return []
    return [np.load(io.BytesIO(b), allow_pickle=False) for b in blobs if isinstance(b, bytes)]


def test_secagg_with_local_dp_reports_the_epsilon_of_a_plain_local_dp_run(tmp_path):
    from fedscale.simulations import simulate

    common = {
        "clients": 6,
        "num_rounds": 2,
        "clients_per_round": 4,
        "local_epochs": 1,
        "export_onnx": False,
        "device": "cpu",
        "dp": "local",
        "dp_noise_multiplier": 0.5,
        "dp_clipping_norm": 5.0,
    }
    secure = simulate(secagg=True, out=str(tmp_path / "secure"), **common).rounds
    plain = simulate(out=str(tmp_path / "plain"), **common).rounds
    assert [r["clients_replied"] for r in secure] == [0, 4, 4]
    assert [r["dp_epsilon"] for r in secure] == [r["dp_epsilon"] for r in plain]
    assert secure[-1]["dp_epsilon"] > secure[1]["dp_epsilon"] > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy": "fedprox"}, "strategy: expected fedavg"),
        ({"strategy_args": "fraction-train=0.5"}, "strategy-args: expected ''"),
        ({"dp": "server-fixed"}, "dp: expected '' or local"),
        ({"dp": "client-adaptive"}, "dp: expected '' or local"),
        ({"device_mix": "uniform"}, "device-mix: expected ''"),
        ({"resume": True}, "resume: expected false"),
        ({"compression": "int8"}, "compression: expected ''"),
        ({"fraction_evaluate": 0.5}, "fraction-evaluate: expected 0"),
        ({"clients_per_round": 2, "secagg_num_shares": 1.0}, "clients-per-round: expected at"),
        ({"secagg_num_shares": 2.0}, "secagg-num-shares: expected a fraction"),
        ({"secagg_num_shares": 20.0}, "secagg-num-shares: expected at most clients-per-round"),
        ({"secagg_reconstruction_threshold": 3.0}, "expected fewer shares than"),
        ({"secagg_reconstruction_threshold": 1.5}, "a whole number >= 2"),
        ({"secagg_clipping_range": 0.0}, "secagg-clipping-range: expected a number > 0"),
        ({"secagg_quantization_range": 2**32}, "secagg-quantization-range: expected"),
        ({"secagg_max_weight": -1.0}, "secagg-max-weight: expected a number > 0"),
        ({"clients_per_round": 1100, "num_clients": 2000}, "at most 1023"),
    ],
)
def test_combinations_secagg_refuses_name_what_and_why(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _secagg_settings(tmp_path, **overrides)


def test_secagg_options_need_secagg():
    with pytest.raises(ConfigError, match="secagg-num-shares: expected 3.0 unless secagg"):
        RunSettings(secagg_num_shares=5.0)


def test_cli_refuses_a_combination_with_exit_code_2(tmp_path):
    result = CliRunner().invoke(
        cli_app,
        ["simulate", "--secagg", "--strategy", "krum", "--rounds", "1", "--out", str(tmp_path)],
    )
    assert result.exit_code == 2
    assert "strategy: expected fedavg" in result.output


def test_secagg_mod_passes_other_runs_through_and_checks_legacy_records():
    seen: list[Message] = []

    def handler(msg: Message, ctxt: Context) -> Message:
        seen.append(msg)
        return Message(RecordDict(), reply_to=msg)

    message = _incoming(RecordDict({"arrays": ArrayRecord()}), 7)
    context = Context(1, 7, {}, RecordDict(), {"secagg": False})
    secagg_mod(message, context, handler)
    assert seen == [message], "a run without secagg is not touched"

    names = ConfigRecord({ARRAY_NAMES_KEY: json.dumps(["w"]), "num-classes": 10})
    legacy = _incoming(RecordDict({"fitins.parameters": ArrayRecord(), "fitins.config": names}), 7)
    with pytest.raises(RecordError, match="expected 1 arrays .* got 0"):
        to_fedscale_message(legacy)
    no_names = _incoming(
        RecordDict({"fitins.parameters": ArrayRecord(), "fitins.config": ConfigRecord()}), 7
    )
    with pytest.raises(RecordError, match="config 'array-names' as a JSON list"):
        to_fedscale_message(no_names)
    with pytest.raises(RecordError, match="expected records 'fitins.parameters'"):
        to_fedscale_message(message)
    assert ARRAY_NAMES_KEY == SERVER_ARRAY_NAMES_KEY


@pytest.mark.integration
@pytest.mark.slow
def test_deployment_with_secagg_trains_with_three_edge_clients(tmp_path):
    run = run_deployment(
        tmp_path, "--rounds", "2", "--per-round", "3", "--secagg", "--no-export-onnx"
    )
    rows = RunDirectory(run).read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients_replied"] == 3 and r["clients_failed"] == 0 for r in rows[1:])
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2
    assert RunDirectory(run).read_config()["secagg"] is True


@pytest.mark.integration
def test_secagg_on_flowers_ray_engine_trains(tmp_path):
    from fedscale.simulations import simulate

    rows = simulate(
        clients=6,
        num_rounds=2,
        clients_per_round=4,
        local_epochs=2,
        export_onnx=False,
        device="cpu",
        secagg=True,
        engine="ray",
        out=str(tmp_path / "ray"),
    ).rounds
    assert [r["clients_replied"] for r in rows] == [0, 4, 4]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2
