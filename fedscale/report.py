"""Plots and one self-contained HTML page for a finished run (``fedscale report``).

:func:`build_report` reads a run folder (:class:`fedscale.runs.RunDirectory`:
``config.toml`` and ``metrics.jsonl``) and writes, into ``<run>/report/`` by default:

``accuracy.png``, ``loss.png``
    the global model's accuracy and loss on the server's test split against the
    round (with the clients' training loss, and their own evaluation when the
    run had ``fraction-evaluate`` > 0);
``accuracy-sim-time.png``, ``loss-sim-time.png``
    the same against simulated time, when the run had a device model
    (``sim_elapsed`` in ``metrics.jsonl``), with the time to the target accuracy;
``clients.png``
    the clients each round offered work to, split into replied, failed and dropped;
``label-distribution.png``, ``client-sizes.png``
    the clients' data as the run's settings give it to them: each client's share
    of every class as a heat map, and a histogram of training-set sizes;
``index.html``
    every plot embedded as a data URI (one file that opens anywhere, offline),
    the run's final numbers and its ``config.toml`` as tables.

The partition is recomputed from ``config.toml`` the way the clients got it
(:func:`fedscale.node_data.node_data`: ``partition_indices`` over the train split
with ``num-clients`` partitions; natural-client datasets from their provider), so
it is what simulated clients and ``edge-client --partition`` nodes trained on.
Nodes with their own ``data-path`` are not described by the run folder.

Every plot keeps the series it draws (:attr:`Plot.series`), taken unchanged from
``metrics.jsonl`` (``None`` where a value is null), so a test or a notebook can
check or reuse them.
"""

from __future__ import annotations

import base64
import html
import json
import math
import tomllib
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .clock import time_to_accuracy
from .exceptions import DataError, FedscaleError
from .files import atomic_write
from .runs import RunDirectory
from .settings import RunSettings

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["HEATMAP_CLIENTS", "SIZE_CLIENTS", "Plot", "Report", "build_report", "read_metrics"]

# More rows than this make a heat map unreadable: show a random sample of clients.
HEATMAP_CLIENTS = 40
# Natural-client datasets build a client to learn its size: bound the work.
SIZE_CLIENTS = 2000

# Fields every metrics.jsonl line must have for the plots (schema 1).
_REQUIRED = {
    "round": int,
    "accuracy": float,
    "loss": float,
    "train_loss": float,
    "clients_sampled": int,
    "clients_replied": int,
    "clients_failed": int,
    "elapsed": float,
}
_NULLABLE = {"loss", "accuracy", "train_loss"}

_DPI = 110
_COLORS = {
    "test": "#1f6fb4",
    "train": "#e3801b",
    "federated": "#2b9c48",
    "target": "#9a9a9a",
    "replied": "#2b9c48",
    "failed": "#d0312d",
    "dropped": "#b5b5b5",
    "rejected": "#8e44ad",
}


@dataclass(frozen=True)
class Plot:
    """One PNG of a report and the series it draws."""

    name: str
    title: str
    caption: str
    path: Path
    series: Mapping[str, Any]


@dataclass(frozen=True)
class Report:
    """What :func:`build_report` wrote and the numbers behind it."""

    run_dir: Path
    out_dir: Path
    html: Path
    plots: tuple[Plot, ...]
    summary: Mapping[str, Any]
    config: Mapping[str, Any]
    notes: tuple[str, ...] = field(default=())

    def plot(self, name: str) -> Plot:
        """Return the plot called ``name`` (``accuracy``, ``loss``, ``clients``, ...)."""
        for p in self.plots:
            if p.name == name:
                return p
        raise KeyError(f"report has no plot {name!r}; it has {[p.name for p in self.plots]}")


