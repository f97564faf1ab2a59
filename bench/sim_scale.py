"""Simulation at scale: fedscale's engine against Flower's Ray engine and a plain torch loop.

One run measures (issue 4's scaling report):

1. Two workloads, each done four ways:

   - ``digits``: 1,000 clients, 100 per round, 5 rounds (a 9k-parameter MLP,
     Dirichlet 0.5 partitions, 1 local epoch, batch 16, SGD lr 0.05);
   - ``synthetic``: 10,000 clients of ``synthetic:1,1``, 1,000 per round, 3 rounds
     (the same MLP builder on 60 features, 1 local epoch, batch 10, lr 0.01, as
     in FedProx);

   (a) ``plain``: a plain torch loop in one process with one torch thread, the
   floor: the same model, the same client data (fedscale's own partitions, or the
   synthetic clients from ``fedscale.node_data`` as the engines build them), the
   same settings, FedAvg, the global model evaluated on the same test set after
   every round; (b) ``ray``: ``simulate(engine="ray")``, fedscale's apps on
   Flower's Ray engine; (c) ``general``: fedscale's in-process engine, one
   ClientApp call per message (``fast_path=False``), with its default
   ``workers="auto"`` (worker processes on every core once a client's call costs
   8x or more its message's wire form: on synthetic, not on digits); (d) ``fast``: the same engine
   training each round's cohort at once (``fast_path=True``). The fedscale variants
   run with ``export-onnx = false``, so every variant does training only.

2. Memory bounds: 100,000 synthetic clients with 1,000 per round (under 2 GiB peak
   RSS), and a 1,000,000-client federation (with the ``mobile`` device mix) created
   and sampled (under 1 GiB).

3. Round cost against federation size: 1,000, 10,000 and 100,000 synthetic clients
   with 100 per round, on the general path (the goal: at most 1.5x growth).

4. Client updates per second against clients per round (10, 100, 1,000) for (c)
   and (d), and for (c) against worker processes (``simulate(workers=N)``, N = 1,
   2, 4, ... up to the machine's cores) at 100 and 1,000 per round. With three or
   more worker counts the universal scalability law is fitted (``bench/usl.py``:
   contention sigma, coherency kappa, and the worker count where adding workers
   stops paying); with two cores there are two points, reported as measured.

Each variant runs as a fresh process, so start-up (imports, Ray) counts, as it
does for a user. Wall time is the process's; peak memory is the highest sum of RSS
over the process and all its descendants (Ray's raylet, GCS and actors included),
sampled every 50 ms; a steady round is the median of rounds 2 to R.

    python bench/sim_scale.py                  # everything, prints markdown tables
    python bench/sim_scale.py --quick          # tiny rounds: a smoke test
    python bench/sim_scale.py --only c,d --skip-ray --json results.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SEED = 0
VARIANTS = {"a": "plain", "b": "ray", "c": "general", "d": "fast"}
WORKLOADS: dict[str, dict[str, Any]] = {
    "digits": dict(
        dataset="digits",
        partition="dirichlet:0.5",
        clients=1000,
        per_round=100,
        rounds=5,
        lr=0.05,
        batch=16,
        epochs=1,
    ),
    "synthetic": dict(
        dataset="synthetic:1,1",
        partition="iid",
        clients=10_000,
        per_round=1000,
        rounds=3,
        lr=0.01,
        batch=10,
        epochs=1,
    ),
}
QUICK = {
    "digits": dict(clients=100, per_round=20, rounds=3),
    "synthetic": dict(clients=1000, per_round=50, rounds=3),
}
MEMORY_100K = dict(clients=100_000, per_round=1000, rounds=2)
SWEEP_SIZES = (1000, 10_000, 100_000)
SWEEP_PER_ROUND = 100
SWEEP_ROUNDS = 6  # synthetic clients' sizes are heavy-tailed: a median over 5 steady rounds
THROUGHPUT_PER_ROUND = (10, 100, 1000)
WORKERS_PER_ROUND = (100, 1000)


def worker_counts(cpus: int) -> list[int]:
    """1, 2, 4, ... up to ``cpus`` (and ``cpus`` itself): the worker sweep's points."""
    counts = [1]
    while counts[-1] * 2 <= cpus:
        counts.append(counts[-1] * 2)
    if counts[-1] != cpus and cpus > 1:
        counts.append(cpus)
    return counts


