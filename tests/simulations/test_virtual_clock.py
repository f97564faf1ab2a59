"""Simulated devices and the virtual clock, through the in-process engine and the round loop."""

import io
import math
from collections import Counter

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from torch import nn

from fedscale.datasets import register_dataset
from fedscale.edge_client import app as fedscale_client
from fedscale.exceptions import ConfigError
from fedscale.models import build_model, register_model
from fedscale.runs import RunDirectory
from fedscale.server.app import app as fedscale_server
from fedscale.settings import RunSettings
from fedscale.simulations import run_apps, simulate
from fedscale.simulations.grid import FIRST_CLIENT_NODE_ID
from fedscale.simulations.system import system_for

# Runs are compared byte for byte, bytes_sent/bytes_received included.
pytestmark = pytest.mark.usefixtures("fixed_run_id")

# ------------------------------------------------------------------ a tiny federation

# Six clients of 100 training samples each (600 samples, an iid split into six).
FEATURES, CLASSES, PER_CLIENT = 4, 3, 100


def _six_clients():
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(CLASSES), 200)
    x = rng.normal(size=(600, FEATURES)).astype(np.float32) + y[:, None]
    y_test = np.arange(60) % CLASSES
    x_test = rng.normal(size=(60, FEATURES)).astype(np.float32) + y_test[:, None]
    return x, y, x_test, y_test


def _linear(input_shape, num_classes):
    return nn.Linear(input_shape[0], num_classes)


register_dataset("clock-six", _six_clients)
register_model("clock-linear", _linear)

# Kbit/s both ways; seconds of compute are 100 samples / compute_speed.
DOWN, UP = 800.0, 400.0
TRACE = f"""client_id,compute_speed,download_kbps,upload_kbps,availability,period_s,churn_per_hour
0,100,{DOWN:g},{UP:g},,,
1,50,{DOWN:g},{UP:g},,,
2,20,{DOWN:g},{UP:g},,,
3,50,{DOWN:g},{UP:g},0-1.5,,
4,100,{DOWN:g},{UP:g},100-200,,
5,25,{DOWN:g},{UP:g},,,
"""


def _model_bytes():
    # The global model crosses the link as Flower's arrays: one .npy file per tensor.
    model = build_model("clock-linear", (FEATURES,), CLASSES)
    total = 0
    for tensor in model.state_dict().values():
        buffer = io.BytesIO()
        np.save(buffer, tensor.numpy())
        total += len(buffer.getvalue())
    return total


def _settings(tmp_path, **changes):
    trace = tmp_path / "devices.csv"
    trace.write_text(TRACE)
    base = RunSettings(
        num_clients=6,
        clients_per_round=2,
        num_rounds=3,
        min_clients=1,
        local_epochs=1,
        batch_size=10,
        lr=0.05,
        dataset="clock-six",
        model="clock-linear",
        device="cpu",
        device_mix=str(trace),
        deadline=5.0,
        overcommit=1.5,
        export_onnx=False,
        out=str(tmp_path / "run"),
    )
    return base.replace(**changes)


# A ClientApp of its own that notes who it runs as and when, then trains as
# fedscale's does.
DELIVERIES: list[tuple[int, float]] = []
SYSTEM = {}
recording_app = ClientApp()


@recording_app.train()
def _train(msg: Message, context: Context) -> Message:
    DELIVERIES.append((context.node_id, SYSTEM["system"].now))
    assert context.node_config["partition-id"] == context.node_id - FIRST_CLIENT_NODE_ID
    return fedscale_client.train_handler(msg, context)


def _run_recorded(settings):
    DELIVERIES.clear()
    system = system_for(settings)
    SYSTEM["system"] = system
    run_apps(
        fedscale_server,
        recording_app,
        clients=settings.num_clients,
        run_config=settings.to_run_config(),
        system=system,
    )
    return system, RunDirectory(settings.out).read_metrics()


# ------------------------------------------------------------------ hand-computed rounds


