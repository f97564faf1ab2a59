"""Flower's own tools run fedscale: `flwr run .` against a SuperLink and SuperNodes.

The SuperLink, two SuperNodes and `flwr run` are Flower's commands, started here
as separate processes on 127.0.0.1; every one is stopped by its PID.
"""

import os
from pathlib import Path

import pytest

from fedscale.processes import flower_executable, free_port, start, stop
from fedscale.runs import RunDirectory
from fedscale.server.launcher import CONNECTION_NAME, flwr_home_config
from tests.server.deployment import start_superlink

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_flwr_run_of_the_repository_trains_on_supernodes(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(flwr_home_config(f"127.0.0.1:{port}"))
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
    processes = [start_superlink(tmp_path, env, port)]
    try:
        for i in range(2):
            processes.append(
                start(
                    [
                        flower_executable("flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--port",
                        str(free_port()),
                        "--node-config",
                        f"partition-id={i} num-partitions=2",
                    ],
                    log_file=tmp_path / f"supernode{i}.log",
                    env=env,
                    cwd=tmp_path,
                )
            )
        run = tmp_path / "run"
        submit = start(
            [
                flower_executable("flwr"),
                "run",
                str(REPO),
                CONNECTION_NAME,
                "--stream",
                "--run-config",
                f"num-rounds=2 clients-per-round=2 round-timeout=120.0 out='{run}'",
            ],
            log_file=tmp_path / "flwr-run.log",
            env=env,
            cwd=tmp_path,
        )
        processes.append(submit)
        assert submit.wait(timeout=240) == 0, (tmp_path / "flwr-run.log").read_text()
        rows = RunDirectory(run).read_metrics()
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert all(r["clients_replied"] == 2 for r in rows[1:])
        assert rows[-1]["accuracy"] > 0.8
        log = (tmp_path / "flwr-run.log").read_text()
        assert "round 2/2: accuracy" in log, "the ServerApp's round lines reach `flwr run --stream`"
    finally:
        for process in reversed(processes):
            stop(process)
    assert all(p.poll() is not None for p in processes)
