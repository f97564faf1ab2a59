"""`--quiet` and `--json` on simulate, server, report and export; error hints; completion."""

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedscale.cli.main import app
from fedscale.cli.output import ensure_port_free, error_report, output_mode
from fedscale.exceptions import ConfigError, DeviceError, LaunchError
from fedscale.processes import free_port, stop
from fedscale.runs import RunDirectory

SMALL = ["--clients", "6", "--per-round", "3", "--rounds", "2", "--local-epochs", "1"]
FEDSCALE = str(Path(sys.executable).parent / "fedscale")


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "time"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One small finished run, made by `fedscale simulate --json`; its output is kept."""
    out = tmp_path_factory.mktemp("run") / "r"
    result = _invoke("simulate", *SMALL, "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    (out / "stdout.jsonl").write_text(result.stdout)
    (out / "stderr.txt").write_text(result.stderr)
    return out


def test_json_prints_each_round_record_then_a_summary(run):
    lines = _json_lines((run / "stdout.jsonl").read_text())
    rows = RunDirectory(run).read_metrics()
    # The rounds are metrics.jsonl's records, in order, then one summary. RoundRecord
    # stamps "time" when it is serialized, so the printed copy may be a few ms later.
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [_untimed(r) for r in lines[:-1]] == [_untimed(r) for r in rows]
    assert all(set(r) == set(rows[0]) for r in lines[:-1])
    summary = lines[-1]
    assert summary["event"] == "summary" and summary["run_dir"] == str(run)
    assert summary["rounds"] == 2
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert summary["final_loss"] == rows[-1]["loss"]
    assert summary["best_accuracy"] == max(r["accuracy"] for r in rows)
    assert summary["clients_replied_per_round"] == 3.0
    assert summary["time_to_accuracy"] is None  # no target, no virtual clock
    assert (run / "stderr.txt").read_text() == ""  # no progress bar, no info lines


def test_json_summary_reports_time_to_a_target(tmp_path):
    out = tmp_path / "r"
    result = _invoke("simulate", *SMALL, "--out", str(out), "--json", "--target-accuracy", "0.05")
    assert result.exit_code == 0, result.output
    reached = _json_lines(result.stdout)[-1]["time_to_accuracy"]
    assert reached["accuracy"] == 0.05 and reached["round"] == 0  # round 0 beats 5%
    result = _invoke(
        "simulate", *SMALL, "--out", str(tmp_path / "r2"), "--json", "--target-accuracy", "0.999"
    )
    assert _json_lines(result.stdout)[-1]["time_to_accuracy"]["round"] is None


def test_quiet_prints_nothing_and_still_writes_the_run(tmp_path):
    out = tmp_path / "r"
    result = _invoke("simulate", *SMALL, "--out", str(out), "--quiet")
    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr == ""
    assert [r["round"] for r in RunDirectory(out).read_metrics()] == [0, 1, 2]


def test_default_output_is_unchanged_for_people(tmp_path):
    result = _invoke("simulate", *SMALL, "--out", str(tmp_path / "r"))
    assert result.exit_code == 0
    assert result.stdout.strip().splitlines()[-1].startswith("final test accuracy: ")
    assert "rounds" in result.stderr  # the progress bar


def test_errors_in_json_are_one_object_on_stderr_with_a_hint(run):
    result = _invoke("simulate", *SMALL, "--out", str(run), "--json")
    assert result.exit_code == 2 and result.stdout == ""
    [error] = _json_lines(result.stderr)
    assert set(error) == {"error", "hint"}
    # This error says what to do itself (choose another --out), so it needs no hint.
    assert "already holds a run" in error["error"] and "--out" in error["error"]
    assert error["hint"] is None


def test_errors_in_quiet_mode_are_still_shown_with_their_hint(run):
    result = _invoke("simulate", *SMALL, "--out", str(run), "--quiet")
    assert result.exit_code == 2 and result.stdout == ""
    text = " ".join(result.stderr.split())
    assert text.startswith("error: run folder") and "--out" in text


def test_quiet_and_json_together_are_a_usage_error():
    result = _invoke("simulate", "--quiet", "--json")
    assert result.exit_code == 2
    assert "at most one of --quiet and --json" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("option", "value", "guess"),
    [
        ("--model", "cmn", "did you mean --model cnn?"),
        ("--dataset", "digit", "did you mean --dataset digits?"),
        ("--strategy", "fedprx", "did you mean --strategy fedprox?"),
        ("--partition", "dirichet:0.5", "did you mean --partition dirichlet:0.5?"),
    ],
)
def test_unknown_names_get_a_did_you_mean_hint(tmp_path, option, value, guess):
    result = _invoke("simulate", *SMALL, option, value, "--out", str(tmp_path / "r"), "--json")
    assert result.exit_code == 2
    [error] = _json_lines(result.stderr)
    assert repr(value) in error["error"] and error["hint"].startswith(guess)


def test_a_name_like_nothing_known_gets_no_guess():
    report = error_report(ConfigError("model: expected one of mlp, cnn or MODULE:ATTR, got 'zz'"))
    assert report.hint is not None and "did you mean" not in report.hint
    assert "fedscale simulate --help" in report.hint


def test_errors_without_a_known_remedy_have_no_hint():
    assert error_report(ConfigError("lr: expected a positive number, got -1")).hint is None
    assert "--device cpu" in (error_report(DeviceError("cuda: not available")).hint or "")


def test_a_log_named_by_the_error_gives_its_cause(tmp_path):
    log = tmp_path / "serverapp.log"
    log.write_text(
        "Traceback (most recent call last):\n"
        '  File "federation.py", line 187, in wait_for_nodes\n'
        "fedscale.exceptions.LaunchError: expected at least 3 connected SuperNodes within "
        "5 s, got 1\n"
        "ERROR :     Exit Code: 201\n"
    )
    report = error_report(LaunchError(f"the run stopped after 0; see {log}"))
    assert report.cause == "expected at least 3 connected SuperNodes within 5 s, got 1"
    assert report.hint and report.hint.startswith("start 3 edge clients")
    assert report.to_json()["cause"] == report.cause
    # A log that is gone or names no fedscale error adds nothing.
    assert error_report(LaunchError(f"see {tmp_path / 'gone.log'}")).cause is None


def test_a_taken_port_is_refused_before_anything_starts():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"--port {port} on 127.0.0.1: expected a free"):
            ensure_port_free("127.0.0.1", port, "--port")
        result = _invoke("server", "--port", str(port), "--rounds", "1", "--json")
    assert result.exit_code == 2
    [error] = _json_lines(result.stderr)
    assert "expected a free port" in error["error"] and "another port" in error["hint"]
    ensure_port_free("127.0.0.1", free_port(), "--port")  # a free one passes


def test_json_mode_turns_warnings_into_json_lines(capsys):
    from rich.console import Console

    console = Console(stderr=True)
    with output_mode(False, True, consoles=(console,), stdout=Console()):
        logging.getLogger("fedscale.test").warning("disk %s full", "/tmp")
        console.print("not shown")
    logging.getLogger("fedscale.test").warning("after")  # handlers restored: not JSON
    captured = capsys.readouterr()
    first = captured.err.splitlines()[0]
    assert json.loads(first) == {
        "level": "warning",
        "logger": "fedscale.test",
        "message": "disk /tmp full",
    }
    assert "not shown" not in captured.err and not console.quiet


def test_report_and_export_json_and_quiet(run):
    result = _invoke("report", str(run), "--json")
    assert result.exit_code == 0, result.output
    [body] = _json_lines(result.stdout)
    assert body["event"] == "report" and Path(body["html"]).is_file()
    assert {Path(p).name for p in body["plots"]} >= {"accuracy.png", "loss.png"}
    result = _invoke("report", str(run), "--quiet")
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""

    out = run / "m.onnx"
    result = _invoke("export", str(run), "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    [body] = _json_lines(result.stdout)
    assert body["event"] == "export" and body["round"] == 2 and body["path"] == str(out)
    import hashlib

    assert body["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert [p["batch_size"] for p in body["parity"]] == [1, 32, 1000]
    result = _invoke("report", str(run / "nothing"), "--json")
    assert result.exit_code == 2 and "error" in _json_lines(result.stderr)[0]


def test_show_completion_prints_a_bash_script_that_completes():
    env = {**os.environ, "SHELL": "/bin/bash"}
    shown = subprocess.run(
        [FEDSCALE, "--show-completion", "bash"], capture_output=True, text=True, env=env, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert "complete -o default -F _fedscale_completion fedscale" in shown.stdout
    # What the script runs on <TAB>: the command itself, asked to complete.
    for words, cword, expected in (("fedscale sim", 1, "simulate"), ("fedscale rep", 1, "report")):
        completed = subprocess.run(
            [FEDSCALE],
            capture_output=True,
            text=True,
            timeout=60,
            env={
                **env,
                "_FEDSCALE_COMPLETE": "complete_bash",
                "COMP_WORDS": words,
                "COMP_CWORD": str(cword),
            },
        )
        assert completed.stdout.split() == [expected]


def test_install_completion_writes_the_script_for_bash(tmp_path):
    env = {**os.environ, "SHELL": "/bin/bash", "HOME": str(tmp_path)}
    done = subprocess.run(
        [FEDSCALE, "--install-completion", "bash"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    script = tmp_path / ".bash_completions" / "fedscale.sh"
    assert "_fedscale_completion" in script.read_text()
    assert str(script) in (tmp_path / ".bashrc").read_text()


@pytest.mark.integration
def test_server_without_supernodes_names_the_cause_and_what_to_do(tmp_path):
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0"}
    argv = [
        *(sys.executable, "-m", "fedscale.cli", "server"),
        *("--port", str(free_port()), "--rounds", "1", "--round-timeout", "2"),
        *("--out", str(tmp_path / "r"), "--json"),
    ]
    # Its own process group, stdout and stderr apart; stopped by PID whatever happens.
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        server = subprocess.Popen(
            argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    try:
        code = server.wait(timeout=180)
    finally:
        stop(server)
    assert code == 2 and (tmp_path / "out").read_text() == ""
    [error] = _json_lines((tmp_path / "err").read_text())
    assert error["cause"] == "expected at least 2 connected SuperNodes within 2 s, got 0"
    assert "fedscale edge-client --server" in error["hint"] and "--min-clients" in error["hint"]


# sys.modules[name] = None makes `import name` raise ModuleNotFoundError: a serve-only
# install, as far as that module goes, in a real `fedscale` process.
_WITHOUT = (
    "import sys; sys.modules[{0!r}] = None; sys.argv[0] = 'fedscale'; "
    "from fedscale.cli.main import run; run()"
)


@pytest.mark.parametrize("module", ["flwr", "matplotlib"])
@pytest.mark.parametrize("json_output", [False, True])
def test_a_serve_only_install_says_what_to_install(run, module, json_output):
    # Without flwr, `simulate` fails setting up logging; without matplotlib, `report`
    # fails once it has read the run and starts plotting.
    args = ["simulate"] if module == "flwr" else ["report", str(run), "--out", str(run / "x")]
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT.format(module), *args]
        + (["--json"] if json_output else []),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=run,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    if json_output:
        [error] = _json_lines(done.stderr)
    else:
        text = " ".join(done.stderr.split())
        error = {"error": text.split("hint:")[0], "hint": text.split("hint:")[1]}
    assert f"{module} is not installed" in error["error"]
    assert "pip install 'fedscale[train]'" in error["hint"]


def test_other_missing_modules_are_not_hidden():
    code = _WITHOUT.format("json")
    done = subprocess.run(
        [sys.executable, "-c", code, "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr
