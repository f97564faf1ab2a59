import tomllib
from pathlib import Path

import pytest

from fedscale.exceptions import ConfigError
from fedscale.settings import RunSettings

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_app_config_is_exactly_the_settings_defaults():
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert config == RunSettings().to_run_config()
    assert RunSettings.from_run_config(config) == RunSettings()


def test_round_trip_and_int_to_float_coercion():
    settings = RunSettings.from_run_config({"lr": 1, "num-rounds": 3, "partition": "dirichlet:0.5"})
    assert settings.lr == 1.0 and isinstance(settings.lr, float)
    assert RunSettings.from_run_config(settings.to_run_config()) == settings


def test_unknown_key_lists_valid_keys():
    with pytest.raises(
        ConfigError,
        match=r"unknown run-config key\(s\) epochs; valid keys are: .*local-epochs",
    ):
        RunSettings.from_run_config({"epochs": 3})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"num-rounds": 0}, r"num-rounds: expected an integer >= 1, got 0"),
        ({"num-rounds": "5"}, r"num-rounds: expected int, got '5' \(str\)"),
        ({"num-rounds": True}, r"num-rounds: expected int, got True \(bool\)"),
        ({"lr": -0.1}, r"lr: expected a learning rate > 0, got -0.1"),
        ({"test-fraction": 1.0}, r"test-fraction: expected a number in \(0, 1\)"),
        (
            {"fraction-evaluate": 2.0},
            r"fraction-evaluate: expected a number in \[0, 1\]",
        ),
        ({"partition": "dirichlet:-1"}, r"partition: expected iid"),
        ({"device": "gpu"}, r"device: expected one of auto, cpu"),
        ({"batch-size": 0}, r"batch-size: expected an integer >= 1"),
    ],
)
def test_bad_values_name_the_key_the_expectation_and_the_value(config, message):
    with pytest.raises(ConfigError, match=message):
        RunSettings.from_run_config(config)


def test_settings_are_frozen():
    with pytest.raises(AttributeError):
        RunSettings().lr = 1.0  # type: ignore[misc]


def test_the_apps_demand_a_complete_run_config():
    full = RunSettings().to_run_config()
    assert RunSettings.from_run_config(full, complete=True) == RunSettings()
    del full["partition"]
    with pytest.raises(ConfigError, match=r"expected all of fedscale's keys.*missing partition"):
        RunSettings.from_run_config(full, complete=True)
    with pytest.raises(
        ConfigError, match=r"missing allow-duplicate-samples, attack, attack-fraction, batch-size"
    ):
        RunSettings.from_run_config({}, complete=True)


def test_cached_parsing_still_checks_types():
    assert RunSettings.from_run_config({"num-rounds": 5}).num_rounds == 5
    with pytest.raises(ConfigError, match=r"num-rounds: expected int, got 5.0 \(float\)"):
        RunSettings.from_run_config({"num-rounds": 5.0})
    assert (
        RunSettings.from_run_config({"allow-duplicate-samples": False}).allow_duplicate_samples
        is False
    )
    with pytest.raises(ConfigError, match=r"allow-duplicate-samples: expected bool, got 0 \(int\)"):
        RunSettings.from_run_config({"allow-duplicate-samples": 0})