TIMEOUT_S = 900  # per variant; a variant that runs longer is reported as such
# Issue 4's measurements of Flower 1.42's Ray engine (digits MLP, 100 per round,
# 2 cores): seconds per steady round by federation size. Context, not this run.
RAY_CONTEXT = {1000: 0.5, 10_000: 1.7, 100_000: 11.7}


# ----------------------------------------------------------------- the variants


def _settings(w: dict[str, Any], out: Path) -> Any:
    from fedscale.settings import RunSettings

    return RunSettings(
        num_clients=w["clients"],
        clients_per_round=w["per_round"],
        num_rounds=w["rounds"],
        dataset=w["dataset"],
        partition=w["partition"],
        model="mlp",
        local_epochs=w["epochs"],
        batch_size=w["batch"],
        lr=w["lr"],
        seed=SEED,
        device="cpu",
        fraction_evaluate=0.0,
        export_onnx=False,
        out=str(out),
    )


def run_plain(w: dict[str, Any], out: Path) -> None:
    """FedAvg as a plain loop: one process, one torch thread, no framework."""
    import random

    import torch
    from torch import nn

    from fedscale.models import build_model
    from fedscale.node_data import node_data
    from fedscale.server.federation import server_data

    torch.set_num_threads(1)
    settings = _settings(w, out)
    test = server_data(settings)  # the engines' test set
    x_test, y_test = torch.from_numpy(test.x_test), torch.from_numpy(test.y_test)
    torch.manual_seed(SEED)
    model = build_model("mlp", test.sample_shape, test.num_classes)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = nn.CrossEntropyLoss()
    sampler = random.Random(SEED)
    rows = []
    for server_round in range(1, w["rounds"] + 1):
        start = time.perf_counter()
        chosen = sampler.sample(range(w["clients"]), w["per_round"])
        # The clients' data as the engines get it (partitions, or synthetic clients
        # generated from their seeds by fedscale.population.data_provider).
        data = [
            node_data(settings, {"partition-id": c, "num-partitions": w["clients"]}) for c in chosen
        ]
        total = sum(len(d.y_train) for d in data)
        new_state = {k: torch.zeros_like(v) for k, v in global_state.items()}
        for client, d in zip(chosen, data, strict=True):
            model.load_state_dict(global_state)
            optimizer = torch.optim.SGD(model.parameters(), lr=w["lr"])
            xs, ys = torch.from_numpy(d.x_train.copy()), torch.from_numpy(d.y_train.copy())
            generator = torch.Generator().manual_seed(server_round * 100_003 + client)
            for _ in range(w["epochs"]):
                order = torch.randperm(len(xs), generator=generator)
                for i in range(0, len(xs), w["batch"]):
                    idx = order[i : i + w["batch"]]
                    optimizer.zero_grad()
                    loss_fn(model(xs[idx]), ys[idx]).backward()
                    optimizer.step()
            weight = len(ys) / total
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


def run_fedscale(variant: str, w: dict[str, Any], out: Path) -> None:
    """``simulate`` on one engine and path; its metrics.jsonl is the record."""
    from fedscale.simulations import simulate

    simulate(
        _settings(w, out),
        engine="ray" if variant == "ray" else "inprocess",
        fast_path=variant == "fast",
        workers=w.get("workers", "auto"),  # the default: workers where they pay
    )


def run_population(clients: int, out: Path) -> None:
    """Create a federation of ``clients`` simulated devices and sample a round of it."""
    import random

    from fedscale.node_data import node_data
    from fedscale.simulations.system import system_for

    settings = _settings(
        dict(WORKLOADS["synthetic"], clients=clients, per_round=1000, rounds=1), out
    ).replace(device_mix="mobile")
    start = time.perf_counter()
    system = system_for(settings)
    online = system.online_node_ids()
    chosen = random.Random(SEED).sample(online, 1000)
    plan = system.plan_round(
        1, chosen, k=1000, model_bytes=40_000, update_bytes=40_000, local_epochs=1
    )
    first = system.first_node_id
    samples = sum(
        len(node_data(settings, {"partition-id": n - first, "num-partitions": clients}).y_train)
        for n in sorted(plan.accepted_nodes)
    )
    row = {
        "clients": clients,
        "online": len(online),
        "accepted": len(plan.accepted_nodes),
        "samples": samples,
        "seconds": time.perf_counter() - start,
    }
    out.write_text(json.dumps(row) + "\n")


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


_RUNS = itertools.count(1)


