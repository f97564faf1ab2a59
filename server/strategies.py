"""Every strategy Flower 1.42 ships for the Message API, by name, with checked parameters.

A run names its strategy (``strategy``, default ``fedavg``) and passes it
parameters as one string, ``strategy-args = "key=value key2=value2"``, because
Flower's run configs hold scalars only. Keys are the constructor's parameter
names in kebab-case (``proximal-mu`` for ``proximal_mu``); values are converted
to the types the constructor declares and checked, and an unknown name or key is
an error that lists the valid ones.

The strategies are Flower's own, from ``flwr.serverapp.strategy``; all of them
subclass ``FedAvg``, so the round loop sizes their sampling every round
(:func:`fedscale.server.federation.size_for_round`). The constructor parameters
that the run's settings already determine are not offered: the sampling ones
(``clients-per-round``, ``fraction-evaluate``), the record keys of fedscale's
ClientApp (``num-examples``, ``train-loss``) and callables. QFedAvg's
``client-learning-rate`` defaults to the run's ``lr``: it is the clients'
learning rate, from which QFedAvg estimates the Lipschitz constant.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_type_hints

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
)

from fedscale.exceptions import ConfigError
from fedscale.settings import RunSettings, parse_strategy_args

__all__ = [
    "STRATEGIES",
    "StrategyParam",
    "build_strategy",
    "check_round_size",
    "strategy_params",
]

# Flower 1.42's Message-API strategies. SecAgg+ and FedXgb* are not here: the
# first exists only on Flower's legacy path, the others aggregate XGBoost trees.
STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "qfedavg": QFedAvg,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
}

# Constructor parameters the run's settings and fedscale's apps decide.
_MANAGED = frozenset(
    {
        "fraction_train",
        "fraction_evaluate",
        "min_train_nodes",
        "min_evaluate_nodes",
        "min_available_nodes",
        "weighted_by_key",
        "arrayrecord_key",
        "configrecord_key",
        "train_metrics_aggr_fn",
        "evaluate_metrics_aggr_fn",
        "selection_rule",
        "train_loss_key",
    }
)

_Check = tuple[Callable[[Any], bool], str]
_POSITIVE: _Check = (lambda v: v > 0, "> 0")
_NON_NEGATIVE: _Check = (lambda v: v >= 0, ">= 0")
_UNIT: _Check = (lambda v: 0 <= v < 1, "in [0, 1)")
# Ranges Flower's constructors accept but that make no sense (or divide by zero).
_CHECKS: dict[str, _Check] = {
    "proximal_mu": _NON_NEGATIVE,
    "server_learning_rate": _POSITIVE,
    "server_momentum": _UNIT,
    "eta": _POSITIVE,
    "eta_l": _POSITIVE,
    "tau": _POSITIVE,
    "beta_1": _UNIT,
    "beta_2": _UNIT,
    "q": _NON_NEGATIVE,
    "client_learning_rate": _POSITIVE,
    "beta": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "num_malicious_nodes": _NON_NEGATIVE,
    "num_nodes_to_select": (lambda v: v >= 1, ">= 1"),
}

_INT = re.compile(r"[-+]?\d+")


@dataclass(frozen=True)
class StrategyParam:
    """One parameter a strategy takes from ``strategy-args``."""

    key: str  # kebab-case, as written in strategy-args
    name: str  # the constructor's parameter
    type: type
    default: Any

    def convert(self, strategy: str, text: str) -> Any:
        """Convert ``text`` to this parameter's type and check its range."""
        where = f"strategy-args {self.key} (for {strategy})"
        value: Any
        if self.type is bool:
            if text.lower() not in ("true", "false"):
                raise ConfigError(f"{where}: expected true or false, got {text!r}")
            value = text.lower() == "true"
        elif self.type is int:
            if not _INT.fullmatch(text):
                raise ConfigError(f"{where}: expected an integer, got {text!r}")
            value = int(text)
        elif self.type is float:
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {text!r}")
        else:
            value = text
        check = _CHECKS.get(self.name)
        if check is not None and not check[0](value):
            raise ConfigError(f"{where}: expected a number {check[1]}, got {text!r}")
        return value


