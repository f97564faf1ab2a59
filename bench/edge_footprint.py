"""What fedscale costs an edge device: install size, serving memory and start, round overhead.

Three measurements, each printed as a table row next to its goal (no assertions;
the run fails only if a measurement cannot be taken):

1. ``install``: the serve-only install. A fresh virtual environment in a temporary
   folder, then ``pip install <a copy of this working tree>`` *without* extras
   (the base dependencies are the serve-only install). Reported: the venv's
   site-packages in MB (10^6 bytes, file sizes summed), also without pip and
   setuptools (which any venv holds), its largest packages, and whether torch,
   flwr or ray can be imported there (they must not).
2. ``serve``: ``fedscale serve`` from that venv (or, with ``--only serve``, from
   this interpreter) on a model directory holding fedscale's LeNet-like ``cnn``
   (1x28x28, exported with fedscale.export). Cold start: from spawning the
   process to the answer of the first ``POST /v2/models/{name}/infer`` (polling
   ``/v2/health/ready`` every 5 ms until it says ready), median of
   ``--cold-starts`` fresh processes. RSS: ``VmRSS`` from /proc/<pid>/status
   after 50 inference requests (and ``VmHWM``, its peak).
3. ``rounds``: a client's per-round overhead beyond training, on a real
   ``flower-superlink`` and one ``fedscale edge-client``, for Flower's default
   SuperExec (``--no-warm``: a fresh ``flwr-clientapp`` interpreter per message)
   and for fedscale's warm SuperExec (``--warm``: a fork of one warm process).
   Per round, **client wall time** runs from the SuperNode's ``Receiving: train
   message`` log line (it has pulled the message from the SuperLink) to its
   ``Sent successfully`` (the reply is with the SuperLink), each line timestamped
   as it arrives on the edge client's output pipe. **Train-handler time** is
   measured inside the ClientApp process, around fedscale's train handler (a
   wrapper ClientApp shipped in the run's FAB prints it). **Overhead** = wall -
   handler: process start and imports, Flower's task hand-off and message
   transfer, and the SuperNode's 0.5 s poll for the reply. Not included: the
   time a message waits on the SuperLink before the SuperNode pulls it (Flower's
   SuperNode polls every 3 s when idle, hard-coded in Flower 1.42), which the
   federation's round time (also printed) does include. Median over
   ``--rounds`` rounds.

    python bench/edge_footprint.py                    # all three
    python bench/edge_footprint.py --only rounds --rounds 3
    python bench/edge_footprint.py --only serve       # fedscale serve of this interpreter
    python bench/edge_footprint.py --venv /tmp/edge   # keep (or reuse) the serve-only venv

Goals (issue #3): install <= 200 MB, RSS <= 100 MB, cold start <= 1 s, round
overhead <= 1 s. The machine's load average is printed: numbers taken while other
work runs are indicative only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedscale.processes import flower_executable, free_port, start, stop, wait_for_port

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
SHAPE = (1, 28, 28)
MODEL_NAME = "lenet"
GOALS = {"install": 200.0, "rss": 100.0, "cold": 1000.0, "overhead": 1.0}
VENV_BASELINE = ("pip", "setuptools", "_distutils_hack", "distutils-precedence.pth")
FORBIDDEN = ("torch", "flwr", "ray")
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", ".ci-venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*cache"
)
TIMED_APP = '''"""fedscale's ClientApp, printing its train handler's time (a benchmark)."""

import json
import time

from flwr.clientapp import ClientApp

from fedscale.edge_client.app import app as fedscale_app

app = ClientApp()


@app.train()
def train(msg, context):
    began = time.perf_counter()
    reply = fedscale_app(msg, context)
    seconds = time.perf_counter() - began
    print("FEDSCALE-BENCH-HANDLER " + json.dumps({"seconds": seconds}), flush=True)
    return reply
'''
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class BenchError(Exception):
    """A measurement could not be taken."""


@dataclass
class Row:
    """One line of the result table."""

    what: str
    value: str
    goal: str = ""
    verdict: str = ""


@dataclass
class Report:
    """The rows so far, and notes printed under the table."""

    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, what: str, value: str, goal: str = "", met: bool | None = None) -> None:
        """Add a row; ``met`` prints as ok / MISSED."""
        verdict = "" if met is None else ("ok" if met else "MISSED")
        self.rows.append(Row(what, value, goal, verdict))

    def print(self) -> None:
        """Print the table and the notes."""
        widths = [max(len(getattr(r, f)) for r in [_HEADER, *self.rows]) for f in _FIELDS]
        for row in [_HEADER, *self.rows]:
            print(
                "  ".join(
                    getattr(row, f).ljust(w) for f, w in zip(_FIELDS, widths, strict=True)
                ).rstrip()
            )
        for note in self.notes:
            print(f"- {note}")


_FIELDS = ("what", "value", "goal", "verdict")
_HEADER = Row("measurement", "value", "goal", "")


# ------------------------------------------------------------------- install


def measure_install(report: Report, venv: Path, work: Path) -> Path:
    """Create the serve-only venv (unless ``venv`` already holds fedscale); return its python."""
    python = venv / "bin" / "python"
    if not (python.exists() and _has_fedscale(python)):
        source = work / "src"
        shutil.copytree(REPO, source, symlinks=True, ignore=COPY_IGNORE)
        print(f"creating {venv} and installing fedscale (no extras) from PyPI ...", flush=True)
        _run([sys.executable, "-m", "venv", str(venv)])
        _run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                str(source),
            ]
        )
    else:
        print(f"reusing {venv}", flush=True)
    site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    )
    sizes = _sizes_by_top_entry(site)
    total = sum(sizes.values()) / 1e6
    baseline = sum(v for k, v in sizes.items() if _is_venv_baseline(k)) / 1e6
    found = _run(
        [
            str(python),
            "-c",
            "import importlib.util as u; "
            f"print(' '.join(m for m in {FORBIDDEN!r} if u.find_spec(m)))",
        ]
    ).split()
    report.add(
        "serve-only install: site-packages",
        f"{total - baseline:.1f} MB",
        f"<= {GOALS['install']:.0f} MB",
        total - baseline <= GOALS["install"],
    )
    report.add("  with the venv's own pip, setuptools", f"{total:.1f} MB")
    report.add("  torch, flwr, ray importable there", ", ".join(found) or "none", "none", not found)
    biggest = sorted(
        ((k, v) for k, v in _by_distribution(sizes).items() if not _is_venv_baseline(k)),
        key=lambda kv: -kv[1],
    )[:6]
    report.notes.append(
        "largest in the serve-only install: "
        + ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in biggest)
    )
    return python


def _has_fedscale(python: Path) -> bool:
    result = subprocess.run([str(python), "-c", "import fedscale.cli.serve"], capture_output=True)
    return result.returncode == 0


def _sizes_by_top_entry(site: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for entry in site.iterdir():
        if entry.is_file() or entry.is_symlink():
            sizes[entry.name] = entry.lstat().st_size
            continue
        total = 0
        for root, _, files in os.walk(entry):
            total += sum(os.lstat(os.path.join(root, f)).st_size for f in files)
        sizes[entry.name] = total
    return sizes


def _by_distribution(sizes: dict[str, int]) -> dict[str, int]:
    # numpy, numpy.libs and numpy-2.x.dist-info are one distribution.
    merged: dict[str, int] = {}
    for name, size in sizes.items():
        key = re.split(r"[.-]", name, maxsplit=1)[0].lower()
        merged[key] = merged.get(key, 0) + size
    return merged


def _is_venv_baseline(name: str) -> bool:
    return any(name == b or name.startswith(f"{b}-") for b in VENV_BASELINE)


# --------------------------------------------------------------------- serve


def measure_serving(report: Report, python: Path, work: Path, cold_starts: int) -> None:
    """Cold start to first answer and RSS of ``fedscale serve`` run by ``python``."""
    model_dir, body = _model_dir(work)
    colds: list[float] = []
    rss = hwm = 0.0
    for attempt in range(cold_starts):
        port = free_port()
        began = time.perf_counter()
        server = start(
            [
                str(python),
                "-m",
                "fedscale.cli",
                "serve",
                "--model-dir",
                str(model_dir),
                "--http-port",
                str(port),
                "--grpc-port",
                "0",
            ],
            log_file=work / f"serve-{attempt}.log",
        )
        try:
            _wait_ready(port, server, work / f"serve-{attempt}.log")
            _infer(port, body)
            colds.append((time.perf_counter() - began) * 1000)
            if attempt == cold_starts - 1:
                for _ in range(50):
                    _infer(port, body)
                rss, hwm = _memory_mb(server.pid)
        finally:
            stop(server)
    cold = statistics.median(colds)
    report.add(
        "serve: cold start to first inference",
        f"{cold:.0f} ms",
        f"<= {GOALS['cold']:.0f} ms",
        cold <= GOALS["cold"],
    )
    report.add("  each start", ", ".join(f"{c:.0f}" for c in colds) + " ms")
    report.add(
        "serve: RSS after 50 inferences",
        f"{rss:.1f} MB",
        f"<= {GOALS['rss']:.0f} MB",
        rss <= GOALS["rss"],
    )
    report.add("  peak RSS (VmHWM)", f"{hwm:.1f} MB")
    report.notes.append(f"fedscale serve ran as {python} -m fedscale.cli serve (MB: 10^6 bytes)")


def _model_dir(work: Path) -> tuple[Path, bytes]:
    import numpy as np

    from fedscale.export import export_onnx
    from fedscale.models import build_model

    model = build_model("cnn", SHAPE, 10, seed=0).eval()
    model_dir = work / "models"
    manifest = export_onnx(model, SHAPE, seed=0, what="benchmark LeNet").publish(
        model_dir, server_round=1, name=MODEL_NAME
    )
    image = np.random.default_rng(0).random((1, *SHAPE), dtype=np.float32)
    body = {
        "inputs": [
            {
                "name": manifest.inputs[0].name,
                "shape": list(image.shape),
                "datatype": "FP32",
                "data": [float(v) for v in image.reshape(-1)],
            }
        ]
    }
    return model_dir, json.dumps(body).encode()


def _request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _wait_ready(port: int, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise BenchError(f"fedscale serve exited with {server.returncode}: {log.read_text()}")
        try:
            if _request(port, "GET", "/v2/health/ready")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.005)
    raise BenchError(f"fedscale serve was not ready within 60 s: {log.read_text()}")


def _infer(port: int, body: bytes) -> None:
    status, answer = _request(port, "POST", f"/v2/models/{MODEL_NAME}/infer", body)
    if status != 200 or not json.loads(answer).get("outputs"):
        raise BenchError(f"infer: expected 200 with outputs, got {status}: {answer[:300]!r}")


def _memory_mb(pid: int) -> tuple[float, float]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return (int(fields["VmRSS"].split()[0]) / 1000, int(fields["VmHWM"].split()[0]) / 1000)


# -------------------------------------------------------------------- rounds


@dataclass(frozen=True)
class RoundTimes:
    """One train message as the client saw it, in seconds."""

    wall: float
    handler: float

    @property
    def overhead(self) -> float:
        """Client wall time beyond the train handler."""
        return self.wall - self.handler


def measure_rounds(report: Report, work: Path, rounds: int) -> None:
    """Per-round client overhead for Flower's default SuperExec and the warm one."""
    for warm in (False, True):
        label = "warm (fedscale)" if warm else "default (Flower)"
        times, server_rounds = _federation(work / ("warm" if warm else "default"), warm, rounds)
        if len(times) != rounds:
            raise BenchError(f"{label}: expected {rounds} train messages, parsed {len(times)}")
        overhead = statistics.median(t.overhead for t in times)
        report.add(
            f"round overhead, {label}",
            f"{overhead:.2f} s",
            f"<= {GOALS['overhead']:.0f} s",
            overhead <= GOALS["overhead"],
        )
        report.add(
            "  per round: wall - handler (s)",
            ", ".join(f"{t.wall:.2f}-{t.handler:.2f}" for t in times),
        )
        report.add("  federation's round time, median", f"{statistics.median(server_rounds):.2f} s")


