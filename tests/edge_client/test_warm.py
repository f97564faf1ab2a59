"""The warm SuperExec: each ClientApp in a fork of one process, on Flower's own SuperNode.

A real `flower-superlink`, two `fedscale edge-client` processes and `flwr run`, on
127.0.0.1, once with Flower's default SuperExec (a fresh `flwr-clientapp` per
message) and once warm; every process is stopped by its PID.
"""

from __future__ import annotations

import http.client as http_client
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import pytest

from fedscale.edge_client.warm import WarmOptions, _fresh_random_state
from fedscale.exceptions import ConfigError
from fedscale.flower_app import write_app_dir
from fedscale.modelstore import Manifest, ModelDirectory
from fedscale.processes import flower_executable, free_port, start, stop
from fedscale.runs import RunDirectory
from fedscale.server.launcher import CONNECTION_NAME, flwr_home_config
from fedscale.settings import RunSettings
from tests.server.deployment import start_superlink

FEDSCALE = [sys.executable, "-m", "fedscale.cli"]
ROUNDS = 2
NODES = 2


def _federation(
    tmp_path: Path,
    *,
    warm: bool,
    data: list[list[str]] | None = None,
    after_run: Callable[[], None] | None = None,
) -> tuple[list[dict[str, object]], list[str]]:
    """Run ROUNDS rounds on edge clients; return metrics rows and client logs.

    ``data`` holds each client's options; by default NODES demo partitions.
    ``after_run`` runs once the run has ended, while the edge clients still run.
    """
    data = data or [
        ["--partition-id", str(i), "--num-partitions", str(NODES)] for i in range(NODES)
    ]
    home = tmp_path / "flwr-home"
    home.mkdir(parents=True)
    port = free_port()
    (home / "config.toml").write_text(flwr_home_config(f"127.0.0.1:{port}"))
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
    run = tmp_path / "run"
    settings = RunSettings(
        num_rounds=ROUNDS,
        clients_per_round=len(data),
        min_clients=len(data),
        local_epochs=1,
        round_timeout=120.0,
        seed=7,
        device="cpu",
        out=str(run),
    )
    app_dir = write_app_dir(tmp_path / "app", settings.to_run_config())
    processes = [start_superlink(tmp_path, env, port)]
    logs = [tmp_path / f"client{i}.log" for i in range(len(data))]
    try:
        for log, options in zip(logs, data, strict=True):
            argv = [
                *FEDSCALE,
                "edge-client",
                "--server",
                f"127.0.0.1:{port}",
                *options,
                "--port",
                str(free_port()),
                "--max-wait-time",
                "120",
            ]
            processes.append(
                start([*argv, "--warm" if warm else "--no-warm"], log_file=log, env=env)
            )
        submit = start(
            [flower_executable("flwr"), "run", str(app_dir), CONNECTION_NAME, "--stream"],
            log_file=tmp_path / "flwr-run.log",
            env=env,
            cwd=tmp_path,
        )
        processes.append(submit)
        assert submit.wait(timeout=300) == 0, (tmp_path / "flwr-run.log").read_text()
        for client in processes[1 : 1 + len(data)]:
            assert client.poll() is None, "edge clients keep running after a run"
        if after_run is not None:
            after_run()
    finally:
        for process in reversed(processes):
            stop(process)
    return RunDirectory(run).read_metrics(), [log.read_text() for log in logs]


@pytest.mark.integration
@pytest.mark.slow
def test_warm_clientapps_run_in_forks_and_train_exactly_as_flowers_default(tmp_path):
    default_rows, default_logs = _federation(tmp_path / "default", warm=False)
    warm_rows, warm_logs = _federation(tmp_path / "warm", warm=True)

    for rows in (default_rows, warm_rows):
        assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
        assert all(r["clients_replied"] == NODES and r["clients_failed"] == 0 for r in rows[1:])
    for default, warm in zip(default_rows, warm_rows, strict=True):
        for key in ("loss", "accuracy", "train_loss"):
            if default[key] is None:
                assert warm[key] is None
            else:
                assert warm[key] == pytest.approx(default[key], rel=1e-6), (key, default, warm)

    # Flower's default path starts a `flwr-clientapp` interpreter per message ...
    for log in default_logs:
        assert log.count("Start `flwr-clientapp` process") == ROUNDS, log
        assert "fedscale-warm" not in log
    # ... the warm one none: each task runs in a fork of the warm SuperExec.
    for log in warm_logs:
        assert "Start `flwr-clientapp` process" not in log, log
        (warm_pid,) = re.findall(r"started warm SuperExec: pid (\d+)", log)
        forks = re.findall(
            r"task (\d+) \(run \d+\): ClientApp in worker pid (\d+), forked from pid (\d+)", log
        )
        assert len(forks) == ROUNDS, log
        for task, worker, parent in forks:
            assert parent == warm_pid
            assert f"worker pid {worker} (parent {warm_pid}) runs task {task}" in log
            assert f"worker pid {worker} (task {task}) exited with code 0" in log


