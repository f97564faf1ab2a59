"""``fedscale report``: plots and one self-contained HTML page for a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .output import JsonOutput, Quiet

__all__ = ["register", "report"]


def register(app: typer.Typer) -> None:
    """Add ``fedscale report`` to ``app``."""
    app.command("report")(report)


def report(
    run_dir: Annotated[
        Path,
        typer.Argument(help="A run folder (config.toml, metrics.jsonl).", show_default=False),
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Where to write the PNGs and index.html (default: RUN_DIR/report)."),
    ] = None,
    quiet: Quiet = False,
    json_output: JsonOutput = False,
) -> None:
    """Plot a run (accuracy, loss, clients, the data's partition) into PNGs and one HTML page."""
    from fedscale.report import build_report

    from .main import _errors, _output, console, stdout

    def show() -> None:
        for note in built.notes:
            console.print(f"[yellow]note:[/] {note}")
        for plot in built.plots:
            stdout.print(str(plot.path), soft_wrap=True, highlight=False)
        stdout.print(str(built.html), soft_wrap=True, highlight=False)

    with _output(quiet, json_output) as output, _errors():
        built = build_report(run_dir, out)
        output.result(
            {
                "event": "report",
                "html": str(built.html),
                "plots": [str(plot.path) for plot in built.plots],
                "notes": list(built.notes),
            },
            show,
        )
