"""Runs with update compression: they learn, upload less, and keep top-k's residual per node."""

from __future__ import annotations

import os

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

import fedscale.simulations.cohort_delivery as cohort_delivery
from fedscale.compression import RESIDUAL_RECORD, Compression, decompress_reply, topk_count
from fedscale.edge_client.app import app as fedscale_client
from fedscale.models import build_model
from fedscale.records import state_dict_to_arrays
from fedscale.runs import RunDirectory
from fedscale.settings import RunSettings
from fedscale.simulations import simulate
from fedscale.simulations._flower import FIRST_CLIENT_NODE_ID, server_task_identity
from fedscale.simulations.grid import InProcessGrid
from tests.server.deployment import run_deployment

BASE = RunSettings(
    num_rounds=5,
    num_clients=20,
    clients_per_round=5,
    local_epochs=1,
    device="cpu",
    export_onnx=False,
)
# Uploaded bytes of an uncompressed run over a compressed one, at least: the
# payload shrinks 2x, 4x and 5x (top-k sends an int32 index with each float32
# value), less the message's fixed overhead on digits' small MLP (about 2 KB of
# 41 KB per reply, and another 400 bytes per array sent).
MIN_RATIO = {"fp16": 1.8, "int8": 3.1, "topk:0.1": 3.1}


@pytest.fixture(scope="module")
def uncompressed(tmp_path_factory):
    return simulate(BASE, out=str(tmp_path_factory.mktemp("none") / "run")).rounds


def _flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([a.ravel() for a in arrays.values()])


@pytest.mark.parametrize("spec", sorted(MIN_RATIO))
def test_each_scheme_learns_and_uploads_fewer_bytes(tmp_path, uncompressed, spec):
    rows = simulate(BASE.replace(compression=spec), out=str(tmp_path / "run")).rounds
    assert [r["round"] for r in rows] == list(range(6))
    assert all(r["clients_replied"] == 5 for r in rows[1:])
    assert all(r["clients_rejected"] == 0 and r["clients_failed"] == 0 for r in rows[1:])
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.3
    if spec in ("fp16", "int8"):
        # Rounding this fine leaves the trajectory all but unchanged.
        assert rows[-1]["accuracy"] == pytest.approx(uncompressed[-1]["accuracy"], abs=0.03)
    for compressed, plain in zip(rows[1:], uncompressed[1:], strict=True):
        # The download (the global model) is the same; only the upload shrinks.
        assert compressed["bytes_sent"] == plain["bytes_sent"]
        ratio = plain["bytes_received"] / compressed["bytes_received"]
        assert MIN_RATIO[spec] <= ratio < {"fp16": 2, "int8": 4, "topk:0.1": 5}[spec]


def test_topk_gives_the_same_run_on_the_fast_and_the_general_path(tmp_path):
    runs = {
        fast: simulate(
            BASE.replace(compression="topk:0.1"), fast_path=fast, out=str(tmp_path / f"{fast}")
        )
        for fast in (False, True)
    }
    for general, fast in zip(runs[False].rounds, runs[True].rounds, strict=True):
        assert fast["loss"] == pytest.approx(general["loss"], rel=1e-5, abs=1e-7)
        assert fast["bytes_received"] == general["bytes_received"]
    np.testing.assert_allclose(
        _flat(runs[True].run_dir.load_global_model(5)),
        _flat(runs[False].run_dir.load_global_model(5)),
        atol=1e-5,
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="workers need fork")
def test_topk_residuals_come_back_from_worker_processes(tmp_path):
    # Worker processes call the ClientApp and send each node's context back to the grid.
    run = BASE.replace(num_rounds=4, num_clients=6, clients_per_round=6, compression="topk:0.1")
    one, two = (
        simulate(run, fast_path=False, workers=n, out=str(tmp_path / f"workers-{n}"))
        for n in (1, 2)
    )
    assert all(r["clients_rejected"] == 0 for r in two.rounds)
    np.testing.assert_array_equal(
        _flat(two.run_dir.load_global_model(4)), _flat(one.run_dir.load_global_model(4))
    )


# ---------------------------------------------------------------- the residual on the grid

NODES = [FIRST_CLIENT_NODE_ID + i for i in range(3)]
GLOBAL = state_dict_to_arrays(build_model("mlp", (64,), 10, seed=3).state_dict())


def _train_messages(server_round: int) -> list[Message]:
    config = {"lr": 0.1, "local-epochs": 1, "batch-size": 16, "num-classes": 10}
    content = RecordDict(
        {"arrays": GLOBAL, "config": ConfigRecord({**config, "server-round": server_round})}
    )
    return [Message(content, node_id, "train") for node_id in NODES]


def _rounds(settings: RunSettings, fast: bool, rounds: int) -> tuple[list, InProcessGrid]:
    """Send every node ``rounds`` train messages with the same global model; return the replies."""
    grid = InProcessGrid(
        fedscale_client,
        settings.num_clients,
        run_id=21,
        run_config=settings.to_run_config(),
        fast_path=cohort_delivery.fast_path_for(fedscale_client) if fast else None,
    )
    replies = []
    with server_task_identity(21):
        for server_round in range(1, rounds + 1):
            ids = grid.push_messages(_train_messages(server_round))
            got = {r.metadata.src_node_id: r for r in grid.pull_messages(ids)}
            assert not any(r.has_error() for r in got.values())
            replies.append(got)
    return replies, grid


