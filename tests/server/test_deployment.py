"""A real deployment on 127.0.0.1: `fedscale server` and three `fedscale edge-client`s.

Each is a separate process (a SuperLink, three SuperNodes, and the ServerApp and
ClientApp processes Flower starts for them); every one is stopped by its PID.
"""

import shutil

import pytest

from fedscale.processes import free_port, stop
from fedscale.runs import RunDirectory
from tests.server.deployment import deployment_env, group_members, start_edge_client, start_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_server_with_three_edge_clients_trains_digits(tmp_path):
    env = deployment_env(tmp_path)
    port = free_port()
    run = tmp_path / "run"
    server = start_server(
        tmp_path,
        env,
        *("--port", str(port), "--rounds", "3", "--min-clients", "3", "--per-round", "3"),
        *("--round-timeout", "120", "--out", str(run)),
    )
    clients = [start_edge_client(tmp_path, env, port, i, 3) for i in range(3)]
    processes = [server, *clients]
    try:
        code = server.wait(timeout=300)
        log = (tmp_path / "server.log").read_text()
        assert code == 0, log
        assert not group_members(server.pid), "the server stopped its SuperLink and ServerApp"
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
    leftovers = {p.pid: group_members(p.pid) for p in processes}
    assert not any(leftovers.values()), leftovers
