"""FedBuff: staleness weights and buffer flushes by hand, then real runs on the in-process engine.

The runs use fedscale's own ServerApp and ClientApp on digits; the device-mix
runs use a trace file, so every device's speed is known and the virtual times
of the first versions can be computed by hand.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedscale.edge_client import app as fedscale_client
from fedscale.exceptions import ConfigError, FedscaleError
from fedscale.runs import RunDirectory
from fedscale.server.fedbuff import (
    FedBuffConfig,
    FedBuffResult,
    Staleness,
    UpdateBuffer,
    run_fedbuff,
)
from fedscale.server.strategies import build_strategy, strategy_params
from fedscale.settings import RunSettings
from fedscale.simulations import run_apps, simulate
from fedscale.simulations.grid import FIRST_CLIENT_NODE_ID
from fedscale.simulations.system import system_for

# ------------------------------------------------------------------ staleness functions


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("constant", [1.0, 1.0, 1.0, 1.0, 1.0]),
        ("polynomial:0.5", [1.0, 1 / math.sqrt(2), 1 / math.sqrt(3), 0.5, 1 / math.sqrt(5)]),
        ("polynomial:1", [1.0, 0.5, 1 / 3, 0.25, 0.2]),
        ("polynomial:0", [1.0, 1.0, 1.0, 1.0, 1.0]),
        # FedAsync's hinge: 1 up to b, then 1 / (a (s - b) + 1).
        ("hinge:10,2", [1.0, 1.0, 1.0, 1 / 11, 1 / 21]),
        ("hinge:0.5,0", [1.0, 1 / 1.5, 0.5, 1 / 2.5, 1 / 3]),
    ],
)
def test_staleness_functions_match_hand_computed_weights(spec, expected):
    function = Staleness.parse(spec)
    assert [function(s) for s in range(5)] == pytest.approx(expected, rel=1e-15)
    assert str(Staleness.parse(str(function))) == str(function)


@pytest.mark.parametrize(
    "spec", ["", "poly", "polynomial", "polynomial:", "polynomial:-1", "hinge:1", "hinge:a,b"]
)
def test_a_bad_staleness_function_names_the_forms_it_takes(spec):
    with pytest.raises(ConfigError, match=r"expected constant, polynomial:A .* or hinge:A,B"):
        Staleness.parse(spec)


def test_a_staleness_function_refuses_negative_parameters_and_staleness():
    with pytest.raises(ConfigError, match=r"expected parameters >= 0, got a=-1"):
        Staleness("polynomial", a=-1.0)
    with pytest.raises(ValueError, match=r"expected an integer >= 0, got -1"):
        Staleness("constant")(-1)


# ------------------------------------------------------------------ the buffer


def test_a_flush_applies_the_staleness_weighted_sum_over_the_buffer_size():
    buffer = UpdateBuffer(2, Staleness.parse("polynomial:0.5"), max_staleness=3)
    current = {"w": np.array([1.0, 2.0]), "b": np.array([0.5])}
    buffer.add(
        {"w": np.array([1.0, 0.0]), "b": np.array([2.0])}, 0, num_examples=10, train_loss=2.0
    )
    assert buffer.count == 1 and not buffer.full
    buffer.add(
        {"w": np.array([0.0, 3.0]), "b": np.array([-1.0])}, 3, num_examples=30, train_loss=1.0
    )
    assert buffer.full
    updated, loss, staleness = buffer.flush(current, server_lr=0.5)
    # sum = 1 * d1 + (1 / sqrt(4)) * d2 = w [1, 1.5], b [1.5]; global + 0.5 * sum / 2.
    np.testing.assert_array_equal(updated["w"], np.array([1.25, 2.375]))
    np.testing.assert_array_equal(updated["b"], np.array([0.875]))
    assert loss == (10 * 2.0 + 30 * 1.0) / 40
    assert staleness == 1.5
    assert buffer.count == 0 and not buffer.full


def test_a_flush_keeps_each_arrays_dtype_and_rounds_integers():
    buffer = UpdateBuffer(2, Staleness.parse("constant"), max_staleness=0)
    current = {"w": np.array([1.0], dtype=np.float32), "steps": np.array([3], dtype=np.int64)}
    for w, steps in ((0.25, 2), (0.5, 5)):
        buffer.add(
            {"w": np.array([w]), "steps": np.array([steps])}, 0, num_examples=1, train_loss=None
        )
    updated, loss, _ = buffer.flush(current, server_lr=1.0)
    assert updated["w"].dtype == np.float32 and updated["w"][0] == np.float32(1.375)
    # 3 + (2 + 5) / 2 = 6.5, rounded half to even.
    assert updated["steps"].dtype == np.int64 and updated["steps"][0] == 6
    assert loss is None  # no update reported a train loss


def test_the_buffer_refuses_updates_too_old_or_beyond_its_size():
    buffer = UpdateBuffer(1, Staleness.parse("polynomial:0.5"), max_staleness=2)
    assert buffer.weight(2) == pytest.approx(1 / math.sqrt(3))
    assert buffer.weight(3) is None
    with pytest.raises(ValueError, match=r"expected staleness at most 2, got 3"):
        buffer.add({"w": np.zeros(1)}, 3, num_examples=1, train_loss=None)
    with pytest.raises(ValueError, match=r"expected 1 updates to flush, got 0"):
        buffer.flush({"w": np.zeros(1)}, 1.0)
    buffer.add({"w": np.ones(1)}, 0, num_examples=1, train_loss=None)
    with pytest.raises(ValueError, match=r"expected room for an update, but it holds 1"):
        buffer.add({"w": np.ones(1)}, 0, num_examples=1, train_loss=None)
    with pytest.raises(ValueError, match=r"expected arrays \['w'\], got \['v'\]"):
        buffer.flush({"v": np.zeros(1)}, 1.0)


# ------------------------------------------------------------------ configuration


def _settings(tmp_path, args="", **changes):
    base = RunSettings(
        num_rounds=20,
        num_clients=100,
        clients_per_round=10,
        local_epochs=5,
        batch_size=16,
        lr=0.1,
        seed=1,
        dataset="digits",
        model="mlp",
        device="cpu",
        export_onnx=False,
        strategy="fedbuff",
        strategy_args=args,
        out=str(tmp_path / "run"),
    )
    return base.replace(**changes)


def test_config_defaults_and_arguments(tmp_path):
    config = FedBuffConfig.from_settings(_settings(tmp_path, clients_per_round=7))
    assert (config.concurrency, config.buffer_size) == (7, 4)
    assert str(config.staleness) == "polynomial:0.5"
    assert (config.max_staleness, config.server_lr) == (10, 1.0)
    args = "concurrency=20 buffer-size=10 staleness=hinge:10,4 max-staleness=3 server-lr=0.5"
    config = FedBuffConfig.from_settings(_settings(tmp_path, args))
    assert (config.concurrency, config.buffer_size, config.max_staleness) == (20, 10, 3)
    assert str(config.staleness) == "hinge:10,4" and config.server_lr == 0.5


@pytest.mark.parametrize(
    ("args", "changes", "error"),
    [
        (
            "buffer=3",
            {},
            r"unknown key\(s\) buffer for strategy fedbuff; valid keys are: "
            r"concurrency, buffer-size, staleness, max-staleness, server-lr",
        ),
        ("concurrency=0", {}, r"concurrency \(for fedbuff\): expected an integer >= 1, got 0"),
        ("buffer-size=2.5", {}, r"buffer-size \(for fedbuff\): expected an integer, got '2.5'"),
        ("max-staleness=-1", {}, r"max-staleness \(for fedbuff\): expected an integer >= 0"),
        ("server-lr=0", {}, r"server-lr \(for fedbuff\): expected a number > 0, got 0.0"),
        ("staleness=sqrt", {}, r"staleness \(for fedbuff\): expected constant, polynomial:A"),
        ("", {"fraction_evaluate": 0.5}, r"fraction-evaluate 0.5: .* expected 0 with"),
        ("", {"overcommit": 0.3, "device_mix": "uniform"}, r"overcommit 0.3: .*expected 0"),
        ("", {"min_replies": 3}, r"min-replies 3: .*expected 1"),
        ("", {"dp": "local"}, r"dp 'local': .*expected no dp with strategy fedbuff"),
    ],
)
def test_bad_arguments_and_synchronous_settings_are_refused(tmp_path, args, changes, error):
    with pytest.raises(ConfigError, match=error):
        FedBuffConfig.from_settings(_settings(tmp_path, args, **changes))


def test_the_strategy_registry_lists_fedbuff_and_its_keys(tmp_path):
    assert list(strategy_params("fedbuff")) == [
        "concurrency",
        "buffer-size",
        "staleness",
        "max-staleness",
        "server-lr",
    ]
    with pytest.raises(ConfigError, match=r"strategy: expected one of fedavg, .*, fedbuff"):
        strategy_params("fedbuf")
    with pytest.raises(ConfigError, match=r"fedbuff is asynchronous and runs in its own loop"):
        build_strategy(_settings(tmp_path))


def test_a_bad_argument_stops_the_run_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) nope"):
        simulate(_settings(tmp_path, "nope=1"))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ runs without a device model


def test_fedbuff_learns_digits_in_process(tmp_path):
    settings = _settings(tmp_path, "concurrency=10 buffer-size=10", num_rounds=30)
    rows = simulate(settings).rounds
    assert [r["round"] for r in rows] == list(range(31))
    assert rows[0]["accuracy"] < 0.2 and rows[-1]["accuracy"] >= 0.8
    trained = rows[1:]
    assert all(r["clients_replied"] == 10 and r["clients_failed"] == 0 for r in trained)
    assert all(r["sim_elapsed"] is None for r in rows)  # no device model, no virtual clock
    # Every job's reply arrives, so jobs started = updates used + those in flight at the end.
    started = sum(r["clients_sampled"] for r in trained)
    used = sum(r["clients_replied"] + r["clients_dropped"] for r in trained)
    assert used <= started <= used + 10
    assert all(r["bytes_sent"] > 0 and r["bytes_received"] > 0 for r in trained)
    assert len(list((tmp_path / "run" / "checkpoints").glob("round-*.safetensors"))) == 31


def test_every_version_is_published_to_the_model_directory(tmp_path):
    from fedscale.modelstore import ModelDirectory

    settings = _settings(tmp_path, "concurrency=4 buffer-size=2", num_rounds=3, export_onnx=True)
    rows = simulate(settings).rounds
    manifest = ModelDirectory(tmp_path / "run" / "models").read_manifest()
    assert manifest.round == 3
    assert manifest.metrics["accuracy"] == pytest.approx(rows[-1]["accuracy"])


@pytest.mark.parametrize("compression", ["int8", "topk:0.3"])
def test_compressed_updates_decode_against_the_version_their_job_started_from(
    tmp_path, compression
):
    settings = _settings(
        tmp_path, "concurrency=10 buffer-size=10", num_rounds=30, compression=compression
    )
    rows = simulate(settings).rounds
    assert all(r["clients_rejected"] == 0 and r["clients_failed"] == 0 for r in rows)
    assert rows[-1]["accuracy"] >= 0.8
    plain = simulate(settings.replace(compression="", out=str(tmp_path / "plain"))).rounds
    # Fewer bytes come back than without compression, for the same number of updates.
    assert sum(r["bytes_received"] for r in rows[1:]) < sum(r["bytes_received"] for r in plain[1:])


# A ServerApp that keeps run_fedbuff's result, for its per-node counts.
RESULTS: list[FedBuffResult] = []
keeping_server = ServerApp()


@keeping_server.main()
def _keep(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(context.run_config, complete=True)
    RESULTS.append(run_fedbuff(grid, settings, out=settings.out))


def _run(settings, client_app=fedscale_client.app, system=None):
    RESULTS.clear()
    run_apps(
        keeping_server,
        client_app,
        clients=settings.num_clients,
        run_config=settings.to_run_config(),
        system=system,
    )
    (result,) = RESULTS
    return result, RunDirectory(settings.out).read_metrics()


def test_without_a_device_model_replies_arrive_in_push_order(tmp_path):
    # 4 jobs at version 0 arrive first: 2 make version 1, and the other 2 are 1 version
    # old, beyond max-staleness 0. Each slot restarts at once from the newest model, so
    # version 0's replacement job (pushed before the flush) is stale too: 3 drops.
    settings = _settings(tmp_path, "concurrency=4 buffer-size=2 max-staleness=0", num_rounds=3)
    result, rows = _run(settings)
    assert [r["dropped"]["stale"] for r in rows] == [0, 0, 3, 3]
    assert result.stale_dropped == 6
    assert sum(result.updates_by_node.values()) == 6


def test_a_run_whose_clients_all_fail_ends_with_a_clear_error(tmp_path):
    failing = ClientApp()

    @failing.train()
    def _fail(msg: Message, context: Context) -> Message:
        raise RuntimeError("this device is broken")

    settings = _settings(tmp_path, "concurrency=2 buffer-size=1", num_clients=4)
    with pytest.raises(FedscaleError, match=r"the last 100 jobs brought none .*100 failed"):
        _run(settings, client_app=failing)
    rows = RunDirectory(settings.out).read_metrics()
    assert [r["round"] for r in rows] == [0]


def test_a_resumed_run_goes_on_from_its_last_flush(tmp_path):
    settings = _settings(tmp_path, "concurrency=6 buffer-size=3", num_rounds=4)
    simulate(settings)
    rows = simulate(settings.replace(num_rounds=7, resume=True)).rounds
    assert [r["round"] for r in rows] == list(range(8))
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    with pytest.raises(ConfigError, match=r"strategy-args"):
        simulate(settings.replace(strategy_args="concurrency=5 buffer-size=3", resume=True))


# ------------------------------------------------------------------ with a device model


FAST, SLOW = 100.0, 10.0  # samples per second
LINK = 100_000.0  # kbit/s both ways


def _trace(tmp_path):
    # Even clients fast, odd clients ten times slower; every one always online.
    path = tmp_path / "devices.csv"
    rows = [
        "client_id,compute_speed,download_kbps,upload_kbps,availability,period_s,churn_per_hour"
    ]
    rows += [f"{i},{FAST if i % 2 == 0 else SLOW:g},{LINK:g},{LINK:g},,," for i in range(2)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_job_end_times_one_job_with_the_clock_rules(tmp_path):
    settings = _settings(tmp_path, device_mix=str(_trace(tmp_path)), num_clients=10)
    system = system_for(settings)
    node = FIRST_CLIENT_NODE_ID + 1  # slow
    samples = system.population.num_train_samples(1)
    end, lost = system.job_end(
        node, 7.0, job=1, model_bytes=10_000, update_bytes=5_000, local_epochs=2
    )
    expected = 7.0 + 10_000 * 8 / 1000 / LINK + samples * 2 / SLOW + 5_000 * 8 / 1000 / LINK
    assert lost is None and end == pytest.approx(expected, rel=1e-12)
    assert system.now == 0.0  # timing a job does not move the clock
    system.deadline_s = 1.0
    end, lost = system.job_end(node, 7.0, job=1, model_bytes=0, update_bytes=0, local_epochs=2)
    assert (end, lost) == (8.0, "deadline")


def test_fast_devices_contribute_more_and_versions_follow_the_virtual_clock(tmp_path):
    settings = _settings(
        tmp_path,
        "concurrency=4 buffer-size=2 max-staleness=2 staleness=constant",
        num_clients=8,
        num_rounds=12,
        local_epochs=1,
        device_mix=str(_trace(tmp_path)),
    )
    system = system_for(settings)
    result, rows = _run(settings, system=system)
    assert [r["round"] for r in rows] == list(range(13))

    fast = [FIRST_CLIENT_NODE_ID + i for i in range(0, 8, 2)]
    slow = [FIRST_CLIENT_NODE_ID + i for i in range(1, 8, 2)]
    by_node = result.updates_by_node
    assert sum(by_node.get(n, 0) for n in fast) >= 4 * sum(by_node.get(n, 0) for n in slow)
    assert sum(by_node.values()) == 12 * 2

    # Slow jobs take ten times as long: some come back more than 2 versions old.
    assert result.stale_dropped == sum(r["dropped"]["stale"] for r in rows) > 0
    assert all(r["clients_dropped"] == r["dropped"]["stale"] for r in rows)
    times = [r["sim_elapsed"] for r in rows]
    assert times == sorted(times) and times[-1] == pytest.approx(system.now)
    assert [r["sim_seconds"] for r in rows[1:]] == pytest.approx(np.diff(times).tolist())

    # Version 1 by hand: at 0 s the 4 slots go to 4 of the 8 idle nodes, drawn with the
    # run's seed; version 1 is published when the second of their jobs ends.
    model_bytes = _model_bytes(settings)

    def job_seconds(client):
        speed = FAST if client % 2 == 0 else SLOW
        samples = system.population.num_train_samples(client)
        return samples / speed + 2 * model_bytes * 8 / 1000 / LINK

    picked = random.Random(settings.seed).sample(range(8), 4)
    assert rows[1]["sim_elapsed"] == pytest.approx(
        sorted(job_seconds(c) for c in picked)[1], abs=1e-6
    )


def _model_bytes(settings):
    from fedscale.models import build_model
    from fedscale.records import state_dict_to_arrays
    from fedscale.server.federation import server_data

    data = server_data(settings)
    model = build_model(settings.model, data.sample_shape, data.num_classes, seed=settings.seed)
    return sum(len(a.data) for a in state_dict_to_arrays(model.state_dict()).values())


# ------------------------------------------------------------------ deployment


@pytest.mark.integration
@pytest.mark.slow
def test_fedbuff_on_a_superlink_with_three_edge_clients(tmp_path):
    from tests.server.deployment import run_deployment

    run = run_deployment(
        tmp_path,
        *("--rounds", "4", "--per-round", "3", "--strategy", "fedbuff"),
        *("--strategy-arg", "buffer-size=2", "--strategy-arg", "max-staleness=5"),
    )
    rows = RunDirectory(run).read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    trained = rows[1:]
    assert all(r["clients_replied"] == 2 and r["clients_failed"] == 0 for r in trained)
    assert all(r["sim_elapsed"] is None for r in rows)  # real devices: wall-clock order
    assert sum(r["clients_sampled"] for r in trained) >= 8
    assert rows[-1]["accuracy"] >= 0.75 > rows[0]["accuracy"]
    assert RunDirectory(run).read_config()["strategy-args"] == "buffer-size=2 max-staleness=5"


@pytest.mark.integration
def test_fedbuff_on_flowers_ray_engine(tmp_path):
    # Ray's actors answer in whatever order they finish: the loop takes replies as
    # they come, and the run still makes every version from `buffer-size` updates.
    settings = _settings(
        tmp_path, "concurrency=6 buffer-size=3", num_rounds=8, num_clients=12, local_epochs=2
    )
    rows = simulate(settings, engine="ray").rounds
    assert [r["round"] for r in rows] == list(range(9))
    assert all(r["clients_replied"] + r["clients_dropped"] == 3 for r in rows[1:])
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.3
