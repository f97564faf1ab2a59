"""Round-by-round progress and the final summary of a run, with rich.

With a device model (``device-mix``) the rows carry the virtual clock
(``sim_elapsed``): the progress line shows the simulated time beside the wall
clock's ETA, and the summary the simulated time to a target accuracy.
"""

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

__all__ = [
    "RoundProgress",
    "install_round_handler",
    "print_summary",
    "remove_round_handlers",
    "run_summary",
    "sim_duration",
]


class RoundProgress:
    """A progress bar over rounds whose line shows the latest round's numbers."""

    def __init__(self, console: Console, total: int):
        self._progress = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TextColumn("ETA"),
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
        remove_round_handlers()
        self._progress.__exit__(exc_type, exc, tb)

    def update(self, row: dict[str, Any]) -> None:
        """Show one ``metrics.jsonl`` row."""
        status = (
            f"acc {_num(row.get('accuracy'))}  loss {_num(row.get('loss'))}  "
            f"{row.get('clients_replied', 0)}/{row.get('clients_sampled', 0)} clients"
        )
        simulated = row.get("sim_elapsed")
        if isinstance(simulated, int | float):
            status += f"  sim {sim_duration(simulated)}"
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

    remove_round_handlers()
    logger = logging.getLogger(federation.__name__)
    logger.addHandler(_RoundHandler(callback, federation.ROUND_EXTRA_KEY))
    logger.setLevel(logging.INFO)


def remove_round_handlers() -> None:
    """Stop calling back with rounds: the run that wanted them has ended."""
    logger = logging.getLogger("fedscale.server.federation")
    for handler in [h for h in logger.handlers if isinstance(h, _RoundHandler)]:
        logger.removeHandler(handler)


def print_summary(
    console: Console,
    rows: list[dict[str, Any]],
    run_dir: Path,
    *,
    target_accuracy: float | None = None,
) -> None:
    """Print the run's outcome; the last line states the final test accuracy.

    With a ``target_accuracy`` it reports when the run first reached it: the
    simulated time when the rows carry a virtual clock, else the round and wall
    time. With a virtual clock and no target, it reports the simulated time to the
    run's best accuracy.
    """
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
        for label, value in _simulated_rows(rows, target_accuracy):
            table.add_row(label, value)
    if isinstance(final.get("dp_epsilon"), int | float):
        table.add_row(
            "privacy spent", f"epsilon {final['dp_epsilon']:.4g} at delta {final['dp_delta']:.3g}"
        )
    table.add_row("run folder", str(run_dir))
    console.print(table)
    console.print(f"final test accuracy: {_num(final.get('accuracy'))}")


def run_summary(
    rows: list[dict[str, Any]],
    run_dir: Path,
    *,
    target_accuracy: float | None = None,
) -> dict[str, Any]:
    """Return the run's outcome as the one JSON object ``--json`` ends with.

    The same numbers as :func:`print_summary`'s table, unrounded; ``time_to_accuracy``
    is set when a target was given or the rows carry a virtual clock (then the goal
    is the best accuracy), and its ``round`` is null when the goal was not reached.
    """
    final = rows[-1]
    best = max(rows, key=lambda r: r.get("accuracy") or 0.0)
    trained = [r for r in rows if r["round"] > 0]
    timed = [r for r in rows if isinstance(r.get("sim_elapsed"), int | float)]
    dropped = [r.get("clients_dropped") or 0 for r in trained]
    summary: dict[str, Any] = {
        "event": "summary",
        "run_dir": str(run_dir),
        "rounds": final["round"],
        "initial_accuracy": rows[0].get("accuracy"),
        "final_accuracy": final.get("accuracy"),
        "final_loss": final.get("loss"),
        "best_accuracy": best.get("accuracy"),
        "best_round": best["round"],
        "clients_replied_per_round": (
            sum(r["clients_replied"] for r in trained) / len(trained) if trained else None
        ),
        "wall_time": final.get("elapsed"),
        "sim_elapsed": timed[-1]["sim_elapsed"] if timed else None,
        "clients_dropped_per_round": (sum(dropped) / len(dropped) if timed and dropped else None),
        "target_accuracy": target_accuracy,
        "time_to_accuracy": None,
        "dp_epsilon": final.get("dp_epsilon"),
        "dp_delta": final.get("dp_delta"),
    }
    scored = [r for r in (timed or rows) if isinstance(r.get("accuracy"), int | float)]
    if (target_accuracy is not None or timed) and scored:
        goal = (
            target_accuracy if target_accuracy is not None else max(r["accuracy"] for r in scored)
        )
        first = next((r for r in scored if r["accuracy"] >= goal), None)
        summary["time_to_accuracy"] = {
            "accuracy": goal,
            "round": first["round"] if first else None,
            "wall_time": first["elapsed"] if first else None,
            "sim_time": first.get("sim_elapsed") if first and timed else None,
        }
    return summary


def _simulated_rows(rows: list[dict[str, Any]], target: float | None) -> list[tuple[str, str]]:
    from fedscale.clock import time_to_accuracy

    trained = [r for r in rows if r["round"] > 0]
    timed = [r for r in rows if isinstance(r.get("sim_elapsed"), int | float)]
    out: list[tuple[str, str]] = []
    if timed:
        out.append(("simulated time", sim_duration(timed[-1]["sim_elapsed"])))
        dropped = [r.get("clients_dropped") or 0 for r in trained]
        if dropped:
            out.append(("clients dropped per round", f"{sum(dropped) / len(dropped):.1f}"))
    scored = [r for r in (timed or rows) if isinstance(r.get("accuracy"), int | float)]
    if target is None and not timed or not scored:
        return out
    goal = target if target is not None else max(r["accuracy"] for r in scored)
    label = f"time to accuracy {goal:.4f}" if target is not None else "time to best accuracy"
    if timed:
        reached = time_to_accuracy(((r["sim_elapsed"], r["accuracy"]) for r in scored), goal)
        first = next((r for r in scored if r["accuracy"] >= goal), None)
        if reached is None or first is None:
            out.append((label, f"not reached (best {_num(max(r['accuracy'] for r in scored))})"))
        else:
            out.append((label, f"{sim_duration(reached)} simulated (round {first['round']})"))
    else:
        first = next((r for r in scored if r["accuracy"] >= goal), None)
        if first is None:
            out.append((label, f"not reached (best {_num(max(r['accuracy'] for r in scored))})"))
        else:
            out.append((label, f"round {first['round']}, {first['elapsed']:.1f} s wall"))
    return out


def sim_duration(seconds: float) -> str:
    """Format simulated seconds for people: ``42.0 s``, ``12m 05s``, ``3h 07m``, ``2d 04h``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"
