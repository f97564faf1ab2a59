"""`fedscale serve`: the command, its ready line, clean stops, and no torch/flwr/ray."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedscale.cli.main import app
from fedscale.processes import free_port

from .helpers import ServeProcess, lenet, lenet_input, publish_export, request, serve_env

pytest.importorskip("torch")

runner = CliRunner()
FORBIDDEN = ("torch", "flwr", "ray")
FEDSCALE = str(Path(sys.executable).parent / "fedscale")


def test_help_lists_the_contract_options():
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in (
        "--model-dir",
        "--model-url",
        "--host",
        "--http-port",
        "--grpc-port",
        "--intra-op-threads",
        "--inter-op-threads",
        "--max-batch",
        "--max-body-bytes",
        "--poll-interval",
    ):
        assert option in result.output, option


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "expected --model-dir DIR, --model-url URL, or both"),
        (["--model-url", "file:///etc"], "expected an http:// or https:// URL"),
        (["--model-dir", "m", "--poll-interval", "0"], "--poll-interval: expected seconds"),
        (["--model-dir", "m", "--intra-op-threads", "-2"], "intra-op-threads: expected"),
        (["--model-dir", "m", "--max-body-bytes", "10"], "--max-body-bytes: expected at least"),
        (["--model-dir", "m", "--http-port", "70000"], "--http-port: expected a port"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["serve", "--grpc-port", "0", *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


@pytest.mark.integration
@pytest.mark.parametrize("which", ["http", "grpc"])
def test_a_port_in_use_exits_2(tmp_path, which):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = ["--http-port", str(port)] if which == "http" else ["--grpc-port", str(port)]
        done = subprocess.run(
            [FEDSCALE, "serve", "--model-dir", str(tmp_path), "--http-port", "0", *ports],
            capture_output=True,
            text=True,
            timeout=60,
            env=serve_env(),
        )
    assert done.returncode == 2
    assert f"could not listen on 127.0.0.1:{port}" in " ".join(done.stderr.split())


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_console_script_prints_one_ready_line_and_stops_cleanly(tmp_path, sig):
    publish_export(tmp_path / "models", lenet(0)[0], 2)
    server = ServeProcess(tmp_path / "models", tmp_path / "serve.log", argv=[FEDSCALE, "serve"])
    with server:
        assert request(server.http_url, "GET", "/v2/health/ready")[0] == 200
        # The serving process maps onnxruntime's library, and no torch library.
        maps = Path(f"/proc/{server.process.pid}/maps").read_text()
        assert "onnxruntime" in maps and "libtorch" not in maps
        server.process.send_signal(sig)
        assert server.process.wait(timeout=30) == 0
    assert server.stdout == [
        f"fedscale serve listening http=127.0.0.1:{server.http_port} "
        f"grpc=127.0.0.1:{server.grpc_port} model-dir={tmp_path / 'models'}"
    ]
    assert "stopping" in server.log()


# Runs `fedscale serve` through the CLI module tree, and reports at exit which of
# the heavy packages the serving process ever imported.
CLI_SCRIPT = """
import atexit, json, sys
def report():
    names = ("torch", "flwr", "ray", "onnxruntime", "grpc", "httptools")
    print("MODULES " + json.dumps({n: n in sys.modules for n in names}), flush=True)
atexit.register(report)
sys.argv = ["fedscale", "serve", *sys.argv[1:]]
from fedscale.cli.main import run
run()
"""


@pytest.mark.integration
def test_cli_serving_process_never_imports_torch_flwr_or_ray(tmp_path):
    httpclient = pytest.importorskip("tritonclient.http")
    grpcclient = pytest.importorskip("tritonclient.grpc")
    publish_export(tmp_path / "models", lenet(0)[0], 1)
    x = lenet_input(0)
    server = ServeProcess(
        tmp_path / "models", tmp_path / "serve.log", argv=[sys.executable, "-c", CLI_SCRIPT]
    )
    with server:
        http = httpclient.InferenceServerClient(server.http_url)
        given = httpclient.InferInput("input", list(x.shape), "FP32")
        given.set_data_from_numpy(x)
        assert http.infer("fedscale", [given]).as_numpy("logits").shape == (1, 10)
        http.close()
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        given = grpcclient.InferInput("input", list(x.shape), "FP32")
        given.set_data_from_numpy(x)
        assert grpc.infer("fedscale", [given]).as_numpy("logits").shape == (1, 10)
        grpc.close()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
    server._reader.join(timeout=10)
    (line,) = [line for line in server.stdout if line.startswith("MODULES ")]
    modules = json.loads(line.removeprefix("MODULES "))
    assert modules == {
        "torch": False,
        "flwr": False,
        "ray": False,
        "onnxruntime": True,  # the check sees what the server really imported
        "grpc": True,
        "httptools": True,
    }


LIBRARY_SCRIPT = """
import json, sys, urllib.request
from pathlib import Path
import numpy as np
from fedscale.serving import ModelServer, ServeOptions

server = ModelServer(
    ServeOptions(model_dir=Path(sys.argv[1]), http_port=0, grpc_port=int(sys.argv[2]))
)
server.start()
x = np.load(sys.argv[3])
body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                               "data": x.ravel().tolist()}]}).encode()
url = f"http://127.0.0.1:{server.http_port}/v2/models/fedscale/infer"
with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30) as response:
    answer = json.load(response)
server.stop()
names = ("torch", "flwr", "ray", "onnxruntime", "grpc")
print(json.dumps({"answer": answer, "modules": {n: n in sys.modules for n in names}}))
"""


@pytest.mark.integration
def test_library_server_in_a_process_never_imports_torch_flwr_or_ray(tmp_path):
    exported = lenet(0)[0]
    publish_export(tmp_path / "models", exported, 1)
    x = lenet_input(3)
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            LIBRARY_SCRIPT,
            str(tmp_path / "models"),
            str(free_port()),
            str(tmp_path / "x.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=serve_env(),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["modules"] == {
        "torch": False,
        "flwr": False,
        "ray": False,
        "onnxruntime": True,
        "grpc": True,
    }
    assert result["answer"]["model_version"] == "1"
    assert len(result["answer"]["outputs"][0]["data"]) == 10
