"""`fedscale server --models-port`: the run's model directory over HTTP while it trains."""

import hashlib
import http.client
import os
import shutil
import sys
import time

import pytest

from fedscale.exceptions import ConfigError
from fedscale.modelstore import Manifest
from fedscale.processes import free_port, start, stop, wait_for_port
from fedscale.server.launcher import ServerOptions

FEDSCALE = [sys.executable, "-m", "fedscale.cli"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"models_port": -1}, r"models port: expected 1-65535, or 0 for none, got -1"),
        ({"models_port": 65536}, r"models port: expected 1-65535, or 0 for none, got 65536"),
        ({"port": 9000, "models_port": 9000}, r"other than the SuperLink's \(9000\), got 9000"),
    ],
)
def test_bad_models_port_is_a_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ServerOptions(**kwargs)


def _get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.integration
@pytest.mark.slow
def test_server_publishes_its_models_while_the_run_lasts(tmp_path):
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0"}
    port, models_port = free_port(), free_port()
    run = tmp_path / "run"
    server = start(
        [
            *FEDSCALE,
            "server",
            "--port",
            str(port),
            "--models-port",
            str(models_port),
            "--rounds",
            "2",
            "--min-clients",
            "1",
            "--per-round",
            "1",
            "--local-epochs",
            "1",
            "--round-timeout",
            "120",
            "--out",
            str(run),
        ],
        log_file=tmp_path / "server.log",
        env=env,
    )
    client = start(
        [
            *FEDSCALE,
            "edge-client",
            "--server",
            f"127.0.0.1:{port}",
            "--partition-id",
            "0",
            "--num-partitions",
            "2",
            "--port",
            str(free_port()),
            "--max-wait-time",
            "120",
        ],
        log_file=tmp_path / "client.log",
        env=env,
    )
    try:
        wait_for_port("127.0.0.1", models_port, timeout=60, process=server, what="publisher")
        seen: dict[int, Manifest] = {}
        deadline = time.monotonic() + 240
        while server.poll() is None and time.monotonic() < deadline:
            try:
                status, body = _get(models_port, "/manifest.json")
            except OSError:  # the run ended between poll() and the request
                break
            if status == 200:
                manifest = Manifest.loads(body)
                try:
                    status, data = _get(models_port, f"/{manifest.file}")
                except OSError:  # the run ended between the two requests
                    break
                if status == 200:  # else pruned between the two requests: poll again
                    assert hashlib.sha256(data).hexdigest() == manifest.sha256
                    seen[manifest.round] = manifest
            else:
                assert status == 404  # nothing published yet
            time.sleep(0.2)
        code = server.wait(timeout=120)
        assert code == 0, (tmp_path / "server.log").read_text()
        assert seen, "a manifest was served while the run lasted"
        assert set(seen) <= {0, 1, 2}
        final = Manifest.loads((run / "models" / "manifest.json").read_bytes())
        assert final.round == 2
        # The server stopped its publisher with the run.
        with pytest.raises(ConnectionRefusedError):
            http.client.HTTPConnection("127.0.0.1", models_port, timeout=5).connect()
    finally:
        for process in (server, client):
            stop(process)
        shutil.rmtree(tmp_path / "flwr-home", ignore_errors=True)