def _federation(work: Path, warm: bool, rounds: int) -> tuple[list[RoundTimes], list[float]]:
    from fedscale.flower_app import write_app_dir
    from fedscale.runs import RunDirectory
    from fedscale.server.launcher import CONNECTION_NAME, flwr_home_config, superlink_argv
    from fedscale.settings import RunSettings

    home = work / "flwr-home"
    home.mkdir(parents=True)
    port = free_port()
    (home / "config.toml").write_text(flwr_home_config(f"{HOST}:{port}"))
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
    settings = RunSettings(
        num_rounds=rounds,
        clients_per_round=1,
        min_clients=1,
        local_epochs=1,
        round_timeout=120.0,
        seed=0,
        device="cpu",
        out=str(work / "run"),
    )
    app_dir = write_app_dir(
        work / "app", settings.to_run_config(), client_app="fedscale_bench_timed:app"
    )
    (app_dir / "fedscale_bench_timed.py").write_text(TIMED_APP)
    processes: list[subprocess.Popen[bytes]] = []
    lines: list[tuple[float, str]] = []
    try:
        superlink = start(
            superlink_argv(port),
            log_file=work / "superlink.log",
            env=env,
            cwd=work,
        )
        processes.append(superlink)
        wait_for_port(HOST, port, timeout=60, process=superlink, what="flower-superlink")
        client = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedscale.cli",
                "edge-client",
                "--server",
                f"{HOST}:{port}",
                "--partition-id",
                "0",
                "--num-partitions",
                "2",
                "--max-wait-time",
                "120",
                "--warm" if warm else "--no-warm",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        processes.append(client)
        reader = threading.Thread(target=_read_lines, args=(client, lines), daemon=True)
        reader.start()
        submit = start(
            [flower_executable("flwr"), "run", str(app_dir), CONNECTION_NAME, "--stream"],
            log_file=work / "flwr-run.log",
            env=env,
            cwd=work,
        )
        processes.append(submit)
        if submit.wait(timeout=120 + 60 * rounds) != 0:
            raise BenchError(f"flwr run failed: {(work / 'flwr-run.log').read_text()[-3000:]}")
    finally:
        for process in reversed(processes):
            stop(process)
    (work / "edge-client.log").write_text("\n".join(f"{t:.3f} {line}" for t, line in lines))
    server_rounds = [float(r["seconds"]) for r in RunDirectory(work / "run").read_metrics()[1:]]
    return _parse_rounds(lines), server_rounds


