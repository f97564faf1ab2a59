"""Output modes of the commands that run or read a federation: human, ``--quiet``, ``--json``.

People get rich progress, tables and colored errors; scripts get either silence
(``--quiet``: the exit code tells) or JSON lines (``--json``): on stdout each
round's ``metrics.jsonl`` record as it happens and one final object with
``"event"`` set, on stderr every error (and warning) as one JSON object. An error
carries a ``hint``, what to do about it, in every mode.
"""

from __future__ import annotations

import difflib
import enum
import json
import logging
import re
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from fedscale.exceptions import ConfigError, DeviceError, FedscaleError

__all__ = [
    "ErrorReport",
    "JsonOutput",
    "Mode",
    "Output",
    "Quiet",
    "current_mode",
    "emit_json",
    "ensure_port_free",
    "error_report",
    "missing_training_module",
    "output_mode",
    "print_error",
    "print_interrupted",
    "print_report",
]

Quiet = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="Print nothing but errors; the exit code tells how it went."
    ),
]
JsonOutput = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print JSON lines on stdout (each round's metrics.jsonl record, then a summary "
        'object with "event"), errors as {"error", "hint"} on stderr; no progress bar.',
    ),
]


class Mode(enum.Enum):
    """How a command reports: to people, not at all, or as JSON lines."""

    HUMAN = "human"
    QUIET = "quiet"
    JSON = "json"


# The mode of the command running now. One CLI invocation runs one command, but
# tests invoke many in one process: ``output_mode`` sets it and always restores it.
_mode = Mode.HUMAN


def current_mode() -> Mode:
    """Return the output mode of the command running now (human outside of one)."""
    return _mode


def emit_json(obj: dict[str, Any], *, stream: Any = None) -> None:
    """Write ``obj`` as one JSON line (stdout by default) and flush it at once."""
    out = stream if stream is not None else sys.stdout
    out.write(json.dumps(obj, allow_nan=False) + "\n")
    out.flush()


class _Rows:
    """Where each round's row goes when no progress bar is drawn."""

    def __init__(self, write: Callable[[dict[str, Any]], None]):
        self._write = write

    def __enter__(self) -> _Rows:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        from .progress import remove_round_handlers

        remove_round_handlers()

    def update(self, row: dict[str, Any]) -> None:
        """Report one ``metrics.jsonl`` row."""
        self._write(row)


@dataclass(frozen=True)
class Output:
    """The command's reporting, for its mode: progress, summary, results."""

    mode: Mode
    stdout: Console

    def progress(self, console: Console, total: int) -> AbstractContextManager[Any]:
        """Return the round reporter: a progress bar, nothing, or JSON lines of rows.

        It is a context manager whose value has ``update(row)``.
        """
        from .progress import RoundProgress

        if self.mode is Mode.HUMAN:
            return RoundProgress(console, total=total)
        if self.mode is Mode.JSON:
            return _Rows(emit_json)
        return _Rows(lambda row: None)

    def summary(
        self,
        rows: list[dict[str, Any]],
        run_dir: Path,
        *,
        target_accuracy: float | None = None,
    ) -> None:
        """Report a finished run: the table, nothing, or one ``"event": "summary"`` object."""
        from .progress import print_summary, run_summary

        if self.mode is Mode.HUMAN:
            print_summary(self.stdout, rows, run_dir, target_accuracy=target_accuracy)
        elif self.mode is Mode.JSON:
            emit_json(run_summary(rows, run_dir, target_accuracy=target_accuracy))

    def result(self, obj: dict[str, Any], show: Callable[[], None]) -> None:
        """Report a command's result: ``show()`` for people, ``obj`` as JSON, or nothing."""
        if self.mode is Mode.HUMAN:
            show()
        elif self.mode is Mode.JSON:
            emit_json(obj)


