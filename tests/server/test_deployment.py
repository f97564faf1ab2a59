"""A real deployment on 127.0.0.1: `fedscale server` and three `fedscale edge-client`s.

Each is a separate process (a SuperLink, three SuperNodes, and the ServerApp and
ClientApp processes Flower starts for them); every one is stopped by its PID.
"""

import os
import shutil
import sys
from pathlib import Path

import pytest

from fedscale.processes import free_port, start, stop
from fedscale.runs import RunDirectory

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FEDSCALE = [sys.executable, "-m", "fedscale.cli"]


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def test_server_with_three_edge_clients_trains_digits(tmp_path):
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    port = free_port()
    run = tmp_path / "run"
    server = start(
        [
            *FEDSCALE,
            "server",
            "--port",
            str(port),
            "--rounds",
            "3",
            "--min-clients",
            "3",
            "--per-round",
            "3",
            "--round-timeout",
            "120",
            "--out",
            str(run),
        ],
        log_file=tmp_path / "server.log",
        env=env,
    )
    clients = [
        start(
            [
                *FEDSCALE,
                "edge-client",
                "--server",
                f"127.0.0.1:{port}",
                "--partition-id",
                str(i),
                "--num-partitions",
                "3",
                "--port",
                str(free_port()),
                "--max-wait-time",
                "120",
            ],
            log_file=tmp_path / f"client{i}.log",
            env=env,
        )
        for i in range(3)
    ]
    processes = [server, *clients]
    try:
        code = server.wait(timeout=300)
        log = (tmp_path / "server.log").read_text()
        assert code == 0, log
        assert not _group_members(server.pid), "the server stopped its SuperLink and ServerApp"
        rows = RunDirectory(run).read_metrics()
        assert [r["round"] for r in rows] == [0, 1, 2, 3]
        assert all(r["clients_replied"] == 3 and r["clients_failed"] == 0 for r in rows[1:])
        assert rows[-1]["accuracy"] >= 0.80
        assert log.strip().splitlines()[-1] == f"final test accuracy: {rows[-1]['accuracy']:.4f}"
        assert len(list((run / "checkpoints").glob("round-*.safetensors"))) == 4
        for client in clients:
            assert client.poll() is None, "edge clients keep serving after a run"
    finally:
        for process in processes:
            stop(process)
        shutil.rmtree(tmp_path / "flwr-home", ignore_errors=True)
    leftovers = {p.pid: _group_members(p.pid) for p in processes}
    assert not any(leftovers.values()), leftovers