def test_rounds_match_hand_computed_times_and_drops(tmp_path):
    system, rows = _run_recorded(_settings(tmp_path))
    transfer = _model_bytes() * 8 / 1000 / DOWN + _model_bytes() * 8 / 1000 / UP
    round_s = 100 / 50 + transfer  # client 1, the slower of the two kept, sets the pace

    # Round 1 at t = 0: clients 0, 1, 2, 3, 5 are online (4's window opens at 100 s),
    # so all five are offered work (ceil(2 * 2.5) = 5). Client 0 finishes at 1 s + transfer,
    # client 1 at 2 s + transfer: the two kept. Client 5 (4 s) finishes after them
    # (over-commit), client 3's window closes at 1.5 s before it is done (went-offline),
    # client 2 needs 5 s + transfer, past the 5 s deadline.
    first = rows[1]
    assert first["clients_sampled"] == 5 and first["clients_replied"] == 2
    assert first["clients_dropped"] == 3
    assert first["dropped"] == {
        "offline": 0,
        "went-offline": 1,
        "churn": 0,
        "deadline": 1,
        "over-commit": 1,
    }
    assert first["sim_seconds"] == pytest.approx(round_s, abs=1e-6)
    assert first["sim_elapsed"] == pytest.approx(round_s, abs=1e-6)

    # Rounds 2 and 3: client 3 is gone for good (its only window is over), so four are
    # offered; 0 and 1 are kept again, 5 is over-committed, 2 misses the deadline.
    for n, row in enumerate(rows[2:], start=2):
        assert row["clients_sampled"] == 4 and row["clients_replied"] == 2
        assert row["dropped"] == {
            "offline": 0,
            "went-offline": 0,
            "churn": 0,
            "deadline": 1,
            "over-commit": 1,
        }
        assert row["sim_seconds"] == pytest.approx(round_s, abs=1e-6)
        assert row["sim_elapsed"] == pytest.approx(n * round_s, abs=1e-6)
    assert system.now == pytest.approx(3 * round_s, abs=1e-6)
    assert rows[0]["sim_elapsed"] == 0.0 and rows[0]["clients_dropped"] == 0

    # Only the kept clients trained: dropped ones were never sent the model.
    nodes = Counter(node for node, _ in DELIVERIES)
    assert nodes == {FIRST_CLIENT_NODE_ID: 3, FIRST_CLIENT_NODE_ID + 1: 3}


def test_a_round_with_too_few_finishers_lasts_until_every_offered_client_resolves(tmp_path):
    # k = 4 of the five online: only 0, 1 and 5 finish in time, so the server waits
    # for the last offered client to resolve: client 2 at the 5 s deadline.
    settings = _settings(tmp_path, clients_per_round=4, overcommit=0.25, num_rounds=1)
    _, rows = _run_recorded(settings)
    assert rows[1]["sim_seconds"] == pytest.approx(5.0, abs=1e-9)
    assert rows[1]["clients_replied"] == 3
    assert rows[1]["dropped"]["deadline"] == 1 and rows[1]["dropped"]["went-offline"] == 1


def test_the_server_waits_in_virtual_time_when_nobody_is_online(tmp_path):
    # Only client 4 exists that is ever online after 1.5 s, from 100 s to 200 s.
    trace = tmp_path / "late.csv"
    trace.write_text(
        "client_id,compute_speed,download_kbps,upload_kbps,availability\n"
        f"0,100,{DOWN:g},{UP:g},100-200\n"
        f"1,100,{DOWN:g},{UP:g},150-160\n"
    )
    settings = _settings(
        tmp_path,
        num_clients=2,
        clients_per_round=1,
        overcommit=0.0,
        num_rounds=2,
        device_mix=str(trace),
    )
    _, rows = _run_recorded(settings)
    # Two clients split the 600 samples: 300 each, at 100 samples a second.
    one = 300 / 100 + _model_bytes() * 8 / 1000 / DOWN + _model_bytes() * 8 / 1000 / UP
    assert rows[1]["sim_seconds"] == pytest.approx(one, abs=1e-6)
    assert rows[1]["sim_elapsed"] == pytest.approx(100 + one, abs=1e-6)
    assert rows[2]["sim_elapsed"] == pytest.approx(100 + 2 * one, abs=1e-6)
    assert [node for node, _ in DELIVERIES] == [FIRST_CLIENT_NODE_ID] * 2
    assert all(t >= 100 for _, t in DELIVERIES)


def test_a_federation_nobody_can_join_is_a_clear_error(tmp_path):
    trace = tmp_path / "gone.csv"
    trace.write_text(
        "client_id,compute_speed,download_kbps,upload_kbps,availability\n"
        f"0,100,{DOWN:g},{UP:g},0-1\n"
        f"1,100,{DOWN:g},{UP:g},0-1\n"
    )
    settings = _settings(
        tmp_path, num_clients=2, clients_per_round=1, overcommit=0.0, device_mix=str(trace)
    )
    # Each round ends after 1 s + transfer, when both windows have closed for good.
    with pytest.raises(ConfigError, match=r"none of the 2 is online at or after"):
        _run_recorded(settings)


# ------------------------------------------------------------------ availability at scale


def test_offline_clients_are_never_sent_a_message(tmp_path):
    settings = RunSettings(
        num_clients=400,
        clients_per_round=8,
        num_rounds=4,
        local_epochs=1,
        dataset="synthetic:1,1",
        device="cpu",
        device_mix="mobile",
        overcommit=0.5,
        deadline=120.0,
        export_onnx=False,
        out=str(tmp_path / "run"),
    )
    system, rows = _run_recorded(settings)
    assert len(DELIVERIES) == sum(r["clients_replied"] for r in rows) > 0
    for node, when in DELIVERIES:
        availability = system.population.profile(node - FIRST_CLIENT_NODE_ID).availability
        assert availability.is_online(when)
    # The mix keeps about a fifth of the devices online: most were never offered.
    online_at_start = [system.population.profile(c).availability.is_online(0.0) for c in range(400)]
    assert 0.1 < np.mean(online_at_start) < 0.35
    assert rows[-1]["sim_elapsed"] > 0


def test_the_grid_refuses_a_message_to_an_offline_node(tmp_path):
    from flwr.app import ArrayRecord, RecordDict
    from flwr.common.constant import ErrorCode

    from fedscale.simulations._flower import server_task_identity
    from fedscale.simulations.grid import InProcessGrid

    settings = _settings(tmp_path)
    system = system_for(settings)
    grid = InProcessGrid(
        recording_app, 6, run_id=7, run_config=settings.to_run_config(), system=system
    )
    assert grid.system is system
    offline = FIRST_CLIENT_NODE_ID + 4  # online from 100 s only
    assert offline not in grid.get_node_ids()
    assert sorted(grid.get_node_ids()) == [FIRST_CLIENT_NODE_ID + i for i in (0, 1, 2, 3, 5)]
    DELIVERIES.clear()
    with server_task_identity(7):
        message = Message(RecordDict({"arrays": ArrayRecord()}), offline, "train")
        (reply,) = grid.send_and_receive([message])
    assert reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE
    assert "offline at 0 s of virtual time" in reply.error.reason
    assert DELIVERIES == [] and grid.stats.unavailable == 1


# ------------------------------------------------------------------ determinism, memory


def _comparable(rows):
    wall = {"seconds", "elapsed", "time", "aggregate_seconds"}
    return [{k: v for k, v in row.items() if k not in wall} for row in rows]


def test_same_seed_same_metrics_with_a_device_mix(tmp_path):
    def run(name):
        return simulate(
            out=str(tmp_path / name),
            clients=300,
            clients_per_round=6,
            num_rounds=3,
            local_epochs=1,
            dataset="synthetic:1,1",
            device="cpu",
            device_mix="mobile",
            deadline=60.0,
            overcommit=0.5,
            seed=3,
            export_onnx=False,
        ).rounds

    first, second = run("a"), run("b")
    assert _comparable(first) == _comparable(second)
    assert sum(r["clients_dropped"] for r in first[1:]) > 0
    assert all(math.isfinite(r["sim_elapsed"]) for r in first)


def test_a_100k_client_federation_runs_a_round_in_bounded_memory(tmp_path):
    import tracemalloc

    def peak_of_a_round(clients):
        tracemalloc.start()
        try:
            result = simulate(
                out=str(tmp_path / f"n{clients}-{len(list(tmp_path.iterdir()))}"),
                clients=clients,
                clients_per_round=4,
                num_rounds=1,
                local_epochs=1,
                dataset="synthetic:1,1",
                device="cpu",
                device_mix="mobile",
                overcommit=0.5,
                export_onnx=False,
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert result.rounds[1]["clients_replied"] == 4
        return peak

    peak_of_a_round(1_000)  # fills the per-process caches (the server's test set)
    small, big = peak_of_a_round(1_000), peak_of_a_round(100_000)
    # A Python object per client would cost tens of megabytes more at 100,000 clients;
    # the online mask and the online node ids cost about one.
    assert big - small < 4 * 2**20, f"{small / 2**20:.1f} MiB -> {big / 2**20:.1f} MiB"
    assert big < 40 * 2**20


def test_device_mix_needs_the_in_process_engine(tmp_path):
    with pytest.raises(ConfigError, match=r"simulated devices need the in-process engine"):
        simulate(
            out=str(tmp_path / "r"),
            clients=4,
            clients_per_round=2,
            device_mix="mobile",
            engine="ray",
        )
