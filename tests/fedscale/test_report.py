"""`fedscale.report`: plots and an HTML page from real simulated runs."""

import base64
import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from fedscale.clock import time_to_accuracy
from fedscale.exceptions import DataError
from fedscale.node_data import node_data
from fedscale.report import HEATMAP_CLIENTS, Report, build_report
from fedscale.settings import RunSettings
from fedscale.simulations import simulate

METRIC_PLOTS = {"accuracy", "loss", "clients", "accuracy-sim-time", "loss-sim-time"}


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Report:
    """Digits over 6 clients, non-iid, with the clients' own evaluation: no device model."""
    out = tmp_path_factory.mktemp("report") / "plain"
    simulate(
        out=str(out),
        num_rounds=3,
        clients=6,
        clients_per_round=3,
        local_epochs=1,
        partition="dirichlet:0.5",
        fraction_evaluate=0.5,
        export_onnx=False,
    )
    return build_report(out)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Report:
    """Synthetic natural clients on simulated phones, over-committed so that some drop."""
    out = tmp_path_factory.mktemp("report") / "simulated"
    simulate(
        out=str(out),
        num_rounds=4,
        clients=HEATMAP_CLIENTS + 20,
        clients_per_round=4,
        local_epochs=1,
        dataset="synthetic:1,1",
        device_mix="mobile-always-on",
        overcommit=0.5,
        target_accuracy=0.12,
        export_onnx=False,
    )
    return build_report(out, tmp_path_factory.mktemp("report") / "elsewhere")


def _rows(report: Report) -> list[dict]:
    text = (report.run_dir / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _settings(report: Report) -> RunSettings:
    config = tomllib.loads((report.run_dir / "config.toml").read_text())
    return RunSettings.from_run_config(config)


@pytest.mark.parametrize("which", ["plain", "simulated"])
def test_every_plot_is_a_valid_non_blank_png(which, request):
    report = request.getfixturevalue(which)
    for plot in report.plots:
        assert plot.path.parent == report.out_dir
        assert plot.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot.name
        pixels = imread(plot.path)
        assert pixels.ndim == 3 and pixels.shape[0] >= 300 and pixels.shape[1] >= 600
        assert float(pixels[..., :3].var()) > 0, f"{plot.name} is blank"
    names = {p.name for p in report.plots}
    assert len(names) == len(report.plots)
    assert {"accuracy", "loss", "clients", "label-distribution", "client-sizes"} <= names
    assert report.notes == ()


def test_simulated_time_plots_only_with_a_device_model(plain, simulated):
    assert {"accuracy-sim-time", "loss-sim-time"} <= {p.name for p in simulated.plots}
    assert not {"accuracy-sim-time", "loss-sim-time"} & {p.name for p in plain.plots}


@pytest.mark.parametrize("which", ["plain", "simulated"])
def test_each_series_is_what_metrics_jsonl_holds(which, request):
    report = request.getfixturevalue(which)
    rows = _rows(report)
    checked = 0
    for plot in report.plots:
        if plot.name not in METRIC_PLOTS:
            continue
        # The clients plot leaves out round 0, which offers no work.
        kept = [r for r in rows if r["round"] >= 1] if plot.name == "clients" else rows
        for key, values in plot.series.items():
            assert values == [r[key] for r in kept], (plot.name, key)
            checked += 1
    assert checked >= 11
    # Nulls stay nulls: round 0 has no training loss.
    assert report.plot("loss").series["train_loss"][0] is None


def test_optional_series_follow_the_run(plain, simulated):
    assert "federated_accuracy" in plain.plot("accuracy").series
    assert "federated_loss" in plain.plot("loss").series
    assert "clients_dropped" not in plain.plot("clients").series
    dropped = simulated.plot("clients").series["clients_dropped"]
    assert sum(dropped) > 0  # over-commitment drops the late finishers
    assert "federated_accuracy" not in simulated.plot("accuracy").series
    assert simulated.plot("accuracy-sim-time").series["sim_elapsed"][0] == 0.0


def test_partition_plots_match_what_the_clients_trained_on(plain):
    settings = _settings(plain)
    n = settings.num_clients
    heat = plain.plot("label-distribution")
    sizes = plain.plot("client-sizes")
    assert heat.series["client_id"] == list(range(n))
    assert sizes.series["client_id"] == list(range(n))
    for cid in range(n):
        data = node_data(settings, {"partition-id": cid, "num-partitions": n})
        expected = np.bincount(data.y_train, minlength=10).tolist()
        assert heat.series["label_counts"][cid] == expected
        assert sizes.series["num_train_samples"][cid] == len(data.y_train)
    assert f"all {n} clients" in heat.title


def test_many_clients_show_a_sample_of_natural_clients(simulated):
    settings = _settings(simulated)
    n = settings.num_clients
    heat = simulated.plot("label-distribution")
    ids = heat.series["client_id"]
    assert len(ids) == HEATMAP_CLIENTS and len(set(ids)) == len(ids)
    assert ids == sorted(ids) and 0 <= ids[0] and ids[-1] < n
    assert f"{HEATMAP_CLIENTS} of {n} clients (random sample)" in heat.title
    for cid, counts in zip(ids[:5], heat.series["label_counts"][:5], strict=True):
        data = node_data(settings, {"partition-id": cid, "num-partitions": n})
        assert counts == np.bincount(data.y_train, minlength=10).tolist()
    sizes = simulated.plot("client-sizes").series
    assert sizes["client_id"] == list(range(n))
    assert sizes["num_train_samples"][7] == len(
        node_data(settings, {"partition-id": 7, "num-partitions": n}).y_train
    )


def test_summary_numbers(plain, simulated):
    rows = _rows(simulated)
    s = simulated.summary
    assert s["rounds"] == rows[-1]["round"] == 4
    assert s["final_accuracy"] == rows[-1]["accuracy"]
    assert s["final_loss"] == rows[-1]["loss"]
    assert s["sim_seconds"] == rows[-1]["sim_elapsed"]
    assert s["clients_dropped"] == sum(r["clients_dropped"] for r in rows)
    points = [(r["sim_elapsed"], r["accuracy"]) for r in rows]
    assert s["sim_seconds_to_target"] == time_to_accuracy(points, 0.12)
    assert "sim_seconds" not in plain.summary and "target_accuracy" not in plain.summary
    assert plain.summary["best_accuracy"] == max(r["accuracy"] for r in _rows(plain))


@pytest.mark.parametrize("which", ["plain", "simulated"])
def test_html_holds_every_plot_config_and_numbers(which, request):
    report = request.getfixturevalue(which)
    page = report.html.read_text(encoding="utf-8")
    assert report.html == report.out_dir / "index.html"
    assert page.count("data:image/png;base64,") == len(report.plots)
    for plot in report.plots:
        data = base64.b64encode(plot.path.read_bytes()).decode()
        assert page.count(f'src="data:image/png;base64,{data}"') == 1, plot.name
        assert f'alt="{plot.title}"' in page
        assert f'<h2 id="{plot.name}">{plot.title}</h2>' in page
    # Self-contained: nothing is fetched from elsewhere.
    assert "http://" not in page and "https://" not in page and "<script" not in page
    config = tomllib.loads((report.run_dir / "config.toml").read_text())
    for key in config:
        assert f"<th>{key}</th>" in page
    assert f"{report.summary['final_accuracy']:.2%}" in page


def _copy_run(report: Report, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(report.run_dir, dest, ignore=shutil.ignore_patterns("report", "checkpoints"))
    return dest


def test_a_folder_without_metrics_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"expected metrics\.jsonl .*found none"):
        build_report(tmp_path)
    with pytest.raises(DataError, match="expected a folder"):
        build_report(tmp_path / "missing")


def test_a_truncated_metrics_line_is_named(plain, tmp_path):
    run = _copy_run(plain, tmp_path)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([*lines[:-1], lines[-1][:40]]) + "\n")
    with pytest.raises(DataError, match=rf"line {len(lines)}: expected one JSON object per line"):
        build_report(run)


