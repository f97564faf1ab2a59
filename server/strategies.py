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

``fedbuff`` (:data:`ASYNC_STRATEGIES`) is fedscale's own and asynchronous: its
name and ``strategy-args`` keys are listed and checked here too, but it runs in
its own loop (:mod:`.fedbuff`), not as a Flower strategy.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, get_type_hints

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
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
    Strategy,
)
from flwr.supercore.differential_privacy import KEY_NORM_BIT
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, PrivacyAccountant
from numpy.typing import NDArray

from fedscale.exceptions import ConfigError, DataError
from fedscale.privacy import clipped_count_stddev, new_accountant
from fedscale.settings import RunSettings, parse_strategy_args

__all__ = [
    "ASYNC_STRATEGIES",
    "STRATEGIES",
    "StrategyParam",
    "build_strategy",
    "check_round_size",
    "inner_strategy",
    "privacy_spent",
    "privatize",
    "set_sample_size",
    "restore_strategy_state",
    "strategy_state",
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

# fedscale's own asynchronous strategies: not Flower strategies (Flower has no
# asynchronous one), run by their own loop (server/fedbuff.py).
ASYNC_STRATEGIES = ("fedbuff",)

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
    if name in ASYNC_STRATEGIES:
        from .fedbuff import fedbuff_params  # it builds on this module

        return fedbuff_params()
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
    if name in ASYNC_STRATEGIES:
        raise ConfigError(
            f"strategy {name}: expected a synchronous strategy here; {name} is asynchronous "
            "and runs in its own loop, fedscale.server.fedbuff.run_fedbuff (the ServerApp "
            "picks it)"
        )
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
        names = [*STRATEGIES, *ASYNC_STRATEGIES]
        raise ConfigError(f"strategy: expected one of {', '.join(names)}, got {name!r}")
    return STRATEGIES[name]


def strategy_state(strategy: Strategy) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
    """Return what a strategy learned across rounds: JSON-able values, and arrays.

    Flower's strategies keep their state in plain attributes: server-optimizer
    moments (FedAdam's ``m_t``/``v_t``, dicts of arrays), FedAvgM's
    ``momentum_vector`` (a list), the last global model (``current_arrays``, an
    ``ArrayRecord`` or a dict), and numbers. Taken generically, so every strategy
    of :data:`STRATEGIES` is covered without knowing its internals; functions and
    other objects are configuration, rebuilt from the run's settings. A wrapper's
    inner strategy (Flower's DP wrappers hold it as ``strategy``) is taken the same
    way, and a privacy accountant by its own ``state_dict``, so a resumed DP run
    goes on with the epsilon already spent and the adaptive clipping norm reached.
    """
    meta: dict[str, Any] = {}
    arrays: dict[str, NDArray[Any]] = {}
    for name, value in vars(strategy).items():
        if value is None or isinstance(value, bool | int | float | str):
            meta[name] = {"kind": "value", "value": value}
            continue
        if isinstance(value, Strategy):
            inner_meta, inner_arrays = strategy_state(value)
            meta[name] = {"kind": "strategy", "class": type(value).__name__, "meta": inner_meta}
            arrays.update({f"{name}/{key}": array for key, array in inner_arrays.items()})
            continue
        if _is_accountant(value):
            meta[name] = {"kind": "accountant", "state": value.state_dict()}
            continue
        items = _array_items(value)
        if items is None:
            continue
        kind = "arrayrecord" if isinstance(value, ArrayRecord) else type(value).__name__
        meta[name] = {"kind": kind, "keys": [key for key, _ in items]}
        for key, array in items:
            arrays[f"{name}/{key}"] = array
    return meta, arrays


def restore_strategy_state(
    strategy: Strategy, meta: dict[str, Any], arrays: dict[str, NDArray[Any]]
) -> None:
    """Put back what :func:`strategy_state` took from the same kind of strategy."""
    for name, entry in meta.items():
        kind = entry.get("kind")
        if kind == "value":
            value = entry["value"]
            if isinstance(value, float) and not math.isfinite(value):
                continue  # JSON has no NaN: such values were never stored
            setattr(strategy, name, value)
            continue
        if kind == "strategy":
            inner = getattr(strategy, name, None)
            if not isinstance(inner, Strategy) or type(inner).__name__ != entry["class"]:
                raise DataError(
                    f"checkpoint: strategy state {name!r}: expected the run's "
                    f"{type(inner).__name__}, got the state of a {entry['class']}"
                )
            prefix = f"{name}/"
            inner_arrays = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            restore_strategy_state(inner, entry["meta"], inner_arrays)
            continue
        if kind == "accountant":
            accountant: Any = getattr(strategy, name, None)
            if not _is_accountant(accountant):
                raise DataError(
                    f"checkpoint: strategy state {name!r} holds a privacy accountant, but "
                    "this run's strategy has none"
                )
            try:
                accountant.load_state_dict(entry["state"])
            except ValueError as err:
                raise DataError(
                    f"checkpoint: privacy accountant {name!r}: expected the state of this "
                    f"run's accountant, got one it refuses: {err}"
                ) from err
            continue
        try:
            items = [(key, arrays[f"{name}/{key}"]) for key in entry["keys"]]
        except KeyError as err:
            raise DataError(
                f"checkpoint: strategy state {name!r} expected array {err.args[0]!r}, "
                "which the checkpoint does not hold"
            ) from None
        if kind == "arrayrecord":
            setattr(strategy, name, ArrayRecord({k: Array(np.array(v)) for k, v in items}))
        elif kind == "dict":
            setattr(strategy, name, {k: np.array(v) for k, v in items})
        elif kind == "list":
            setattr(strategy, name, [np.array(v) for _, v in items])
        else:
            raise DataError(
                f"checkpoint: strategy state {name!r}: expected kind value, strategy, "
                f"accountant, arrayrecord, dict or list, got {kind!r}"
            )


def _is_accountant(value: Any) -> bool:
    return all(
        callable(getattr(value, attr, None))
        for attr in ("state_dict", "load_state_dict", "get_privacy_spent", "compose")
    )


def _array_items(value: Any) -> list[tuple[str, NDArray[Any]]] | None:
    if isinstance(value, ArrayRecord):
        return [(key, array.numpy()) for key, array in value.items()]
    if isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
        return [(str(key), v) for key, v in value.items()]
    if isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
        # Zero-padded, so the names sort in the list's order.
        return [(f"{i:06d}", v) for i, v in enumerate(value)]
    return None


# ---------------------------------------------------------------- differential privacy
#
# Flower's DP wrappers do the clipping and the noise; what fedscale adds is where
# they fall short for a run: equal client weights (their accounting requires them,
# and FedAvg would weigh by num-examples), accounting for the adaptive wrappers
# (Flower's take no accountant), the same all-or-nothing rule for a round's replies
# the accounted fixed wrappers apply, and accounting for local DP.

_log = logging.getLogger(__name__)


class ServerFixedClipping(DifferentialPrivacyServerSideFixedClipping):
    """Flower's central DP with server-side fixed clipping, every client weighing the same."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip, average with equal weights, add noise, account (Flower's wrapper)."""
        replies = _equal_weights(list(replies), self.strategy)
        return super().aggregate_train(server_round, replies)


class ClientFixedClipping(DifferentialPrivacyClientSideFixedClipping):
    """Flower's central DP with client-side fixed clipping, every client weighing the same."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the clients' clipped updates with equal weights, add noise, account."""
        replies = _equal_weights(list(replies), self.strategy)
        return super().aggregate_train(server_round, replies)


class _Accounted:
    """Give one of Flower's adaptive-clipping wrappers (which take none) an accountant.

    Andrew et al. (2021) split the noise between the update (Flower sets
    ``noise_multiplier`` to that part) and the clipped count so that together they
    are one Gaussian mechanism of the requested noise multiplier: that one,
    ``accounted_noise_multiplier``, is what each round composes.
    """

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        num_sampled_clients: int,
        *,
        accountant: PrivacyAccountant,
        **adaptive: float,
    ) -> None:
        super().__init__(  # type: ignore[call-arg]  # the Flower wrapper after this in the MRO
            strategy, noise_multiplier, num_sampled_clients, **adaptive
        )
        self.accountant = accountant
        self.accounted_noise_multiplier = noise_multiplier


