"""GPU check: train on CUDA, export that model to ONNX, check onnxruntime parity.

Run by ``bench/gpu_check.sh`` on a machine with a GPU (CI never needs one).
``--device cpu`` runs the same steps without a GPU, to check the script itself.
Exits non-zero if any check fails; prints one table (check, result, ok) and,
for the cohort fast path, a timing table (the anchor: the per-client loop on
the same device in the same run).

Checks:

1. ``fedscale.training.train`` on the device lowers the loss, and the weights
   live on the device.
2. fedscale's own export path (``fedscale.export.export_onnx``, what the server
   and the edge client run) takes the device-trained model and writes an ONNX
   model that matches torch at batch 1, 32 and 1000.
3. A direct trace of the model *on the device* (``torch.onnx.export`` of the CUDA
   module) matches torch on the CPU and on the device (TF32 off for the compare).
4. The cohort fast path (``fedscale.cohort.train_cohort``, vmap engine) on the
   device gives the per-client loop's weights for the same seeds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedscale.cohort import train_cohort
from fedscale.export import export_onnx
from fedscale.models import build_model
from fedscale.training import evaluate, resolve_device, train

BATCHES = (1, 32, 1000)
ATOL, RTOL = 1e-5, 1e-4
COHORT_CLIENTS = 64


def data() -> tuple[np.ndarray, np.ndarray, str]:
    try:
        from fedscale.datasets import load_dataset

        ds = load_dataset("digits", seed=0, test_fraction=0.2)
        return np.asarray(ds.x_train), np.asarray(ds.y_train), "digits"
    except Exception as err:  # the device image may lack scikit-learn
        print(f"digits unavailable ({err}); using a seeded synthetic task", file=sys.stderr)
        rng = np.random.default_rng(0)
        y = rng.integers(0, 10, 2000)
        x = rng.normal(size=(2000, 1, 8, 8)).astype(np.float32) + y[:, None, None, None] / 3
        return x.astype(np.float32), y.astype(np.int64), "synthetic"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cohort_check(
    x: np.ndarray, y: np.ndarray, device: torch.device, rows: list[tuple[str, str, bool]]
) -> list[tuple[str, float]]:
    """The fast path against the per-client loop on ``device``; returns timings."""
    model = build_model("cnn", tuple(x.shape[1:]), 10, seed=1)
    shards = np.array_split(np.arange(len(x)), COHORT_CLIENTS)
    datasets = [(x[s], y[s]) for s in shards]
    seeds = list(range(COHORT_CLIENTS))
    kwargs: dict[str, Any] = {"epochs": 1, "batch_size": 16, "lr": 0.05}

    def loop() -> list[dict[str, torch.Tensor]]:
        out = []
        for (xc, yc), seed in zip(datasets, seeds, strict=True):
            local = build_model("cnn", tuple(x.shape[1:]), 10, seed=1).to(device)
            train(local, xc, yc, device=device, seed=seed, **kwargs)
            out.append({n: p.detach() for n, p in local.named_parameters()})
        return out

    def cohort() -> Any:
        return train_cohort(
            model, datasets, seeds=seeds, device=device, method="vmap", chunk_size=None, **kwargs
        )

    timings = []
    for name, fn in (("per-client loop", loop), ("cohort (vmap)", cohort)):
        fn()  # warm-up: kernels, allocator
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        timings.append((name, time.perf_counter() - start))
        if name == "per-client loop":
            reference = result
        else:
            trained = result
    worst = max(
        float((trained.state_dict(i)[n].to("cpu") - ref[n].to("cpu")).abs().max())
        for i, ref in enumerate(reference)
        for n in ref
    )
    rows.append(
        (
            f"cohort fast path on {device}, {COHORT_CLIENTS} clients",
            f"max abs weight difference to the per-client loop {worst:.2e}",
            worst < 1e-4,
        )
    )
    return timings


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda":
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}")
        # Exact float32 on the device: TF32 convolutions would differ from the CPU by ~1e-3.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    x, y, source = data()
    rows: list[tuple[str, str, bool]] = []

    # 1. Train a few epochs on the device.
    model = build_model("cnn", tuple(x.shape[1:]), 10, seed=0)
    before = evaluate(model, x, y, device=device)
    start = time.perf_counter()
    result = train(model, x, y, epochs=10, batch_size=32, lr=0.1, device=device, seed=0)
    seconds = time.perf_counter() - start
    after = evaluate(model, x, y, device=device)
    on_device = next(model.parameters()).device.type == device.type
    rows.append(
        (
            f"train on {device} ({source})",
            f"{result.steps} steps in {seconds:.2f} s; loss {before.loss:.3f} -> "
            f"{after.loss:.3f}, accuracy {after.accuracy:.3f}",
            on_device and after.loss < before.loss,
        )
    )

    # 2. fedscale's export path, handed the device-trained model.
    exported = export_onnx(model, tuple(x.shape[1:]), seed=0, what="gpu-trained cnn")
    still_on_device = next(model.parameters()).device.type == device.type
    parity = ", ".join(f"b{c.batch_size} {c.max_abs_error:.1e}" for c in exported.parity)
    rows.append(
        (
            "fedscale export_onnx of the device model",
            f"{len(exported.model)} bytes, opset {exported.opset}; parity {parity}",
            still_on_device and [c.batch_size for c in exported.parity] == list(BATCHES),
        )
    )

    # 3. A direct trace of the module on the device, then onnxruntime against torch.
    import onnx
    import onnxruntime as ort

    model.eval()
    path = Path(tempfile.mkdtemp()) / "model.onnx"
    example = torch.from_numpy(np.array(x[:2])).to(device)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
    )
    onnx.checker.check_model(str(path))
    rows.append((f"torch.onnx.export on {device}", f"{path.stat().st_size} bytes, opset 17", True))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    served = ort.InferenceSession(exported.model, providers=["CPUExecutionProvider"])
    cpu_model = build_model("cnn", tuple(x.shape[1:]), 10, seed=0)
    cpu_model.load_state_dict({k: v.to("cpu") for k, v in model.state_dict().items()})
    cpu_model.eval()
    rng = np.random.default_rng(1)
    for batch in BATCHES:
        inputs = rng.normal(size=(batch, *x.shape[1:])).astype(np.float32)
        got = session.run(None, {"input": inputs})[0]
        got_served = served.run(None, {served.get_inputs()[0].name: inputs})[0]
        with torch.no_grad():
            want_cpu = cpu_model(torch.from_numpy(inputs)).numpy()
            want_dev = model(torch.from_numpy(inputs).to(device)).cpu().numpy()
        for label, a, b in (
            ("device trace vs torch cpu", got, want_cpu),
            (f"device trace vs torch {device.type}", got, want_dev),
            ("fedscale export vs torch cpu", got_served, want_cpu),
        ):
            ok = bool(np.allclose(a, b, atol=ATOL, rtol=RTOL))
            err = float(np.abs(a - b).max())
            rows.append((f"onnxruntime {label}, batch {batch}", f"max abs {err:.2e}", ok))

    # 4. The cohort fast path on the device.
    timings = cohort_check(x, y, device, rows)

    width = max(len(r[0]) for r in rows)
    print(f"| {'check':{width}} | result | ok |")
    print(f"|{'-' * (width + 2)}|---|---|")
    for name, detail, ok in rows:
        print(f"| {name:{width}} | {detail} | {'yes' if ok else 'NO'} |")
    anchor = timings[0][1]
    print(f"\n| {COHORT_CLIENTS} clients, 1 epoch, on {device} | seconds | vs loop |")
    print("|---|---|---|")
    for name, secs in timings:
        print(f"| {name} | {secs:.3f} | {anchor / secs:.2f}x |")
    return 0 if all(ok for _, _, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