def measure(variant: str, w: dict[str, Any], workdir: Path, timeout: float) -> dict[str, Any]:
    """Run one variant in a fresh process; return wall time, memory and round times."""
    # A fresh folder for every measurement, even of the same settings.
    out = workdir / (
        f"{next(_RUNS):03d}-{variant}-{w['dataset'].replace(':', '_')}-{w['clients']}"
        f"-{w['per_round']}"
    )
    argv = [sys.executable, __file__, "--worker", variant, "--out", str(out)]
    argv += ["--workload", json.dumps(w)]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    start = time.perf_counter()
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(process.pid))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)  # its own session: Ray's processes go with it
        process.communicate()
        stop.set()
        sampler.join()
        return {"timeout": timeout, "peak_mb": peak / 2**20}
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{stderr.decode()[-3000:]}")
    metrics = out if variant in ("plain", "population") else out / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    result: dict[str, Any] = {"wall": wall, "peak_mb": peak / 2**20}
    if variant == "population":
        return {**result, **rows[0]}
    rounds = [r for r in rows if r["round"] > 0]
    return {
        **result,
        "steady": statistics.median(r["seconds"] for r in rounds[1:] or rounds),
        "first": rounds[0]["seconds"],
        "accuracy": rounds[-1]["accuracy"],
    }


# ----------------------------------------------------------------- reporting


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def _ratio(num: dict[str, Any] | None, den: dict[str, Any] | None, key: str) -> float | None:
    if not num or not den or key not in num or key not in den or not den[key]:
        return None
    return float(num[key]) / float(den[key])