def test_a_metrics_line_without_a_field_is_named(plain, tmp_path):
    run = _copy_run(plain, tmp_path)
    metrics = run / "metrics.jsonl"
    rows = _rows(plain)
    del rows[1]["accuracy"]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"line 2: expected 'accuracy' to be a number.*nothing"):
        build_report(run)
    metrics.write_text("")
    with pytest.raises(DataError, match="expected at least one round"):
        build_report(run)


def test_missing_config_is_refused(plain, tmp_path):
    run = _copy_run(plain, tmp_path)
    (run / "config.toml").unlink()
    with pytest.raises(DataError, match=r"expected config\.toml, found none"):
        build_report(run)


def test_data_that_cannot_be_rebuilt_is_said_not_hidden(plain, tmp_path):
    run = _copy_run(plain, tmp_path)
    config = (run / "config.toml").read_text()
    (run / "config.toml").write_text(
        config.replace('dataset = "digits"', f'dataset = "{tmp_path / "gone.npz"}"')
    )
    report = build_report(run)
    assert {p.name for p in report.plots} == {"accuracy", "loss", "clients"}
    assert len(report.notes) == 1 and "gone.npz" in report.notes[0]
    assert "No partition plots" in report.html.read_text()


def test_settings_from_another_version_are_reported_on(plain, tmp_path):
    run = _copy_run(plain, tmp_path)
    with open(run / "config.toml", "a") as handle:
        handle.write('from-the-future = "yes"\n')
    report = build_report(run)
    assert "label-distribution" in {p.name for p in report.plots}
    assert len(report.notes) == 1 and "from-the-future" in report.notes[0]
    assert "from-the-future" in report.html.read_text()