@pytest.mark.integration
@pytest.mark.slow
def test_a_clientapp_that_raises_in_a_fork_replies_an_error_and_the_next_task_runs(tmp_path):
    # Labels 10..19 on a 10-class digits run: fedscale's ClientApp raises DataError.
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((20, 64), np.float32), y=np.arange(10, 30) % 20 + 10)
    rows, (log,) = _federation(tmp_path / "fed", warm=True, data=[["--data-path", str(bad)]])
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    assert all(r["clients_replied"] == 0 and r["clients_failed"] == 1 for r in rows[1:]), rows
    workers = re.findall(r"ClientApp in worker pid (\d+)", log)
    assert len(workers) == ROUNDS, log
    for worker in workers:
        assert re.search(rf"worker pid {worker} \(task \d+\) exited with code [1-9]", log), log
    assert "expected labels below 10" in log


@pytest.mark.integration
@pytest.mark.slow
def test_one_edge_client_command_trains_and_serves_the_federations_model(tmp_path):
    models, http = tmp_path / "models", free_port()
    served: dict[str, object] = {}

    def infer_with_the_newest_model() -> None:
        manifest = ModelDirectory(models).read_manifest()
        (spec,) = manifest.inputs
        body = {
            "inputs": [
                {
                    "name": spec.name,
                    "shape": [1, *spec.shape[1:]],
                    "datatype": spec.datatype,
                    "data": [0.5] * int(np.prod(spec.shape[1:])),
                }
            ]
        }
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the server notices a new manifest by polling
            connection = http_client.HTTPConnection("127.0.0.1", http, timeout=10)
            try:
                connection.request("POST", f"/v2/models/{manifest.name}/infer", json.dumps(body))
                response = connection.getresponse()
                answer = json.loads(response.read())
            finally:
                connection.close()
            if response.status == 200 and answer["model_version"] == str(manifest.round):
                served.update(manifest=manifest, answer=answer)
                return
            time.sleep(0.2)
        raise AssertionError(f"fedscale serve did not serve round {manifest.round}: {answer}")

    options = ["--partition-id", "0", "--num-partitions", "2"]
    options += ["--model-dir", str(models), "--serve-port", str(http)]
    rows, (log,) = _federation(
        tmp_path / "fed", warm=True, data=[options], after_run=infer_with_the_newest_model
    )
    assert all(r["clients_replied"] == 1 for r in rows[1:])
    # Round r's message carries the global model after round r - 1.
    manifest = cast(Manifest, served["manifest"])
    assert manifest.round == ROUNDS - 1
    (output,) = cast(dict[str, list[dict[str, object]]], served["answer"])["outputs"]
    assert output["shape"] == [1, 10]
    assert "fedscale serve listening" in log


def test_each_fork_draws_fresh_global_random_state():
    read, write = os.pipe()
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            _fresh_random_state()
            os.write(write, np.random.random_sample(2).tobytes())
            os._exit(0)
        children.append(pid)
    for pid in children:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    os.close(write)
    data = b""
    while chunk := os.read(read, 4096):
        data += chunk
    os.close(read)
    first, second = np.frombuffer(data, dtype=np.float64).reshape(2, 2)
    assert not np.array_equal(first, second)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"runtime_api_address": " "}, r"--runtime-api-address: expected HOST:PORT"),
        ({"poll_interval": 0.0}, r"--poll-interval: expected 0.005 to 60 seconds, got 0.0"),
        ({"max_workers": 0}, r"--max-workers: expected at least 1, got 0"),
    ],
)
def test_bad_warm_options_are_clear_errors(kwargs, message):
    options = {"runtime_api_address": "127.0.0.1:9094", **kwargs}
    with pytest.raises(ConfigError, match=message):
        WarmOptions(**options)