class _JsonLogHandler(logging.Handler):
    """Warnings as JSON lines on stderr, so that stderr stays machine-readable."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            emit_json(
                {
                    "level": record.levelname.lower(),
                    "logger": record.name,
                    "message": record.getMessage(),
                },
                stream=sys.stderr,
            )
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


@contextmanager
def output_mode(
    quiet: bool, json_output: bool, *, consoles: tuple[Console, ...], stdout: Console
) -> Iterator[Output]:
    """Run a command in the mode its ``--quiet``/``--json`` flags ask for.

    In ``--quiet`` and ``--json`` modes the command's rich ``consoles`` print
    nothing (errors go through :func:`print_error`, which knows the mode), and
    Flower's logger shows errors only; ``--json`` turns fedscale's warnings into
    JSON lines on stderr. Everything is restored on leaving.
    """
    global _mode
    if quiet and json_output:
        raise typer.BadParameter("expected at most one of --quiet and --json, got both")
    mode = Mode.JSON if json_output else Mode.QUIET if quiet else Mode.HUMAN
    previous_mode = _mode
    quiet_before = [c.quiet for c in consoles]
    fedscale_log = logging.getLogger("fedscale")
    handlers_before = list(fedscale_log.handlers)
    flwr_log = logging.getLogger("flwr")
    flwr_level = flwr_log.level
    _mode = mode
    try:
        if mode is not Mode.HUMAN:
            for c in consoles:
                c.quiet = True
            flwr_log.setLevel(logging.ERROR)
        if mode is Mode.JSON:
            fedscale_log.handlers[:] = [_JsonLogHandler(logging.WARNING)]
        elif mode is Mode.QUIET:
            fedscale_log.handlers[:] = [_StderrErrors()]
        yield Output(mode, stdout)
    finally:
        _mode = previous_mode
        for c, was in zip(consoles, quiet_before, strict=True):
            c.quiet = was
        fedscale_log.handlers[:] = handlers_before
        flwr_log.setLevel(flwr_level)


class _StderrErrors(logging.StreamHandler):  # type: ignore[type-arg]
    """``--quiet``: logged errors still reach stderr, as plain lines."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setLevel(logging.ERROR)
        self.setFormatter(logging.Formatter("error: %(message)s"))


# ----------------------------------------------------------------- errors and hints


