"""`fedscale report RUN_DIR`: PNGs and index.html for a finished run."""

from pathlib import Path

from typer.testing import CliRunner

from fedscale.cli.main import app
from fedscale.simulations import simulate


def test_report_writes_and_prints_the_paths(tmp_path):
    run = tmp_path / "run"
    simulate(
        out=str(run),
        num_rounds=2,
        clients=4,
        clients_per_round=2,
        local_epochs=1,
        export_onnx=False,
    )
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    paths = [Path(line) for line in result.stdout.splitlines() if line.strip()]
    assert paths[-1] == run / "report" / "index.html"
    assert {p.name for p in paths} == {
        "accuracy.png",
        "loss.png",
        "clients.png",
        "label-distribution.png",
        "client-sizes.png",
        "index.html",
    }
    assert all(p.is_file() and p.stat().st_size > 1000 for p in paths)

    elsewhere = tmp_path / "out"
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(elsewhere)])
    assert result.exit_code == 0, result.output
    assert (elsewhere / "index.html").is_file() and (elsewhere / "accuracy.png").is_file()


def test_report_on_a_folder_without_a_run_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "expected metrics.jsonl" in " ".join(result.output.split())
