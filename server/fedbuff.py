"""FedBuff: asynchronous buffered aggregation (Nguyen et al., AISTATS 2022).

The server keeps ``concurrency`` clients training at once. Each client's job
starts from the global model as it is when the job starts (version ``v0``) and
replies with its trained weights; the server turns them into a delta
(``trained - model v0``), weighs it by its staleness ``s = v - v0`` (``v``: the
version when the reply arrives) and adds it to a buffer. Every ``buffer-size``
updates the buffer is flushed::

    model(v + 1) = model(v) + server-lr * (1 / M) * sum_i w(s_i) * delta_i

with ``M`` the buffer size and ``w`` the staleness function; the weights are
not renormalised, so a buffer of stale updates moves the model less (the paper's
Algorithm 1). Updates older than ``max-staleness`` are dropped and counted. A
job that ends (in any way) frees its slot, and a new job starts at once on an
idle node drawn uniformly at random (with the run's seed), so ``concurrency``
stay in flight. Updates are not weighted by their clients' example counts, as
in the paper.

Flower 1.42 has no asynchronous strategy: its ``Strategy`` hooks are shaped as
rounds (``configure_train`` then ``aggregate_train`` over one round's replies),
so FedBuff is a loop of its own here, on the Grid's ``push_messages`` and
``pull_messages``. It reuses the synchronous loop's pieces
(:mod:`.federation`): the server's data and evaluation, update decoding
(:mod:`fedscale.compression`, against the version the job started from) and
validation (:func:`fedscale.validation.validate_reply`), ONNX publication,
checkpoints and ``metrics.jsonl`` lines. Each flush is one "round": ``round`` is the model
version and ``num-rounds`` the number of versions to produce.

Arrival order:

- on fedscale's in-process engine with a device model (``grid.system``): in
  virtual time. Each job's end is timed when it starts (download, train,
  upload, window closing, churn, deadline; :meth:`SimulatedSystem.job_end`) and
  the job with the earliest end is processed next, the clock moving to it; so
  fast devices contribute more often. A job the device model loses is never
  sent: it holds its slot until it is lost, then counts as dropped (by reason);
- on any other grid (a SuperLink, the in-process engine without a device model):
  as the replies arrive, pulled by polling ``pull_messages`` for the jobs in
  flight; a job without a reply after ``round-timeout`` seconds fails and frees
  its slot. In-process without a device model that is push order (FIFO).

Checkpoints are committed at every flush; a resumed run (``resume``) goes on from
the last flush with new jobs: the jobs in flight at the crash and the updates
buffered since the flush are lost.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast, get_args

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from numpy.typing import NDArray

from fedscale.checkpoint import BackgroundCommits, Checkpoint, config_hash, rng_state
from fedscale.clock import DropReason
from fedscale.compression import decode_replies, update_bytes
from fedscale.exceptions import ConfigError, ExportError, FedscaleError
from fedscale.models import build_model
from fedscale.records import serialized_bytes, state_dict_to_arrays
from fedscale.runs import RoundRecord, RunDirectory
from fedscale.settings import RunSettings, parse_strategy_args
from fedscale.training import evaluate, resolve_device
from fedscale.validation import WEIGHT_KEY, update_byte_limit, validate_reply

from .federation import (
    FederationResult,
    SimulatedSystemView,
    arrays_like,
    emit,
    evaluate_global,
    make_exporter,
    numpy_arrays,
    publish,
    published_round,
    resume_run,
    round_record,
    server_data,
    wait_for_nodes,
)
from .strategies import StrategyParam

if TYPE_CHECKING:
    import torch.nn

    from fedscale.export import OnnxExporter

    from .federation import ServerData

__all__ = [
    "FEDBUFF",
    "AsyncSystemView",
    "FedBuffConfig",
    "FedBuffResult",
    "Staleness",
    "UpdateBuffer",
    "fedbuff_params",
    "run_fedbuff",
]

log = logging.getLogger(__name__)

FEDBUFF = "fedbuff"
STALE = "stale"
"""The ``dropped`` reason of an update older than ``max-staleness``."""

# How often the wall-clock loop asks the grid for replies when none came back.
_POLL_S = 0.2
_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


# ---------------------------------------------------------------- staleness


@dataclass(frozen=True)
class Staleness:
    """A staleness function ``w(s)``: how much an update ``s`` versions old counts.

    ``s`` is the number of model versions published between the start of a
    client's job and the arrival of its update (0: fresh).

    - ``constant``: ``w(s) = 1``;
    - ``polynomial:a``: ``w(s) = (1 + s) ** -a`` (FedAsync's polynomial; ``a = 0.5``,
      ``1 / sqrt(1 + s)``, is FedBuff's);
    - ``hinge:a,b``: ``w(s) = 1`` for ``s <= b``, else ``1 / (a * (s - b) + 1)``
      (FedAsync's hinge).
    """

    kind: Literal["constant", "polynomial", "hinge"]
    a: float = 0.0
    b: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "polynomial", "hinge"):
            raise ConfigError(
                f"staleness: expected constant, polynomial:A or hinge:A,B, got {self.kind!r}"
            )
        if not (math.isfinite(self.a) and self.a >= 0 and math.isfinite(self.b) and self.b >= 0):
            raise ConfigError(
                f"staleness {self.kind}: expected parameters >= 0, got a={self.a!r}, b={self.b!r}"
            )

    @classmethod
    def parse(cls, text: str) -> Staleness:
        """Read ``constant``, ``polynomial:A`` or ``hinge:A,B``."""
        spec = text.strip()
        if spec == "constant":
            return cls("constant")
        if match := re.fullmatch(rf"polynomial:({_NUMBER})", spec):
            return cls("polynomial", a=float(match.group(1)))
        if match := re.fullmatch(rf"hinge:({_NUMBER}),({_NUMBER})", spec):
            return cls("hinge", a=float(match.group(1)), b=float(match.group(2)))
        raise ConfigError(
            "strategy-args staleness (for fedbuff): expected constant, polynomial:A (such as "
            f"polynomial:0.5) or hinge:A,B (such as hinge:10,4), with A, B >= 0, got {text!r}"
        )

    def __call__(self, staleness: int) -> float:
        """Return the weight of an update ``staleness`` versions old."""
        if staleness < 0:
            raise ValueError(f"staleness: expected an integer >= 0, got {staleness}")
        if self.kind == "polynomial":
            return float((1.0 + staleness) ** -self.a)
        if self.kind == "hinge" and staleness > self.b:
            return 1.0 / (self.a * (staleness - self.b) + 1.0)
        return 1.0

    def __str__(self) -> str:
        if self.kind == "polynomial":
            return f"polynomial:{self.a:g}"
        if self.kind == "hinge":
            return f"hinge:{self.a:g},{self.b:g}"
        return "constant"


# ---------------------------------------------------------------- configuration


def fedbuff_params() -> dict[str, StrategyParam]:
    """Return the ``strategy-args`` FedBuff takes, by key (defaults: ``None`` = derived).

    ``concurrency`` (clients training at once; default ``clients-per-round``),
    ``buffer-size`` (updates per model version; default half the concurrency,
    rounded up), ``staleness`` (default ``polynomial:0.5``), ``max-staleness``
    (older updates are dropped; default 10) and ``server-lr`` (default 1.0).
    """
    return {
        p.key: p
        for p in (
            StrategyParam("concurrency", "concurrency", int, None),
            StrategyParam("buffer-size", "buffer_size", int, None),
            StrategyParam("staleness", "staleness", str, "polynomial:0.5"),
            StrategyParam("max-staleness", "max_staleness", int, 10),
            StrategyParam("server-lr", "server_lr", float, 1.0),
        )
    }


@dataclass(frozen=True)
class FedBuffConfig:
    """FedBuff's settings, from a run's ``strategy-args``."""

    concurrency: int
    buffer_size: int
    staleness: Staleness = field(default_factory=lambda: Staleness("polynomial", a=0.5))
    max_staleness: int = 10
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        for key, value, low in (
            ("concurrency", self.concurrency, 1),
            ("buffer-size", self.buffer_size, 1),
            ("max-staleness", self.max_staleness, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(
                    f"strategy-args {key} (for fedbuff): expected an integer >= {low}, "
                    f"got {value!r}"
                )
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ConfigError(
                f"strategy-args server-lr (for fedbuff): expected a number > 0, "
                f"got {self.server_lr!r}"
            )

    @classmethod
    def from_settings(cls, settings: RunSettings) -> FedBuffConfig:
        """Read ``strategy-args``; refuse unknown keys and settings FedBuff cannot honour."""
        if settings.strategy != FEDBUFF:
            raise ConfigError(f"strategy: expected {FEDBUFF}, got {settings.strategy!r}")
        params = fedbuff_params()
        given = parse_strategy_args(settings.strategy_args)
        unknown = sorted(set(given) - set(params))
        if unknown:
            raise ConfigError(
                f"strategy-args: unknown key(s) {', '.join(unknown)} for strategy {FEDBUFF}; "
                f"valid keys are: {', '.join(params)}"
            )
        values = {params[k].name: params[k].convert(FEDBUFF, v) for k, v in given.items()}
        concurrency = values.get("concurrency", settings.clients_per_round)
        config = cls(
            concurrency=concurrency,
            buffer_size=values.get("buffer_size", max(1, math.ceil(concurrency / 2))),
            staleness=Staleness.parse(values.get("staleness", "polynomial:0.5")),
            max_staleness=values.get("max_staleness", 10),
            server_lr=values.get("server_lr", 1.0),
        )
        _check_run_settings(settings)
        return config


def _check_run_settings(settings: RunSettings) -> None:
    """Refuse the synchronous-round settings FedBuff would otherwise silently ignore."""
    refusals = []
    if settings.dp:
        refusals.append(
            f"dp {settings.dp!r}: differential privacy is accounted per synchronous round; "
            "expected no dp with strategy fedbuff"
        )
    if settings.fraction_evaluate > 0:
        refusals.append(
            f"fraction-evaluate {settings.fraction_evaluate:g}: federated evaluation runs "
            "between synchronous rounds; expected 0 with strategy fedbuff"
        )
    if settings.overcommit > 0:
        refusals.append(
            f"overcommit {settings.overcommit:g}: FedBuff keeps concurrency clients busy "
            "instead; expected 0 with strategy fedbuff"
        )
    if settings.min_replies != 1:
        refusals.append(
            f"min-replies {settings.min_replies}: FedBuff updates the model every buffer-size "
            "updates; expected 1 (the default) with strategy fedbuff"
        )
    if refusals:
        raise ConfigError("; ".join(refusals))


# ---------------------------------------------------------------- the buffer


class UpdateBuffer:
    """FedBuff's buffer: staleness-weighted deltas summed until ``size`` have arrived.

    Deltas are summed in float64 as they arrive (memory: one model), so the
    buffer never holds ``size`` models.
    """

    def __init__(self, size: int, staleness: Staleness, max_staleness: int) -> None:
        if size < 1:
            raise ConfigError(f"buffer-size: expected an integer >= 1, got {size}")
        if max_staleness < 0:
            raise ConfigError(f"max-staleness: expected an integer >= 0, got {max_staleness}")
        self.size = size
        self.staleness = staleness
        self.max_staleness = max_staleness
        self._sum: dict[str, NDArray[np.float64]] = {}
        self._count = 0
        self._examples = 0
        self._loss_sum = 0.0
        self._staleness_sum = 0

    @property
    def count(self) -> int:
        """Updates buffered since the last flush."""
        return self._count

    @property
    def full(self) -> bool:
        """Whether ``size`` updates are buffered: time to flush."""
        return self._count >= self.size

    def weight(self, staleness: int) -> float | None:
        """Return the weight of an update ``staleness`` versions old, or ``None`` if too old."""
        if staleness > self.max_staleness:
            return None
        return self.staleness(staleness)

    def add(
        self,
        delta: Mapping[str, NDArray[Any]],
        staleness: int,
        *,
        num_examples: int,
        train_loss: float | None,
    ) -> None:
        """Add ``w(staleness) * delta``; refuse a full buffer or an update too old."""
        weight = self.weight(staleness)
        if weight is None:
            raise ValueError(
                f"update: expected staleness at most {self.max_staleness}, got {staleness}"
            )
        if self.full:
            raise ValueError(f"buffer: expected room for an update, but it holds {self.size}")
        if self._sum and list(delta) != list(self._sum):
            raise ValueError(f"update: expected arrays {list(self._sum)}, got {list(delta)}")
        for key, value in delta.items():
            weighted = weight * np.asarray(value, dtype=np.float64)
            if key in self._sum:
                self._sum[key] += weighted
            else:
                self._sum[key] = weighted
        self._count += 1
        self._staleness_sum += staleness
        if train_loss is not None and math.isfinite(train_loss):
            self._examples += num_examples
            self._loss_sum += num_examples * train_loss

    def flush(
        self, global_arrays: Mapping[str, NDArray[Any]], server_lr: float
    ) -> tuple[dict[str, NDArray[Any]], float | None, float]:
        """Apply the buffer to the global model; return it, the mean train loss and staleness.

        ``global + server_lr * sum / size``, computed in float64 and cast back to
        each array's dtype (integer arrays rounded). The train loss is the
        buffered updates' mean weighted by examples (``None`` if none reported
        one); the staleness is their plain mean. Empties the buffer.
        """
        if not self.full:
            raise ValueError(f"buffer: expected {self.size} updates to flush, got {self._count}")
        if list(global_arrays) != list(self._sum):
            raise ValueError(
                f"global model: expected arrays {list(self._sum)}, got {list(global_arrays)}"
            )
        out: dict[str, NDArray[Any]] = {}
        for key, current in global_arrays.items():
            updated = np.asarray(current, dtype=np.float64) + server_lr * self._sum[key] / self.size
            dtype = np.asarray(current).dtype
            if dtype.kind in "biu":
                updated = np.rint(updated)
            out[key] = updated.astype(dtype)
        loss = self._loss_sum / self._examples if self._examples else None
        staleness = self._staleness_sum / self._count
        self._sum, self._count, self._examples = {}, 0, 0
        self._loss_sum, self._staleness_sum = 0.0, 0
        return out, loss, staleness


# ---------------------------------------------------------------- the loop


class AsyncSystemView(Protocol):
    """What FedBuff asks of a grid's simulated system (``grid.system``)."""

    @property
    def now(self) -> float:
        """The virtual clock, in seconds."""
        ...

    def wait_for_clients(self) -> float:
        """Advance the clock until a client is online."""
        ...

    def job_end(
        self,
        node_id: int,
        start: float,
        *,
        job: int,
        model_bytes: int,
        update_bytes: int,
        local_epochs: int,
    ) -> tuple[float, DropReason | None]:
        """Time one client's job: when it ends, and why it is lost (``None``: it finishes)."""
        ...

    def resume_at(self, now: float) -> None:
        """Set the clock (here: move it to the next event)."""
        ...


@dataclass(frozen=True)
class FedBuffResult(FederationResult):
    """A finished FedBuff run: the federation's result, and who contributed."""

    updates_by_node: dict[int, int]
    """Updates aggregated into the global model, by node id."""
    stale_dropped: int
    """Updates dropped for being older than ``max-staleness``."""


@dataclass
class _Job:
    seq: int
    node: int
    version: int
    start: float  # virtual time (with a system), else wall (time.monotonic)
    end: float  # virtual end (with a system), else the reply's deadline
    lost: DropReason | None = None  # the device model loses it: never sent
    message_id: str | None = None
    reply: Message | None = None


@dataclass
class _Version:
    record: ArrayRecord  # sent to every job starting from it (shared, so cohorts train it once)
    arrays: dict[str, NDArray[Any]]


@dataclass
class _Interval:
    """What happened between two flushes: one ``metrics.jsonl`` line."""

    wall_start: float
    sim_start: float
    sampled: int = 0
    failed: int = 0
    rejected: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    bytes_sent: int = 0
    bytes_received: int = 0


class _Progress:
    """Counters a checkpoint keeps (restored generically, as a strategy's attributes)."""

    def __init__(self) -> None:
        self.jobs_started = 0


def run_fedbuff(grid: Grid, settings: RunSettings, *, out: str | Path) -> FedBuffResult:
    """Run FedBuff on ``grid`` until ``num-rounds`` model versions are published.

    Writes the run folder as :func:`~.federation.run_federation` does (one
    ``metrics.jsonl`` line, checkpoint and ONNX model per version) and returns
    the result with per-node contribution counts.
    """
    config = FedBuffConfig.from_settings(settings)  # before anything is written
    with BackgroundCommits(RunDirectory(out).checkpoint_store) as checkpoints:
        return _FedBuff(grid, settings, config, Path(out), checkpoints).run()


class _FedBuff:
    def __init__(
        self,
        grid: Grid,
        settings: RunSettings,
        config: FedBuffConfig,
        out: Path,
        checkpoints: BackgroundCommits,
    ) -> None:
        self.grid = grid
        self.checkpoints = checkpoints
        self.settings = settings
        self.config = config
        self.buffer = UpdateBuffer(config.buffer_size, config.staleness, config.max_staleness)
        system = getattr(grid, "system", None)
        self.system = None if system is None else cast(AsyncSystemView, system)
        # Flower's samplers and ours draw from `random`: seed it for repeatable runs.
        random.seed(settings.seed)
        torch.manual_seed(settings.seed)
        self.dataset: ServerData = server_data(settings)
        self.device = resolve_device(settings.device)
        self.model: torch.nn.Module = build_model(
            settings.model, self.dataset.sample_shape, self.dataset.num_classes, seed=settings.seed
        )
        self.arrays = state_dict_to_arrays(self.model.state_dict())
        self.run_dir = RunDirectory(out)
        self.run_config = settings.replace(out=str(self.run_dir.path)).to_run_config()
        self.fingerprint = config_hash(self.run_config)
        self.exporter: OnnxExporter | None = make_exporter(settings, self.dataset)
        self.progress = _Progress()
        self.version = 0
        self.versions: dict[int, _Version] = {}
        self.jobs: dict[str, _Job] = {}
        self.busy: set[int] = set()
        self.records: list[RoundRecord] = []
        self.updates_by_node: Counter[int] = Counter()
        self.stale_dropped = 0
        self.unusable_streak = 0
        self.started = time.monotonic()
        self.interval = _Interval(self.started, self._now())
        self.model_bytes = 0
        self.update_bytes = 0
        self.byte_limit = 0

    # ------------------------------------------------------------ setup

    def run(self) -> FedBuffResult:
        settings = self.settings
        resumed = (
            resume_run(
                self.run_dir,
                self.run_config,
                # resume_run restores a strategy's plain attributes generically, which
                # is all _Progress holds.
                cast(Strategy, self.progress),
                cast(SimulatedSystemView | None, self.system),
            )
            if settings.resume
            else None
        )
        if resumed is None:
            self.run_dir.create()
        self.run_dir.write_config(self.run_config)
        if self.system is None:
            if settings.device_mix:
                log.warning(
                    "device-mix %r is simulated by fedscale's in-process engine only; this "
                    "runtime's nodes are real or have no device model, so it is ignored",
                    settings.device_mix,
                )
            available = wait_for_nodes(self.grid, settings.min_clients, settings.round_timeout)
        else:
            available = list(self.grid.get_node_ids())
        if self.config.concurrency > settings.num_clients:
            log.warning(
                "fedbuff: concurrency %d is more than the %d clients; at most %d train at once",
                self.config.concurrency,
                settings.num_clients,
                settings.num_clients,
            )
        log.info(
            "run %s: FedBuff to version %d (concurrency %d, buffer %d, staleness %s up to %d, "
            "server lr %g) on %s, %d nodes %s",
            self.run_dir.path.name,
            settings.num_rounds,
            self.config.concurrency,
            self.config.buffer_size,
            self.config.staleness,
            self.config.max_staleness,
            self.config.server_lr,
            settings.dataset,
            len(available),
            "connected" if self.system is None else "online",
        )

        if resumed is None:
            initial = evaluate(
                self.model, self.dataset.x_test, self.dataset.y_test, device=self.device
            )
            record = round_record(0, initial, None, 0, 0, 0, 0.0, 0.0, **self._simulated(0.0))
            self._commit(record)
            if self.exporter is not None:
                try:
                    publish(self.exporter, self.model, self.run_dir, 0, initial, settings)
                except ExportError as err:
                    raise ExportError(
                        f"{err}; set export-onnx = false (--no-export-onnx) to train without "
                        "ONNX models"
                    ) from err
            self.records.append(record)
            emit(self.run_dir, record, settings.num_rounds)
        else:
            self.arrays = arrays_like(resumed.global_arrays, self.arrays)
            self.records = [RoundRecord.from_json(r) for r in self.run_dir.read_metrics()]
            self.started = time.monotonic() - (self.records[-1].elapsed if self.records else 0.0)
            self.version = resumed.round
            if self.exporter is not None and published_round(self.run_dir) < resumed.round:
                result = evaluate_global(self.model, self.arrays, self.dataset, self.device)
                publish(self.exporter, self.model, self.run_dir, resumed.round, result, settings)
            log.info("fedbuff: the jobs in flight when the run stopped are lost; starting anew")

        self.model_bytes = sum(len(a.data) for a in self.arrays.values())
        self.update_bytes = update_bytes(self.arrays, settings.compression)
        self.byte_limit = update_byte_limit(self.arrays, settings.max_update_bytes)
        self.versions = {self.version: _Version(self.arrays, numpy_arrays(self.arrays))}
        self.interval = _Interval(time.monotonic(), self._now())
        if self.system is None:
            self._run_as_replies_arrive()
        else:
            self._run_in_virtual_time(self.system)
        return FedBuffResult(
            run_dir=self.run_dir,
            rounds=self.records,
            arrays=self.arrays,
            updates_by_node=dict(self.updates_by_node),
            stale_dropped=self.stale_dropped,
        )

    # ------------------------------------------------------------ the two event loops

    def _run_in_virtual_time(self, system: AsyncSystemView) -> None:
        """Process jobs in order of their virtual end; the clock moves to each."""
        while self.version < self.settings.num_rounds:
            self._start_jobs()
            if not self.jobs:
                # Nobody online (everyone is idle): wait, in virtual time, for a client.
                system.wait_for_clients()
                continue
            job = min(self.jobs.values(), key=lambda j: (j.end, j.seq))
            if job.message_id is not None and job.reply is None:
                self._pull_in_flight()
            # Pulled before the clock moves: every job in flight started at or before
            # now and ends at or after it, so its node is online now.
            if job.end > system.now:
                system.resume_at(job.end)
            self._finish(job)
            self._resolve(job, job.reply)

    def _pull_in_flight(self) -> None:
        """Pull the replies of every job in flight at once (the in-process grid trains on pull).

        A reply does not depend on when it is pulled (each node has one job at a
        time), so pulling together lets the grid train a cohort at once; each
        reply is processed at its job's virtual end.
        """
        waiting = {j.message_id: j for j in self.jobs.values() if j.message_id and not j.reply}
        for reply in self.grid.pull_messages(list(waiting)):
            job = waiting.get(reply.metadata.reply_to_message_id)
            if job is not None:
                job.reply = reply

    def _run_as_replies_arrive(self) -> None:
        """Process replies in the order the grid hands them over; time out silent jobs."""
        timeout = self.settings.round_timeout
        while self.version < self.settings.num_rounds:
            self._start_jobs()
            if not self.jobs:
                wait_for_nodes(self.grid, 1, timeout)  # raises when nobody comes
                continue
            ids = [j.message_id for j in self.jobs.values() if j.message_id is not None]
            replies = list(self.grid.pull_messages(ids)) if ids else []
            for reply in replies:
                job = self.jobs.get(reply.metadata.reply_to_message_id)
                if job is None:
                    continue  # a reply after its job timed out, or after the run's last version
                self._finish(job)
                self._resolve(job, reply)
                if self.version >= self.settings.num_rounds:
                    return
                self._start_jobs()  # at once: the slot's new job starts from the newest model
            now = time.monotonic()
            for job in [j for j in self.jobs.values() if j.end <= now]:
                self._finish(job)
                log.warning(
                    "fedbuff: node %d sent no reply within round-timeout %g s", job.node, timeout
                )
                self._resolve(job, None)
            if not replies and self.version < self.settings.num_rounds:
                time.sleep(_POLL_S)

    # ------------------------------------------------------------ jobs

    def _now(self) -> float:
        return self.system.now if self.system is not None else 0.0

    def _start_jobs(self) -> None:
        """Start jobs on idle nodes, drawn at random, until ``concurrency`` are in flight."""
        free = self.config.concurrency - len(self.jobs)
        if free <= 0:
            return
        idle = [n for n in self.grid.get_node_ids() if n not in self.busy]
        if not idle:
            return
        nodes = random.sample(idle, min(free, len(idle)))
        sent: list[tuple[_Job, Message]] = []
        for node in nodes:
            self.progress.jobs_started += 1
            self.interval.sampled += 1
            self.busy.add(node)
            job = self._timed_job(node, self.progress.jobs_started)
            if job.lost is not None:
                self.jobs[f"lost-{job.seq}"] = job
                continue
            sent.append((job, self._train_message(node)))
        if not sent:
            return
        messages = [m for _, m in sent]
        ids = list(self.grid.push_messages(messages))
        self.interval.bytes_sent += serialized_bytes(messages)
        for (job, _), message_id in zip(sent, ids, strict=True):
            if not message_id:
                # Flower's grid marks a message it could not push with None.
                log.warning("fedbuff: the train message to node %d was not pushed", job.node)
                self.busy.discard(job.node)
                self.interval.failed += 1
                self._count_unusable()
                continue
            job.message_id = message_id
            self.jobs[message_id] = job

    def _timed_job(self, node: int, seq: int) -> _Job:
        if self.system is None:
            start = time.monotonic()
            return _Job(seq, node, self.version, start, start + self.settings.round_timeout)
        start = self.system.now
        end, lost = self.system.job_end(
            node,
            start,
            job=seq,
            model_bytes=self.model_bytes,
            update_bytes=self.update_bytes,
            local_epochs=self.settings.local_epochs,
        )
        return _Job(seq, node, self.version, start, end, lost=lost)

    def _train_message(self, node: int) -> Message:
        config = ConfigRecord(
            {
                "lr": self.settings.lr,
                "local-epochs": self.settings.local_epochs,
                "batch-size": self.settings.batch_size,
                "num-classes": self.dataset.num_classes,
                # The version it trains toward: the ClientApp names the model it received
                # (version) by it, as with a synchronous round's number.
                "server-round": self.version + 1,
            }
        )
        content = RecordDict({"arrays": self.versions[self.version].record, "config": config})
        return Message(
            content,
            dst_node_id=node,
            message_type=MessageType.TRAIN,
            group_id=str(self.version + 1),
        )

    def _finish(self, job: _Job) -> None:
        key = job.message_id if job.message_id is not None else f"lost-{job.seq}"
        del self.jobs[key]
        self.busy.discard(job.node)

    def _resolve(self, job: _Job, reply: Message | None) -> None:
        """Count a finished job, buffer its update if usable, flush a full buffer."""
        if reply is not None:
            self.interval.bytes_received += serialized_bytes([reply])
        usable = self._buffer(job, reply)
        self._forget_unused_versions()
        if not usable:
            self._count_unusable()
            return
        self.unusable_streak = 0
        if self.buffer.full:
            self._flush()

    def _buffer(self, job: _Job, reply: Message | None) -> bool:
        if job.lost is not None:
            self.interval.dropped[job.lost] += 1
            return False
        if reply is None:
            self.interval.failed += 1
            return False
        if reply.has_error():
            self.interval.failed += 1
            log.warning(
                "fedbuff: node %d failed: %s (code %d)",
                job.node,
                reply.error.reason,
                reply.error.code,
            )
            return False
        start = self.versions[job.version]
        # A compressed update decodes against the version its job started from.
        decoded, undecodable = decode_replies(
            [reply], start.record, self.settings, server_round=job.version + 1
        )
        reason = undecodable[0][1] if undecodable else None
        reply = decoded[0] if decoded else reply
        reason = reason or validate_reply(
            reply,
            start.record,
            max_examples=self.settings.max_examples,
            max_bytes=self.byte_limit,
            weight_key=WEIGHT_KEY,
        )
        if reason is not None:
            self.interval.rejected += 1
            log.warning(
                "version %d: update from node %d rejected: %s", self.version, job.node, reason
            )
            return False
        staleness = self.version - job.version
        if self.buffer.weight(staleness) is None:
            self.interval.dropped[STALE] += 1
            self.stale_dropped += 1
            log.debug(
                "version %d: update from node %d dropped: %d versions old, more than "
                "max-staleness %d",
                self.version,
                job.node,
                staleness,
                self.config.max_staleness,
            )
            return False
        trained = next(iter(reply.content.array_records.values()))
        metrics = next(iter(reply.content.metric_records.values()))
        delta = {
            key: trained[key].numpy().astype(np.float64) - np.asarray(base, dtype=np.float64)
            for key, base in start.arrays.items()
        }
        loss = metrics.get("train-loss")
        self.buffer.add(
            delta,
            staleness,
            num_examples=int(cast(int, metrics[WEIGHT_KEY])),
            train_loss=float(loss) if isinstance(loss, int | float) else None,
        )
        self.updates_by_node[job.node] += 1
        return True

    def _count_unusable(self) -> None:
        # Every job that ends without an update is counted; a run where none ever
        # arrives (every client fails, is rejected or is lost) must end, not spin.
        self.unusable_streak += 1
        limit = max(100, 10 * self.config.concurrency)
        if self.unusable_streak >= limit:
            interval = self.interval
            raise FedscaleError(
                f"fedbuff: expected client updates to aggregate, but the last {limit} jobs "
                f"brought none (since version {self.version}: {interval.failed} failed, "
                f"{interval.rejected} rejected, dropped {dict(interval.dropped)}); "
                "see the log for why"
            )

    def _forget_unused_versions(self) -> None:
        keep = {j.version for j in self.jobs.values()} | {self.version}
        for version in [v for v in self.versions if v not in keep]:
            del self.versions[version]

    # ------------------------------------------------------------ flush

    def _flush(self) -> None:
        settings = self.settings
        aggregation_start = time.perf_counter()
        current = self.versions[self.version].arrays
        updated, train_loss, staleness = self.buffer.flush(current, self.config.server_lr)
        self.arrays = ArrayRecord({key: Array(value) for key, value in updated.items()})
        aggregate_seconds = time.perf_counter() - aggregation_start
        self.version += 1
        self.versions[self.version] = _Version(self.arrays, updated)
        self._forget_unused_versions()

        result = evaluate_global(self.model, self.arrays, self.dataset, self.device)
        now = time.monotonic()
        interval = self.interval
        record = round_record(
            self.version,
            result,
            train_loss,
            interval.sampled,
            self.config.buffer_size,
            interval.failed,
            now - interval.wall_start,
            now - self.started,
            rejected=interval.rejected,
            bytes_sent=interval.bytes_sent,
            bytes_received=interval.bytes_received,
            aggregate_seconds=aggregate_seconds,
            **self._simulated(self._now() - interval.sim_start),
        )
        log.debug("version %d: mean staleness %.2f", self.version, staleness)
        self._commit(record)
        if self.exporter is not None:
            try:
                publish(self.exporter, self.model, self.run_dir, self.version, result, settings)
            except ExportError as err:
                log.error("version %d: global model not published: %s", self.version, err)
        self.records.append(record)
        emit(self.run_dir, record, settings.num_rounds)
        self.interval = _Interval(time.monotonic(), self._now())

    def _simulated(self, sim_seconds: float) -> dict[str, Any]:
        """Return the drop counts (stale updates, and the device model's) and virtual times."""
        dropped = self.interval.dropped
        if self.system is None:
            return {"clients_dropped": dropped[STALE], "dropped": {STALE: dropped[STALE]}}
        reasons = [*get_args(DropReason), STALE]
        return {
            "sim_seconds": sim_seconds,
            "sim_elapsed": self.system.now,
            "clients_dropped": sum(dropped.values()),
            "dropped": {reason: dropped[reason] for reason in reasons},
        }

    def _commit(self, record: RoundRecord) -> None:
        # The flush's commit point (written now, or in the background on a slow disk:
        # BackgroundCommits); once it lands, a crash loses only jobs in flight.
        rng_meta, rng_arrays = rng_state()
        self.checkpoints.commit(
            Checkpoint(
                round=self.version,
                config_hash=self.fingerprint,
                global_arrays=numpy_arrays(self.arrays),
                record=record.to_json(),
                strategy_meta={
                    "jobs_started": {"kind": "value", "value": self.progress.jobs_started}
                },
                rng_meta=rng_meta,
                rng_arrays=rng_arrays,
                sim_now=None if self.system is None else self.system.now,
            )
        )
