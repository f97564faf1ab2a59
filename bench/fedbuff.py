"""FedBuff vs synchronous FedAvg: simulated time to a test accuracy on heavy-tailed devices.

On ``digits`` (scikit-learn's; 100 clients, iid, the ``mlp`` model, 5 local
epochs, batch 16, lr 0.1), both strategies keep the same number of clients in
flight, ``C`` (20):

- **FedAvg**, synchronous: ``clients-per-round C``; a round lasts until its
  slowest client finishes;
- **FedBuff** (``server/fedbuff.py``): ``concurrency C``, ``buffer-size M`` (10),
  staleness ``polynomial:0.5`` (``1 / sqrt(1 + s)``), ``max-staleness`` 10, server
  lr 1: a new model version every ``M`` arrivals, and a freed slot restarts at once.

Each runs on the in-process engine's virtual clock with a heavy-tailed device mix:

- ``mobile-always-on`` (built in): training speed log-normal (median 73.6
  samples/s, sigma 0.6), links log-normal (median 10 Mbit/s down, sigma 1.0;
  up 0.3 of it), always online (see ``fedscale/devices.py``);
- ``pareto`` (a trace this script writes from the seed): training speed
  ``73.6 * 2 ** (1 / alpha) / X`` with ``X`` Pareto(alpha = 1.5, minimum 1), so a
  median of 73.6 samples/s and a slow tail (1% of devices more than 20 times
  slower than the median); links 10 Mbit/s down, 3 Mbit/s up; always online.

The result per seed is the simulated time at which the global model first
reaches ``--target`` test accuracy (0.85; on the server's held-out split, after
every round or version), for each strategy, and the ratio FedAvg / FedBuff.
Wall times are the whole runs (FedAvg ``--rounds``, FedBuff ``--versions``) on
this machine. Printed as markdown tables, with the command and the machine.

    python bench/fedbuff.py                          # the tables (about a minute on 2 cores)
    python bench/fedbuff.py --seeds 0 --mixes pareto # one row
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

MEDIAN_SPEED = 73.6  # samples/s: fedscale.devices' reference device
PARETO_ALPHA = 1.5


def pareto_trace(path: Path, clients: int, seed: int) -> Path:
    """Write a trace of ``clients`` always-online devices with Pareto-tailed training speeds."""
    rng = np.random.default_rng([seed, 0xFEDB])
    slowdown = rng.pareto(PARETO_ALPHA, size=clients) + 1.0  # Pareto, minimum 1
    speed = MEDIAN_SPEED * 2 ** (1 / PARETO_ALPHA) / slowdown
    lines = [
        "client_id,compute_speed,download_kbps,upload_kbps,availability,period_s,churn_per_hour"
    ]
    lines += [f"{i},{s:.6g},10000,3000,,," for i, s in enumerate(speed)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(
    args: argparse.Namespace, mix: str, seed: int, scratch: Path, fedbuff: bool
) -> dict[str, Any]:
    from fedscale.clock import time_to_accuracy
    from fedscale.simulations import simulate

    device_mix = (
        mix
        if mix != "pareto"
        else str(pareto_trace(scratch / f"pareto-{seed}.csv", args.clients, seed))
    )
    name = "fedbuff" if fedbuff else "fedavg"
    started = time.perf_counter()
    result = simulate(
        dataset="digits",
        clients=args.clients,
        clients_per_round=args.concurrency,
        num_rounds=args.versions if fedbuff else args.rounds,
        local_epochs=args.local_epochs,
        seed=seed,
        device="cpu",
        device_mix=device_mix,
        export_onnx=False,
        strategy=name,
        strategy_args=(
            f"concurrency={args.concurrency} buffer-size={args.buffer_size} "
            f"staleness={args.staleness} max-staleness={args.max_staleness}"
            if fedbuff
            else ""
        ),
        out=str(scratch / f"{name}-{mix}-{seed}"),
    )
    wall = time.perf_counter() - started
    rows = result.rounds
    points = [(r["sim_elapsed"], r["accuracy"]) for r in rows if r["accuracy"] is not None]
    reached = time_to_accuracy(points, args.target)
    at = next((r for r in rows if reached is not None and r["sim_elapsed"] == reached), None)
    return {
        "sim_to_target": reached,
        "rounds_to_target": None if at is None else at["round"],
        "wall_to_target": None if at is None else at["elapsed"],
        "final": rows[-1]["accuracy"],
        "rounds": rows[-1]["round"],
        "sim_total": rows[-1]["sim_elapsed"],
        "wall": wall,
        "stale": sum((r.get("dropped") or {}).get("stale", 0) for r in rows),
        "updates": sum(r["clients_replied"] for r in rows[1:]),
    }


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "not reached" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    """Run FedAvg and FedBuff per mix and seed; print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=20, help="C: clients in flight")
    parser.add_argument("--buffer-size", type=int, default=10, help="M: FedBuff's buffer")
    parser.add_argument("--staleness", default="polynomial:0.5")
    parser.add_argument("--max-staleness", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=60, help="FedAvg's cap")
    parser.add_argument("--versions", type=int, default=200, help="FedBuff's cap")
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--mixes", nargs="+", default=["mobile-always-on", "pareto"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)

    started = time.perf_counter()
    results: dict[str, list[tuple[int, dict[str, Any], dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for mix in args.mixes:
            for seed in args.seeds:
                fedavg = _run(args, mix, seed, Path(scratch), fedbuff=False)
                fedbuff = _run(args, mix, seed, Path(scratch), fedbuff=True)
                results.setdefault(mix, []).append((seed, fedavg, fedbuff))
                print(
                    f"{mix} seed {seed}: FedAvg {_fmt(fedavg['sim_to_target'])} s, "
                    f"FedBuff {_fmt(fedbuff['sim_to_target'])} s",
                    file=sys.stderr,
                    flush=True,
                )

    command = " ".join(["python bench/fedbuff.py", *(sys.argv[1:] if argv is None else argv)])
    print(
        f"\n`{command}` — digits, {args.clients} clients, iid, mlp, {args.local_epochs} local "
        f"epochs; {args.concurrency} clients in flight; FedBuff buffer {args.buffer_size}, "
        f"staleness {args.staleness}, max-staleness {args.max_staleness}; target accuracy "
        f"{args.target:g}; {platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"cores, {time.perf_counter() - started:.0f} s in all.\n"
    )
    ok = True
    for mix, rows in results.items():
        print(f"**{mix}**\n")
        print(
            "| seed | FedAvg: simulated s to target (rounds) | FedBuff: simulated s to target "
            "(versions) | speed-up | FedAvg wall s (to target) | FedBuff wall s (to target) "
            "| FedBuff stale updates dropped / used |"
        )
        print("|---|---|---|---|---|---|---|")
        ratios = []
        for seed, fa, fb in rows:
            ratio = (
                fa["sim_to_target"] / fb["sim_to_target"]
                if fa["sim_to_target"] and fb["sim_to_target"]
                else None
            )
            if ratio is not None:
                ratios.append(ratio)
            print(
                f"| {seed} | {_fmt(fa['sim_to_target'])} ({fa['rounds_to_target'] or '-'}) | "
                f"{_fmt(fb['sim_to_target'])} ({fb['rounds_to_target'] or '-'}) | "
                f"{_fmt(ratio, '.2f')}x | {fa['wall']:.1f} ({_fmt(fa['wall_to_target'])}) | "
                f"{fb['wall']:.1f} ({_fmt(fb['wall_to_target'])}) | "
                f"{fb['stale']} / {fb['updates']} |"
            )
        reached_all = len(ratios) == len(rows)
        ok = ok and reached_all and min(ratios, default=0.0) >= 1.5
        if ratios:
            print(
                f"\nSpeed-up (FedAvg / FedBuff simulated time to {args.target:g}): mean "
                f"{statistics.fmean(ratios):.2f}x, lowest {min(ratios):.2f}x over "
                f"{len(ratios)} seed(s){'' if reached_all else '; some runs never reached it'}"
                " (goal: at least 1.5x).\n"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
