"""Fuzz `fedscale serve` with malformed requests: only 4xx answers, and it keeps serving.

At least 1,000 requests from a seeded generator (reproducible: a failure names its
seed and index), each on its own connection to a real `fedscale serve` process on
127.0.0.1, spread over these kinds:

- random bytes; broken request lines; bad, duplicated or oversized headers and URLs;
- Content-Length that lies (too long, with the client's side then closed; too short,
  so the rest reads as a garbage second request; not a number), bad chunked bodies;
- invalid JSON (truncated or corrupted valid requests); valid JSON with wrong types,
  shapes, datatypes, names, values; binary tensor extension garbage; corrupt gzip;
- random paths and methods.

Every request gets an answer: the server answers 400 to what its HTTP parser
rejects, and to a request the client stopped sending halfway (its side closed). The
one exception is a payload of nothing but blank lines (CR/LF), which HTTP says to
ignore before a request: no request was sent, so none is answered; those few are
counted and checked to be blank. Every
answer must be a 4xx with a JSON error body; after the run the server still answers
a valid request correctly, its process is alive, its log holds no traceback, and its
metrics hold no 5xx.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import random
import socket
from collections import Counter
from collections.abc import Callable
from urllib.parse import unquote

import pytest

from .helpers import ServeProcess, publish_two_input, request

pytest.importorskip("onnx")  # builds the two-input test model

pytestmark = pytest.mark.integration

SEED = 20261126
COUNT = 3000
MAX_BODY = 64 * 1024
INFER = "/v2/models/fedscale/infer"
IMAGE = {"name": "image", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}
MASK = {"name": "mask", "shape": [1, 4], "datatype": "INT64", "data": [1, 0, 1, 0]}
VALID = {"inputs": [IMAGE, MASK]}

# (payload, close our sending side after it)
Case = tuple[bytes, bool]


def _post(body: bytes, *headers: str, path: str = INFER) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: fuzz", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _random_bytes(rng: random.Random) -> Case:
    data = rng.randbytes(rng.randint(1, 2000))
    if data[:1].isalpha():  # keep a random prefix from spelling a method by chance
        data = b"\x00" + data
    return data, True


def _broken_request_line(rng: random.Random) -> Case:
    line = rng.choice(
        [
            b"GET\r\n\r\n",
            b"GET /v2 HTTP/9.9\r\n\r\n",
            b"GET /v2 HTTP/1.1 extra\r\n\r\n",
            b"GET /v2\x00 HTTP/1.1\r\n\r\n",
            b"get /v2 HTTP/1.1\r\n\r\n",
            b"GET /v2 HTTX/1.1\r\n\r\n",
            b" GET /v2 HTTP/1.1\r\n\r\n",
            b"GET /v2 HTTP/1.1\n\rHost: x\r\n\r\n",
            b"\r\n\r\nGET",
            b"GET /v2 HTTP/1.\r\n\r\n",
            b"G\x7fT /v2 HTTP/1.1\r\n\r\n",
            b"GET /v2 HTTP/1.1\rHost: x\r\n\r\n",
            b"POST /v2/models/fedscale/infer HTTP/1.1\r\nContent-Length: 5\r\n\r\n"
            b"12345GARBAGE\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET http://[::1 HTTP/1.1\r\n\r\n",
        ]
    )
    cut = rng.randint(1, len(line)) if rng.random() < 0.3 else len(line)
    return line[:cut], True


def _bad_headers(rng: random.Random) -> Case:
    header = rng.choice(
        [
            b"No Colon Here",
            b"Bad Name: x",
            b": empty-name",
            b"X-Ctl: a\x01b",
            b"Content-Length: 4\r\nContent-Length: 5",
            b"Content-Length: -1",
            b"Content-Length: 1e3",
            b"Content-Length: 0x10",
            b"Transfer-Encoding: chunked\r\nContent-Length: 3",
            b"Transfer-Encoding: gzip, chunked, identity",
            b"Host: a\rX: b",
            b"X-Fold: a\r\n  folded",
            b"Upgrade: websocket\r\nConnection: Upgrade",
            b"Expect: 100-continue\r\nContent-Length: 20",
            b"Authorization: Bearer " + base64.b64encode(rng.randbytes(30)),
        ]
    )
    start = b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: fuzz\r\n"
    return start + header + b"\r\n\r\n" + b"{}"[: rng.randint(0, 2)], True


def _lying_length(rng: random.Random) -> Case:
    body = json.dumps(VALID).encode()
    kind = rng.randrange(5)
    if kind == 4:  # announces more than --max-body-bytes
        length = rng.randint(MAX_BODY + 1, 10**12)
        head = f"POST {INFER} HTTP/1.1\r\nHost: f\r\nContent-Length: {length}\r\n\r\n"
        return head.encode() + rng.randbytes(100), True
    if kind == 0:  # announces more than it sends, then closes its side
        head = f"POST {INFER} HTTP/1.1\r\nHost: f\r\nContent-Length: {len(body) + 50}\r\n\r\n"
        return head.encode() + body, True
    if kind == 1:  # announces less: the rest is parsed as a second, garbage request
        head = f"POST {INFER} HTTP/1.1\r\nHost: f\r\nContent-Length: {len(body) // 2}\r\n\r\n"
        return head.encode() + body, True
    if kind == 2:  # a chunked body with a broken chunk size
        return (
            f"POST {INFER} HTTP/1.1\r\nHost: f\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + rng.choice([b"zz\r\n", b"-5\r\n", b"5\r\nabc\r\n0\r\n\r\n", b"fffffffffffffffff\r\n"])
        ), True
    return _post(b"x" * rng.randint(0, 10), f"Content-Length: {rng.randint(11, 99)}"), True


def _huge_headers(rng: random.Random) -> Case:
    if rng.random() < 0.5:
        return b"GET /v2/" + b"a" * rng.randint(70_000, 100_000) + b" HTTP/1.1\r\n\r\n", True
    many = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(rng.randint(66, 90)))
    return b"GET /v2 HTTP/1.1\r\nHost: f\r\n" + many + b"\r\n", True


def _invalid_json(rng: random.Random) -> Case:
    body = bytearray(json.dumps(VALID).encode())
    if rng.random() < 0.5:
        body = body[: rng.randint(0, len(body) - 1)]
    else:
        for _ in range(rng.randint(1, 8)):
            body[rng.randrange(len(body))] = rng.choice(b'{}[]",:\\\x00\xff')
        try:  # a corruption that still parses and validates is not a malformed request
            json.loads(body)
            body = body + b"}"
        except ValueError:
            pass
    return _post(bytes(body), "Content-Type: application/json"), False


def _wrong_value(rng: random.Random, field: str) -> object:
    """A value that is never valid for ``field`` of this model's input tensors."""
    choices: dict[str, list[object]] = {
        "name": ["", "nope", 7, None, ["image"], {"a": 1}, "image\u00e9"],
        "shape": ["1x4", [4], [1, 5], [0, 4], [-1, 4], [1.5, 4], [1, 4, 1], None, {}, [2, 4],
                  [10**30, 4], [True, 4], []],
        "datatype": ["FP64", "fp32", "", 32, None, "BYTES", "INT8", ["FP32"]],
        "data": [None, "abcd", [1, 2, 3], [[1, 2], [3]], [1e400], ["a"] * 4, {"x": 1}, [None] * 4,
                 [[[1, 2, 3, 4]]] * 2, list(range(5))],
        "parameters": ["x", [1], {"binary_data_size": -1}, {"binary_data_size": "4"},
                       {"binary_data_size": 10**12}],
    }  # fmt: skip
    return rng.choice(choices[field])