def report(results: dict[str, Any], only: list[str]) -> list[str]:
    """Return the markdown tables and the goals' verdicts."""
    lines = []
    for name in WORKLOADS:
        rows = results["workloads"].get(name, {})
        if not rows:
            continue
        w = results["settings"][name]
        lines += [
            f"**{name}**: {w['clients']:,} clients, {w['per_round']:,} per round, "
            f"{w['rounds']} rounds ({w['dataset']}, {w['partition']}, lr {w['lr']}, "
            f"batch {w['batch']}, {w['epochs']} local epoch)",
            "",
            "| variant | wall (s) | steady round (s) | first round (s) | peak RSS (MB) "
            "| final accuracy | wall vs (a) | steady vs (a) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        plain = rows.get("plain")
        for key in only:
            variant = VARIANTS[key]
            r = rows.get(variant)
            if r is None:
                continue
            label = f"({key}) {variant}"
            if "timeout" in r:
                lines.append(
                    f"| {label} | timed out after {r['timeout']:.0f} s | - | - "
                    f"| {r['peak_mb']:.0f} | - | - | - |"
                )
                continue
            lines.append(
                f"| {label} | {r['wall']:.2f} | {r['steady']:.3f} | {r['first']:.3f} "
                f"| {r['peak_mb']:.0f} | {r['accuracy']:.4f} "
                f"| {_fmt(_ratio(r, plain, 'wall'))}x | {_fmt(_ratio(r, plain, 'steady'))}x |"
            )
        lines.append("")
    lines += ["**Goals**", "", "| goal | workload | measured | verdict |", "|---|---|---|---|"]
    for name, rows in results["workloads"].items():
        a, b, c, d = (rows.get(VARIANTS[k]) for k in "abcd")
        b_ok = b if b and "timeout" not in b else None
        goals = [
            ("(c) >= 10x faster than (b) per steady round", _ratio(b_ok, c, "steady"), 10.0),
            ("(c) within 1.3x of (a) end to end", _ratio(c, a, "wall"), 1.3),
            ("(d) >= 1.5x faster than (a) per steady round", _ratio(a, d, "steady"), 1.5),
        ]
        if name == "synthetic":
            goals.insert(1, ("(c) >= 5x faster than (b) end to end", _ratio(b_ok, c, "wall"), 5.0))
        for goal, value, bound in goals:
            ok = None if value is None else (value <= bound if "within" in goal else value >= bound)
            lines.append(f"| {goal} | {name} | {_fmt(value)}x | {_verdict(ok)} |")
        if b and "timeout" in b:
            lines.append(f"| (b) timed out after {b['timeout']:.0f} s | {name} | - | MISS |")
    mem = results.get("memory", {})
    if mem:
        lines += ["", "**Memory bounds**", "", "| run | peak RSS (MB) | bound | verdict |"]
        lines.append("|---|---|---|---|")
        big = mem.get("100k")
        if big:
            ok = "timeout" not in big and big["peak_mb"] < 2048
            extra = "" if "timeout" in big else f", steady round {big['steady']:.2f} s"
            lines.append(
                f"| 100,000 clients, 1,000 per round, {MEMORY_100K['rounds']} rounds "
                f"(fast path{extra}) | {big['peak_mb']:.0f} | 2,048 | {_verdict(ok)} |"
            )
        mil = mem.get("1m")
        if mil:
            ok = "timeout" not in mil and mil["peak_mb"] < 1024
            lines.append(
                f"| {mil.get('clients', 0):,} clients created and sampled "
                f"({mil.get('online', 0):,} online, "
                f"{mil.get('accepted', 0):,} accepted, their data built, "
                f"{mil.get('wall', 0):.1f} s) | {mil['peak_mb']:.0f} | 1,024 | {_verdict(ok)} |"
            )
    sweep = results.get("sweep", {})
    if sweep:
        lines += [
            "",
            f"**Round cost against federation size** (synthetic, {SWEEP_PER_ROUND} per round, "
            "general path; Flower's Ray numbers are issue 4's measurement on digits, "
            "not measured in this run)",
            "",
            "| clients | (c) steady round (s) | vs 1,000 | peak RSS (MB) | Ray, from issue 4 (s) |",
            "|---|---|---|---|---|",
        ]
        base = sweep.get(str(SWEEP_SIZES[0]))
        worst, largest = 0.0, SWEEP_SIZES[0]
        for size in SWEEP_SIZES:
            r = sweep.get(str(size))
            if not r:
                continue
            growth = _ratio(r, base, "steady")
            worst, largest = max(worst, growth or 0.0), size
            lines.append(
                f"| {size:,} | {r['steady']:.3f} | {_fmt(growth)}x | {r['peak_mb']:.0f} "
                f"| {RAY_CONTEXT[size]} |"
            )
        lines += [
            "",
            f"Largest growth over 1,000 clients, up to {largest:,}: {worst:.2f}x "
            f"(goal <= 1.5x): {_verdict(worst <= 1.5 if base else None)}",
        ]
    throughput = results.get("throughput", {})
    if throughput:
        lines += [
            "",
            "**Client updates per second** (synthetic, 10,000 clients, steady rounds)",
            "",
            "| clients per round | (c) general | (d) fast |",
            "|---|---|---|",
        ]
        for per_round in THROUGHPUT_PER_ROUND:
            cells = []
            for variant in ("general", "fast"):
                r = throughput.get(f"{variant}-{per_round}")
                cells.append(_fmt(per_round / r["steady"], ".0f") if r and r.get("steady") else "-")
            lines.append(f"| {per_round:,} | {cells[0]} | {cells[1]} |")
    lines += _worker_report(results.get("workers", {}))
    return lines


def _worker_report(workers: dict[str, Any]) -> list[str]:
    if not workers:
        return []
    counts = sorted({int(key.split("-")[0]) for key in workers})
    per_rounds = sorted({int(key.split("-")[1]) for key in workers})
    lines = [
        "",
        "**Client updates per second against worker processes** (synthetic, 10,000 "
        "clients, general path, steady rounds)",
        "",
        "| clients per round | "
        + " | ".join(f"{n} worker{'s' if n > 1 else ''}" for n in counts)
        + " | best vs 1 worker |",
        "|---|" + "---|" * (len(counts) + 1),
    ]
    fits = []
    for per_round in per_rounds:
        rates = {}
        for n in counts:
            r = workers.get(f"{n}-{per_round}")
            if r and r.get("steady"):
                rates[n] = per_round / r["steady"]
        if not rates:
            continue
        best = max(rates.values()) / rates[1] if 1 in rates else None
        cells = [_fmt(rates[n], ".0f") if n in rates else "-" for n in counts]
        lines.append(f"| {per_round:,} | " + " | ".join(cells) + f" | {_fmt(best)}x |")
        if len(rates) >= 3:
            from usl import fit_usl, peak_workers

            ns = sorted(rates)
            sigma, kappa, lam = fit_usl(ns, [rates[n] for n in ns])
            fits.append(
                f"- {per_round:,} per round: contention sigma {sigma:.3f}, coherency kappa "
                f"{kappa:.4f}, one worker {lam:.0f} updates/s; adding workers stops paying "
                f"at about {peak_workers(sigma, kappa):.1f} workers."
            )
    if fits:
        lines += ["", "Universal scalability law, fitted (bench/usl.py):", *fits]
    else:
        lines += [
            "",
            f"{len(counts)} worker counts on this machine: the universal scalability law "
            "(three coefficients) needs at least three, so the points are reported as "
            "measured. Run on a machine with more cores for the fit.",
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=["plain", "ray", "general", "fast", "population"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny federations: a smoke test")
    parser.add_argument("--only", default="a,b,c,d", help="variants to run, e.g. a,c,d")
    parser.add_argument("--skip-ray", action="store_true", help="leave out (b), Flower's Ray")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--skip-workers", action="store_true", help="leave out the worker-process sweep"
    )
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per variant")
    args = parser.parse_args()

    if args.worker:
        w = json.loads(args.workload)
        if args.worker == "plain":
            run_plain(w, args.out)
        elif args.worker == "population":
            run_population(w["clients"], args.out)
        else:
            run_fedscale(args.worker, w, args.out)
        return

    only = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in only if k not in VARIANTS]
    if unknown:
        parser.error(f"--only: expected letters among a,b,c,d, got {','.join(unknown)}")
    if args.skip_ray:
        only = [k for k in only if k != "b"]

    def log(text: str) -> None:
        print(f"  {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)

    workloads = {n: {**w, **(QUICK[n] if args.quick else {})} for n, w in WORKLOADS.items()}
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cpus": os.cpu_count(),
        "settings": workloads,
        "workloads": {},
        "memory": {},
        "sweep": {},
        "throughput": {},
        "workers": {},
    }
    with tempfile.TemporaryDirectory(prefix="fedscale-bench-") as tmp:
        work = Path(tmp)
        for name, w in workloads.items():
            results["workloads"][name] = {}
            for key in only:
                variant = VARIANTS[key]
                results["workloads"][name][variant] = measure(variant, w, work, args.timeout)
                log(f"measured ({key}) {variant} on {name}")
        if "d" in only:
            big = dict(workloads["synthetic"], **MEMORY_100K)
            if args.quick:
                big.update(clients=10_000, per_round=100)
            results["memory"]["100k"] = measure("fast", big, work, args.timeout)
            log("measured the 100,000-client run")
            population = dict(workloads["synthetic"], clients=100_000 if args.quick else 10**6)
            results["memory"]["1m"] = measure("population", population, work, args.timeout)
            log("measured the 1,000,000-client federation")
        if "c" in only:
            for size in SWEEP_SIZES[:2] if args.quick else SWEEP_SIZES:
                w = dict(
                    workloads["synthetic"],
                    clients=size,
                    per_round=SWEEP_PER_ROUND,
                    rounds=SWEEP_ROUNDS,
                )
                results["sweep"][str(size)] = measure("general", w, work, args.timeout)
                log(f"measured the sweep at {size:,} clients")
        for key in ("c", "d"):
            if key not in only:
                continue
            variant = VARIANTS[key]
            for per_round in THROUGHPUT_PER_ROUND:
                if args.quick and per_round > 100:
                    continue
                synthetic = workloads["synthetic"]
                if per_round == synthetic["per_round"] and variant in results["workloads"].get(
                    "synthetic", {}
                ):
                    r = results["workloads"]["synthetic"][variant]
                elif (
                    variant == "general"
                    and per_round == SWEEP_PER_ROUND
                    and (str(synthetic["clients"]) in results["sweep"])
                ):
                    r = results["sweep"][str(synthetic["clients"])]
                else:
                    w = dict(synthetic, per_round=per_round, rounds=3)
                    r = measure(variant, w, work, args.timeout)
                    log(f"measured ({key}) {variant} at {per_round} per round")
                results["throughput"][f"{variant}-{per_round}"] = r

        if "c" in only and not args.skip_workers:
            synthetic = workloads["synthetic"]
            for per_round in (50,) if args.quick else WORKERS_PER_ROUND:
                for n in worker_counts(os.cpu_count() or 1):
                    # Explicit counts: (c) itself runs with the default, workers="auto".
                    w = dict(synthetic, per_round=per_round, rounds=3, workers=n)
                    results["workers"][f"{n}-{per_round}"] = measure(
                        "general", w, work, args.timeout
                    )
                    log(f"measured (c) general with {n} workers at {per_round} per round")

    lines = report(results, only)
    print(f"sim_scale: {results['date']}, {results['cpus']} CPUs, `{results['command']}`\n")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
