"""The in-process engine's fast path gives the general path's results, or steps aside."""

import math

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode

import fedscale.simulations.cohort_delivery as cohort_delivery
from fedscale.edge_client.app import app as fedscale_client
from fedscale.models import build_model
from fedscale.records import arrays_to_state_dict, state_dict_to_arrays
from fedscale.settings import RunSettings
from fedscale.simulations import simulate
from fedscale.simulations._flower import FIRST_CLIENT_NODE_ID, server_task_identity
from fedscale.simulations.grid import InProcessGrid
from fedscale.simulations.system import system_for

# Runs are compared byte for byte, bytes_sent/bytes_received included.
pytestmark = pytest.mark.usefixtures("fixed_run_id")

WALL = {"seconds", "elapsed", "time", "aggregate_seconds"}
FLOATS = {"loss", "accuracy", "train_loss", "federated_loss", "federated_accuracy"}


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


def _both(tmp_path, **kwargs):
    runs = {}
    for fast in (False, True):
        runs[fast] = simulate(
            out=str(tmp_path / f"fast-{fast}"), fast_path=fast, device="cpu", **kwargs
        ).rounds
    return runs[False], runs[True]


def _assert_same_metrics(general, fast):
    assert len(general) == len(fast)
    for g, f in zip(general, fast, strict=True):
        assert set(g) == set(f)
        for key in set(g) - WALL:
            if key in FLOATS and g[key] is not None:
                assert f[key] == pytest.approx(g[key], rel=1e-5, abs=1e-7), (g["round"], key)
            else:
                assert f[key] == g[key], (g["round"], key)


@pytest.mark.parametrize("partition", ["iid", "dirichlet:0.5"])
def test_digits_mlp_same_metrics_on_both_paths(tmp_path, cohorts, partition):
    general, fast = _both(
        tmp_path,
        clients=60,
        clients_per_round=20,
        num_rounds=3,
        dataset="digits",
        model="mlp",
        partition=partition,
        lr=0.05,
        batch_size=16,
        seed=1,
        export_onnx=False,
    )
    _assert_same_metrics(general, fast)
    assert cohorts == [20, 20, 20]  # one cohort a round, on the fast path only
    assert fast[-1]["accuracy"] > fast[0]["accuracy"]


@pytest.mark.parametrize("device_mix", ["", "mobile"])
def test_synthetic_same_metrics_with_and_without_devices(tmp_path, cohorts, device_mix):
    extra = {"device_mix": device_mix, "deadline": 60.0, "overcommit": 0.5} if device_mix else {}
    general, fast = _both(
        tmp_path,
        clients=400,
        clients_per_round=12,
        num_rounds=3,
        dataset="synthetic:1,1",
        model="mlp",
        local_epochs=2,
        batch_size=10,
        lr=0.01,
        seed=3,
        export_onnx=False,
        **extra,
    )
    _assert_same_metrics(general, fast)
    assert len(cohorts) == 3 and all(n >= 2 for n in cohorts)
    if device_mix:
        assert sum(r["clients_dropped"] for r in fast[1:]) > 0
        assert all(math.isfinite(r["sim_elapsed"]) for r in fast)


def test_evaluate_messages_take_the_general_path_and_agree(tmp_path, cohorts):
    general, fast = _both(
        tmp_path,
        clients=30,
        clients_per_round=10,
        num_rounds=2,
        dataset="digits",
        model="mlp",
        fraction_evaluate=0.5,
        seed=2,
        export_onnx=False,
    )
    _assert_same_metrics(general, fast)
    assert all(r["federated_accuracy"] is not None for r in fast[1:])
    assert cohorts == [10, 10]


def test_an_ineligible_model_falls_back_to_the_general_path(tmp_path, cohorts):
    general, fast = _both(
        tmp_path,
        clients=20,
        clients_per_round=4,
        num_rounds=1,
        dataset="shakespeare",
        model="char-lstm-small",
        batch_size=32,
        seed=0,
        export_onnx=False,
    )
    assert cohorts == []
    assert [{k: v for k, v in r.items() if k not in WALL} for r in fast] == [
        {k: v for k, v in r.items() if k not in WALL} for r in general
    ]
    assert fast[-1]["clients_replied"] == 4


