"""Serving hardening: deadlines, bounded concurrency, the API key (issue #6).

The unit tests drive :mod:`fedscale.serving.hardening` directly (real threads, a
real event loop, real onnxruntime sessions). The integration tests run the real
`fedscale serve` on 127.0.0.1 with a model whose cost the request picks
(`helpers.slow_model`): a huge step count runs until the server's deadline stops
it, which is how these tests hold inference slots without mocking anything.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedscale.exceptions import ConfigError
from fedscale.serving.hardening import (
    API_KEY_ENV,
    ApiKey,
    ConcurrencyLimiter,
    DeadlineExceeded,
    Overloaded,
    Unauthorized,
    Watchdog,
    default_max_concurrency,
    run_with_deadline,
)
from fedscale.serving.protocol import InferRequest

from .helpers import (
    ServeProcess,
    publish_slow,
    publish_two_input,
    request,
    serve_env,
    slow_model,
    slow_request,
    wait_until,
)

pytest.importorskip("onnx")  # builds the test models

FOREVER = 10**12  # steps no run finishes: only a deadline ends it
INFER = "/v2/models/fedscale/infer"


# ------------------------------------------------------------------ units


def test_limiter_admits_queues_and_refuses_at_once():
    limiter = ConcurrencyLimiter(max_concurrency=2, max_queue=1)
    assert limiter.try_acquire() and limiter.try_acquire()
    assert not limiter.try_acquire()
    granted = threading.Event()

    def queued() -> None:
        limiter.acquire(timeout=30)
        granted.set()

    waiter = threading.Thread(target=queued)
    waiter.start()
    wait_until(lambda: limiter.waiting == 1, 10, "a queued waiter")
    with pytest.raises(Overloaded, match=r"all 2 busy \(--max-concurrency\) and 1 requests"):
        limiter.acquire(timeout=30)  # the queue is full: refused without waiting
    assert not granted.is_set()
    limiter.release()  # the slot goes to the waiter, not back to the pool
    waiter.join(10)
    assert granted.is_set() and limiter.active == 2 and limiter.waiting == 0
    limiter.release()
    limiter.release()
    assert limiter.active == 0


def test_limiter_wait_gives_up_at_the_deadline():
    limiter = ConcurrencyLimiter(max_concurrency=1, max_queue=4)
    assert limiter.try_acquire()
    with pytest.raises(Overloaded, match="within the request's deadline"):
        limiter.acquire(timeout=0.05)
    assert limiter.waiting == 0 and limiter.active == 1
    limiter.release()
    assert limiter.active == 0


def test_limiter_async_waiters_are_served_in_order():
    async def main() -> list[int]:
        limiter = ConcurrencyLimiter(max_concurrency=1, max_queue=2)
        assert limiter.try_acquire()
        order: list[int] = []

        async def wait(index: int) -> None:
            await limiter.acquire_async(30)
            order.append(index)
            limiter.release()

        tasks = [asyncio.create_task(wait(i)) for i in range(2)]
        while limiter.waiting < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await limiter.acquire_async(30)
        # Released from another thread, as a gRPC handler would.
        await asyncio.get_running_loop().run_in_executor(None, limiter.release)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert limiter.active == 0 and limiter.waiting == 0
        with pytest.raises(Overloaded):  # a waiter that times out leaves the queue
            assert limiter.try_acquire()
            await limiter.acquire_async(0.02)
        assert limiter.waiting == 0
        return order

    assert asyncio.run(main()) == [0, 1]


def test_default_concurrency_is_bounded():
    assert 4 <= default_max_concurrency() <= 64


class _Model:
    """Enough of LoadedModel for run_with_deadline: a real session and cost_s."""

    def __init__(self) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(slow_model()[0], options)
        self.cost_s = float("inf")

    def run(self, feeds, outputs, run_options=None):
        return self.session.run(list(outputs), dict(feeds), run_options)


def _feeds(steps: int) -> InferRequest:
    return InferRequest(
        id=None,
        feeds={"x": np.full((1, 64), 0.5, np.float32), "steps": np.array([steps])},
        outputs=["y"],
        binary=[False],
    )


def test_watchdog_stops_a_run_at_its_deadline_and_times_finished_ones():
    watchdog = Watchdog()
    model = _Model()
    try:
        (result,) = run_with_deadline(watchdog, model, _feeds(3), time.monotonic() + 30)  # type: ignore[arg-type]
        assert result.shape == (1, 64) and 0 < model.cost_s < 30
        expected = model.session.run(None, _feeds(3).feeds)[0]
        np.testing.assert_array_equal(result, expected)
        with pytest.raises(DeadlineExceeded, match="within the request's deadline"):
            run_with_deadline(watchdog, model, _feeds(FOREVER), time.monotonic() + 0.2)  # type: ignore[arg-type]
    finally:
        watchdog.close()


def test_api_key_sources_and_checks(tmp_path, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert ApiKey.load(None) is None
    path = tmp_path / "key"
    path.write_text("  s3cret-Key_1\n")
    key = ApiKey.load(path)
    assert key is not None and "s3cret" not in repr(key)
    key.check(b"Bearer s3cret-Key_1")
    key.check("bearer   s3cret-Key_1")  # the scheme is case-insensitive (RFC 7235)
    for header, message in [
        (None, "got none"),
        (b"s3cret-Key_1", "Bearer scheme"),
        (b"Basic s3cret-Key_1", "Bearer scheme"),
        (b"Bearer s3cret-Key_2", "wrong one"),
        (b"Bearer ", "wrong one"),
        ("Bearer s3cret-Key_1\u00e9", "wrong one"),
    ]:
        with pytest.raises(Unauthorized, match=message):
            key.check(header)
    assert ApiKey.load(None, {API_KEY_ENV: "from-env"}) is not None
    path.write_text(" \n")
    with pytest.raises(ConfigError, match="expected a key, got an empty one"):
        ApiKey.load(path)
    with pytest.raises(ConfigError, match="expected a key, got an empty one"):
        ApiKey.load(None, {API_KEY_ENV: ""})
    path.write_text("two words")
    with pytest.raises(ConfigError, match="printable ASCII without spaces"):
        ApiKey.load(path)
    with pytest.raises(ConfigError, match="expected a readable UTF-8 text file"):
        ApiKey.load(tmp_path / "missing")


# ------------------------------------------------------------------ integration


def _metrics(server: ServeProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, _, body = request(server.http_url, "GET", "/metrics", timeout=10)
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _rejections(server: ServeProcess, protocol: str, reason: str) -> float:
    labels = (("protocol", protocol), ("reason", reason))
    return _metrics(server)[("fedscale_serving_rejections_total", labels)]


def _gauge(server: ServeProcess, name: str) -> float:
    return _metrics(server)[(name, ())]


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    for _ in range(1000):  # bounded: the server closes after answering
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    raise AssertionError("expected the server to close the connection")


@pytest.mark.integration
def test_slow_senders_get_408_and_idle_connections_close(tmp_path):
    publish_two_input(tmp_path / "models")
    args = ("--request-timeout", "1", "--idle-timeout", "1")
    with ServeProcess(tmp_path / "models", tmp_path / "serve.log", *args, grpc=False) as server:
        host, port = server.http_url.split(":")
        address = (host, int(port))
        # Headers sent, the body stalls after 5 of its 100 bytes.
        with socket.create_connection(address, timeout=15) as sock:
            sock.sendall(
                b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                b'Content-Length: 100\r\n\r\n{"inp'
            )
            answer = _read_until_closed(sock)
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in head
        assert "--request-timeout" in json.loads(body)["error"]
        # Slowloris: headers trickle in a byte at a time, each well within the idle time.
        with socket.create_connection(address, timeout=15) as sock:
            sock.settimeout(0.2)
            trickle = b"GET /v2/health/live HTTP/1.1\r\n" + b"X-Slow: loris\r\n" * 100
            answer = b""
            for byte in trickle:  # bounded by the trickle's length
                try:
                    sock.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    break
                try:
                    answer = sock.recv(65536)
                except TimeoutError:
                    continue
                break
            sock.settimeout(15)
            answer += _read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        # An idle keep-alive connection is closed after --idle-timeout.
        with socket.create_connection(address, timeout=15) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            first = sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 ")
            assert _read_until_closed(sock) == b""  # closed by the server, no answer due
        assert _rejections(server, "rest", "timeout") == 2
        # And it still serves a normal request.
        good = {"inputs": [
            {"name": "image", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "mask", "shape": [1, 4], "datatype": "INT64", "data": [1, 0, 1, 0]},
        ]}  # fmt: skip
        status, _, content = request(server.http_url, "POST", INFER, json.dumps(good).encode())
        assert status == 200
        assert json.loads(content)["outputs"][0]["data"] == [1.5, -1.0, 5.0, 0.0]
    assert "Traceback" not in server.log()


def _post_in_thread(server: ServeProcess, steps: int, results: dict, key: str) -> threading.Thread:
    def post() -> None:
        try:
            results[key] = request(server.http_url, "POST", INFER, slow_request(steps), timeout=60)
        except OSError as err:  # the server went away: the test looks at what it got
            results[key] = err

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread


@pytest.mark.integration
def test_excess_requests_get_503_at_once_and_slow_runs_stop_at_the_deadline(tmp_path):
    grpc = pytest.importorskip("grpc")
    pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    publish_slow(tmp_path / "models")
    args = ("--max-concurrency", "2", "--max-queue", "1", "--request-timeout", "4")
    with ServeProcess(tmp_path / "models", tmp_path / "serve.log", *args) as server:
        results: dict[str, tuple[int, dict[str, str], bytes]] = {}
        running = [_post_in_thread(server, FOREVER, results, f"slow{i}") for i in range(2)]
        wait_until(lambda: _gauge(server, "fedscale_serving_inflight") == 2, 20, "2 running")
        queued = _post_in_thread(server, FOREVER, results, "queued")
        wait_until(lambda: _gauge(server, "fedscale_serving_queued") == 1, 20, "1 queued")

        # Every slot and queue place is taken: more requests are refused at once,
        # while the slow ones still run (their threads have not returned).
        for _ in range(3):
            status, headers, content = request(server.http_url, "POST", INFER, slow_request(1))
            assert status == 503, content
            assert headers["Retry-After"] == "1"
            assert "--max-concurrency" in json.loads(content)["error"]
        channel = grpc.insecure_channel(server.grpc_url)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        infer = service_pb2.ModelInferRequest(model_name="fedscale")
        for name, datatype, shape, raw in (
            ("x", "FP32", [1, 64], np.full(64, 0.5, "<f4").tobytes()),
            ("steps", "INT64", [1], np.array([FOREVER], "<i8").tobytes()),
        ):
            tensor = infer.inputs.add()
            tensor.name, tensor.datatype = name, datatype
            tensor.shape.extend(shape)
            infer.raw_input_contents.append(raw)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(infer, timeout=30)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Health and metadata are not held up by inference load.
        assert request(server.http_url, "GET", "/v2/health/live")[0] == 200
        assert request(server.http_url, "GET", "/v2/health/ready")[0] == 200
        assert request(server.http_url, "GET", "/v2/models/fedscale")[0] == 200
        live = stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=30)
        assert live.live
        assert all(thread.is_alive() for thread in [*running, queued])

        for thread in [*running, queued]:
            thread.join(60)
        for key in ("slow0", "slow1"):
            status, _, content = results[key]
            assert status == 504, content
            assert "within the request's deadline" in json.loads(content)["error"]
        # The queued one got a slot when they stopped, or its own wait ran out first.
        assert results["queued"][0] in (503, 504)
        wait_until(lambda: _gauge(server, "fedscale_serving_inflight") == 0, 20, "slots freed")

        # gRPC: the client's own deadline (1 s, under --request-timeout) stops the run.
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(infer, timeout=1)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: _rejections(server, "grpc", "timeout") == 1, 20, "a gRPC timeout")
        wait_until(lambda: _gauge(server, "fedscale_serving_inflight") == 0, 20, "slots freed")
        assert _rejections(server, "rest", "overloaded") >= 3
        assert _rejections(server, "rest", "timeout") >= 2
        assert _rejections(server, "grpc", "overloaded") == 1

        # Afterwards, a normal request is answered, and matches onnxruntime.
        status, _, content = request(server.http_url, "POST", INFER, slow_request(3))
        assert status == 200, content
        session = ort.InferenceSession(slow_model()[0])
        expected = session.run(None, {"x": np.full((1, 64), 0.5, np.float32),
                                      "steps": np.array([3])})[0]  # fmt: skip
        got = np.array(json.loads(content)["outputs"][0]["data"], np.float32)
        np.testing.assert_allclose(got, expected.ravel(), rtol=1e-6)
        typed = service_pb2.ModelInferRequest()
        typed.CopyFrom(infer)
        typed.raw_input_contents[1] = np.array([3], "<i8").tobytes()
        answer = stub.ModelInfer(typed, timeout=30)
        np.testing.assert_allclose(
            np.frombuffer(answer.raw_output_contents[0], "<f4"), expected.ravel(), rtol=1e-6
        )
        channel.close()
    assert "Traceback" not in server.log()


@pytest.mark.integration
def test_api_key_guards_inference_and_metadata_not_health(tmp_path):
    grpc = pytest.importorskip("grpc")
    pytest.importorskip("tritonclient.grpc")
    import tritonclient.http as httpclient
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    publish_slow(tmp_path / "models")
    key_file = tmp_path / "api-key"
    key_file.write_text("k3y-for-tests_0123456789\n")
    bearer = {"Authorization": "Bearer k3y-for-tests_0123456789"}
    wrong = {"Authorization": "Bearer k3y-for-tests_0123456780"}
    with ServeProcess(
        tmp_path / "models", tmp_path / "serve.log", "--api-key-file", str(key_file)
    ) as server:
        url = server.http_url
        for method, path, body in (
            ("POST", INFER, slow_request(1)),
            ("GET", "/v2/models/fedscale", None),
            ("GET", "/v2/models/fedscale/ready", None),
            ("GET", "/v2", None),
        ):
            for headers in ({}, wrong):
                status, response_headers, content = request(url, method, path, body, headers)
                assert status == 401, (path, content)
                assert response_headers["WWW-Authenticate"].startswith("Bearer")
                assert "authorization: expected" in json.loads(content)["error"]
            assert request(url, method, path, body, bearer)[0] == 200
        for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
            assert request(url, "GET", path)[0] == 200
        assert _rejections(server, "rest", "unauthorized") == 8

        # tritonclient's HTTP client, with the header.
        client = httpclient.InferenceServerClient(url)
        given = httpclient.InferInput("x", [1, 64], "FP32")
        given.set_data_from_numpy(np.full((1, 64), 0.5, np.float32), binary_data=True)
        steps = httpclient.InferInput("steps", [1], "INT64")
        steps.set_data_from_numpy(np.array([2], np.int64))
        result = client.infer("fedscale", [given, steps], headers=bearer)
        assert result.as_numpy("y").shape == (1, 64)
        client.close()

        channel = grpc.insecure_channel(server.grpc_url)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        metadata_request = service_pb2.ModelMetadataRequest(name="fedscale")
        for metadata in ((), (("authorization", wrong["Authorization"]),)):
            with pytest.raises(grpc.RpcError) as raised:
                stub.ModelMetadata(metadata_request, metadata=metadata, timeout=30)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer <key>" in raised.value.details() or (
                "wrong one" in raised.value.details()
            )
        good = (("authorization", bearer["Authorization"]),)
        assert stub.ModelMetadata(metadata_request, metadata=good, timeout=30).name == "fedscale"
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=30).live
        assert stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=30).ready
        assert _rejections(server, "grpc", "unauthorized") == 2
        channel.close()
    assert "Traceback" not in server.log()
    assert "k3y-for-tests" not in server.log()  # the key is never logged


@pytest.mark.integration
def test_api_key_from_the_environment(tmp_path):
    publish_slow(tmp_path / "models")
    with ServeProcess(
        tmp_path / "models", tmp_path / "serve.log", grpc=False, env={API_KEY_ENV: "env-key-42"}
    ) as server:
        assert request(server.http_url, "GET", "/v2/models/fedscale")[0] == 401
        headers = {"Authorization": "Bearer env-key-42"}
        assert request(server.http_url, "GET", "/v2/models/fedscale", None, headers)[0] == 200


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--api-key-file", "{empty}"), "expected a key, got an empty one"),
        (("--max-concurrency", "0"), "--max-concurrency: expected a whole number in [1, 4096]"),
        (("--request-timeout", "0"), "--request-timeout: expected seconds >= 0.01"),
    ],
    ids=["empty-key-file", "zero-concurrency", "zero-timeout"],
)
def test_bad_hardening_options_are_clear_errors(tmp_path: Path, args, message):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    argv = [a.format(empty=empty) for a in args]
    done = subprocess.run(
        [sys.executable, "-m", "fedscale.cli", "serve", "--model-dir", str(tmp_path), *argv,
         "--http-port", "0", "--grpc-port", "0"],
        capture_output=True, text=True, timeout=120, env={**serve_env(), "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in " ".join((done.stdout + done.stderr).split())


def _split_responses(data: bytes) -> list[tuple[int, bytes]]:
    """Split a stream of HTTP/1.1 responses (each with Content-Length) into (status, body)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(int(v) for k, _, v in (x.partition(b": ") for x in lines[1:])
                      if k.lower() == b"content-length")  # fmt: skip
        out.append((int(lines[0].split()[1]), rest[:length]))
        data = rest[length:]
    return out