@dataclass(frozen=True)
class ErrorReport:
    """An error as the command line shows it: what failed, why, and what to do."""

    error: str
    hint: str | None = None
    cause: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object ``--json`` prints on stderr."""
        body: dict[str, Any] = {"error": self.error, "hint": self.hint}
        if self.cause is not None:
            body["cause"] = self.cause
        return body


def print_error(console: Console, exc: FedscaleError) -> None:
    """Show ``exc`` with its hint: red lines for people (also with ``--quiet``), or JSON."""
    print_report(console, error_report(exc), json_output=_mode is Mode.JSON)


# Modules of the `train` extra: a serve-only (base) install lacks them.
_TRAIN_MODULES = frozenset(
    {"torch", "flwr", "ray", "onnx", "safetensors", "sklearn", "mlxtend", "tomli_w"}
    | {"threadpoolctl", "matplotlib"}
)


def missing_training_module(exc: ModuleNotFoundError) -> ErrorReport | None:
    """Return the error for a module of the ``train`` extra that is not installed, else None.

    The base install serves models only; every other command needs the extra,
    and a traceback is no way to say so.
    """
    top = (exc.name or "").partition(".")[0]
    if top not in _TRAIN_MODULES:
        return None
    return ErrorReport(
        f"this command needs fedscale's training install (torch, Flower and more), but "
        f"{top} is not installed here",
        "pip install 'fedscale[train]' (on a machine without an NVIDIA GPU, install torch's "
        "CPU build first); the base install runs `fedscale serve` only",
    )


def print_report(console: Console, report: ErrorReport, *, json_output: bool) -> None:
    """Show an error report: red lines for people (also with ``--quiet``), or JSON."""
    if json_output:
        emit_json(report.to_json(), stream=sys.stderr)
        return
    lines = [f"[bold red]error:[/] {escape(report.error)}"]
    if report.cause:
        lines.append(f"[bold]cause:[/] {escape(report.cause)}")
    if report.hint:
        lines.append(f"[bold]hint:[/] {escape(report.hint)}")
    _unquieted(console, "\n".join(lines))


def print_interrupted(console: Console) -> None:
    """Report a Ctrl-C (or SIGTERM) that ended the command."""
    if _mode is Mode.JSON:
        emit_json({"error": "interrupted", "hint": None}, stream=sys.stderr)
    elif _mode is Mode.HUMAN:
        console.print("[yellow]interrupted[/]")


def _unquieted(console: Console, text: str) -> None:
    was = console.quiet
    console.quiet = False
    try:
        console.print(text)
    finally:
        console.quiet = was


def error_report(exc: FedscaleError) -> ErrorReport:
    """Return the error line for ``exc``, with the cause a log holds and a hint to act on."""
    message = str(exc)
    cause = _cause_from_log(message)
    hint = _hint(exc, cause or message) or (_hint(exc, message) if cause else None)
    return ErrorReport(message, hint, cause)


_LOG_PATH = re.compile(r"see (/\S+\.log)$")
# The last exception line of a traceback in a ServerApp's or SuperNode's log.
_EXCEPTION_LINE = re.compile(r"^fedscale\.exceptions\.\w+: (.+)$")


def _cause_from_log(message: str) -> str | None:
    """Return the fedscale error a run's log ends with, when ``message`` points at it.

    The ServerApp runs in a process Flower starts; ``fedscale server`` only sees it
    stop and names its log. The error that stopped it is the useful line.
    """
    match = _LOG_PATH.search(message)
    if not match:
        return None
    try:
        lines = Path(match.group(1)).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    causes = [m.group(1) for line in lines if (m := _EXCEPTION_LINE.match(line.strip()))]
    return causes[-1] if causes else None


def _hint(exc: FedscaleError, message: str) -> str | None:
    for pattern, hint in _HINTS:
        match = pattern.search(message)
        if match:
            return hint(match)
    if isinstance(exc, DeviceError):
        return "pass --device cpu, or --device auto to take the best device this machine has"
    return None


def _choices(option: str, names: Callable[[], list[str]]) -> Callable[[re.Match[str]], str]:
    def hint(match: re.Match[str]) -> str:
        given = match.group("got")
        close = difflib.get_close_matches(given, names(), n=1, cutoff=0.6)
        guess = f"did you mean {option} {close[0]}? " if close else ""
        return f"{guess}pick one of the names listed; `fedscale simulate --help` lists them all"

    return hint


def _datasets() -> list[str]:
    from fedscale.datasets import BUILTIN_DATASETS

    return [*BUILTIN_DATASETS, "shakespeare", "synthetic:1,1"]


def _models() -> list[str]:
    from fedscale.models import BUILTIN_MODELS, TEXT_MODELS

    return [*BUILTIN_MODELS, *TEXT_MODELS]


def _strategies() -> list[str]:
    from fedscale.server.strategies import ASYNC_STRATEGIES, STRATEGIES

    return [*STRATEGIES, *ASYNC_STRATEGIES]


def _partitions() -> list[str]:
    return ["iid", "dirichlet:0.5", "shards:2"]


def _fixed(text: str) -> Callable[[re.Match[str]], str]:
    return lambda match: text


_GOT = r".*got '(?P<got>[^']*)'"
_HINTS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (
        # The run folder's own error already says what to do; the launcher's does not.
        re.compile(r"already holds a run(?!.*--out)"),
        _fixed("pass another --out, or delete that folder to start over"),
    ),
    (
        re.compile(r"expected at least (?P<n>\d+) connected SuperNodes"),
        lambda m: (
            f"start {m.group('n')} edge clients within --round-timeout (`fedscale edge-client "
            "--server HOST:PORT --partition-id I --num-partitions N` on each device, see "
            "docs/deployment.md), or lower --min-clients"
        ),
    ),
    (
        re.compile(r"expected a free port, but something listens there"),
        _fixed(
            "stop the program holding it (an earlier fedscale server?) or pass another port "
            "(`ss -ltnp` shows who listens)"
        ),
    ),
    (re.compile(r"^dataset: expected one of" + _GOT), _choices("--dataset", _datasets)),
    (re.compile(r"^model: expected one of" + _GOT), _choices("--model", _models)),
    (re.compile(r"^strategy: expected one of" + _GOT), _choices("--strategy", _strategies)),
    (re.compile(r"^partition: expected iid" + _GOT), _choices("--partition", _partitions)),
]


def ensure_port_free(host: str, port: int, option: str) -> None:
    """Refuse a port another program listens on, before starting anything on it.

    A Flower SuperLink on a taken port logs the bind error and exits, and what
    the command sees is a later, unrelated connection failure; so ask first.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        taken = probe.connect_ex((host, port)) == 0
    if taken:
        raise ConfigError(
            f"{option} {port} on {host}: expected a free port, but something listens there"
        )
