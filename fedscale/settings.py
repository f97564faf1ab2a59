"""The settings of a fedscale run, as one typed and validated dataclass.

Flower hands apps their run configuration as a flat mapping with kebab-case keys
(``[tool.flwr.app.config]`` in ``pyproject.toml`` plus ``--run-config``
overrides). :class:`RunSettings` is the single place that mapping is parsed and
checked; everything else takes a ``RunSettings``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

from .attacks import Attack
from .compression import check_compression_settings
from .devices import BUILTIN_MIXES
from .exceptions import ConfigError
from .partition import parse_scheme
from .privacy import check_privacy_settings

__all__ = ["RunSettings", "parse_device_name", "parse_strategy_args"]

_TRACES = (".csv", ".json")

_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def parse_device_name(name: str) -> str:
    """Check a device name's syntax: ``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N``."""
    if not isinstance(name, str) or not _DEVICE_RE.fullmatch(name):
        raise ConfigError(f"device: expected one of auto, cpu, cuda, cuda:N, mps; got {name!r}")
    return name


@dataclass(frozen=True)
class RunSettings:
    """Everything the fedscale ServerApp and ClientApp need to know about a run.

    The defaults are the embedded default job: ``fedscale simulate`` with no options.
    """

    num_rounds: int = 100
    num_clients: int = 100
    clients_per_round: int = 10
    min_clients: int = 2
    fraction_evaluate: float = 0.0
    round_timeout: float = 600.0
    local_epochs: int = 5
    batch_size: int = 16
    lr: float = 0.1
    seed: int = 0
    dataset: str = "digits"
    label_column: str = "label"
    test_fraction: float = 0.2
    partition: str = "iid"
    allow_duplicate_samples: bool = False
    model: str = "mlp"
    device: str = "auto"
    device_mix: str = ""
    deadline: float = 0.0
    overcommit: float = 0.0
    compute_scale: float = 1.0
    target_accuracy: float = 0.0
    keep_models: int = 5
    export_onnx: bool = True
    out: str = ""
    resume: bool = False
    strategy: str = "fedavg"
    strategy_args: str = ""
    attack: str = ""
    attack_fraction: float = 0.0
    max_examples: int = 1_000_000
    max_update_bytes: int = 0
    min_replies: int = 1
    dp: str = ""
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 1.0
    dp_delta: float = 0.0
    dp_target_quantile: float = 0.5
    dp_clip_lr: float = 0.2
    dp_clipped_count_stddev: float = 0.0
    compression: str = ""
    secagg: bool = False
    secagg_num_shares: float = 3.0
    secagg_reconstruction_threshold: float = 2.0
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4194304
    secagg_max_weight: float = 1000.0

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            expected = _FIELD_TYPES[field.name]
            # bool is an int subclass: refuse it where a number is expected.
            wrong_bool = isinstance(value, bool) and expected is not bool
            if wrong_bool or not isinstance(value, expected):
                raise ConfigError(
                    f"{_key(field.name)}: expected {expected.__name__}, "
                    f"got {value!r} ({type(value).__name__})"
                )
        _check(self.num_rounds >= 1, "num-rounds", "an integer >= 1", self.num_rounds)
        _check(self.num_clients >= 1, "num-clients", "an integer >= 1", self.num_clients)
        _check(
            self.clients_per_round >= 1,
            "clients-per-round",
            "an integer >= 1",
            self.clients_per_round,
        )
        _check(self.min_clients >= 1, "min-clients", "an integer >= 1", self.min_clients)
        _check(
            0.0 <= self.fraction_evaluate <= 1.0,
            "fraction-evaluate",
            "a number in [0, 1]",
            self.fraction_evaluate,
        )
        _check(self.round_timeout > 0, "round-timeout", "seconds > 0", self.round_timeout)
        _check(self.local_epochs >= 1, "local-epochs", "an integer >= 1", self.local_epochs)
        _check(self.batch_size >= 1, "batch-size", "an integer >= 1", self.batch_size)
        _check(self.lr > 0, "lr", "a learning rate > 0", self.lr)
        _check(
            0.0 < self.test_fraction < 1.0,
            "test-fraction",
            "a number in (0, 1)",
            self.test_fraction,
        )
        _check(bool(self.dataset), "dataset", "a dataset name or path", self.dataset)
        _check(bool(self.model), "model", "a model name or MODULE:ATTR", self.model)
        _check(
            self.min_replies >= 1,
            "min-replies",
            "an integer >= 1 (replies a round needs to update the global model)",
            self.min_replies,
        )
        _check(self.keep_models >= 1, "keep-models", "an integer >= 1", self.keep_models)
        _check(
            self.max_examples >= 1,
            "max-examples",
            "an integer >= 1 (the most num-examples an update may claim)",
            self.max_examples,
        )
        _check(
            self.max_update_bytes >= 0,
            "max-update-bytes",
            "an integer >= 0 (0: twice the global model's bytes plus 1 MiB)",
            self.max_update_bytes,
        )
        _check_simulated_system(self)
        _check_strategy_and_attack(self)
        check_privacy_settings(self)
        check_compression_settings(self)
        _check_secagg(self)
        parse_scheme(self.partition)
        parse_device_name(self.device)

    @classmethod
    def from_run_config(
        cls, run_config: Mapping[str, Any], *, complete: bool = False
    ) -> RunSettings:
        """Build settings from a Flower run config (kebab-case keys).

        Unknown keys are an error that lists the valid ones. Absent keys keep
        their defaults, unless ``complete``: the apps ask for every key, so a
        runtime that hands them an empty or foreign run config fails loudly
        instead of training on defaults.
        """
        if cls is RunSettings:
            try:
                # The type is part of the key: True == 1 and 5 == 5.0 must not
                # share a cache entry, or a wrong type would pass unchecked.
                key = tuple(sorted((k, type(v).__name__, v) for k, v in run_config.items()))
                return _parse_cached(key, complete)
            except TypeError:  # an unhashable value: parse it uncached, to report it
                pass
        return cls._parse(run_config, complete)

    @classmethod
    def _parse(cls, run_config: Mapping[str, Any], complete: bool) -> RunSettings:
        valid = {_key(f.name): f.name for f in fields(cls)}
        unknown = sorted(set(run_config) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {', '.join(unknown)}; "
                f"valid keys are: {', '.join(sorted(valid))}"
            )
        missing = sorted(set(valid) - set(run_config))
        if complete and missing:
            raise ConfigError(
                f"run config: expected all of fedscale's keys (pyproject.toml "
                f"[tool.flwr.app.config]); missing {', '.join(missing)}"
            )
        kwargs = {valid[k]: _coerce(valid[k], v) for k, v in run_config.items()}
        return cls(**kwargs)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Return the settings as a Flower run config (kebab-case keys)."""
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> RunSettings:
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@lru_cache(maxsize=64)
def _parse_cached(items: tuple[tuple[str, str, Any], ...], complete: bool) -> RunSettings:
    # Every message of a run carries the same run config: parse it once.
    return RunSettings._parse({key: value for key, _, value in items}, complete)


_FIELD_TYPES: dict[str, type] = {
    "num_rounds": int,
    "num_clients": int,
    "clients_per_round": int,
    "min_clients": int,
    "fraction_evaluate": float,
    "round_timeout": float,
    "local_epochs": int,
    "batch_size": int,
    "lr": float,
    "seed": int,
    "dataset": str,
    "label_column": str,
    "test_fraction": float,
    "partition": str,
    "allow_duplicate_samples": bool,
    "model": str,
    "device": str,
    "device_mix": str,
    "deadline": float,
    "overcommit": float,
    "compute_scale": float,
    "target_accuracy": float,
    "keep_models": int,
    "export_onnx": bool,
    "out": str,
    "resume": bool,
    "strategy": str,
    "strategy_args": str,
    "attack": str,
    "attack_fraction": float,
    "max_examples": int,
    "max_update_bytes": int,
    "min_replies": int,
    "dp": str,
    "dp_noise_multiplier": float,
    "dp_clipping_norm": float,
    "dp_delta": float,
    "dp_target_quantile": float,
    "dp_clip_lr": float,
    "dp_clipped_count_stddev": float,
    "compression": str,
    "secagg": bool,
    "secagg_num_shares": float,
    "secagg_reconstruction_threshold": float,
    "secagg_clipping_range": float,
    "secagg_quantization_range": int,
    "secagg_max_weight": float,
}


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _coerce(field_name: str, value: Any) -> Any:
    # TOML and Flower's --run-config parser give `1` for a float field and
    # "1" never; accept ints for floats, nothing else.
    if _FIELD_TYPES[field_name] is float and type(value) is int:
        return float(value)
    return value


def _check(ok: bool, key: str, expected: str, got: object) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def _check_simulated_system(s: RunSettings) -> None:
    """Check the virtual-clock settings (``device-mix`` and what only it gives meaning to)."""
    # NaN fails every comparison, so each check below also refuses it.
    _check(
        s.deadline >= 0 and s.deadline < math.inf, "deadline", "seconds >= 0 (0: none)", s.deadline
    )
    _check(
        s.overcommit >= 0 and s.overcommit < math.inf,
        "overcommit",
        "a fraction >= 0 (0.3: offer work to 30% more clients)",
        s.overcommit,
    )
    _check(
        s.compute_scale > 0 and s.compute_scale < math.inf,
        "compute-scale",
        "a number > 0 (the model's cost per sample relative to the device profiles')",
        s.compute_scale,
    )
    _check(
        0.0 <= s.target_accuracy <= 1.0,
        "target-accuracy",
        "a number in [0, 1] (0: none)",
        s.target_accuracy,
    )
    mix = s.device_mix
    _check(
        mix == "" or mix == mix.strip() and (mix in BUILTIN_MIXES or mix.lower().endswith(_TRACES)),
        "device-mix",
        f"'' (no device model), one of {', '.join(BUILTIN_MIXES)}, or a .csv or .json trace file",
        mix,
    )
    if not mix:
        # Without devices there is no virtual time: a deadline or over-commitment
        # would silently do nothing.
        for key, value in (("deadline", s.deadline), ("overcommit", s.overcommit)):
            _check(value == 0, key, "0 unless device-mix is set (it needs device profiles)", value)


def parse_strategy_args(text: str) -> dict[str, str]:
    """Split a ``strategy-args`` setting, ``'key=value key2=value2'``, into its pairs.

    Flower's run configs hold scalars only, hence one string. Values are kept as
    text: the strategy registry (``fedscale.server.strategies``) converts them to
    the types its strategy's constructor takes.
    """
    pairs: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if not sep or not key or not value:
            raise ConfigError(
                f"strategy-args: expected space-separated key=value pairs "
                f"(proximal-mu=0.1 beta=0.2), got {token!r} in {text!r}"
            )
        if key in pairs:
            raise ConfigError(f"strategy-args: expected each key once, got {key!r} twice")
        pairs[key] = value
    return pairs


def _check_strategy_and_attack(s: RunSettings) -> None:
    """Check the strategy's and the attack's syntax (the registry checks names and types)."""
    _check(
        s.strategy == s.strategy.strip() and bool(s.strategy),
        "strategy",
        "a strategy name such as fedavg, fedprox or krum",
        s.strategy,
    )
    parse_strategy_args(s.strategy_args)
    attack = Attack.parse(s.attack)
    _check(
        0.0 <= s.attack_fraction <= 1.0,
        "attack-fraction",
        "a fraction of the clients in [0, 1]",
        s.attack_fraction,
    )
    # Either alone would silently do nothing.
    if attack is None:
        _check(
            s.attack_fraction == 0,
            "attack-fraction",
            "0 unless attack is set (sign-flip, scale:<factor> or noise:<std>)",
            s.attack_fraction,
        )
    else:
        _check(
            s.attack_fraction > 0,
            "attack-fraction",
            f"a fraction > 0 of the clients to make Byzantine with attack {s.attack!r}",
            s.attack_fraction,
        )


# Flower's SecAgg+ samples its masks below this modulus (SecAggPlusWorkflow's largest).
SECAGG_MODULUS = 2**32
_SECAGG_DEFAULTS = {
    "secagg_num_shares": 3.0,
    "secagg_reconstruction_threshold": 2.0,
    "secagg_clipping_range": 8.0,
    "secagg_quantization_range": 4194304,
    "secagg_max_weight": 1000.0,
}


def _check_secagg(s: RunSettings) -> None:
    """Check SecAgg+'s settings, and refuse what does not combine with it (docs/secagg.md).

    With SecAgg+ the server only ever holds the masked sum of a round's updates,
    so everything that needs an individual update on the server, and everything
    fedscale's own round loop does that Flower's legacy workflow does not, is
    refused here instead of silently doing nothing.
    """
    if not s.secagg:
        # A secagg-* value without secagg would silently do nothing.
        for name, default in _SECAGG_DEFAULTS.items():
            value = getattr(s, name)
            _check(value == default, _key(name), f"{default!r} unless secagg is true", value)
        return
    _check(
        s.clients_per_round >= 3,
        "clients-per-round",
        "at least 3 with secagg (with 2, each client could subtract its own update from the sum)",
        s.clients_per_round,
    )
    shares, threshold = s.secagg_num_shares, s.secagg_reconstruction_threshold
    _check(
        0 < shares <= 1 or (shares >= 3 and shares == int(shares)),
        "secagg-num-shares",
        "a fraction in (0, 1] of the round's clients, or a whole number >= 3",
        shares,
    )
    _check(
        0 < threshold <= 1 or (threshold >= 2 and threshold == int(threshold)),
        "secagg-reconstruction-threshold",
        "a fraction in (0, 1] of the shares, or a whole number >= 2",
        threshold,
    )
    if shares > 1:
        _check(
            threshold < shares,
            "secagg-reconstruction-threshold",
            f"fewer shares than secagg-num-shares ({shares:g})",
            threshold,
        )
        _check(
            shares <= s.clients_per_round,
            "secagg-num-shares",
            f"at most clients-per-round ({s.clients_per_round})",
            shares,
        )
    _check(
        0 < s.secagg_clipping_range < math.inf,
        "secagg-clipping-range",
        "a number > 0 (updates are clipped to [-range, range] before quantization)",
        s.secagg_clipping_range,
    )
    _check(
        0 < s.secagg_quantization_range < SECAGG_MODULUS,
        "secagg-quantization-range",
        f"an integer in [1, {SECAGG_MODULUS - 1}]",
        s.secagg_quantization_range,
    )
    _check(
        0 < s.secagg_max_weight < math.inf,
        "secagg-max-weight",
        "a number > 0 (the most examples one update is weighted by)",
        s.secagg_max_weight,
    )
    # The masked sum of the round's quantized updates must not wrap around the modulus.
    most = SECAGG_MODULUS // s.secagg_quantization_range - 1
    _check(
        s.clients_per_round <= most,
        "clients-per-round",
        f"at most {most} with secagg-quantization-range {s.secagg_quantization_range} "
        f"(the sum of the round's quantized updates must stay below 2**32)",
        s.clients_per_round,
    )
    refused = (
        (s.strategy == "fedavg", "strategy", "fedavg (SecAgg+ sums; only FedAvg averages a sum)"),
        (s.strategy_args == "", "strategy-args", "'' (Flower's legacy FedAvg runs SecAgg+)"),
        (s.dp in ("", "local"), "dp", "'' or local (central DP needs each update on the server)"),
        (s.device_mix == "", "device-mix", "'' (the virtual clock runs fedscale's own round loop)"),
        (not s.resume, "resume", "false (a SecAgg+ run cannot be resumed)"),
        (s.compression == "", "compression", "'' (SecAgg+ sends its own quantized integers)"),
        (
            s.fraction_evaluate == 0,
            "fraction-evaluate",
            "0 (SecAgg+ runs server-side evaluation only)",
        ),
    )
    for ok, key, expected in refused:
        _check(ok, key, f"{expected} with secagg", getattr(s, key.replace("-", "_")))
