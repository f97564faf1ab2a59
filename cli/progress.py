"""Round-by-round progress and the final summary of a run, with rich."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

__all__ = ["RoundProgress", "install_round_handler", "print_summary"]


class RoundProgress:
    """A progress bar over rounds whose line shows the latest round's numbers."""

    def __init__(self, console: Console, total: int):
        self._progress = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task("rounds", total=total, status="starting")

    def __enter__(self) -> RoundProgress:
        self._progress.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _remove_round_handlers()
        self._progress.__exit__(exc_type, exc, tb)

    def update(self, row: dict[str, Any]) -> None:
        """Show one ``metrics.jsonl`` row."""
        status = (
            f"acc {_num(row.get('accuracy'))}  loss {_num(row.get('loss'))}  "
            f"{row.get('clients_replied', 0)}/{row.get('clients_sampled', 0)} clients"
        )
        self._progress.update(self._task, completed=row["round"], status=status)


class _RoundHandler(logging.Handler):
    def __init__(self, callback: Callable[[dict[str, Any]], None], key: str):
        super().__init__(logging.INFO)
        self._callback = callback
        self._key = key

    def emit(self, record: logging.LogRecord) -> None:
        round_record = getattr(record, self._key, None)
        if round_record is not None:
            self._callback(round_record.to_json())


def install_round_handler(callback: Callable[[dict[str, Any]], None]) -> None:
    """Call ``callback`` with each round's row as the server in this process logs it."""
    from fedscale.server import federation

    _remove_round_handlers()
    logger = logging.getLogger(federation.__name__)
    logger.addHandler(_RoundHandler(callback, federation.ROUND_EXTRA_KEY))
    logger.setLevel(logging.INFO)


def _remove_round_handlers() -> None:
    logger = logging.getLogger("fedscale.server.federation")
    for handler in [h for h in logger.handlers if isinstance(h, _RoundHandler)]:
        logger.removeHandler(handler)


def print_summary(console: Console, rows: list[dict[str, Any]], run_dir: Path) -> None:
    """Print the run's outcome; the last line states the final test accuracy."""
    final = rows[-1]
    best = max(rows, key=lambda r: r.get("accuracy") or 0.0)
    trained = [r for r in rows if r["round"] > 0]
    table = Table(title="fedscale run", show_header=False)
    table.add_row("rounds", str(final["round"]))
    table.add_row("initial accuracy", _num(rows[0].get("accuracy")))
    table.add_row("final loss", _num(final.get("loss")))
    table.add_row("best accuracy", f"{_num(best.get('accuracy'))} (round {best['round']})")
    if trained:
        replied = sum(r["clients_replied"] for r in trained) / len(trained)
        table.add_row("clients replied per round", f"{replied:.1f}")
        table.add_row("wall time", f"{final['elapsed']:.1f} s")
    table.add_row("run folder", str(run_dir))
    console.print(table)
    console.print(f"final test accuracy: {_num(final.get('accuracy'))}")


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"