@pytest.mark.parametrize("fast", [False, True], ids=["general-path", "fast-path"])
def test_topk_residual_persists_across_rounds_in_the_in_process_engine(fast):
    plain = RunSettings(num_clients=3, local_epochs=1, device="cpu", export_onnx=False)
    topk = plain.replace(compression="topk:0.05")
    compression = Compression.parse(topk.compression)
    assert compression is not None
    # Training does not depend on what is sent: the uncompressed replies are the updates.
    trained, _ = _rounds(plain, fast, 3)
    sent, grid = _rounds(topk, fast, 3)
    global_arrays = {k: a.numpy() for k, a in GLOBAL.items()}
    for node in NODES:
        residual = {k: a.numpy() for k, a in grid.node_context(node).state[RESIDUAL_RECORD].items()}
        total_update = {k: np.zeros(v.shape, np.float64) for k, v in global_arrays.items()}
        total_sent = {k: np.zeros(v.shape, np.float64) for k, v in global_arrays.items()}
        for server_round, (plain_round, topk_round) in enumerate(
            zip(trained, sent, strict=True), start=1
        ):
            decoded = decompress_reply(
                topk_round[node].content,
                GLOBAL,
                compression,
                max_bytes=10**7,
                server_round=server_round,
            )["arrays"]
            for key, value in global_arrays.items():
                update = decoded[key].numpy().astype(np.float64) - value
                assert np.count_nonzero(update) <= topk_count(value.size, compression.fraction)
                total_sent[key] += update
                total_update[key] += plain_round[node].content["arrays"][key].numpy() - value
        for key in global_arrays:
            assert np.abs(residual[key]).max() > 0, "the unsent part is kept"
            np.testing.assert_allclose(
                total_sent[key] + residual[key], total_update[key], atol=1e-5
            )


def test_local_dp_noise_comes_before_compression():
    # The privacy mod (inner) noises the whole update; compression (outer) then keeps
    # top-k of it: a reply with k nonzeros per tensor shows that order.
    settings = RunSettings(
        num_clients=3,
        local_epochs=1,
        device="cpu",
        export_onnx=False,
        dp="local",
        dp_noise_multiplier=0.5,
        dp_delta=0.1,
        compression="topk:0.05",
    )
    compression = Compression.parse(settings.compression)
    assert compression is not None
    replies, _ = _rounds(settings, fast=False, rounds=1)
    for reply in replies[0].values():
        decoded = decompress_reply(reply.content, GLOBAL, compression, max_bytes=10**7)["arrays"]
        for key, array in GLOBAL.items():
            update = decoded[key].numpy() - array.numpy()
            assert np.count_nonzero(update) == topk_count(update.size, compression.fraction)


def test_the_cli_takes_compression(tmp_path):
    from typer.testing import CliRunner

    from fedscale.cli.main import app

    args = ["simulate", "--clients", "10", "--rounds", "2", "--no-export-onnx", "-q"]
    result = CliRunner().invoke(
        app, [*args, "--compression", "int8", "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 0, result.output
    assert RunDirectory(tmp_path / "run").read_config()["compression"] == "int8"
    result = CliRunner().invoke(app, [*args, "--compression", "int4"])
    assert result.exit_code == 2
    assert "compression: expected '' (none), 'fp16', 'int8' or 'topk:<fraction>'" in result.output


# ---------------------------------------------------------------- other runtimes


@pytest.mark.integration
@pytest.mark.slow
def test_topk_on_flowers_ray_engine_matches_the_in_process_engine(tmp_path):
    # Every client in every round: the same clients train the same models, so the
    # runs agree only if Ray keeps each node's residual across rounds as well.
    run = BASE.replace(num_rounds=3, num_clients=6, clients_per_round=6, compression="topk:0.1")
    results = {
        engine: simulate(run, engine=engine, out=str(tmp_path / engine))
        for engine in ("inprocess", "ray")
    }
    rows = results["ray"].rounds
    assert [r["clients_replied"] for r in rows] == [0, 6, 6, 6]
    assert all(r["clients_rejected"] == 0 for r in rows)
    for ray_row, inprocess_row in zip(rows[1:], results["inprocess"].rounds[1:], strict=True):
        # Equal payloads; only the metadata's node ids differ in length between runtimes.
        assert ray_row["bytes_received"] == pytest.approx(inprocess_row["bytes_received"], rel=0.01)
    np.testing.assert_allclose(
        _flat(results["ray"].run_dir.load_global_model(3)),
        _flat(results["inprocess"].run_dir.load_global_model(3)),
        atol=1e-4,
    )


@pytest.mark.integration
@pytest.mark.slow
def test_topk_in_a_real_deployment_matches_the_in_process_engine(tmp_path):
    # Three SuperNodes whose ClientApp runs in a fresh forked process per message:
    # the residual survives rounds only through Flower's Context.state.
    run = run_deployment(
        tmp_path,
        *("--rounds", "3", "--per-round", "3", "--compression", "topk:0.1", "--no-export-onnx"),
    )
    deployed = RunDirectory(run)
    rows = deployed.read_metrics()
    assert all(r["clients_replied"] == 3 and r["clients_rejected"] == 0 for r in rows[1:])
    inprocess = simulate(
        RunSettings(
            num_rounds=3,
            num_clients=3,
            clients_per_round=3,
            compression="topk:0.1",
            export_onnx=False,
            device="cpu",
        ),
        out=str(tmp_path / "inprocess"),
    )
    for deployed_row, inprocess_row in zip(rows[1:], inprocess.rounds[1:], strict=True):
        assert deployed_row["bytes_received"] == pytest.approx(
            inprocess_row["bytes_received"], rel=0.01
        )
    np.testing.assert_allclose(
        _flat(deployed.load_global_model(3)),
        _flat(inprocess.run_dir.load_global_model(3)),
        atol=1e-4,
    )