@pytest.mark.integration
def test_pipelined_requests_are_answered_in_order_around_worker_threads(tmp_path):
    """Inferences that run on worker threads keep a connection's answers in request order."""
    publish_slow(tmp_path / "models")
    with ServeProcess(tmp_path / "models", tmp_path / "serve.log", grpc=False) as server:
        host, port = server.http_url.split(":")
        # The first run of a model always goes to a worker thread (its cost is not known
        # yet), and 200,000 steps take long enough to keep it there.
        requests = []
        for steps in (200_000, 1, 30_000):
            body = slow_request(steps)
            requests.append(
                b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        requests.append(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(b"".join(requests))
            answers = _split_responses(_read_until_closed(sock))
        assert [status for status, _ in answers] == [200, 200, 200, 200]
        session = ort.InferenceSession(slow_model()[0])
        for (_, body), steps in zip(answers[:3], (200_000, 1, 30_000), strict=True):
            feeds = {"x": np.full((1, 64), 0.5, np.float32), "steps": np.array([steps])}
            expected = session.run(None, feeds)[0].ravel()
            got = np.array(json.loads(body)["outputs"][0]["data"], np.float32)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert answers[3][1] == b""
    assert "Traceback" not in server.log()


@pytest.mark.integration
def test_sigterm_stops_inferences_in_flight_and_exits_cleanly(tmp_path):
    """Shutdown does not wait out a 10-minute deadline: running inferences are stopped."""
    publish_slow(tmp_path / "models")
    server = ServeProcess(
        tmp_path / "models", tmp_path / "serve.log", "--request-timeout", "600"
    ).wait_ready()
    try:
        results: dict[str, tuple[int, dict[str, str], bytes]] = {}
        thread = _post_in_thread(server, FOREVER, results, "slow")
        wait_until(lambda: _gauge(server, "fedscale_serving_inflight") == 1, 20, "1 running")
    finally:
        # SIGTERM, then SIGKILL only after 10 s: exit code 0 means it stopped on its own.
        code = server.stop()
    assert code == 0, server.log()
    thread.join(30)
    assert isinstance(results["slow"], OSError)  # closed, not answered: the server is gone
    assert "Traceback" not in server.log()