def read_metrics(run: RunDirectory) -> list[dict[str, Any]]:
    """Return ``metrics.jsonl``'s lines, checked: a bad line is an error naming it."""
    path = run.metrics_path
    rows: list[dict[str, Any]] = []
    for number, row in run.numbered_metrics():
        for key, kind in _REQUIRED.items():
            value = row.get(key, ...)
            ok = (value is None and key in _NULLABLE) or (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and (kind is float or isinstance(value, int))
            )
            if not ok:
                got = "nothing" if value is ... else repr(value)
                raise DataError(
                    f"{path} line {number}: expected {key!r} to be "
                    f"{'a number' if kind is float else 'an integer'}"
                    f"{' or null' if key in _NULLABLE else ''}, got {got}"
                )
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: expected at least one round, found an empty file")
    return rows


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Report:
    """Write a run's plots and ``index.html`` into ``out_dir`` (default ``<run>/report``)."""
    run = RunDirectory(run_dir)
    if not run.path.is_dir():
        raise DataError(f"run folder: expected a folder, got {run.path} (not a folder)")
    rows = read_metrics(run)
    config = _read_config(run)
    notes: list[str] = []
    settings = _settings(config, run, notes)
    out = (Path(out_dir) if out_dir is not None else run.path / "report").absolute()
    if out.exists() and not out.is_dir():
        raise DataError(f"report folder: expected a folder, got the file {out}")
    out.mkdir(parents=True, exist_ok=True)

    plots = [_accuracy_plot(rows, settings, out), _loss_plot(rows, out)]
    simulated = any(r.get("sim_elapsed") is not None for r in rows)
    if simulated:
        plots += [_accuracy_time_plot(rows, settings, out), _loss_time_plot(rows, out)]
    plots.append(_clients_plot(rows, out))
    try:
        plots += _partition_plots(settings, out)
    except FedscaleError as err:
        # The metrics plots stand on their own; say plainly why these are missing.
        notes.append(f"No partition plots: the run's data cannot be rebuilt here ({err}).")
    summary = _summary(rows, settings)
    page = _html(run, rows, plots, summary, config, notes)
    index = out / "index.html"
    atomic_write(index, page.encode("utf-8"))
    return Report(run.path, out, index, tuple(plots), summary, config, tuple(notes))


# ------------------------------------------------------------------ reading


def _read_config(run: RunDirectory) -> dict[str, Any]:
    if not run.config_path.is_file():
        raise DataError(f"run folder {run.path}: expected config.toml, found none")
    try:
        return tomllib.loads(run.config_path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{run.config_path}: expected TOML, got unreadable text ({err})") from err


def _settings(config: Mapping[str, Any], run: RunDirectory, notes: list[str]) -> RunSettings:
    # A run written by another fedscale version may hold keys this one does not
    # know: report on the ones it does, and say which were left out.
    known = RunSettings().to_run_config()
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        notes.append(
            f"{run.config_path.name} holds settings this fedscale does not know, ignored "
            f"here: {', '.join(unknown)}."
        )
    return RunSettings.from_run_config({k: v for k, v in config.items() if k in known})


def _column(rows: Sequence[Mapping[str, Any]], key: str) -> list[Any]:
    return [r.get(key) for r in rows]


def _has(values: Sequence[Any]) -> bool:
    return any(v is not None for v in values)


def _floats(values: Sequence[Any]) -> npt.NDArray[np.float64]:
    # None (a null in metrics.jsonl) becomes NaN: matplotlib leaves a gap there.
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


# ------------------------------------------------------------------ figures


def _figure(width: float = 8.0, height: float = 4.6) -> Figure:
    from matplotlib.figure import Figure  # lazy: only reports need matplotlib

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    return fig


def _style(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=13, loc="left")
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.tick_params(labelsize=10)
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI, facecolor="white")
    return path


def _legend(fig: Figure, ax: Axes, columns: int = 2) -> None:
    # Below the axes, never over the data; constrained layout makes room for it.
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncol=min(columns, len(labels)),
        fontsize=10,
        frameon=False,
    )


