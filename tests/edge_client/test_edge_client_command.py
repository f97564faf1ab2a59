"""`fedscale edge-client`: its options, its processes, and how it stops them.

The process tests run the real command on 127.0.0.1 against a real
`flower-superlink`, with `--serve-port`, and stop every process by its PID.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from fedscale.edge_client.supernode import (
    MODEL_DIR,
    EdgeClientOptions,
    edge_client_children,
    supernode_argv,
)
from fedscale.exceptions import ConfigError
from fedscale.processes import free_port, start, stop, wait_for_port
from tests.server.deployment import start_superlink

FEDSCALE = [sys.executable, "-m", "fedscale.cli"]


def _options(**kwargs: object) -> EdgeClientOptions:
    base: dict[str, object] = {
        "server": "127.0.0.1:9092",
        "clientappio_port": 9999,
        "partition_id": 0,
        "num_partitions": 2,
    }
    return EdgeClientOptions(**{**base, **kwargs})


def test_model_dir_key_is_the_one_the_client_app_reads():
    from fedscale.edge_client.app import MODEL_DIR_KEY

    assert MODEL_DIR == MODEL_DIR_KEY


def test_warm_runs_the_supernode_in_process_isolation_beside_fedscales_superexec(tmp_path):
    options = _options(model_dir=str(tmp_path / "models"), serve_port=8500, serve_grpc_port=8501)
    children = edge_client_children(options, parent_pid=4321)
    assert [c.name for c in children] == ["flower-supernode", "warm SuperExec", "fedscale serve"]
    supernode, warm, serve = (c.argv for c in children)
    assert supernode[supernode.index("--isolation") + 1] == "process"
    assert supernode[-2:] == [
        "--node-config",
        f'partition-id=0 num-partitions=2 model-dir="{tmp_path / "models"}"',
    ]
    assert warm[1:3] == ["-m", "fedscale.edge_client.warm"]
    assert warm[warm.index("--runtime-api-address") + 1] == "127.0.0.1:9999"
    assert warm[warm.index("--parent-pid") + 1] == "4321"
    assert serve[1:4] == ["-m", "fedscale.cli", "serve"]
    for flag, value in (
        ("--model-dir", str(tmp_path / "models")),
        ("--http-port", "8500"),
        ("--grpc-port", "8501"),
        ("--host", "127.0.0.1"),
    ):
        assert serve[serve.index(flag) + 1] == value


def test_not_warm_is_flowers_default_supernode_alone():
    options = _options(warm=False)
    assert [c.name for c in edge_client_children(options, parent_pid=1)] == ["flower-supernode"]
    assert "--isolation" not in supernode_argv(options)


def test_serve_args_reach_the_fedscale_serve_command_line(tmp_path):
    options = _options(
        model_dir=str(tmp_path / "models"),
        serve_port=8500,
        serve_args=("--api-key-file=/etc/key", "--max-concurrency=8"),
    )
    serve = next(c for c in edge_client_children(options, 1) if c.name == "fedscale serve").argv
    assert serve[-2:] == ["--api-key-file=/etc/key", "--max-concurrency=8"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"serve_args": ("--max-concurrency=8",)}, r"--serve-arg: expected --serve-port too"),
        (
            {"model_dir": "M", "serve_port": 8500, "serve_args": ("--model-dir=/other",)},
            r"--serve-arg: expected a fedscale serve option as --name=value other than",
        ),
        (
            {"model_dir": "M", "serve_port": 8500, "serve_args": ("rm",)},
            r"got 'rm'",
        ),
        ({"serve_port": 8500}, r"--serve-port: expected --model-dir DIR to serve"),
        ({"serve_grpc_port": 8501}, r"--serve-grpc-port: expected --serve-port too"),
        ({"model_dir": "M", "serve_port": 70000}, r"--serve-port: expected 1-65535, got 70000"),
        (
            {"model_dir": "M", "serve_port": 8500, "serve_grpc_port": -1},
            r"--serve-grpc-port: expected 1-65535 \(or 0 for no gRPC\), got -1",
        ),
        (
            {"model_dir": "M", "serve_port": 8500, "serve_grpc_port": 8500},
            r"expected a port other than --serve-port, got 8500 for both",
        ),
    ],
)
def test_bad_serving_options_are_clear_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _options(**kwargs)


def test_model_dir_must_not_be_a_file(tmp_path):
    file = tmp_path / "models"
    file.write_text("")
    with pytest.raises(ConfigError, match=r"--model-dir: expected a directory, found a file"):
        _options(model_dir=str(file))


def test_the_command_names_a_missing_model_dir():
    from typer.testing import CliRunner

    from fedscale.cli.main import app

    result = CliRunner().invoke(
        app,
        ["edge-client", "--server", "127.0.0.1:9092", "--partition-id", "0",
         "--num-partitions", "2", "--serve-port", "8500"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--serve-port: expected --model-dir DIR to serve" in " ".join(result.output.split())


# ------------------------------------------------------------------ processes


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _wait_for(log: Path, pattern: str, process, timeout: float = 120.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        if found := re.search(pattern, text):
            return found
        assert process.poll() is None, f"edge-client exited with {process.returncode}:\n{text}"
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} within {timeout} s in:\n{log.read_text()}")


@pytest.fixture
def superlink(tmp_path):
    port = free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0"}
    process = start_superlink(tmp_path, env, port)
    try:
        yield port, env
    finally:
        stop(process)


def _start_edge_client(tmp_path: Path, superlink_port: int, env: dict[str, str], *extra: str):
    http, grpc = free_port(), free_port()
    log = tmp_path / "edge-client.log"
    process = start(
        [
            *FEDSCALE,
            "edge-client",
            "--server",
            f"127.0.0.1:{superlink_port}",
            "--partition-id",
            "0",
            "--num-partitions",
            "2",
            "--port",
            str(free_port()),
            "--model-dir",
            str(tmp_path / "models"),
            "--serve-port",
            str(http),
            "--serve-grpc-port",
            str(grpc),
            *extra,
        ],
        log_file=log,
        env=env,
    )
    try:
        _wait_for(log, r"fedscale serve listening http=127\.0\.0\.1:\d+", process)
        _wait_for(log, r"fedscale-warm INFO: connected to the SuperNode", process)
        text = log.read_text()
        pids = {name: int(pid) for name, pid in re.findall(r"started ([\w -]+): pid (\d+)", text)}
    except BaseException:
        stop(process)
        raise
    assert set(pids) == {"flower-supernode", "warm SuperExec", "fedscale serve"}, text
    for pid in pids.values():
        assert _running(pid) and _parent(pid) == process.pid
    assert (tmp_path / "models").is_dir()
    return process, pids, log, (http, grpc)


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_stops_the_supernode_the_warm_superexec_and_the_server(tmp_path, superlink):
    port, env = superlink
    process, pids, log, (http, grpc) = _start_edge_client(tmp_path, port, env)
    try:
        wait_for_port("127.0.0.1", grpc, timeout=30, what="fedscale serve gRPC")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        stop(process)
    assert "stopped on SIGTERM" in log.read_text()
    left = {name: pid for name, pid in pids.items() if _running(pid)}
    assert not left, left


@pytest.mark.integration
@pytest.mark.slow
def test_a_child_that_dies_stops_the_others_and_is_named(tmp_path, superlink):
    port, env = superlink
    process, pids, log, _ = _start_edge_client(tmp_path, port, env)
    try:
        os.kill(pids["fedscale serve"], signal.SIGKILL)
        assert process.wait(timeout=60) == 2, log.read_text()
    finally:
        stop(process)
    text = " ".join(log.read_text().split())  # undo the console's line wrapping
    assert (
        f"fedscale serve (pid {pids['fedscale serve']}) exited with code -9; "
        "stopping flower-supernode, warm SuperExec" in text
    ), text
    left = {name: pid for name, pid in pids.items() if _running(pid)}
    assert not left, left


@pytest.mark.integration
@pytest.mark.slow
def test_serve_arg_turns_on_the_api_key_of_the_served_model(tmp_path, superlink):
    import http.client

    port, env = superlink
    key = tmp_path / "key"
    key.write_text("s3cret-device-key\n")
    process, pids, log, (http_port, _) = _start_edge_client(
        tmp_path, port, env, f"--serve-arg=--api-key-file={key}"
    )

    def status(path: str, headers: dict[str, str]) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
        try:
            connection.request("GET", path, headers=headers)
            return connection.getresponse().status
        finally:
            connection.close()

    try:
        assert status("/v2/health/live", {}) == 200, "health stays open"
        assert status("/v2", {}) == 401
        assert status("/v2", {"Authorization": "Bearer s3cret-device-key"}) == 200
    finally:
        stop(process)
    left = {name: pid for name, pid in pids.items() if _running(pid)}
    assert not left, left
