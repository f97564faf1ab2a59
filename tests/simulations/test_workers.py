"""Worker processes give the in-process engine's results, with Flower's semantics."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from bench.usl import fit_usl, peak_workers, usl_throughput
from fedscale.exceptions import ConfigError
from fedscale.simulations import simulate
from fedscale.simulations._flower import FIRST_CLIENT_NODE_ID
from fedscale.simulations.engine import run_in_process
from fedscale.simulations.workers import AutoWorkers, _chunk_size, resolve_workers
from tests.simulations import plain_flower_app as plain

pytestmark = [
    pytest.mark.skipif(
        not os.path.isdir("/proc/self") or not hasattr(os, "fork"),
        reason="workers need Linux fork",
    ),
    # Runs are compared byte for byte, bytes_sent/bytes_received included.
    pytest.mark.usefixtures("fixed_run_id"),
]

# ---------------------------------------------------------------- same results


# metrics.jsonl fields that are wall-clock times, the only ones runs may differ in.
WALL = {"seconds", "elapsed", "time", "aggregate_seconds"}


def _rows(result):
    return [{k: v for k, v in row.items() if k not in WALL} for row in result.rounds]


def _assert_same_metrics(one, two):
    rows1, rows2 = _rows(one), _rows(two)
    assert len(rows1) == len(rows2) > 1
    for a, b in zip(rows1, rows2, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float) and not isinstance(value, bool):
                assert b[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
            else:
                assert b[key] == value, key


@pytest.mark.parametrize("fast_path", [False, True], ids=["general", "with-fast-path"])
def test_digits_mlp_two_workers_give_the_same_metrics_as_one(tmp_path, fast_path):
    # With the fast path, cohorts train in the parent and evaluation goes to the workers.
    runs = {
        w: simulate(
            out=str(tmp_path / f"w{w}"),
            num_rounds=3,
            clients=60,
            clients_per_round=12,
            fraction_evaluate=0.2,
            model="mlp",
            fast_path=fast_path,
            workers=w,
        )
        for w in (1, 2)
    }
    _assert_same_metrics(runs[1], runs[2])
    assert all(r["clients_replied"] == 12 for r in runs[2].rounds[1:])


@pytest.mark.parametrize(
    "workers",
    [
        2,
        pytest.param(
            "auto",
            marks=pytest.mark.skipif(
                len(os.sched_getaffinity(0)) < 2,
                reason="auto starts workers only with two or more cores",
            ),
        ),
    ],
)
def test_synthetic_with_a_device_mix_workers_give_the_same_metrics_as_one(tmp_path, workers):
    # Synthetic clients take milliseconds each: "auto" starts workers in round 1.
    runs = {
        w: simulate(
            out=str(tmp_path / f"w{w}"),
            dataset="synthetic:1,1",
            num_rounds=3,
            clients=300,
            clients_per_round=20,
            device_mix="mobile",
            overcommit=0.3,
            fast_path=False,
            workers=w,
        )
        for w in (1, workers)
    }
    _assert_same_metrics(runs[1], runs[workers])
    # The virtual clock ran: simulated time is in the rows, and it advanced.
    assert runs[workers].rounds[-1]["sim_elapsed"] > 0


# ---------------------------------------------------------------- Flower's semantics


@pytest.fixture(scope="module")
def plain_observed():
    run = run_in_process(
        plain.server_app,
        plain.client_app,
        num_nodes=4,
        run_config={"num-rounds": 3, "fail-partition": 1, "fail-round": 2},
        workers=2,
    )
    return {"rounds": plain.OBSERVED["rounds"], "stats": run.stats}


def test_a_raising_client_app_gives_an_error_reply_and_the_run_goes_on(plain_observed):
    second = plain_observed["rounds"][1]
    errors = [m for m in second["replies"] if m.has_error()]
    assert len(errors) == 1
    assert errors[0].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION == 2
    assert "planned failure" in errors[0].error.reason
    assert second["aggregate"] is not None
    third = plain_observed["rounds"][2]
    assert not any(m.has_error() for m in third["replies"])
    assert plain_observed["stats"].errors == 1
    assert plain_observed["stats"].messages == 12


def test_state_persists_through_workers_and_a_failed_call_is_discarded(plain_observed):
    for server_round, rnd in enumerate(plain_observed["rounds"], start=1):
        for m in (m for m in rnd["replies"] if not m.has_error()):
            pid = int(m.content["metrics"]["partition"])
            failed_before = pid == 1 and server_round > 2
            assert m.content["metrics"]["calls"] == server_round - failed_before


def test_ids_mods_and_node_isolation_survive_the_process_boundary(plain_observed):
    for server_round, rnd in enumerate(plain_observed["rounds"], start=1):
        assert {m.metadata.reply_to_message_id for m in rnd["replies"]} == set(rnd["ids"])
        reply_ids = [m.metadata.message_id for m in rnd["replies"]]
        assert all(reply_ids) and len(set(reply_ids)) == 4
        assert not set(reply_ids) & set(rnd["ids"])
        ok = [m for m in rnd["replies"] if not m.has_error()]
        assert all(m.content["metrics"]["via-mod"] == 1 for m in ok)
        assert {m.content["metrics"]["received-w0"] for m in ok} == {rnd["global_w0"]}
        pids = [int(m.content["metrics"]["partition"]) for m in ok]
        weights = np.array([p + 1 for p in pids], dtype=np.float64)
        expected = np.average(
            np.stack([plain.client_values(p, server_round)["w"] for p in pids]),
            axis=0,
            weights=weights,
        )
        np.testing.assert_allclose(rnd["aggregate"]["w"], expected, rtol=1e-12)


# ---------------------------------------------------------------- process lifetime

# Per round: the serving process by partition, and the (code, reason) of each error.
OBSERVED: list[tuple[dict[int, int], list[tuple[int, str]]]] = []
NODES = 6
ROUNDS = 3
KILLED_PARTITION = 2

pid_app = ClientApp()


@pid_app.train()
def _train(msg: Message, context: Context) -> Message:
    marker = context.run_config.get("kill-marker")
    pid = int(context.node_config["partition-id"])
    if marker and pid == KILLED_PARTITION and not Path(str(marker)).exists():
        Path(str(marker)).write_text("killed once")
        os.kill(os.getpid(), signal.SIGKILL)  # dies mid-call, as a segfault would
    slow = context.run_config.get("slow-partition", pid)  # by default every client
    if slow == pid:
        time.sleep(float(context.run_config.get("sleep-ms", 0)) / 1000)  # a client with work
    metrics = MetricRecord({"pid": os.getpid(), "partition": pid})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


pid_server = ServerApp()


@pid_server.main()
def _main(grid: Grid, context: Context) -> None:
    OBSERVED.clear()
    for server_round in range(1, ROUNDS + 1):
        content = RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"r": server_round})})
        replies = grid.send_and_receive(
            [Message(content, node, "train") for node in grid.get_node_ids()]
        )
        served = {
            int(r.content["metrics"]["partition"]): int(r.content["metrics"]["pid"])
            for r in replies
            if not r.has_error()
        }
        errors = [(int(r.error.code), str(r.error.reason)) for r in replies if r.has_error()]
        OBSERVED.append((served, errors))


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def _serving_pids() -> set[int]:
    return {pid for served, _ in OBSERVED for pid in served.values()}


def test_workers_run_the_client_app_and_are_gone_after_the_run():
    run_in_process(pid_server, pid_app, num_nodes=NODES, run_config={}, workers=2)
    pids = _serving_pids()
    assert len(pids) == 2 and os.getpid() not in pids
    assert all(_gone(pid) for pid in pids)


def test_a_worker_killed_mid_call_fails_that_message_and_the_run_goes_on(tmp_path):
    marker = tmp_path / "killed"
    run = run_in_process(
        pid_server, pid_app, num_nodes=NODES, run_config={"kill-marker": str(marker)}, workers=2
    )
    assert marker.exists()
    (served, errors), *later = OBSERVED
    # The killed call's message gets Flower's "ClientApp crashed" error; every
    # other node of that round is still served (the dead worker's queue moved on).
    assert len(errors) == 1
    code, reason = errors[0]
    assert code == ErrorCode.CLIENT_APP_CRASHED
    assert "killed by signal 9" in reason
    assert f"node {FIRST_CLIENT_NODE_ID + KILLED_PARTITION}'s" in reason
    assert sorted(served) == [p for p in range(NODES) if p != KILLED_PARTITION]
    assert all(sorted(s) == list(range(NODES)) and not e for s, e in later)
    assert run.stats.errors == 1 and run.stats.messages == NODES * ROUNDS
    # A fresh worker took the dead one's place: three processes in all, all gone now.
    dead = int(re.search(r"worker process (\d+) ", reason).group(1))  # type: ignore[union-attr]
    pids = _serving_pids() | {dead}
    assert len(pids) == 3 and os.getpid() not in pids
    assert all(_gone(pid) for pid in pids)


def test_chunks_shrink_as_a_batch_runs_out_so_workers_finish_together():
    # A fair share's quarter, at most _MAX_CHUNK, at least one.
    assert [_chunk_size(n, 2) for n in (1000, 256, 100, 40, 9, 8, 1)] == [32, 32, 13, 5, 2, 1, 1]
    assert _chunk_size(1000, 16) == 16
    # Handing out a round chunk by chunk ends in single messages, never a full queue.
    left, sizes = 1000, []
    while left:
        sizes.append(_chunk_size(left, 2))
        left -= sizes[-1]
    assert sizes[0] == 32 and sizes[-5:] == [1] * 5 and sizes == sorted(sizes, reverse=True)


def test_workers_count_is_checked():
    assert resolve_workers(0) == resolve_workers("auto") == len(os.sched_getaffinity(0))
    assert resolve_workers(3) == 3
    for bad in (-1, 1.5, True, "2", "Auto"):
        with pytest.raises(ConfigError, match="workers: expected 'auto' or an integer >= 0"):
            resolve_workers(bad)


# A batch large enough to share: the 8 probed here, then at least 4 per worker.
AUTO_NODES = AutoWorkers.PROBE + AutoWorkers.MIN_SHARE * 2 + 4
two_cores = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="auto starts workers only with two or more cores"
)


@two_cores
def test_auto_starts_workers_once_client_calls_take_a_millisecond():
    run_in_process(
        pid_server, pid_app, num_nodes=AUTO_NODES, run_config={"sleep-ms": 3}, workers="auto"
    )
    parent = os.getpid()
    (first, errors), *later = OBSERVED
    assert not errors and sorted(first) == list(range(AUTO_NODES))
    # The first batch's probe is served here; its rest and every later batch by workers.
    here = sorted(p for p, pid in first.items() if pid == parent)
    assert here == list(range(AutoWorkers.PROBE))
    assert all(pid != parent for served, _ in later for pid in served.values())
    workers = _serving_pids() - {parent}
    assert len(workers) == len(os.sched_getaffinity(0))
    assert all(_gone(pid) for pid in workers), "stopped when the run ended"


@two_cores
@pytest.mark.parametrize(
    "run_config",
    [{}, {"sleep-ms": 20, "slow-partition": 0}],
    ids=["quick", "one-slow-first-call"],
)
def test_auto_keeps_quick_clients_in_this_process(run_config):
    # One slow call among the probed (a first call that builds the model and loads
    # the data, say) does not start workers: the probe leaves out the slowest call.
    run_in_process(pid_server, pid_app, num_nodes=AUTO_NODES, run_config=run_config, workers="auto")
    assert _serving_pids() == {os.getpid()}
    assert all(len(served) == AUTO_NODES for served, _ in OBSERVED)


# ---------------------------------------------------------------- the scalability law


def test_fit_usl_recovers_known_coefficients():
    workers = np.arange(1, 17)
    sigma, kappa, lam = 0.08, 0.004, 950.0
    throughput = usl_throughput(workers, sigma, kappa, lam)
    noise = np.random.default_rng(0).normal(1.0, 0.002, size=workers.size)
    got = fit_usl(workers, throughput * noise)
    assert got[0] == pytest.approx(sigma, abs=0.005)
    assert got[1] == pytest.approx(kappa, abs=0.0005)
    assert got[2] == pytest.approx(lam, rel=0.01)
    assert peak_workers(sigma, kappa) == pytest.approx(np.sqrt((1 - sigma) / kappa))
    with pytest.raises(ValueError, match="at least 3"):
        fit_usl([1, 2], [1.0, 1.8])
