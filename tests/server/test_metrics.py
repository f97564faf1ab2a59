"""Prometheus metrics: the server's (from round records) and `fedscale serve`'s.

Scrapes go over real HTTP and are read back with prometheus-client's own text
parser; the counters must equal what the run folder and the requests say.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fedscale.modelstore import ModelDirectory
from fedscale.processes import free_port, stop
from fedscale.runs import RunDirectory
from fedscale.server.metrics import METRIC_NAMES as SERVER_NAMES
from fedscale.server.metrics import MetricsExporter, ServerMetrics, update_from_round
from fedscale.serving.metrics import METRIC_NAMES as SERVING_NAMES
from fedscale.serving.metrics import ServingMetrics
from tests.server.deployment import deployment_env, start_edge_client, start_server
from tests.serving.helpers import ServeProcess, lenet, lenet_input, publish_export, request

DASHBOARD = Path(__file__).resolve().parents[2] / "server" / "grafana-dashboard.json"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def scrape(host: str, port: int, path: str = "/metrics") -> str:
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/plain")
        return response.read().decode()
    finally:
        connection.close()


def _row(server_round: int, **fields: object) -> dict[str, object]:
    return {
        "round": server_round,
        "loss": 1.0 / (server_round + 1),
        "accuracy": 0.1 * server_round,
        "clients_sampled": 0,
        "clients_replied": 0,
        "clients_failed": 0,
        "clients_rejected": 0,
        "clients_dropped": None,
        "seconds": 0.0,
        **fields,
    }


def test_update_from_round_counts_training_rounds_only():
    metrics = ServerMetrics()
    rows = [
        _row(0),
        _row(
            1,
            clients_sampled=5,
            clients_replied=3,
            clients_failed=1,
            clients_rejected=1,
            clients_dropped=2,
            seconds=0.3,
            bytes_sent=1000,
            bytes_received=900,
            aggregate_seconds=0.002,
        ),
        _row(
            2,
            clients_sampled=5,
            clients_replied=5,
            seconds=7.0,
            loss=None,
            bytes_sent=1000,
            bytes_received=1500,
            aggregate_seconds=None,  # too few replies to aggregate
        ),
    ]
    for row in rows:
        update_from_round(metrics, row)
    got = samples(generate_latest(metrics.registry).decode())
    assert got[("fedscale_server_rounds_completed_total", ())] == 2
    assert got[("fedscale_server_clients_sampled_total", ())] == 10
    assert got[("fedscale_server_clients_replied_total", ())] == 8
    assert got[("fedscale_server_clients_failed_total", ())] == 1
    assert got[("fedscale_server_clients_rejected_total", ())] == 1
    assert got[("fedscale_server_clients_dropped_total", ())] == 2
    assert got[("fedscale_server_current_round", ())] == 2
    assert got[("fedscale_server_global_accuracy", ())] == pytest.approx(0.2)
    assert math.isnan(got[("fedscale_server_global_loss", ())])  # a diverged (null) loss
    assert got[("fedscale_server_round_duration_seconds_count", ())] == 2
    assert got[("fedscale_server_round_duration_seconds_sum", ())] == pytest.approx(7.3)
    assert got[("fedscale_server_round_duration_seconds_bucket", (("le", "0.5"),))] == 1
    assert got[("fedscale_server_round_duration_seconds_bucket", (("le", "10.0"),))] == 2
    assert got[("fedscale_server_bytes_sent_total", ())] == 2000
    assert got[("fedscale_server_bytes_received_total", ())] == 2400
    assert got[("fedscale_server_aggregation_seconds_count", ())] == 1
    assert got[("fedscale_server_aggregation_seconds_sum", ())] == pytest.approx(0.002)
    exported = {name for name, _ in got}
    for name in SERVER_NAMES:
        assert name in exported or f"{name}_count" in exported, name


def test_exporter_refuses_a_taken_port():
    from fedscale.exceptions import ConfigError

    first = MetricsExporter(ServerMetrics(), "127.0.0.1", free_port()).start()
    try:
        with pytest.raises(ConfigError, match="metrics port: could not listen"):
            MetricsExporter(ServerMetrics(), "127.0.0.1", first.port).start()
    finally:
        first.stop()


_NAME = re.compile(r"\bfedscale_[a-z_]+\b")


def _queried_names() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    names = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                names.update(_NAME.findall(node["expr"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard)
    return names


def test_every_dashboard_query_names_an_exported_metric():
    dashboard = json.loads(DASHBOARD.read_text())
    assert any(v.get("type") == "datasource" for v in dashboard["templating"]["list"])
    queried = _queried_names()
    assert any(n.startswith("fedscale_server_") for n in queried)
    assert any(n.startswith("fedscale_serving_") for n in queried)
    # What a scrape shows: counters with _total, histograms as _bucket/_sum/_count.
    shown = set()
    for name in SERVER_NAMES | SERVING_NAMES:
        shown |= {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    assert queried <= shown, f"not exported: {sorted(queried - shown)}"
    # And the names are what the registries really produce, not just the constants.
    server, serving = ServerMetrics(), ServingMetrics()
    update_from_round(server, _row(1, clients_dropped=1, seconds=1.0))
    serving.request("m", 200, 0.001)
    serving.grpc_request("m", "OK", 0.001)
    serving.loaded("m", "1")
    serving.refused()
    produced = set()
    for registry in (server.registry, serving.registry):
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            produced |= {s.name for s in family.samples}
    assert queried <= produced, f"not produced: {sorted(queried - produced)}"


@pytest.mark.integration
def test_serve_metrics_count_requests_by_status(tmp_path):
    exported, _ = lenet(0)
    models = tmp_path / "models"
    publish_export(models, exported, server_round=4)
    name = exported.inputs[0].name
    x = lenet_input(0)
    good = orjson.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    )
    served = ModelDirectory(models).read_manifest().name
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with ServeProcess(models, tmp_path / "serve.log") as server:
        codes = []
        for _ in range(5):
            codes.append(request(server.http_url, "POST", f"/v2/models/{served}/infer", good)[0])
        for _ in range(3):
            codes.append(request(server.http_url, "POST", f"/v2/models/{served}/infer", b"{no")[0])
        codes.append(request(server.http_url, "POST", "/v2/models/nope/infer", good)[0])
        assert codes == [200] * 5 + [400] * 3 + [404]
        client = grpcclient.InferenceServerClient(server.grpc_url)
        grpc_codes = []
        for model, array in [(served, x)] * 3 + [("nope", x), (served, x[..., :-1])]:
            given = grpcclient.InferInput(name, list(array.shape), "FP32")
            given.set_data_from_numpy(np.ascontiguousarray(array))
            try:
                client.infer(model, [given])
                grpc_codes.append("OK")
            except InferenceServerException as err:
                grpc_codes.append(str(err.status()).removeprefix("StatusCode."))
        client.close()
        assert grpc_codes == ["OK"] * 3 + ["NOT_FOUND", "INVALID_ARGUMENT"]
        got = samples(scrape("127.0.0.1", server.http_port))
    requests = {
        dict(labels)["model"] + ":" + dict(labels)["code"]: value
        for (metric, labels), value in got.items()
        if metric == "fedscale_serving_requests_total"
    }
    assert requests == {f"{served}:200": 5, f"{served}:400": 3, "_unknown:404": 1}
    assert got[("fedscale_serving_request_duration_seconds_count", ())] == 9
    grpc_requests = {
        dict(labels)["model"] + ":" + dict(labels)["grpc_code"]: value
        for (metric, labels), value in got.items()
        if metric == "fedscale_serving_grpc_requests_total"
    }
    assert grpc_requests == {
        f"{served}:OK": 3,
        "_unknown:NOT_FOUND": 1,
        f"{served}:INVALID_ARGUMENT": 1,
    }
    assert got[("fedscale_serving_grpc_request_duration_seconds_count", ())] == 5
    assert got[("fedscale_serving_model_version", (("model", served),))] == 4
    assert got[("fedscale_serving_reloads_total", (("result", "ok"),))] == 1


@pytest.mark.integration
@pytest.mark.slow
def test_server_metrics_match_the_run(tmp_path):
    env = deployment_env(tmp_path)
    port, metrics_port = free_port(), free_port()
    run = tmp_path / "run"
    log_file = tmp_path / "server.log"
    server = start_server(
        tmp_path,
        env,
        *("--port", str(port), "--rounds", "2", "--min-clients", "2", "--per-round", "2"),
        *("--round-timeout", "120", "--out", str(run)),
        *("--metrics-port", str(metrics_port), "--metrics-linger", "120"),
    )
    clients = [start_edge_client(tmp_path, env, port, i, 2) for i in range(2)]
    try:
        # The run is over once the server says how long it keeps /metrics up.
        deadline = time.monotonic() + 300
        while "keeping http" not in log_file.read_text(errors="replace"):
            assert server.poll() is None, log_file.read_text(errors="replace")
            assert time.monotonic() < deadline, "the run did not finish in 300 s"
            time.sleep(0.5)
        got = samples(scrape("127.0.0.1", metrics_port))
        rows = RunDirectory(run).read_metrics()
        trained = [r for r in rows if r["round"] > 0]
        assert len(trained) == 2
        assert got[("fedscale_server_rounds_completed_total", ())] == 2
        assert got[("fedscale_server_current_round", ())] == 2
        for key in ("sampled", "replied", "failed", "rejected"):
            expected = sum(r[f"clients_{key}"] for r in trained)
            assert got[(f"fedscale_server_clients_{key}_total", ())] == expected, key
        assert got[("fedscale_server_clients_replied_total", ())] == 4
        for key in ("sent", "received"):
            expected = sum(r[f"bytes_{key}"] for r in trained)
            assert got[(f"fedscale_server_bytes_{key}_total", ())] == expected > 0, key
        assert got[("fedscale_server_aggregation_seconds_count", ())] == 2
        assert got[("fedscale_server_round_duration_seconds_count", ())] == 2
        assert got[("fedscale_server_global_accuracy", ())] == pytest.approx(rows[-1]["accuracy"])
        assert stop(server) == 0, "SIGTERM ends the linger cleanly"
    finally:
        for process in [server, *clients]:
            stop(process)
        shutil.rmtree(tmp_path / "flwr-home", ignore_errors=True)