def _wrong_types(rng: random.Random) -> Case:
    inputs = [dict(IMAGE), dict(MASK)]
    target = rng.choice(inputs)
    field = rng.choice(["name", "shape", "datatype", "data", "parameters"])
    target[field] = _wrong_value(rng, field)
    if field == "data" and target["name"] == "image" and target["data"] == list(range(5)):
        target["data"] = list(range(5))  # 5 values for 4: still wrong
    doc: object = {"inputs": inputs}
    roll = rng.random()
    if roll < 0.15:
        doc = rng.choice([[], "inputs", 3, None, {"inputs": {}}, {"inputs": []}, {"inputs": [1]}])
    elif roll < 0.3:
        assert isinstance(doc, dict)
        doc = {**doc, "inputs": [IMAGE, MASK], **rng.choice([
            {"outputs": [{"name": "nope"}]}, {"outputs": "score"}, {"id": 5},
            {"parameters": {"binary_data_output": "yes"}}, {"outputs": [{"name": "score",
             "parameters": {"classification": 3}}]},
        ])}  # fmt: skip
    return _post(json.dumps(doc).encode()), False


def _binary_garbage(rng: random.Random) -> Case:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": rng.choice([0, 3, 15, 17, 64, -4])},
                },
                MASK,
            ]
        }  # fmt: skip
    ).encode()
    blob = rng.randbytes(rng.randint(0, 40))
    length = rng.choice(
        [str(len(header)), str(len(header) + 1), str(len(header) - 1), "abc", "-1", "", "99999"]
    )
    body = header + blob  # no binary_data_size above is the 16 bytes [1, 4] FP32 needs
    return _post(body, f"Inference-Header-Content-Length: {length}"), False