def _round_axis(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _percent_axis(ax: Axes) -> None:
    from matplotlib.ticker import PercentFormatter

    ax.yaxis.set_major_formatter(PercentFormatter(1.0))


def _time_unit(seconds: npt.NDArray[np.float64]) -> tuple[float, str]:
    top = float(np.nanmax(seconds)) if np.isfinite(seconds).any() else 0.0
    if top <= 180:
        return 1.0, "s"
    if top <= 3 * 3600:
        return 60.0, "min"
    if top <= 3 * 86400:
        return 3600.0, "h"
    return 86400.0, "days"


def _accuracy_plot(rows: list[dict[str, Any]], settings: RunSettings, out: Path) -> Plot:
    series: dict[str, Any] = {
        "round": _column(rows, "round"),
        "accuracy": _column(rows, "accuracy"),
    }
    federated = _column(rows, "federated_accuracy")
    if _has(federated):
        series["federated_accuracy"] = federated
    fig = _figure()
    ax = fig.add_subplot()
    x = series["round"]
    ax.plot(
        x,
        _floats(series["accuracy"]),
        color=_COLORS["test"],
        marker=_marker(x),
        label="global model, server's test split",
    )
    if "federated_accuracy" in series:
        ax.plot(
            x,
            _floats(federated),
            color=_COLORS["federated"],
            marker=_marker(x),
            label="global model, clients' own data",
        )
    if settings.target_accuracy > 0:
        ax.axhline(
            settings.target_accuracy,
            color=_COLORS["target"],
            linestyle="--",
            label=f"target {settings.target_accuracy:.0%}",
        )
    _style(ax, "Accuracy by round", "round", "accuracy")
    _round_axis(ax)
    _percent_axis(ax)
    _legend(fig, ax)
    title = "Accuracy by round"
    caption = (
        "Accuracy of the global model after each round on the server's held-out test "
        "split (round 0: the initial model)."
    )
    return Plot("accuracy", title, caption, _save(fig, out / "accuracy.png"), series)


def _loss_plot(rows: list[dict[str, Any]], out: Path) -> Plot:
    series: dict[str, Any] = {
        "round": _column(rows, "round"),
        "loss": _column(rows, "loss"),
        "train_loss": _column(rows, "train_loss"),
    }
    federated = _column(rows, "federated_loss")
    if _has(federated):
        series["federated_loss"] = federated
    fig = _figure()
    ax = fig.add_subplot()
    x = series["round"]
    ax.plot(
        x,
        _floats(series["loss"]),
        color=_COLORS["test"],
        marker=_marker(x),
        label="global model, server's test split",
    )
    ax.plot(
        x,
        _floats(series["train_loss"]),
        color=_COLORS["train"],
        marker=_marker(x),
        label="clients' training (last epoch, weighted mean)",
    )
    if "federated_loss" in series:
        ax.plot(
            x,
            _floats(federated),
            color=_COLORS["federated"],
            marker=_marker(x),
            label="global model, clients' own data",
        )
    _style(ax, "Loss by round", "round", "cross-entropy loss")
    _round_axis(ax)
    _legend(fig, ax)
    caption = (
        "Cross-entropy of the global model on the server's test split, and the "
        "clients' mean training loss in each round (none in round 0)."
    )
    return Plot("loss", "Loss by round", caption, _save(fig, out / "loss.png"), series)


def _accuracy_time_plot(rows: list[dict[str, Any]], settings: RunSettings, out: Path) -> Plot:
    series: dict[str, Any] = {
        "sim_elapsed": _column(rows, "sim_elapsed"),
        "accuracy": _column(rows, "accuracy"),
    }
    t = _floats(series["sim_elapsed"])
    scale, unit = _time_unit(t)
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(
        t / scale,
        _floats(series["accuracy"]),
        color=_COLORS["test"],
        marker=_marker(t),
        label="global model, server's test split",
    )
    reached = _time_to_target(rows, settings)
    if settings.target_accuracy > 0:
        ax.axhline(
            settings.target_accuracy,
            color=_COLORS["target"],
            linestyle="--",
            label=f"target {settings.target_accuracy:.0%}",
        )
        if reached is not None:
            ax.axvline(
                reached / scale,
                color=_COLORS["target"],
                linestyle=":",
                label=f"reached at {_duration(reached)}",
            )
    _style(ax, "Accuracy over simulated time", f"simulated time ({unit})", "accuracy")
    _percent_axis(ax)
    _legend(fig, ax)
    caption = (
        "Accuracy of the global model against the virtual clock at each round's end "
        f"(device mix {settings.device_mix!r}): the time the clients' devices would take."
    )
    path = _save(fig, out / "accuracy-sim-time.png")
    return Plot("accuracy-sim-time", "Accuracy over simulated time", caption, path, series)


def _loss_time_plot(rows: list[dict[str, Any]], out: Path) -> Plot:
    series: dict[str, Any] = {
        "sim_elapsed": _column(rows, "sim_elapsed"),
        "loss": _column(rows, "loss"),
        "train_loss": _column(rows, "train_loss"),
    }
    t = _floats(series["sim_elapsed"])
    scale, unit = _time_unit(t)
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(
        t / scale,
        _floats(series["loss"]),
        color=_COLORS["test"],
        marker=_marker(t),
        label="global model, server's test split",
    )
    ax.plot(
        t / scale,
        _floats(series["train_loss"]),
        color=_COLORS["train"],
        marker=_marker(t),
        label="clients' training (last epoch, weighted mean)",
    )
    _style(ax, "Loss over simulated time", f"simulated time ({unit})", "cross-entropy loss")
    _legend(fig, ax)
    caption = "Test and training loss against the virtual clock at each round's end."
    path = _save(fig, out / "loss-sim-time.png")
    return Plot("loss-sim-time", "Loss over simulated time", caption, path, series)


def _clients_plot(rows: list[dict[str, Any]], out: Path) -> Plot:
    # Round 0 evaluates the initial model and offers no work: it has no bar.
    trained = [r for r in rows if r["round"] >= 1]
    series: dict[str, Any] = {
        "round": _column(trained, "round"),
        "clients_sampled": _column(trained, "clients_sampled"),
        "clients_replied": _column(trained, "clients_replied"),
        "clients_failed": _column(trained, "clients_failed"),
    }
    stacks = [("clients_replied", "replied", "replied"), ("clients_failed", "failed", "failed")]
    optional = [
        ("clients_rejected", "rejected (failed validation)", "rejected"),
        ("clients_dropped", "dropped (update not used)", "dropped"),
    ]
    for key, label, color in optional:
        values = _column(trained, key)
        if _has(values):
            series[key] = values
            stacks.append((key, label, color))
    x = np.array(series["round"], dtype=np.float64)
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.8 if len(x) <= 60 else 1.0
    bottom = np.zeros(len(x))
    for key, label, color in stacks:
        heights = np.nan_to_num(_floats(series[key]))
        ax.bar(
            x, heights, width=width, bottom=bottom, color=_COLORS[color], label=label, linewidth=0
        )
        bottom = bottom + heights
    # The outline is the clients offered work: the outcomes stack up to it. Many
    # thin outlined bars merge into stripes, so long runs get a step line instead.
    sampled = _floats(series["clients_sampled"])
    if len(x) <= 60:
        ax.bar(
            x,
            sampled,
            width=width,
            fill=False,
            edgecolor="black",
            linewidth=0.8,
            label="offered work",
        )
    else:
        ax.step(x, sampled, where="mid", color="black", linewidth=1.0, label="offered work")
    _style(ax, "Clients per round", "round", "clients")
    _round_axis(ax)
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    top = float(np.nanmax(sampled)) if np.isfinite(sampled).any() else 1.0
    ax.set_ylim(0, max(top, 1.0) * 1.08)
    _legend(fig, ax, columns=3)
    caption = (
        "The clients each round offered work to (outline), by outcome: replied with an "
        "update that was averaged, failed (an error or no reply before round-timeout)"
        + (", rejected by validation" if "clients_rejected" in series else "")
        + (
            ", or dropped by the device model (offline, deadline, churn, over-commit)."
            if "clients_dropped" in series
            else "."
        )
    )
    return Plot("clients", "Clients per round", caption, _save(fig, out / "clients.png"), series)


def _marker(x: Sized) -> str | None:
    return "o" if len(x) <= 30 else None


# ------------------------------------------------------------------ partition


@dataclass(frozen=True)
class _Partition:
    num_classes: int
    # training-set size of each client in ``size_ids``
    size_ids: npt.NDArray[np.int64]
    sizes: npt.NDArray[np.int64]
    # per-class training-sample counts of each client in ``heat_ids``
    heat_ids: npt.NDArray[np.int64]
    counts: npt.NDArray[np.int64]


def _sample_ids(num_clients: int, limit: int, seed: int) -> npt.NDArray[np.int64]:
    if num_clients <= limit:
        return np.arange(num_clients, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_clients, size=limit, replace=False)).astype(np.int64)


