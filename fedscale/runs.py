"""The folder a run leaves behind, and the schema of its ``metrics.jsonl``.

``runs/<name>/``::

    config.toml                   the run settings, as run
    metrics.jsonl                 one JSON object per round (schema below)
    checkpoints/round-0003.safetensors   the global model after round 3
    models/                       the newest global models as ONNX, with manifest.json
                                  (fedscale.modelstore; written unless export-onnx is false)

``metrics.jsonl`` (``schema`` 1): one line per round, round 0 being the initial
model. Fields: ``schema``, ``round``, ``loss`` and ``accuracy`` (the global model
on the server's held-out test split), ``train_loss`` (clients' mean, weighted by
examples; null in round 0), ``clients_sampled``, ``clients_replied``,
``clients_failed``, ``seconds`` (wall time of the round), ``elapsed`` (since the
run started), ``federated_loss`` and ``federated_accuracy`` (clients' own
evaluation, weighted by examples; null unless ``fraction-evaluate`` > 0),
``sim_seconds`` and ``sim_elapsed`` (the round's duration and the virtual clock at
its end, in simulated seconds), ``clients_dropped`` and ``dropped`` (clients offered
work whose update the round did not use, in all and by reason; these four are null
without a device model), ``clients_rejected`` (replies refused before aggregation by
:mod:`fedscale.validation`), ``time`` (ISO 8601, UTC). Later versions only add fields; readers
must ignore fields they do not know. See docs/metrics.md.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .exceptions import ConfigError, DataError
from .files import atomic_write

__all__ = ["METRICS_SCHEMA_VERSION", "RoundRecord", "RunDirectory"]

METRICS_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RoundRecord:
    """One line of ``metrics.jsonl``."""

    round: int
    loss: float | None
    accuracy: float | None
    train_loss: float | None
    clients_sampled: int
    clients_replied: int
    clients_failed: int
    seconds: float
    elapsed: float
    federated_loss: float | None = None
    federated_accuracy: float | None = None
    sim_seconds: float | None = None
    sim_elapsed: float | None = None
    clients_dropped: int | None = None
    dropped: dict[str, int] | None = None
    clients_rejected: int = 0

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object written for this round."""
        body = {k: _finite_or_none(v) for k, v in asdict(self).items()}
        return {
            "schema": METRICS_SCHEMA_VERSION,
            **body,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }


def _finite_or_none(value: Any) -> Any:
    # JSON has no NaN or infinity; a diverged loss is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunDirectory:
    """Read and write one run's folder; every file is replaced atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()

    @property
    def config_path(self) -> Path:
        """``config.toml``: the settings the run used."""
        return self.path / "config.toml"

    @property
    def metrics_path(self) -> Path:
        """``metrics.jsonl``: one line per round."""
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        """``checkpoints/``: the global model of every round."""
        return self.path / "checkpoints"

    @property
    def models(self) -> Path:
        """``models/``: the run's model directory (see :mod:`fedscale.modelstore`)."""
        return self.path / "models"

    def create(self) -> RunDirectory:
        """Create the folder for a new run; refuse one that already holds a run."""
        if self.metrics_path.exists():
            raise ConfigError(
                f"run folder {self.path}: expected a new or empty folder, but it already "
                "holds a run (metrics.jsonl); choose another --out or remove it"
            )
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        return self

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Write the run's settings as TOML."""
        import tomli_w  # lazy: only the server writes run folders

        atomic_write(self.config_path, tomli_w.dumps(dict(config)).encode())

    def append_metrics(self, record: RoundRecord) -> None:
        """Append one round to ``metrics.jsonl`` and flush it to disk."""
        line = json.dumps(record.to_json(), allow_nan=False) + "\n"
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """Return every line of ``metrics.jsonl`` as a dict."""
        return [row for _, row in self.numbered_metrics()]

    def numbered_metrics(self) -> list[tuple[int, dict[str, Any]]]:
        """Return ``(line number, object)`` for every line of ``metrics.jsonl``.

        A line that is not a JSON object is an error naming the file and line.
        """
        path = self.metrics_path
        if not path.is_file():
            raise DataError(
                f"run folder {self.path}: expected metrics.jsonl (one JSON line per round), "
                "found none"
            )
        rows = []
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                shown = line if len(line) <= 80 else line[:77] + "..."
                raise DataError(
                    f"{path} line {number}: expected one JSON object per line, got {shown!r} "
                    f"({err.msg}); was the run stopped while writing it?"
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path} line {number}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append((number, row))
        return rows

    def checkpoint_path(self, server_round: int) -> Path:
        """Where the global model after ``server_round`` is stored."""
        return self.checkpoints / f"round-{server_round:04d}.safetensors"

    def save_global_model(
        self,
        server_round: int,
        arrays: Mapping[str, npt.NDArray[Any]],
        metadata: Mapping[str, str] | None = None,
    ) -> Path:
        """Store the global model's arrays as safetensors, atomically."""
        from safetensors.numpy import save  # lazy: see write_config

        meta = {"round": str(server_round), "keys": json.dumps(list(arrays))}
        meta.update(metadata or {})
        data = save({k: np.require(v, requirements="C") for k, v in arrays.items()}, metadata=meta)
        path = self.checkpoint_path(server_round)
        atomic_write(path, data)
        return path

    def load_global_model(self, server_round: int) -> dict[str, npt.NDArray[Any]]:
        """Load the arrays saved for ``server_round``, in their original order."""
        from safetensors import safe_open

        path = self.checkpoint_path(server_round)
        if not path.exists():
            raise DataError(f"run folder {self.path}: expected a checkpoint at {path}, found none")
        with safe_open(str(path), framework="numpy") as handle:
            keys = json.loads(handle.metadata()["keys"])
            return {k: handle.get_tensor(k) for k in keys}