def _bad_encoding(rng: random.Random) -> Case:
    raw = json.dumps(VALID).encode()
    kind = rng.randrange(4)
    if kind == 3:  # a small body that inflates past --max-body-bytes
        return _post(gzip.compress(b" " * (MAX_BODY * 4)), "Content-Encoding: gzip"), False
    if kind == 0:
        return _post(rng.randbytes(rng.randint(1, 200)), "Content-Encoding: gzip"), False
    if kind == 1:
        return _post(gzip.compress(raw)[:-5], "Content-Encoding: gzip"), False
    return _post(raw, f"Content-Encoding: {rng.choice(['br', 'zstd', 'x', 'gzip, br'])}"), False


_ROUTES = {
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    "/metrics",
    "/v2/models/fedscale",
    "/v2/models/fedscale/ready",
    "/v2/models/fedscale/infer",
    "/v2/models/fedscale/versions/1",
    "/v2/models/fedscale/versions/1/ready",
    "/v2/models/fedscale/versions/1/infer",
}


def _random_route(rng: random.Random) -> Case:
    method = rng.choice(["PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "FOO", "POST", "GET"])
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789-._~%/"
    path = "/" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    path = rng.choice([path, "/v2" + path, "/v2/models" + path, "/v2/health" + path, "/%zz",
                       "/v2/models/fedscale/infer/..", "/v2/models//infer"])  # fmt: skip
    if unquote(path).rstrip("/") in _ROUTES and method in ("GET", "POST"):
        method = "PUT"  # a real route: only a method it does not take is malformed
    body = b"{}" if method in ("POST", "PUT", "PATCH") else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: f\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body, False


KINDS: list[tuple[str, Callable[[random.Random], Case]]] = [
    ("random-bytes", _random_bytes),
    ("request-line", _broken_request_line),
    ("headers", _bad_headers),
    ("content-length", _lying_length),
    ("huge-headers", _huge_headers),
    ("invalid-json", _invalid_json),
    ("wrong-types", _wrong_types),
    ("binary", _binary_garbage),
    ("encoding", _bad_encoding),
    ("route", _random_route),
]


def _exchange(port: int, payload: bytes, close_after: bool) -> tuple[int, bytes]:
    """Send ``payload`` on a fresh connection; return the first answer's status and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        try:
            sock.sendall(payload)
            if close_after:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused early (413, 431): the answer is already waiting to be read
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def test_malformed_requests_only_get_4xx(tmp_path):
    publish_two_input(tmp_path / "models")
    args = ("--max-body-bytes", str(MAX_BODY), "--request-timeout", "10")
    with ServeProcess(tmp_path / "models", tmp_path / "serve.log", *args, grpc=False) as server:
        rng = random.Random(SEED)
        statuses: Counter[int] = Counter()
        blank = 0
        for index in range(COUNT):
            kind, make = KINDS[index % len(KINDS)]
            payload, close_after = make(rng)
            try:
                status, body = _exchange(server.http_port, payload, close_after)
            except http.client.RemoteDisconnected:
                # Blank lines before a request line are to be ignored (RFC 9112, 2.2):
                # a client that sends only CR/LF and closes sent no request, so nothing
                # is answered. Anything else closed without an answer is a failure.
                assert payload.strip(b"\r\n") == b"", (index, kind, payload[:300])
                blank += 1
                continue
            except (http.client.HTTPException, OSError) as err:
                raise AssertionError(
                    f"case {index} ({kind}, seed {SEED}): expected a 4xx answer, got "
                    f"{type(err).__name__}: {err}; payload {payload[:200]!r}"
                ) from None
            assert 400 <= status < 500, (index, kind, status, body[:300], payload[:300])
            assert "error" in json.loads(body), (index, kind, body[:300])
            statuses[status] += 1
        assert sum(statuses.values()) + blank == COUNT >= 1000
        assert blank < COUNT // 100, blank
        # Most kinds end in 400; the size limits, routes and methods have their own codes.
        assert {400, 404, 405, 413, 414, 415, 431} <= set(statuses), statuses

        assert server.process.poll() is None
        good = json.dumps(VALID).encode()
        status, _, content = request(server.http_url, "POST", INFER, good)
        assert status == 200
        assert json.loads(content)["outputs"][0]["data"] == [1.5, -1.0, 5.0, 0.0]
        status, _, metrics = request(server.http_url, "GET", "/metrics")
        assert status == 200
        assert 'code="5' not in metrics.decode()
    assert "Traceback" not in server.log()
