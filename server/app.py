"""fedscale's ServerApp: the run's strategy (FedAvg by default), evaluated on the server.

Runs unchanged on a real SuperLink (``fedscale server``, ``flwr run``), on
Flower's Ray simulation and on fedscale's in-process engine. Settings come from
the run config (see :class:`fedscale.settings.RunSettings`).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedscale.settings import RunSettings

from .federation import run_federation

__all__ = ["app", "default_run_dir"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config."""
    settings = RunSettings.from_run_config(context.run_config, complete=True)
    _log_to_console_unless_configured()
    out = settings.out or default_run_dir(settings)
    if settings.secagg:
        # SecAgg+ exists only on Flower's legacy workflow: its one adapter (docs/secagg.md).
        from .secagg import run_secagg_federation

        run_secagg_federation(grid, context, settings, out=out)
        return
    if settings.strategy == "fedbuff":
        # Asynchronous: a loop of its own on the Grid's push and pull (docs/fedbuff.md).
        from .fedbuff import run_fedbuff

        run_fedbuff(grid, settings, out=out)
        return
    run_federation(grid, settings, out=out)


def _log_to_console_unless_configured() -> None:
    # In a deployment this process is started by the SuperLink and nobody has
    # set up logging: send fedscale's round lines to stderr, which Flower
    # streams to `flwr run --stream` and `flwr log`. A front end that set up
    # logging itself (the CLI, a notebook) keeps its own.
    logger = logging.getLogger("fedscale")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def default_run_dir(settings: RunSettings, root: str | Path = "runs") -> Path:
    """``runs/<dataset>-<model>-<UTC timestamp>``, as an absolute path."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    base = (Path(root) / f"{_slug(settings.dataset)}-{_slug(settings.model)}-{stamp}").absolute()
    path, n = base, 1
    while path.exists():  # two runs started in the same second
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _slug(text: str) -> str:
    tail = Path(text.split(":")[-1]).stem or "custom"
    return "".join(c if c.isalnum() else "-" for c in tail).strip("-") or "custom"
