"""fedscale's in-process engine against Flower's Ray engine and a plain torch loop.

One run measures, for each workload, three ways of doing the same federated
training (a 10k-parameter MLP on digits, Dirichlet 0.5 partitions, 1 local epoch,
batch 16, SGD lr 0.05, FedAvg, the global model evaluated on the test split after
every round):

- ``plain``: a plain torch loop in one process with one torch thread (the floor),
- ``inprocess``: ``fedscale simulate`` on fedscale's in-process engine,
- ``ray``: ``fedscale simulate --engine ray``, the same apps on Flower's Ray engine.

Each variant runs as a fresh process, so start-up (imports, Ray) counts, as it does
for a user. Wall time is the process's; peak memory is the highest sum of RSS over
the process and all its descendants (Ray's raylet, GCS and actors included),
sampled every 50 ms; a steady round is the median of rounds 2 to R.

    python bench/sim_vs_flower.py            # both workloads, prints a table
    python bench/sim_vs_flower.py --quick    # fewer rounds, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LR = 0.05
EPOCHS = 1
BATCH = 16
PARTITION = "dirichlet:0.5"
SEED = 0

WORKLOADS = {
    "100 clients, all per round, 5 rounds": dict(clients=100, per_round=100, rounds=5),
    "1,000 clients, 100 per round, 5 rounds": dict(clients=1000, per_round=100, rounds=5),
}


# ----------------------------------------------------------------- the variants


def run_plain(clients: int, per_round: int, rounds: int, out: Path) -> None:
    """FedAvg as a plain loop: one process, one torch thread, no framework."""
    import random

    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    from fedscale.partition import partition_indices  # the same partitions as the engines

    torch.set_num_threads(1)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(SEED)
    test = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[: round((y == c).sum() * 0.2)] for c in range(10)]
    )
    train = np.setdiff1d(np.arange(len(y)), test)
    x_train, y_train, x_test, y_test = map(torch.from_numpy, (x[train], y[train], x[test], y[test]))
    parts = partition_indices(y[train], clients, PARTITION, SEED)
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = nn.CrossEntropyLoss()
    sampler = random.Random(SEED)
    rows = []
    for server_round in range(1, rounds + 1):
        start = time.perf_counter()
        chosen = sampler.sample(range(clients), per_round)
        total = sum(len(parts[c]) for c in chosen)
        new_state = {k: torch.zeros_like(v) for k, v in global_state.items()}
        for client in chosen:
            model.load_state_dict(global_state)
            optimizer = torch.optim.SGD(model.parameters(), lr=LR)
            xs, ys = x_train[parts[client]], y_train[parts[client]]
            generator = torch.Generator().manual_seed(server_round * 100_003 + client)
            for _ in range(EPOCHS):
                order = torch.randperm(len(xs), generator=generator)
                for i in range(0, len(xs), BATCH):
                    idx = order[i : i + BATCH]
                    optimizer.zero_grad()
                    loss_fn(model(xs[idx]), ys[idx]).backward()
                    optimizer.step()
            weight = len(parts[client]) / total
            for k, v in model.state_dict().items():
                new_state[k] += v * weight
        global_state = new_state
        model.load_state_dict(global_state)
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        rows.append(
            {"round": server_round, "accuracy": accuracy, "seconds": time.perf_counter() - start}
        )
    out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def run_fedscale(engine: str, clients: int, per_round: int, rounds: int, out: Path) -> None:
    """``fedscale simulate`` on one engine; its metrics.jsonl is the record."""
    from fedscale.simulations import simulate

    simulate(
        clients=clients,
        engine=engine,  # type: ignore[arg-type]
        clients_per_round=per_round,
        num_rounds=rounds,
        local_epochs=EPOCHS,
        batch_size=BATCH,
        lr=LR,
        partition=PARTITION,
        seed=SEED,
        device="cpu",
        out=str(out),
    )


# ----------------------------------------------------------------- measurement


def _tree_rss(root: int) -> int:
    """Sum of RSS (bytes) of ``root`` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            pid = int(stat.parent.name)
            parents[pid] = int(fields[1])
            rss[pid] = int(fields[21]) * page
        except (OSError, ValueError, IndexError):
            continue
    total, frontier = 0, [root]
    seen = set()
    while frontier:
        pid = frontier.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += rss.get(pid, 0)
        frontier += [child for child, parent in parents.items() if parent == pid]
    return total


def measure(variant: str, workload: dict[str, int], workdir: Path) -> dict[str, float]:
    """Run one variant in a fresh process; return wall time, memory and round times."""
    out = workdir / f"{variant}-{workload['clients']}"
    argv = [sys.executable, __file__, "--worker", variant, "--out", str(out)]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in workload.items()]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(process.pid))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate(timeout=1800)
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{stderr.decode()[-3000:]}")
    metrics = out if variant == "plain" else out / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rounds = [r for r in rows if r["round"] > 0]
    return {
        "wall": wall,
        "peak_mb": peak / 2**20,
        "steady": statistics.median(r["seconds"] for r in rounds[1:]),
        "first": rounds[0]["seconds"],
        "accuracy": rounds[-1]["accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=["plain", "inprocess", "ray"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--per-round", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--quick", action="store_true", help="3 rounds per workload")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    if args.worker:
        if args.worker == "plain":
            run_plain(args.clients, args.per_round, args.rounds, args.out)
        else:
            run_fedscale(args.worker, args.clients, args.per_round, args.rounds, args.out)
        return

    results = {}
    with tempfile.TemporaryDirectory(prefix="fedscale-bench-") as tmp:
        for name, workload in WORKLOADS.items():
            if args.quick:
                workload = {**workload, "rounds": 3}
            for variant in ("plain", "inprocess", "ray"):
                results[(name, variant)] = measure(variant, workload, Path(tmp))
                print(f"  measured {variant:9s} {name}", file=sys.stderr, flush=True)

    header = (
        "| workload | variant | wall (s) | steady round (s) | first round (s) | peak memory (MB) "
        "| final accuracy | wall vs plain | wall vs ray | steady vs plain |"
    )
    print(header)
    print("|" + "---|" * 10)
    for (name, variant), r in results.items():
        plain, ray = results[(name, "plain")], results[(name, "ray")]
        print(
            f"| {name} | {variant} | {r['wall']:.2f} | {r['steady']:.3f} | {r['first']:.3f} "
            f"| {r['peak_mb']:.0f} | {r['accuracy']:.4f} | {r['wall'] / plain['wall']:.2f}x "
            f"| {ray['wall'] / r['wall']:.2f}x faster | {r['steady'] / plain['steady']:.2f}x |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({f"{n} / {v}": r for (n, v), r in results.items()}, indent=2)
        )


if __name__ == "__main__":
    main()
