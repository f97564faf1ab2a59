"""Server soak: `fedscale server` with 10 real edge devices for 10 rounds, no round lost.

Starts ``fedscale server`` and ``--devices`` ``fedscale edge-client`` processes
(each a Flower SuperNode with fedscale's warm ClientApp runner) on 127.0.0.1,
runs ``--rounds`` rounds of FedAvg on digits with every device in every round,
and prints one table: rounds completed, replies and failures in all, the slowest
round, wall time, and the peak memory of the server's and the devices' process
trees. Optionally (``--kill-server-after R``) the server's process group is killed
with SIGKILL after round R and restarted with ``--resume``, as in
``tests/server/test_resume_deployment.py``, and the table says whether every
round 0..N is in ``metrics.jsonl`` exactly once.

    python bench/server_soak.py                      # 10 devices, 10 rounds
    python bench/server_soak.py --kill-server-after 4

Every process is stopped by its PID at the end (also on failure).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedscale.processes import free_port, start, stop  # noqa: E402
from fedscale.runs import RunDirectory  # noqa: E402

FEDSCALE = [sys.executable, "-m", "fedscale.cli"]


def _tree_rss_mb(root: int) -> float:
    """Sum VmRSS of ``root``'s process group (every process of the group), in MB."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != root:
                continue
            for line in (stat.parent / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1024


class PeakMemory:
    """Sample the RSS of some process groups every second; keep each group's peak."""

    def __init__(self) -> None:
        self.groups: dict[str, list[int]] = {}
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, name: str, pgid: int) -> None:
        self.groups.setdefault(name, []).append(pgid)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for name, pgids in list(self.groups.items()):
                now = sum(_tree_rss_mb(p) for p in pgids)
                self.peaks[name] = max(self.peaks.get(name, 0.0), now)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--round-timeout", type=float, default=300.0)
    parser.add_argument("--kill-server-after", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fedscale-soak-"))
    env = {**os.environ, "FLWR_HOME": str(work / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0"}
    port = free_port()
    run = work / "run"
    where = ["--port", str(port), "--out", str(run)]
    server_argv = [
        *FEDSCALE,
        "server",
        *where,
        "--rounds",
        str(args.rounds),
        "--min-clients",
        str(args.devices),
        "--per-round",
        str(args.devices),
        "--local-epochs",
        str(args.local_epochs),
        "--round-timeout",
        str(args.round_timeout),
    ]
    processes = []
    started = time.monotonic()
    deadline = started + args.timeout
    restarted = False
    try:
        with PeakMemory() as memory:
            server = start(server_argv, log_file=work / "server.log", env=env)
            processes.append(server)
            memory.watch("server", server.pid)
            for i in range(args.devices):
                device = start(
                    [
                        *FEDSCALE,
                        "edge-client",
                        "--server",
                        f"127.0.0.1:{port}",
                        "--partition-id",
                        str(i),
                        "--num-partitions",
                        str(args.devices),
                        "--port",
                        str(free_port()),
                        "--max-wait-time",
                        str(args.round_timeout),
                    ],
                    log_file=work / f"device{i}.log",
                    env=env,
                )
                processes.append(device)
                memory.watch("devices", device.pid)
            if args.kill_server_after:
                metrics = run / "metrics.jsonl"
                marker = f'"round": {args.kill_server_after},'
                while not (metrics.exists() and marker in metrics.read_text()):
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit(f"round {args.kill_server_after} never came; {work}")
                    time.sleep(0.05)
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)
                server = start(
                    [*FEDSCALE, "server", *where, "--resume"],
                    log_file=work / "resumed.log",
                    env=env,
                )
                processes.append(server)
                memory.watch("server", server.pid)
                restarted = True
            code = server.wait(timeout=max(1.0, deadline - time.monotonic()))
        wall = time.monotonic() - started
        rows = RunDirectory(run).read_metrics() if (run / "metrics.jsonl").exists() else []
        rounds = [r["round"] for r in rows]
        complete = rounds == list(range(args.rounds + 1))
        replies = sum(r["clients_replied"] for r in rows[1:])
        failures = sum(r["clients_failed"] for r in rows[1:])
        slowest = max((r["seconds"] for r in rows[1:]), default=0.0)
        print(
            f"server soak: {args.devices} devices x {args.rounds} rounds, "
            f"{platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
        )
        print("| measure | value |")
        print("|---|---|")
        print(f"| server exit code | {code} |")
        print(
            f"| server killed (SIGKILL) and resumed after round | {args.kill_server_after or '-'} |"
        )
        print(f"| rounds in metrics.jsonl, each once | {complete} ({rounds}) |")
        print(f"| replies / expected | {replies} / {args.devices * args.rounds} |")
        print(f"| failed replies | {failures} |")
        print(f"| slowest round | {slowest:.2f} s |")
        print(f"| final accuracy | {rows[-1]['accuracy'] if rows else float('nan'):.4f} |")
        print(f"| wall time | {wall:.1f} s |")
        print(f"| peak RSS, server group(s) | {memory.peaks.get('server', 0):.0f} MB |")
        print(f"| peak RSS, {args.devices} devices | {memory.peaks.get('devices', 0):.0f} MB |")
        ok = code == 0 and complete and (restarted or failures == 0)
        return 0 if ok else 1
    finally:
        for process in processes:
            stop(process)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
