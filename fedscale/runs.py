"""The folder a run leaves behind, and the schema of its ``metrics.jsonl``.

``runs/<name>/``::

    config.toml                   the run settings, as run
    metrics.jsonl                 one JSON object per round (schema below)
    checkpoints/round-0003.safetensors   the global model after round 3
    checkpoints/state-0003.safetensors   the rest of a resumable checkpoint (the last two)
    checkpoints/latest.json       the last committed round (see fedscale.checkpoint)
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
:mod:`fedscale.validation`), ``bytes_sent`` and ``bytes_received`` (the round's messages to
and from clients, training and federated evaluation, in the bytes Flower serializes them
to: :func:`fedscale.records.serialized_bytes`; null in round 0), ``aggregate_seconds`` (the
strategy's aggregation; null when the round had too few replies to aggregate),
``dp_epsilon`` and ``dp_delta`` (with ``dp`` set: the privacy spent so far, epsilon at
that delta, from :mod:`fedscale.privacy`'s accountant; null without), ``time``
(ISO 8601, UTC). Later versions only add fields; readers
must ignore fields they do not know. See docs/metrics.md.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy.typing as npt

from .checkpoint import CheckpointStore
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
    bytes_sent: int | None = None
    bytes_received: int | None = None
    aggregate_seconds: float | None = None
    dp_epsilon: float | None = None
    dp_delta: float | None = None

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> RoundRecord:
        """Read back a ``metrics.jsonl`` object (fields it does not know are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})

    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds"))
    """When the round's record was made (ISO 8601, UTC): stamped once, so every copy
    (metrics.jsonl, the checkpoint, ``--json`` output) says the same."""

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object written for this round."""
        body = {k: _finite_or_none(v) for k, v in asdict(self).items()}
        return {"schema": METRICS_SCHEMA_VERSION, **body}


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

    def read_config(self) -> dict[str, Any]:
        """Read ``config.toml``: the settings the run used, as a run config."""
        import tomllib

        try:
            return tomllib.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise DataError(
                f"{self.config_path}: expected the run's settings as TOML, could not read "
                f"them: {err}"
            ) from err

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

    def rewind_metrics(self, last_round: int, last_record: Mapping[str, Any]) -> None:
        """Make ``metrics.jsonl`` hold rounds 0 to ``last_round`` exactly once (for a resume).

        Lines of later rounds (written before the crash that the resume follows,
        never committed) are dropped, and ``last_record``, the committed
        checkpoint's own copy of its round's line, replaces a missing one.
        """
        kept: dict[int, dict[str, Any]] = {}
        if self.metrics_path.exists():
            text = self.metrics_path.read_text(encoding="utf-8", errors="replace")
            for line in text.splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by the crash: the round is redone
                number = row.get("round") if isinstance(row, dict) else None
                if isinstance(number, int) and 0 <= number <= last_round:
                    kept.setdefault(number, row)
        kept[last_round] = dict(last_record)
        lines = [json.dumps(kept[n], allow_nan=False) + "\n" for n in sorted(kept)]
        atomic_write(self.metrics_path, "".join(lines).encode())

    @property
    def checkpoint_store(self) -> CheckpointStore:
        """The run's checkpoints (:mod:`fedscale.checkpoint`): models, state, commit point."""
        return CheckpointStore(self.checkpoints)

    def checkpoint_path(self, server_round: int) -> Path:
        """Where the global model after ``server_round`` is stored."""
        return self.checkpoint_store.model_path(server_round)

    def save_global_model(self, server_round: int, arrays: Mapping[str, npt.NDArray[Any]]) -> Path:
        """Store the global model's arrays as safetensors, atomically."""
        return self.checkpoint_store.save_model(server_round, arrays)[0]

    def load_global_model(self, server_round: int) -> dict[str, npt.NDArray[Any]]:
        """Load the arrays saved for ``server_round``, in their original order."""
        from safetensors import safe_open

        path = self.checkpoint_path(server_round)
        if not path.exists():
            raise DataError(f"run folder {self.path}: expected a checkpoint at {path}, found none")
        with safe_open(str(path), framework="numpy") as handle:
            keys = json.loads(handle.metadata()["keys"])
            return {k: handle.get_tensor(k) for k in keys}
