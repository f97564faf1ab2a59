"""GPU check: train on CUDA, export that model to ONNX, check onnxruntime parity.

Run by ``bench/gpu_check.sh`` on a machine with a GPU (CI never needs one).
``--device cpu`` runs the same steps without a GPU, to check the script itself.
Exits non-zero if any step fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedscale.models import build_model
from fedscale.training import evaluate, resolve_device, train

BATCHES = (1, 32, 1000)
ATOL, RTOL = 1e-5, 1e-4


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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = resolve_device(args.device)
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
            f"{result.steps} steps in {seconds:.2f} s; loss {before.loss:.3f} -> {after.loss:.3f}",
            on_device and after.loss < before.loss,
        )
    )

    # 2. Export the trained model, still on the device, to ONNX (dynamic batch).
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
    rows.append((f"export from {device} to ONNX", f"{path.stat().st_size} bytes, opset 17", True))

    # 3. onnxruntime against torch (on the CPU, the same weights), batch 1/32/1000.
    cpu_model = model.to("cpu").eval()
    providers = ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), providers=providers)
    rng = np.random.default_rng(1)
    for batch in BATCHES:
        inputs = rng.normal(size=(batch, *x.shape[1:])).astype(np.float32)
        got = session.run(None, {"input": inputs})[0]
        with torch.no_grad():
            want = cpu_model(torch.from_numpy(inputs)).numpy()
        ok = np.allclose(got, want, atol=ATOL, rtol=RTOL)
        err = float(np.abs(got - want).max())
        rows.append((f"onnxruntime parity, batch {batch}", f"max abs error {err:.2e}", ok))

    width = max(len(r[0]) for r in rows)
    print(f"| {'check':{width}} | result | ok |")
    for name, detail, ok in rows:
        print(f"| {name:{width}} | {detail} | {'yes' if ok else 'NO'} |")
    return 0 if all(ok for _, _, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