def strategy_params(name: str) -> dict[str, StrategyParam]:
    """Return the parameters strategy ``name`` takes from ``strategy-args``, by key."""
    cls = _strategy_class(name)
    hints = get_type_hints(cls.__init__)
    params: dict[str, StrategyParam] = {}
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name == "self" or p.name in _MANAGED:
            continue
        kind = hints.get(p.name)
        if kind not in (bool, int, float, str):
            raise ConfigError(
                f"strategy {name}: parameter {p.name} has type {kind!r}, which strategy-args "
                "cannot give"
            )
        default = None if p.default is inspect.Parameter.empty else p.default
        key = p.name.replace("_", "-")
        params[key] = StrategyParam(key, p.name, kind, default)
    return params


def build_strategy(settings: RunSettings) -> FedAvg:
    """Build the run's strategy from ``strategy`` and ``strategy-args``, checked.

    The sampling parameters are placeholders the round loop sets every round;
    the strategy is also checked against ``clients-per-round`` (Krum and
    Bulyan need enough clients per round for their ``num-malicious-nodes``).
    """
    name = settings.strategy
    params = strategy_params(name)
    given = parse_strategy_args(settings.strategy_args)
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise ConfigError(
            f"strategy-args: unknown key(s) {', '.join(unknown)} for strategy {name}; "
            f"valid keys are: {', '.join(params) or 'none (it takes no parameters)'}"
        )
    kwargs = {params[k].name: params[k].convert(name, v) for k, v in given.items()}
    cls = STRATEGIES[name]
    if cls is QFedAvg:
        kwargs.setdefault("client_learning_rate", settings.lr)
        kwargs["train_loss_key"] = "train-loss"  # what fedscale's ClientApp reports
    try:
        strategy = cls(
            # With fraction-evaluate 0 the round loop never asks for federated
            # evaluation; FedAvg's own 0.0 would only log a warning every run.
            fraction_evaluate=settings.fraction_evaluate or 1.0,
            min_available_nodes=1,
            **kwargs,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"strategy {name} with {settings.strategy_args!r}: {err}") from err
    check_round_size(strategy, settings.clients_per_round)
    return strategy


def check_round_size(strategy: FedAvg, per_round: int) -> None:
    """Refuse a strategy whose robustness needs more clients per round than ``per_round``.

    Krum and MultiKrum (Blanchard et al., 2017) tolerate ``f`` malicious clients
    among ``n`` if ``n >= 2f + 3``; MultiKrum averages at most ``n - f`` of them.
    Bulyan (El Mhamdi et al., 2018) needs ``n >= 4f + 3`` (Flower skips the
    round's aggregation otherwise).
    """
    name = _name_of(strategy)
    if isinstance(strategy, Bulyan):
        f = strategy.num_malicious_nodes
        _need(per_round >= 4 * f + 3, name, f"at least 4f + 3 = {4 * f + 3}", f, per_round)
    elif isinstance(strategy, MultiKrum):  # Krum too
        f = strategy.num_malicious_nodes
        _need(per_round >= 2 * f + 3, name, f"at least 2f + 3 = {2 * f + 3}", f, per_round)
        select = strategy.num_nodes_to_select
        if select > per_round - f:
            raise ConfigError(
                f"strategy {name}: expected num-nodes-to-select at most clients-per-round - "
                f"num-malicious-nodes = {per_round - f}, got {select}"
            )


def _need(ok: bool, name: str, expected: str, f: int, per_round: int) -> None:
    if not ok:
        raise ConfigError(
            f"strategy {name} with num-malicious-nodes {f}: expected clients-per-round "
            f"{expected}, got {per_round}; lower num-malicious-nodes or raise clients-per-round"
        )


def _name_of(strategy: FedAvg) -> str:
    for name, cls in STRATEGIES.items():
        if type(strategy) is cls:
            return name
    return type(strategy).__name__


def _strategy_class(name: str) -> type[FedAvg]:
    if name not in STRATEGIES:
        raise ConfigError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {name!r}")
    return STRATEGIES[name]
