"""``fedscale export``: turn any round's saved global model into a checked ONNX file."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .output import JsonOutput, Quiet

if TYPE_CHECKING:
    import numpy.typing as npt
    import torch
    from rich.console import Console

    from fedscale.export import OnnxExport

__all__ = ["register"]

_CHECKPOINT = re.compile(r"^round-(\d{4,})\.safetensors$")


def register(app: typer.Typer) -> None:
    """Add ``fedscale export`` to ``app``."""
    app.command("export")(export)


def export(
    run_dir: Annotated[
        Path, typer.Argument(help="A run folder (config.toml, checkpoints/).", show_default=False)
    ],
    round_: Annotated[
        int | None,
        typer.Option("--round", help="Which round's global model (default: the last saved)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Where to write it (default: RUN_DIR/exported/model-<round>.onnx)."),
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="int8: dynamic int8 quantization of MatMul/Gemm; reports accuracy drift."
        ),
    ] = None,
    quiet: Quiet = False,
    json_output: JsonOutput = False,
) -> None:
    """Export a run's global model to ONNX, checked against torch before it is written."""
    from .main import _errors, _output, stdout

    with _output(quiet, json_output) as output, _errors():
        result = _export(run_dir, round_, out, quantize)
        output.result(_as_json(*result), lambda: _report(stdout, *result))


def _export(
    run_dir: Path, server_round: int | None, out: Path | None, quantize: str | None
) -> tuple[Path, OnnxExport, int]:
    from fedscale.datasets import load_dataset
    from fedscale.exceptions import ConfigError, DataError
    from fedscale.export import QUANTIZATIONS, OnnxExporter
    from fedscale.files import atomic_write
    from fedscale.models import build_model
    from fedscale.modelstore import model_file_name
    from fedscale.records import load_arrays_into, state_dict_to_arrays
    from fedscale.runs import RunDirectory
    from fedscale.settings import RunSettings

    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ConfigError(
            f"--quantize: expected one of {', '.join(QUANTIZATIONS)}, got {quantize!r}"
        )
    run = RunDirectory(run_dir)
    if not run.config_path.is_file():
        raise DataError(f"run folder {run.path}: expected config.toml, found none")
    try:
        config = tomllib.loads(run.config_path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{run.config_path}: expected TOML, got unreadable text ({err})") from err
    # Absent keys (a run from before a setting existed) keep their defaults.
    settings = RunSettings.from_run_config(config)
    server_round = _pick_round(run.checkpoints, server_round)

    dataset = load_dataset(
        settings.dataset,
        seed=settings.seed,
        test_fraction=settings.test_fraction,
        label_column=settings.label_column,
    )
    model = build_model(settings.model, dataset.sample_shape, dataset.num_classes)
    load_arrays_into(model, state_dict_to_arrays(_as_tensors(run.load_global_model(server_round))))

    what = f"model {settings.model!r} of round {server_round}"
    exporter = OnnxExporter.for_data(dataset.x_train)
    exported = exporter.export(model, what=what)
    if quantize is not None:
        exported = exporter.quantize(
            exported, dataset.x_test, dataset.y_test, mode=quantize, what=what
        )
    if out is None:
        name = model_file_name(server_round)
        if quantize is not None:
            name = name.replace(".onnx", f"-{quantize}.onnx")
        out = run.path / "exported" / name
    out = out.absolute()
    if out.is_dir():
        raise ConfigError(f"--out: expected a file path, got the folder {out}")
    atomic_write(out, exported.model)
    return out, exported, server_round


def _pick_round(checkpoints: Path, wanted: int | None) -> int:
    from fedscale.exceptions import DataError

    saved = sorted(
        int(m.group(1))
        for p in (checkpoints.iterdir() if checkpoints.is_dir() else ())
        if (m := _CHECKPOINT.match(p.name))
    )
    if not saved:
        raise DataError(f"{checkpoints}: expected round-NNNN.safetensors checkpoints, found none")
    if wanted is None:
        return saved[-1]
    if wanted not in saved:
        shown = ", ".join(map(str, saved[:20])) + (", ..." if len(saved) > 20 else "")
        raise DataError(f"--round: expected one of the saved rounds ({shown}), got {wanted}")
    return wanted


def _as_tensors(arrays: Mapping[str, npt.NDArray[Any]]) -> dict[str, torch.Tensor]:
    import torch

    return {key: torch.from_numpy(value.copy()) for key, value in arrays.items()}


def _as_json(path: Path, exported: OnnxExport, server_round: int) -> dict[str, Any]:
    drift = exported.drift
    return {
        "event": "export",
        "round": server_round,
        "path": str(path),
        "sha256": exported.sha256,
        "bytes": len(exported.model),
        "opset": exported.opset,
        "inputs": [t.to_json() for t in exported.inputs],
        "outputs": [t.to_json() for t in exported.outputs],
        "parity": [
            {"batch_size": p.batch_size, "max_abs_error": p.max_abs_error} for p in exported.parity
        ],
        "quantization": exported.quantization,
        "drift": None
        if drift is None
        else {
            "num_examples": drift.num_examples,
            "fp32_accuracy": drift.fp32_accuracy,
            "int8_accuracy": drift.int8_accuracy,
            "accuracy_change": drift.accuracy_change,
            "agreement": drift.agreement,
        },
    }


def _report(console: Console, path: Path, exported: OnnxExport, server_round: int) -> None:
    from rich.table import Table

    from fedscale.modelstore import TensorSpec

    def spec(t: TensorSpec) -> str:
        return f"{t.name} {t.datatype} {list(t.shape)}"

    # One fact per line, never wrapped: scripts read the path and the sha256.
    lines = [
        f"round {server_round}: {path}",
        f"sha256 {exported.sha256}  {len(exported.model)} bytes  opset {exported.opset}",
        f"inputs {', '.join(map(spec, exported.inputs))}; "
        f"outputs {', '.join(map(spec, exported.outputs))}",
        "fp32 parity with torch (max abs error): "
        + ", ".join(f"batch {p.batch_size}: {p.max_abs_error:.2g}" for p in exported.parity),
    ]
    for line in lines:
        console.print(line, soft_wrap=True, highlight=False, markup=False)
    drift = exported.drift
    if drift is None:
        return
    table = Table(
        title=f"{exported.quantization} accuracy drift on {drift.num_examples} test examples"
    )
    table.add_column("fp32 accuracy", justify="right")
    table.add_column(f"{exported.quantization} accuracy", justify="right")
    table.add_column("change", justify="right")
    table.add_column("predictions agree", justify="right")
    table.add_row(
        f"{drift.fp32_accuracy:.4f}",
        f"{drift.int8_accuracy:.4f}",
        f"{drift.accuracy_change:+.4f}",
        f"{drift.agreement:.2%}",
    )
    console.print(table)
