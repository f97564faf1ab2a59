"""docs/deployment.md, run on one machine: a server, three edge clients, a serve-only device.

The document's hosts are different machines; here they are folders of one test,
so the test changes only addresses and ports: `SERVER_IP` and `0.0.0.0` become
127.0.0.1 (tests bind loopback only), and every port becomes a free one, each
device getting its own serving port. The commands are otherwise run as written, in
the document's order. The TLS section has its own test (tests/server/test_tls.py).
"""

import http.client
import json
import time

import pytest

from fedscale.processes import free_port, wait_for_port
from fedscale.runs import RunDirectory

from .doc_commands import ROOT, Doc, bash_blocks

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEPLOYMENT = ROOT / "docs" / "deployment.md"
TLS_HEADING = "## TLS and node authentication"


def _get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except OSError:
        return 0, b""
    finally:
        connection.close()


def _wait_for(what: str, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.25)


def test_the_deployment_steps_run_on_one_machine(tmp_path):
    blocks = bash_blocks(DEPLOYMENT, before_heading=TLS_HEADING)
    assert [b.marker for b in blocks] == [
        "skip",  # install
        "skip",  # serve-only install
        "background",  # server
        "background",  # three edge clients
        "background",  # serve-only device
        "run",  # metrics
        "run",  # the run folder
        "run",  # ask a device
    ]
    _, _, server_block, clients_block, serve_block, watch, listing_block, ask = blocks
    assert len(clients_block.commands()) == 3

    port, models, metrics = free_port(), free_port(), free_port()
    devices = [free_port() for _ in range(3)]
    serve_http, serve_grpc = free_port(), free_port()
    loopback = {"SERVER_IP": "127.0.0.1", "0.0.0.0": "127.0.0.1"}
    on_server = {**loopback, "8000": str(port), "8090": str(models), "9100": str(metrics)}
    server_dir = tmp_path / "server"
    device_dirs = [tmp_path / f"device-{i}" for i in range(3)]
    serve_dir = tmp_path / "serve-only"
    doc = Doc(DEPLOYMENT, tmp_path, substitute=on_server, timeout=60)

    with doc.background(server_block, folders=[server_dir]) as [(server, server_log)]:
        wait_for_port(
            "127.0.0.1",
            port,
            timeout=60,
            process=server,
            what="fedscale server",
            log_file=server_log,
        )
        with doc.background(
            clients_block,
            substitutes=[{**on_server, "8080": str(d)} for d in devices],
            folders=device_dirs,
        ) as clients:
            # Orchestration only: the serve-only device is started once the server
            # publishes a model, so that a short run cannot end before its first pull.
            _wait_for("a published model", lambda: _get(models, "/manifest.json")[0] == 200, 180)
            on_serve_device = {**on_server, "8080": str(serve_http), "8081": str(serve_grpc)}
            with doc.background(
                serve_block, substitutes=[on_serve_device], folders=[serve_dir]
            ) as [(serve_only, _)]:
                _wait_for(
                    "the serve-only device's model",
                    lambda: _get(serve_http, "/v2/health/ready")[0] == 200,
                    60,
                )
                watched = doc.run_block(watch, folder=server_dir)
                code = server.wait(timeout=300)
                assert code == 0, server_log.read_text()
                listing = doc.run_block(listing_block, folder=server_dir)
                answers = [
                    doc.run_block(ask, substitute={"8080": str(p)}, folder=d)
                    for p, d in zip([*devices, serve_http], [*device_dirs, serve_dir], strict=True)
                ]
                assert serve_only.poll() is None, "the serve-only device keeps serving"
            assert all(c.poll() is None for c, _ in clients), "edge clients stay up after a run"

    rows = RunDirectory(server_dir / "runs" / "deployment").read_metrics()
    assert [r["round"] for r in rows] == list(range(6))
    assert all(r["clients_replied"] == 3 and r["clients_failed"] == 0 for r in rows[1:])
    assert rows[-1]["accuracy"] >= 0.8, "the doc says about 0.88"
    last = server_log.read_text().strip().splitlines()[-1]
    assert last == f"final test accuracy: {rows[-1]['accuracy']:.4f}"
    assert watched.startswith("fedscale_server_current_round ")
    assert "manifest.json" in listing and '"round": 5' in listing

    for i, answer in enumerate(answers):
        metadata, version_metric = answer.strip().splitlines()
        versions = json.loads(metadata)["versions"]
        assert len(versions) == 1 and 0 <= int(versions[0]) <= 5
        assert version_metric.startswith("fedscale_serving_model_version")
        assert float(version_metric.split()[-1]) == int(versions[0])
        # Edge clients keep the models they received: their directory is the device's.
        if i < 3:
            assert (device_dirs[i] / "models" / "manifest.json").is_file()
