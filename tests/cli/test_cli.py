from typer.testing import CliRunner

from fedscale import __version__
from fedscale.cli.main import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"fedscale {__version__}"


def test_every_command_has_help():
    for command in ("simulate", "server", "edge-client"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_server_refuses_plaintext_beyond_loopback(tmp_path):
    result = runner.invoke(app, ["server", "--host", "0.0.0.0", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "expected a loopback address" in result.output and "--insecure" in result.output


def test_edge_client_needs_its_data(tmp_path):
    result = runner.invoke(app, ["edge-client", "--server", "127.0.0.1:9092"])
    assert result.exit_code == 2 and "--data-path" in result.output


def test_third_party_mode_needs_both_apps():
    result = runner.invoke(app, ["simulate", "--server-app", "x:y"])
    assert result.exit_code == 2 and "both --server-app and --client-app" in result.output