def _partition(settings: RunSettings) -> _Partition:
    from .node_data import has_natural_clients, natural_provider

    n = settings.num_clients
    heat_ids = _sample_ids(n, HEATMAP_CLIENTS, settings.seed)
    if has_natural_clients(settings.dataset):
        provider = natural_provider(settings)
        size_ids = _sample_ids(n, SIZE_CLIENTS, settings.seed)
        sizes = np.array([provider.num_train_samples(int(c)) for c in size_ids], np.int64)
        k = provider.num_classes
        counts = np.stack(
            [np.bincount(provider.client_data(int(c)).y_train, minlength=k)[:k] for c in heat_ids]
        ).astype(np.int64)
        return _Partition(k, size_ids, sizes, heat_ids, counts)

    from .datasets import load_dataset
    from .partition import partition_indices

    data = load_dataset(
        settings.dataset,
        seed=settings.seed,
        test_fraction=settings.test_fraction,
        label_column=settings.label_column,
    )
    y = data.y_train
    # As fedscale.node_data partitions it. With more clients than samples,
    # client i holds partition i mod samples (partition_indices' definition),
    # so the base partitions are computed once instead of once per client.
    parts_n = min(n, len(y)) if settings.allow_duplicate_samples else n
    parts = partition_indices(
        y,
        parts_n,
        settings.partition,
        settings.seed,
        allow_duplicates=settings.allow_duplicate_samples,
    )
    lengths = np.array([len(p) for p in parts], dtype=np.int64)
    size_ids = np.arange(n, dtype=np.int64)
    sizes = lengths[size_ids % parts_n]
    k = data.num_classes
    counts = np.stack([np.bincount(y[parts[int(c) % parts_n]], minlength=k)[:k] for c in heat_ids])
    return _Partition(k, size_ids, sizes, heat_ids, counts.astype(np.int64))