class ServerAdaptiveClipping(_Accounted, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's central DP with server-side adaptive clipping, with an accountant."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip, adapt the norm, average with equal weights, add noise, account."""
        return _adaptive_round(self, super().aggregate_train, server_round, list(replies))


class ClientAdaptiveClipping(_Accounted, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's central DP with client-side adaptive clipping, with an accountant.

    As :class:`ServerAdaptiveClipping`; a reply without a 0 or 1 ``norm_bit`` (the
    clients' mod adds it) skips the round instead of failing the run.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the clients' clipped updates, adapt the norm, add noise, account."""
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                continue
            bits = [m.get(KEY_NORM_BIT) for m in reply.content.metric_records.values()]
            if bits not in ([0], [1]):
                _log.warning(
                    "round %d: node %d sent no %s of 0 or 1 (got %r); the round is skipped",
                    server_round,
                    reply.metadata.src_node_id,
                    KEY_NORM_BIT,
                    bits,
                )
                return None, None
        return _adaptive_round(self, super().aggregate_train, server_round, replies)


class LocalDpAccounting(Strategy):
    """Any strategy, with the epsilon of the clients' local DP accounted round by round.

    Local DP needs nothing of the server (every client adds its own noise with
    Flower's ``LocalDpMod``); this wrapper only composes, for every round that asks
    clients to train, one Gaussian release of ``noise_multiplier`` per client:
    the epsilon of a client that took part in every round.
    """

    def __init__(
        self, strategy: Strategy, noise_multiplier: float, *, accountant: PrivacyAccountant
    ) -> None:
        self.strategy = strategy
        self.accounted_noise_multiplier = noise_multiplier
        self.accountant = accountant

    def summary(self) -> None:
        """Log the inner strategy's summary."""
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the inner strategy's round; account the clients' releases."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if messages:
            self.accountant.compose(
                GaussianPrivacyEvent(
                    noise_multiplier=self.accounted_noise_multiplier,
                    sample_size=min(len(messages), self.accountant.config.population_size),
                    population_size=self.accountant.config.population_size,
                )
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate with the inner strategy."""
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the inner strategy's federated evaluation."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate federated evaluation with the inner strategy."""
        return self.strategy.aggregate_evaluate(server_round, replies)


_DP_WRAPPERS = (
    ServerFixedClipping,
    ClientFixedClipping,
    ServerAdaptiveClipping,
    ClientAdaptiveClipping,
    LocalDpAccounting,
)


def privatize(strategy: FedAvg, settings: RunSettings) -> Strategy:
    """Wrap ``strategy`` in the run's differential privacy (``dp``); unchanged without.

    The wrapper is sized for ``clients-per-round``; the round loop resizes it with
    :func:`set_sample_size` when fewer nodes are connected.
    """
    mode = settings.dp
    if not mode:
        return strategy
    z = settings.dp_noise_multiplier
    norm = settings.dp_clipping_norm
    per_round = settings.clients_per_round
    accountant = new_accountant(settings)
    if mode == "local":
        return LocalDpAccounting(strategy, z, accountant=accountant)
    if type(strategy).aggregate_train is not FedAvg.aggregate_train:
        plain = [n for n, c in STRATEGIES.items() if c.aggregate_train is FedAvg.aggregate_train]
        raise ConfigError(
            f"dp {mode}: expected a strategy that averages with FedAvg's own mean "
            f"({', '.join(plain)}), got {_name_of(strategy)}"
        )
    try:
        if mode == "server-fixed":
            return ServerFixedClipping(strategy, z, norm, per_round, accountant=accountant)
        if mode == "client-fixed":
            return ClientFixedClipping(strategy, z, norm, per_round, accountant=accountant)
        adaptive = {
            "initial_clipping_norm": norm,
            "target_clipped_quantile": settings.dp_target_quantile,
            "clip_norm_lr": settings.dp_clip_lr,
            "clipped_count_stddev": clipped_count_stddev(settings),
        }
        if mode == "server-adaptive":
            return ServerAdaptiveClipping(strategy, z, per_round, accountant=accountant, **adaptive)
        if mode == "client-adaptive":
            return ClientAdaptiveClipping(strategy, z, per_round, accountant=accountant, **adaptive)
    except ValueError as err:  # Flower's own checks of the same values
        raise ConfigError(f"dp {mode}: {err}") from err
    raise ConfigError(f"dp: expected a mode fedscale.privacy knows, got {mode!r}")


def inner_strategy(strategy: Strategy) -> Strategy:
    """Return the strategy a DP wrapper wraps (itself if not wrapped): the one to size."""
    while isinstance(strategy, _DP_WRAPPERS):
        strategy = strategy.strategy
    return strategy


def set_sample_size(strategy: Strategy, per_round: int) -> None:
    """Tell a central-DP wrapper how many clients this round samples: its noise's divisor."""
    while isinstance(strategy, _DP_WRAPPERS):
        if not isinstance(strategy, LocalDpAccounting):
            strategy.num_sampled_clients = per_round
        strategy = strategy.strategy


def privacy_spent(strategy: Strategy) -> tuple[float, float] | None:
    """Return ``(epsilon, delta)`` spent so far by a DP-wrapped strategy; ``None`` without DP.

    Epsilon is 0 until the first release.
    """
    accountant: Any = getattr(strategy, "accountant", None)
    if not _is_accountant(accountant):
        return None
    spent = accountant.get_privacy_spent()
    epsilon = spent.epsilon if spent.num_releases else 0.0
    return float(epsilon), float(spent.delta)


def _weight_key(strategy: Strategy) -> str:
    return str(getattr(inner_strategy(strategy), "weighted_by_key", "num-examples"))


def _equal_weights(replies: list[Message], strategy: Strategy) -> list[Message]:
    """Give every content reply weight 1 (the key the inner FedAvg weighs by).

    Central DP's noise is calibrated to the mean of clipped updates, where one
    client moves the result by at most C / m; weighing by examples would let a
    client claiming many move it further. The replies were validated already.
    """
    key = _weight_key(strategy)
    for reply in replies:
        if not reply.has_error():
            for metrics in reply.content.metric_records.values():
                metrics[key] = 1
    return replies


class _Adaptive(Protocol):
    num_sampled_clients: int
    strategy: Strategy
    accountant: PrivacyAccountant
    accounted_noise_multiplier: float


def _adaptive_round(
    wrapper: _Adaptive,
    aggregate: Callable[[int, list[Message]], tuple[ArrayRecord | None, MetricRecord | None]],
    server_round: int,
    replies: list[Message],
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """Run one adaptive round the way Flower's accounted fixed wrappers run theirs.

    All sampled clients must reply without error: with fewer, the mean's
    sensitivity C / m' would exceed the C / m the noise is calibrated to (Flower's
    adaptive wrappers only log that). A released round composes one event.
    """
    content = [r for r in replies if not r.has_error()]
    if len(content) != len(replies) or len(content) != wrapper.num_sampled_clients:
        _log.warning(
            "round %d: %d usable replies of %d sampled clients; differential privacy "
            "needs all of them, so the round is skipped",
            server_round,
            len(content),
            wrapper.num_sampled_clients,
        )
        return None, None
    arrays, metrics = aggregate(server_round, _equal_weights(replies, wrapper.strategy))
    if arrays:
        population = wrapper.accountant.config.population_size
        wrapper.accountant.compose(
            GaussianPrivacyEvent(
                noise_multiplier=wrapper.accounted_noise_multiplier,
                sample_size=len(replies),
                population_size=population,
            )
        )
    return arrays, metrics