def _read_lines(process: subprocess.Popen[bytes], lines: list[tuple[float, str]]) -> None:
    assert process.stdout is not None
    for raw in process.stdout:
        lines.append((time.monotonic(), ANSI.sub("", raw.decode(errors="replace")).rstrip()))


def _parse_rounds(lines: list[tuple[float, str]]) -> list[RoundTimes]:
    times: list[RoundTimes] = []
    received: float | None = None
    handler: float | None = None
    for at, line in lines:
        if "Receiving: train message" in line:
            received, handler = at, None
        elif line.startswith("FEDSCALE-BENCH-HANDLER ") and received is not None:
            handler = float(json.loads(line.split(" ", 1)[1])["seconds"])
        elif "Sent successfully" in line and received is not None:
            if handler is None:
                raise BenchError("a reply was sent without a train-handler time line")
            times.append(RoundTimes(wall=at - received, handler=handler))
            received = None
    return times


# ---------------------------------------------------------------------- main


def _run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(
            f"{' '.join(argv)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return result.stdout.strip()


def main() -> int:
    """Run the measurements and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        default="install,serve,rounds",
        help="comma-separated subset of install, serve, rounds",
    )
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds per mode")
    parser.add_argument("--cold-starts", type=int, default=3, help="fresh serve processes")
    parser.add_argument("--venv", type=Path, help="serve-only venv to create or reuse (kept)")
    args = parser.parse_args()
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = parts - {"install", "serve", "rounds"}
    if unknown or args.rounds < 1 or args.cold_starts < 1:
        parser.error(f"expected --only from install, serve, rounds and counts >= 1; got {args}")

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    print(
        f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    report = Report()
    work = Path(tempfile.mkdtemp(prefix="fedscale-edge-footprint-"))
    try:
        python = Path(sys.executable)
        if "install" in parts:
            python = measure_install(report, (args.venv or work / "venv").absolute(), work)
        elif args.venv is not None:
            python = args.venv.absolute() / "bin" / "python"
        if "serve" in parts:
            measure_serving(report, python, work, args.cold_starts)
        if "rounds" in parts:
            measure_rounds(report, work, args.rounds)
            report.notes.append(
                "round overhead = client wall time (SuperNode 'Receiving: train message' to "
                "'Sent successfully') - train-handler time (inside the ClientApp); the "
                "federation's round time also holds the SuperNode's idle poll of the "
                "SuperLink (3 s in Flower 1.42)"
            )
    except BenchError as err:
        report.print()
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