def _partition_plots(settings: RunSettings, out: Path) -> list[Plot]:
    part = _partition(settings)
    n = settings.num_clients
    how = (
        f"{settings.dataset}'s natural clients"
        if _natural(settings)
        else f"{settings.dataset}, partition {settings.partition}"
    )
    return [_heatmap(part, settings, how, out), _sizes_plot(part, n, how, out)]


def _natural(settings: RunSettings) -> bool:
    from .node_data import has_natural_clients

    return has_natural_clients(settings.dataset)


def _heatmap(part: _Partition, settings: RunSettings, how: str, out: Path) -> Plot:
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    n, shown = settings.num_clients, len(part.heat_ids)
    totals = part.counts.sum(axis=1, keepdims=True)
    shares = part.counts / np.maximum(totals, 1)
    which = f"all {n} clients" if shown == n else f"{shown} of {n} clients (random sample)"
    title = f"Label distribution: {which}"
    height = min(9.0, max(3.6, 1.4 + 0.19 * shown))
    fig = _figure(8.0, height)
    ax = fig.add_subplot()
    image = ax.imshow(
        shares,
        aspect="auto",
        cmap="YlGnBu",
        vmin=0.0,
        vmax=max(float(shares.max()), 1e-9),
        interpolation="nearest",
    )
    ax.set_title(title, fontsize=13, loc="left")
    ax.set_xlabel("class", fontsize=11)
    ax.set_ylabel("client id", fontsize=11)
    step = max(1, math.ceil(shown / HEATMAP_CLIENTS))
    ax.set_yticks(range(0, shown, step), [str(c) for c in part.heat_ids[::step]], fontsize=9)
    if part.num_classes <= 20:
        ax.set_xticks(range(part.num_classes), [str(c) for c in range(part.num_classes)])
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=9)
    bar = fig.colorbar(image, ax=ax, format=PercentFormatter(1.0))
    bar.set_label("share of the client's training samples", fontsize=10)
    caption = (
        f"Each row is one client's training data ({how}, seed {settings.seed}); a cell is "
        "the share of that client's samples in a class. Rows sum to 100%."
    )
    series = {"client_id": part.heat_ids.tolist(), "label_counts": part.counts.tolist()}
    path = _save(fig, out / "label-distribution.png")
    return Plot("label-distribution", title, caption, path, series)


