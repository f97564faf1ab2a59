"""Soak `fedscale serve`: 16 connections for 60 s under wrk, and count every error.

The acceptance benchmark of issue #6 ("`fedscale serve` under 16 connections for
60 s with zero errors"), with the hardening on as shipped: the default
``--request-timeout``, ``--max-concurrency`` and ``--max-queue``, and (unless
``--no-api-key``) an API key, so every request also passes the bearer check.

The model, the input and the checks are bench/serve.py's: LeNet (``cnn`` on
1x28x28, seed 0) exported to ONNX, one real mnist5k image, the server's answer
checked against torch before the run and again after it. For each payload (v2
JSON, v2 binary) it starts a fresh server, warms it up, runs ``wrk -t1 -c16 -d60s
--latency``, then reports one row: requests, errors (non-2xx answers plus wrk's
socket errors: connect, read, write, timeout), requests/s, p50/p99 latency, the
server's resident memory before and after, and the rejections the server counted
(``fedscale_serving_rejections_total``). Any error, a wrong answer afterwards, a
traceback in the server's log or a server that died fails the run (exit 1).

    python bench/serve_soak.py                      # 60 s, 16 connections, JSON and binary
    python bench/serve_soak.py --duration 5         # a smoke run
    python bench/serve_soak.py --payloads binary    # one payload

As in bench/serve.py, the server runs on CPU 0 and wrk on CPU 1 (``--no-pin`` to
let the scheduler place them); the load average is printed first, because other
work on a 2-core machine moves the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import serve as bench  # bench/serve.py, next to this file

from fedscale.processes import free_port, start, stop, wait_for_port

CONNECTIONS = 16
API_KEY = "soak-benchmark-key-0123456789"


@dataclass(frozen=True)
class SoakRow:
    """One payload's soak."""

    label: str
    connections: int
    duration_s: int
    requests: int
    non2xx: int
    socket_errors: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    rss_before_mb: float
    rss_after_mb: float
    rejections: float
    problems: str  # "" when the run is clean

    @property
    def errors(self) -> int:
        """Non-2xx answers plus socket errors."""
        return self.non2xx + self.socket_errors


def rss_mb(pid: int) -> float:
    """Return a process's resident memory in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise bench.BenchError(f"/proc/{pid}/status: expected a VmRSS line, found none")


def error_counts(output: str) -> tuple[int, int]:
    """Return (non-2xx answers, socket errors) from wrk's report (0 when it prints none)."""
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return (
        int(non2xx.group(1)) if non2xx else 0,
        sum(int(n) for n in socket.groups()) if socket else 0,
    )


def rejections(port: int, headers: tuple[tuple[str, str], ...]) -> float:
    """Sum ``fedscale_serving_rejections_total`` over its labels, from ``/metrics``."""
    status, _, body = bench.request(port, "GET", "/metrics", b"", headers)
    if status != 200:
        raise bench.BenchError(f"GET /metrics: expected 200, got {status}")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("fedscale_serving_rejections_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def soak(
    payload: bench.Payload,
    args: argparse.Namespace,
    work: Path,
    model_dir: Path,
    reference: object,
) -> SoakRow:
    """Start a server, check and warm it, run wrk, check it again, stop it."""
    port = free_port(bench.HOST)
    argv = [sys.executable, "-m", "fedscale.cli", "serve", "--model-dir", str(model_dir)]
    argv += ["--http-port", str(port), "--grpc-port", "0"]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    auth: tuple[tuple[str, str], ...] = ()
    if args.api_key:
        key_file = work / "api-key"
        key_file.write_text(API_KEY + "\n")
        argv += ["--api-key-file", str(key_file)]
        auth = (("Authorization", f"Bearer {API_KEY}"),)
    if args.pin:
        argv = ["taskset", "-c", str(bench.SERVER_CPU), *argv]
    log = work / f"soak-{payload.key}-{port}.log"
    process = start(argv, log_file=log, env=env)
    server = bench.Server(process, port, log)
    keyed = bench.Payload(
        payload.key, payload.server, payload.label, payload.path, payload.body,
        payload.headers + auth,
    )  # fmt: skip
    problems: list[str] = []
    after = refused = float("nan")
    try:
        wait_for_port(bench.HOST, port, timeout=bench.START_TIMEOUT, process=process, log_file=log)
        bench.wait_ready(server)
        bench.verify_and_warm(server, keyed, reference)  # type: ignore[arg-type]
        before = rss_mb(process.pid)
        rps, p50, p99, total, _, output = bench.run_wrk(
            keyed, port, args.connections, args.duration, work, args.pin
        )
        non2xx, socket_errors = error_counts(output)
        if process.poll() is not None:
            problems.append(f"server exited with {process.returncode}")
        else:
            after = rss_mb(process.pid)
            bench.verify_and_warm(server, keyed, reference)  # type: ignore[arg-type]
            refused = rejections(port, auth)
    finally:
        stop(process)
    if "Traceback" in log.read_text(errors="replace"):
        problems.append(f"a traceback in the server log {log}")
    if non2xx or socket_errors:
        problems.append(f"{non2xx} non-2xx, {socket_errors} socket errors")
        print(output)
    if problems:
        print(f"server log ({log}):\n{bench.tail(log)}", flush=True)
    return SoakRow(
        payload.label, args.connections, args.duration, total, non2xx, socket_errors, rps,
        p50, p99, before, after, refused, "; ".join(problems),
    )  # fmt: skip