# ------------------------------------------------------------------ the grid itself


def _train_messages(node_ids, server_round=1):
    model = build_model("mlp", (60,), 10)
    content = RecordDict(
        {
            "arrays": state_dict_to_arrays(model.state_dict()),
            "config": ConfigRecord(
                {
                    "lr": 0.01,
                    "local-epochs": 1,
                    "batch-size": 10,
                    "num-classes": 10,
                    "server-round": server_round,
                }
            ),
        }
    )
    # One RecordDict for every node, as Flower's strategies send it.
    return [Message(content, node_id, "train") for node_id in node_ids]


def _grid_replies(settings, node_ids, fast):
    system = system_for(settings)
    grid = InProcessGrid(
        fedscale_client,
        settings.num_clients,
        run_id=11,
        run_config=settings.to_run_config(),
        system=system,
        fast_path=cohort_delivery.fast_path_for(fedscale_client) if fast else None,
    )
    online = set(grid.get_node_ids())
    with server_task_identity(11):
        messages = _train_messages(node_ids)
        ids = grid.push_messages(messages)
        replies = grid.pull_messages(ids)
    return ids, replies, online, grid.stats


def test_offline_and_missing_nodes_get_the_general_paths_errors(tmp_path, cohorts):
    settings = RunSettings(
        num_clients=200,
        dataset="synthetic:1,1",
        model="mlp",
        device="cpu",
        device_mix="mobile",
        seed=5,
        out=str(tmp_path / "run"),
    )
    online = set(system_for(settings).online_node_ids())
    everyone = range(FIRST_CLIENT_NODE_ID, FIRST_CLIENT_NODE_ID + 200)
    offline = [n for n in everyone if n not in online][:3]
    chosen = sorted(online)[:5] + offline + [FIRST_CLIENT_NODE_ID + 10_000]
    assert len(offline) == 3

    results = {fast: _grid_replies(settings, chosen, fast) for fast in (False, True)}
    assert cohorts == [5]
    for fast, (ids, replies, _, stats) in results.items():
        assert {r.metadata.reply_to_message_id for r in replies} == set(ids)
        reply_ids = [r.metadata.message_id for r in replies]
        assert all(reply_ids) and len(set(reply_ids)) == len(ids) and not set(reply_ids) & set(ids)
        assert (stats.messages, stats.errors, stats.unavailable) == (9, 4, 3), fast

    def by_node(replies):
        return {r.metadata.src_node_id: r for r in replies}

    general, fast = by_node(results[False][1]), by_node(results[True][1])
    assert set(general) == set(fast) == set(chosen)
    for node_id in chosen:
        g, f = general[node_id], fast[node_id]
        assert g.has_error() == f.has_error()
        if g.has_error():
            assert f.error.code == g.error.code == ErrorCode.NODE_UNAVAILABLE
            assert f.error.reason == g.error.reason
            continue
        assert f.metadata.message_type == g.metadata.message_type == "train"
        assert list(f.content) == list(g.content) == ["arrays", "metrics"]
        assert dict(f.content["metrics"]) == pytest.approx(dict(g.content["metrics"]), rel=1e-6)
        assert list(f.content["arrays"]) == list(g.content["arrays"])
        g_state = arrays_to_state_dict(g.content["arrays"])
        for key, tensor in arrays_to_state_dict(f.content["arrays"]).items():
            assert tensor.dtype == g_state[key].dtype
            assert tensor.shape == g_state[key].shape
            assert (tensor - g_state[key]).abs().max() < 1e-5


def test_other_client_apps_have_no_fast_path():
    from flwr.clientapp import ClientApp

    assert cohort_delivery.fast_path_for(ClientApp()) is None
    assert cohort_delivery.fast_path_for(fedscale_client) is cohort_delivery.deliver_cohorts