def _sizes_plot(part: _Partition, n: int, how: str, out: Path) -> Plot:
    from matplotlib.ticker import MaxNLocator

    sizes = part.sizes
    shown = len(sizes)
    which = f"all {n} clients" if shown == n else f"{shown} of {n} clients (random sample)"
    title = f"Client training-set sizes: {which}"
    fig = _figure()
    ax = fig.add_subplot()
    low, high = int(sizes.min()), int(sizes.max())
    log = low > 0 and high / low > 50  # heavy-tailed sizes (synthetic): log-spaced bins
    if log:
        bins: Any = np.geomspace(low, high + 1, 30)
        ax.set_xscale("log")
    elif high - low < 30:
        bins = np.arange(low, high + 2) - 0.5  # one bar per size, with room either side
        pad = max(2, (high - low) // 4 + 1)
        ax.set_xlim(low - pad - 0.5, high + pad + 0.5)
    else:
        bins = 30
    ax.hist(
        sizes,
        bins=bins,
        color=_COLORS["test"],
        edgecolor="white",
        linewidth=0.5,
        rwidth=0.9 if isinstance(bins, np.ndarray) and not log else None,
    )
    if not log:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _style(ax, title, "training samples per client" + (" (log scale)" if log else ""), "clients")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    mean, median = float(sizes.mean()), float(np.median(sizes))
    ax.axvline(
        median,
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"median {median:g}, mean {mean:.1f}",
    )
    ax.legend(loc="best", fontsize=10)
    caption = (
        f"How many training samples each client holds ({how}); min {low}, max {high}, "
        f"total {int(sizes.sum())}."
    )
    series = {"client_id": part.size_ids.tolist(), "num_train_samples": sizes.tolist()}
    return Plot("client-sizes", title, caption, _save(fig, out / "client-sizes.png"), series)


# ------------------------------------------------------------------ summary and page


def _time_to_target(rows: list[dict[str, Any]], settings: RunSettings) -> float | None:
    if settings.target_accuracy <= 0:
        return None
    points = [
        (float(r["sim_elapsed"]), float(r["accuracy"]))
        for r in rows
        if r.get("sim_elapsed") is not None and r.get("accuracy") is not None
    ]
    return time_to_accuracy(points, settings.target_accuracy)


def _summary(rows: list[dict[str, Any]], settings: RunSettings) -> dict[str, Any]:
    last = rows[-1]
    scored = [r for r in rows if r["accuracy"] is not None]
    best = max(scored, key=lambda r: r["accuracy"]) if scored else None
    summary: dict[str, Any] = {
        "rounds": last["round"],
        "final_accuracy": last["accuracy"],
        "final_loss": last["loss"],
        "best_accuracy": best["accuracy"] if best else None,
        "best_round": best["round"] if best else None,
        "wall_seconds": last["elapsed"],
        "clients_replied": sum(r["clients_replied"] for r in rows),
        "clients_failed": sum(r["clients_failed"] for r in rows),
    }
    if _has(_column(rows, "clients_dropped")):
        summary["clients_dropped"] = sum(r.get("clients_dropped") or 0 for r in rows)
    if last.get("sim_elapsed") is not None:
        summary["sim_seconds"] = last["sim_elapsed"]
    if settings.target_accuracy > 0:
        summary["target_accuracy"] = settings.target_accuracy
        hit = [r["round"] for r in scored if r["accuracy"] >= settings.target_accuracy]
        summary["rounds_to_target"] = hit[0] if hit else None
        if "sim_seconds" in summary:
            summary["sim_seconds_to_target"] = _time_to_target(rows, settings)
    return summary


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _summary_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = [
        ("rounds", str(summary["rounds"])),
        ("final accuracy", _pct(summary["final_accuracy"])),
        (
            "final loss",
            "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}",
        ),
        ("best accuracy", f"{_pct(summary['best_accuracy'])} (round {summary['best_round']})"),
        ("wall time", _duration(summary["wall_seconds"])),
        ("client updates used", str(summary["clients_replied"])),
        ("client failures", str(summary["clients_failed"])),
    ]
    if "clients_dropped" in summary:
        out.append(("clients dropped", str(summary["clients_dropped"])))
    if "sim_seconds" in summary:
        out.append(("simulated time", _duration(summary["sim_seconds"])))
    if "target_accuracy" in summary:
        target = f"{summary['target_accuracy'] * 100:g}%"
        hit = summary["rounds_to_target"]
        out.append((f"rounds to {target}", "not reached" if hit is None else str(hit)))
        if "sim_seconds_to_target" in summary:
            t = summary["sim_seconds_to_target"]
            out.append(
                (f"simulated time to {target}", "not reached" if t is None else _duration(t))
            )
    return out


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 60rem; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0; }
th, td { text-align: left; padding: 0.2rem 1rem 0.2rem 0; border-bottom: 1px solid #eee;
         vertical-align: top; }
th { font-weight: 600; }
td code { font-size: 0.9rem; }
figure { margin: 1rem 0 2rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.95rem; }
.note { background: #fff6e0; border-left: 4px solid #e3a21b; padding: 0.5rem 1rem; }
.muted { color: #666; }
"""


def _html(
    run: RunDirectory,
    rows: list[dict[str, Any]],
    plots: list[Plot],
    summary: Mapping[str, Any],
    config: Mapping[str, Any],
    notes: list[str],
) -> str:
    e = html.escape
    started = rows[0].get("time", "")
    ended = rows[-1].get("time", "")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>fedscale report: {e(run.path.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>fedscale report: {e(run.path.name)}</h1>",
        f'<p class="muted">{e(str(run.path))}<br>{e(str(started))} to {e(str(ended))}</p>',
    ]
    for note in notes:
        parts.append(f'<p class="note">{e(note)}</p>')
    parts.append("<h2>Final numbers</h2><table>")
    for name, value in _summary_rows(summary):
        parts.append(f"<tr><th>{e(name)}</th><td>{e(value)}</td></tr>")
    parts.append("</table>")
    for plot in plots:
        data = base64.b64encode(plot.path.read_bytes()).decode("ascii")
        parts += [
            f'<h2 id="{e(plot.name)}">{e(plot.title)}</h2>',
            f'<figure><img src="data:image/png;base64,{data}" alt="{e(plot.title)}">',
            f"<figcaption>{e(plot.caption)}</figcaption></figure>",
        ]
    parts.append("<h2>Configuration</h2>")
    parts.append('<p class="muted">config.toml, the settings the run used.</p><table>')
    for key, value in config.items():
        shown = json.dumps(value) if not isinstance(value, str) else value
        parts.append(f"<tr><th>{e(str(key))}</th><td><code>{e(shown)}</code></td></tr>")
    parts.append("</table></body></html>\n")
    return "\n".join(parts)
