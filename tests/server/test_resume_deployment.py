"""The server survives SIGKILL: `fedscale server --resume` finishes the run, no round lost.

Real processes on 127.0.0.1: `fedscale server` (its SuperLink and the ServerApp
process the SuperLink runs, one process group) and three `fedscale edge-client`s.
The server's whole group is killed with SIGKILL after round 2 of 5; the edge
clients stay up, as devices would, and rejoin the restarted SuperLink.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from fedscale.processes import free_port, stop
from fedscale.runs import RunDirectory
from tests.server.deployment import (
    deployment_env,
    group_members,
    start_edge_client,
    start_server,
    wait_for_round,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUNDS = 5


def test_server_killed_after_round_2_resumes_and_loses_no_round(tmp_path):
    env = deployment_env(tmp_path)
    port = free_port()
    run = tmp_path / "run"
    where = ("--port", str(port), "--out", str(run))
    server = start_server(
        tmp_path,
        env,
        *where,
        *("--rounds", str(ROUNDS), "--min-clients", "3", "--per-round", "3"),
        *("--local-epochs", "20", "--round-timeout", "120"),
    )
    clients = [start_edge_client(tmp_path, env, port, i, 3) for i in range(3)]
    processes = [server, *clients]
    try:
        wait_for_round(run, 2, server, timeout=240)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        deadline = time.monotonic() + 30
        while group_members(server.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not group_members(server.pid), "SIGKILL took the SuperLink and ServerApp down"
        before = [r["round"] for r in RunDirectory(run).read_metrics()]
        assert before[-1] < ROUNDS, "the kill came before the run's end"

        # No options but where it runs: the run's config.toml holds the rest.
        resumed = start_server(tmp_path, env, *where, "--resume", log="resumed.log")
        processes.append(resumed)
        code = resumed.wait(timeout=300)
        assert code == 0, (tmp_path / "resumed.log").read_text()
        rows = RunDirectory(run).read_metrics()
        assert [r["round"] for r in rows] == list(range(ROUNDS + 1)), "rounds 0-5 exactly once"
        assert all(r["clients_replied"] == 3 for r in rows[1:])
        assert len(list((run / "checkpoints").glob("round-*.safetensors"))) == ROUNDS + 1
        for client in clients:
            assert client.poll() is None, "the edge clients rode out the server's restart"
    finally:
        for process in processes:
            stop(process)
        shutil.rmtree(tmp_path / "flwr-home", ignore_errors=True)
    assert not any(group_members(p.pid) for p in processes)
