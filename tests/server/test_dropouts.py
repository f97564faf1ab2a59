"""Dropouts on a real deployment: two of six edge devices die mid-round.

The round completes at its deadline (``--round-timeout``) with the four left,
the run completes, and a device that comes back joins the later rounds. Every
process runs on 127.0.0.1 and is stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from fedscale.processes import free_port, stop
from fedscale.runs import RunDirectory
from tests.server.deployment import deployment_env, start_edge_client, start_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICES = 6
ROUNDS = 4
ROUND_TIMEOUT = 40


def test_two_of_six_devices_die_mid_round_the_round_ends_at_its_deadline(tmp_path):
    env = deployment_env(tmp_path)
    port = free_port()
    run = tmp_path / "run"
    server = start_server(
        tmp_path,
        env,
        *("--port", str(port), "--out", str(run), "--rounds", str(ROUNDS)),
        *("--min-clients", str(DEVICES)),
        # More than will ever be connected: every round samples every node.
        *("--per-round", "20"),
        # Short training, a long deadline: however loaded the machine, the four
        # left reply in time, and the dead two are what the round waits for.
        *("--local-epochs", "1", "--round-timeout", str(ROUND_TIMEOUT)),
    )
    clients = [start_edge_client(tmp_path, env, port, i, DEVICES) for i in range(DEVICES)]
    processes = [server, *clients]
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.exists() and '"round": 1,' in metrics.read_text()):
            assert time.monotonic() < deadline, "round 1 did not complete within 240 s"
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.05)
        # Round 2 has just been sent: two devices die while training it.
        for dead in clients[:2]:
            os.killpg(dead.pid, signal.SIGKILL)
            dead.wait(timeout=30)
        # One of them comes back (a new process, as after a reboot).
        time.sleep(2)
        processes.append(start_edge_client(tmp_path, env, port, 0, DEVICES, log="client0-back.log"))

        code = server.wait(timeout=300)
        assert code == 0, (tmp_path / "server.log").read_text()
        rows = RunDirectory(run).read_metrics()
        assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
        assert rows[1]["clients_replied"] == DEVICES
        # Round 2: the dead devices' replies never came; the round closed at its
        # deadline with the four alive, and their update was aggregated.
        assert rows[2]["clients_sampled"] == DEVICES
        assert rows[2]["clients_replied"] == DEVICES - 2
        assert rows[2]["clients_failed"] == 2
        assert rows[2]["seconds"] >= ROUND_TIMEOUT * 0.9, "the round waited for its deadline"
        assert rows[2]["train_loss"] is not None
        # The device that came back trained in a later round: five replies.
        assert max(r["clients_replied"] for r in rows[3:]) == DEVICES - 1
        assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.15
    finally:
        for process in processes:
            stop(process)
        shutil.rmtree(tmp_path / "flwr-home", ignore_errors=True)