def report(rows: list[SoakRow]) -> None:
    """Print the table."""
    head = (
        f"{'payload':<28}{'conns':>6}{'s':>4}{'requests':>11}{'errors':>8}{'req/s':>9}"
        f"{'p50 ms':>8}{'p99 ms':>8}{'RSS MB':>15}{'refused':>9}"
    )
    print("\n" + head)
    print("-" * len(head))
    for r in rows:
        rss = f"{r.rss_before_mb:.0f} -> {r.rss_after_mb:.0f}"
        print(
            f"{r.label:<28}{r.connections:>6}{r.duration_s:>4}{r.requests:>11,}{r.errors:>8}"
            f"{r.requests_per_s:>9,.0f}{r.p50_ms:>8.3f}{r.p99_ms:>8.3f}{rss:>15}"
            f"{r.rejections:>9.0f}"
        )
        if r.problems:
            print(f"  FAILED: {r.problems}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=60, help="seconds per payload")
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--payloads", default="json,binary", help="some of json,binary")
    parser.add_argument(
        "--api-key",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve with --api-key-file and send the key (default: on)",
    )
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"server on CPU {bench.SERVER_CPU}, wrk on CPU {bench.WRK_CPU} (default: on)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    keys = args.payloads.split(",")
    if unknown := set(keys) - {"json", "binary"}:
        parser.error(f"--payloads: expected some of json,binary, got {sorted(unknown)}")
    if args.duration < 1 or args.connections < 1:
        parser.error("--duration and --connections: expected whole numbers >= 1")
    if not Path(bench.WRK).exists():
        parser.error(f"expected wrk at {bench.WRK} (Debian: apt-get install wrk), found none")
    if args.pin and not {bench.SERVER_CPU, bench.WRK_CPU} <= os.sched_getaffinity(0):
        print(f"CPUs {bench.SERVER_CPU} and {bench.WRK_CPU} are not both usable: not pinning")
        args.pin = False
    if args.pin and not shutil.which("taskset"):
        parser.error("--pin: expected taskset (util-linux) on PATH, found none; use --no-pin")

    print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    facts = bench.machine_facts(args.pin)
    for fact in facts:
        print(fact)
    print(f"API key: {'on' if args.api_key else 'off'}; hardening options: the defaults")
    with tempfile.TemporaryDirectory(prefix="fedscale-bench-soak-") as tmp:
        work = Path(tmp)
        image, logits, _, model_dir, manifest = bench.build_inputs(work)
        payloads = [p for p in bench.build_payloads(image, manifest) if p.key in keys]
        rows = []
        for payload in payloads:
            print(f"{payload.label}: {args.connections} connections, {args.duration} s ...",
                  flush=True)  # fmt: skip
            rows.append(soak(payload, args, work, model_dir, logits))
    report(rows)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": facts, "api_key": args.api_key,
                 "rows": [{**r.__dict__, "errors": r.errors} for r in rows]},
                indent=2,
            ) + "\n"
        )  # fmt: skip
    return 1 if any(r.problems for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
