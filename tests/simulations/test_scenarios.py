"""Scenario files: the shipped ones load and fit their data; bad files get clear errors."""

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import fuse_dicts, parse_config_args

from fedscale.exceptions import ConfigError
from fedscale.node_data import node_data
from fedscale.settings import RunSettings
from fedscale.simulations import load_scenario
from fedscale.simulations.scenarios import SCENARIO_DIR, read_scenario, shipped_scenarios
from fedscale.simulations.system import system_for

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "simulations").glob("*.toml"))
APP_CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_the_four_scenarios_of_issue_4_ship():
    assert SCENARIO_DIR == (ROOT / "simulations").resolve()
    assert {"quickstart", "noniid-1k", "cross-device-100k", "shakespeare"} <= set(
        shipped_scenarios()
    )


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_each_shipped_scenario_loads_and_fits_its_data(path):
    settings = load_scenario(path)
    assert settings == load_scenario(path.stem)  # by name, without folder and suffix
    assert settings.clients_per_round <= settings.num_clients
    # The first client's data can be built (enough samples or natural clients for
    # num-clients), and the device model, if any, can be read.
    data = node_data(settings, {"partition-id": 0, "num-partitions": settings.num_clients})
    assert len(data.y_train) > 0
    system = system_for(settings)
    assert (system is None) == (settings.device_mix == "")
    if system is not None:
        assert system.num_clients == settings.num_clients


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_each_shipped_scenario_is_a_valid_flwr_run_config(path):
    # What `flwr run . --run-config FILE` does with it: flatten, then merge into the
    # app's config, refusing keys the app does not have.
    overrides = parse_config_args([str(path)])
    fused = fuse_dicts(APP_CONFIG, overrides)
    for key, value in overrides.items():
        assert type(value) is type(APP_CONFIG[key]), key
    assert RunSettings.from_run_config(fused, complete=True) == load_scenario(path)


def test_the_cross_device_scenario_has_devices_churn_a_deadline_and_over_commitment():
    settings = load_scenario("cross-device-100k")
    assert settings.num_clients == 100_000 and settings.dataset.startswith("synthetic:")
    assert settings.device_mix == "mobile"  # daily availability windows and churn
    assert settings.deadline > 0 and settings.overcommit > 0


def test_keys_left_out_keep_their_defaults_and_overrides_win(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('num-rounds = 7\ndataset = "mnist5k"\nlr = 1\n')
    settings = load_scenario(path, num_rounds=2)
    assert settings == RunSettings(num_rounds=2, dataset="mnist5k", lr=1.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "num-rounds = 3\nrounds = 4\nepochs = 2\n",
            r"unknown key\(s\) epochs, rounds; allowed keys are: .*clients-per-round.*num-rounds",
        ),
        ("[federation]\nnum-clients = 5\n", r"expected top-level `key = value` settings only"),
        ("num-rounds = 3\nnum-rounds = 4\n", r"expected valid TOML"),
        ('num-rounds = "3"\n', r"num-rounds: expected int, got '3' \(str\)"),
        ('device-mix = "phones"\n', r"device-mix: expected '' \(no device model\), one of"),
        ("deadline = 30.0\n", r"deadline: expected 0 unless device-mix is set"),
    ],
)
def test_bad_scenarios_get_errors_naming_the_file_and_what_was_expected(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_scenario(path)
    assert str(path) in str(caught.value)


def test_a_missing_scenario_lists_the_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"one of the shipped scenarios \(.*quickstart.*\)"):
        read_scenario("no-such-scenario")
    with pytest.raises(ConfigError, match=r"no such file"):
        read_scenario(tmp_path / "absent.toml")
