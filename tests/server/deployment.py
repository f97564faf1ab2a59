"""Real deployments on 127.0.0.1 for tests: `fedscale server` and `fedscale edge-client`s.

Each is a process of its own, in a process group of its own (``start``), so a
test can stop it, or kill it with what it started, by its PID.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from subprocess import Popen

from fedscale.processes import free_port, start, stop, wait_for_port
from fedscale.server.launcher import superlink_argv

FEDSCALE = [sys.executable, "-m", "fedscale.cli"]


def deployment_env(tmp_path: Path) -> dict[str, str]:
    """Return the environment for a test's processes: its own FLWR_HOME, no telemetry."""
    return {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0"}


def start_server(
    tmp_path: Path, env: dict[str, str], *options: str, log: str = "server.log"
) -> Popen[bytes]:
    """Start ``fedscale server OPTIONS``, logging to ``tmp_path / log``."""
    return start([*FEDSCALE, "server", *options], log_file=tmp_path / log, env=env)


def start_superlink(tmp_path: Path, env: dict[str, str], port: int) -> Popen[bytes]:
    """Start a plain ``flower-superlink`` on 127.0.0.1:``port`` and wait until it listens."""
    log = tmp_path / "superlink.log"
    process = start(superlink_argv(port), log_file=log, env=env, cwd=tmp_path)
    try:
        wait_for_port(
            "127.0.0.1", port, timeout=60, process=process, what="flower-superlink", log_file=log
        )
    except BaseException:
        stop(process)
        raise
    return process


def start_edge_client(
    tmp_path: Path,
    env: dict[str, str],
    superlink_port: int,
    partition: int,
    partitions: int,
    *options: str,
    log: str | None = None,
) -> Popen[bytes]:
    """Start ``fedscale edge-client`` for one partition of a demo federation."""
    return start(
        [
            *FEDSCALE,
            "edge-client",
            "--server",
            f"127.0.0.1:{superlink_port}",
            "--partition-id",
            str(partition),
            "--num-partitions",
            str(partitions),
            "--port",
            str(free_port()),
            "--max-wait-time",
            "120",
            *options,
        ],
        log_file=tmp_path / (log or f"client{partition}.log"),
        env=env,
    )


def group_members(pgid: int) -> list[int]:
    """Return the live (not zombie) processes of process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def wait_for_round(run: Path, server_round: int, server: Popen[bytes], timeout: float) -> None:
    """Wait until ``run``'s metrics.jsonl holds ``server_round`` (the server still running)."""
    deadline = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and f'"round": {server_round},' in metrics.read_text():
            return
        assert server.poll() is None, f"the server exited ({server.returncode}) before the round"
        time.sleep(0.05)
    raise AssertionError(f"round {server_round} not reached within {timeout} s")


def run_deployment(
    tmp_path: Path, *server_options: str, devices: int = 3, timeout: float = 300
) -> Path:
    """Run ``fedscale server OPTIONS`` with ``devices`` edge clients to the end; return the run.

    Every device is in every round's pool (``--min-clients`` = ``devices``); the
    server must exit 0 within ``timeout`` seconds. Every process is stopped by its
    PID afterwards, and none may be left.
    """
    import shutil

    from fedscale.processes import stop

    env = deployment_env(tmp_path)
    port = free_port()
    run = tmp_path / "run"
    server = start_server(
        tmp_path,
        env,
        *("--port", str(port), "--out", str(run), "--min-clients", str(devices)),
        *("--round-timeout", "120", *server_options),
    )
    processes = [server]
    try:
        processes += [start_edge_client(tmp_path, env, port, i, devices) for i in range(devices)]
        code = server.wait(timeout=timeout)
        assert code == 0, (tmp_path / "server.log").read_text()
    finally:
        for process in processes:
            stop(process)
        shutil.rmtree(tmp_path / "flwr-home", ignore_errors=True)
    leftovers = {p.pid: group_members(p.pid) for p in processes}
    assert not any(leftovers.values()), leftovers
    return run
