"""Differential privacy: the run's DP settings, its accountant, and the ClientApp's mod.

A run picks one mode with ``dp`` (see docs/privacy.md):

- ``server-fixed``, ``server-adaptive``: central DP, the server clips every update
  (to ``dp-clipping-norm``, fixed or adapted each round) and adds Gaussian noise to
  the average (Flower's ``DifferentialPrivacyServerSide*Clipping``);
- ``client-fixed``, ``client-adaptive``: central DP with clipping on the clients
  (Flower's ``fixedclipping_mod``/``adaptiveclipping_mod``), noise on the server
  (``DifferentialPrivacyClientSide*Clipping``);
- ``local``: every client clips its update and adds noise itself (Flower's
  ``LocalDpMod``); the server trusts no one's raw update.

Every mode reports the epsilon spent after each round for ``dp-delta`` (default
``min(1e-5, num-clients ** -1.1)``), from Flower's RDP accountant (Google's
``dp-accounting`` underneath) under add-or-remove-one-client neighbouring and no
amplification by sampling. ``dp-noise-multiplier`` means the same in every mode:
the noise's standard deviation over the L2 sensitivity of what is released (the
average of the round's clipped updates centrally, one clipped update locally).

This module imports Flower only inside functions: :mod:`fedscale.settings` uses
its checks, and the serve-only install has no Flower.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .exceptions import ConfigError

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp.typing import ClientAppCallable
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    from .settings import RunSettings

__all__ = [
    "ADAPTIVE_MODES",
    "CLIENT_SIDE_MODES",
    "DP_MODES",
    "DP_STRATEGIES",
    "check_privacy_settings",
    "clipped_count_stddev",
    "effective_delta",
    "local_epsilon",
    "new_accountant",
    "privacy_mod",
]

DP_MODES: dict[str, str] = {
    "": "no differential privacy",
    "server-fixed": "central DP, the server clips to a fixed norm",
    "server-adaptive": "central DP, the server clips to an adaptive norm",
    "client-fixed": "central DP, the clients clip to a fixed norm",
    "client-adaptive": "central DP, the clients clip to an adaptive norm",
    "local": "local DP, every client clips and adds noise itself",
}
ADAPTIVE_MODES = ("server-adaptive", "client-adaptive")
# Modes whose work happens in the ClientApp (its train mod below).
CLIENT_SIDE_MODES = ("client-fixed", "client-adaptive", "local")
# Central DP calibrates its noise to an unweighted mean of clipped updates: only
# strategies that aggregate with FedAvg's own mean qualify (Flower's wrappers check
# the same). Local DP is post-processed by any strategy.
DP_STRATEGIES = ("fedavg", "fedprox")
# The most dp-delta defaults to; below it, num-clients ** -1.1 (always under 1/N).
DELTA_CAP = 1e-5

_ADAPTIVE_DEFAULTS = {
    # Flower's (and Andrew et al.'s) defaults.
    "dp_target_quantile": 0.5,
    "dp_clip_lr": 0.2,
    "dp_clipped_count_stddev": 0.0,
}
_DEFAULTS = {
    "dp_noise_multiplier": 1.0,
    "dp_clipping_norm": 1.0,
    "dp_delta": 0.0,
    **_ADAPTIVE_DEFAULTS,
}


def effective_delta(dp_delta: float, num_clients: int) -> float:
    """Return the delta epsilon is reported for: ``dp-delta``, or its default when 0.

    The default, ``min(1e-5, num_clients ** -1.1)``, stays below ``1 / num_clients``
    (a delta above it allows leaking one client's data outright) for any population.
    """
    if dp_delta > 0:
        return dp_delta
    return min(DELTA_CAP, math.pow(num_clients, -1.1))


def clipped_count_stddev(settings: RunSettings) -> float:
    """Return the adaptive modes' noise on the clipped count (``dp-clipped-count-stddev``).

    Its default (0) is Andrew et al.'s ``clients-per-round / 20``, raised to the
    noise multiplier when that is larger: the count's noise takes its share of the
    privacy budget, and at that level the update's noise grows by at most
    ``1 / sqrt(0.75)``, about 15 % (Flower refuses a multiplier of 2x it or more).
    """
    if settings.dp_clipped_count_stddev > 0:
        return float(settings.dp_clipped_count_stddev)
    return float(max(settings.clients_per_round / 20, settings.dp_noise_multiplier))


def local_epsilon(noise_multiplier: float, delta: float) -> float:
    """Return the epsilon that makes Flower's ``LocalDpMod`` add ``noise_multiplier`` x C noise.

    ``LocalDpMod`` adds noise of standard deviation ``s * sqrt(2 ln(1.25 / delta)) /
    epsilon`` for sensitivity ``s``; with ``s`` the clipping norm, this epsilon gives
    exactly ``noise_multiplier * s``. (The classic bound that formula comes from holds
    for epsilon below 1 only; the reported epsilon is the RDP accountant's instead.)
    """
    return math.sqrt(2 * math.log(1.25 / delta)) / noise_multiplier


def check_privacy_settings(s: RunSettings) -> None:
    """Check the ``dp*`` settings, alone and with the rest of the run's."""
    if s.dp not in DP_MODES:
        valid = ", ".join(repr(m) for m in DP_MODES)
        raise ConfigError(f"dp: expected one of {valid}, got {s.dp!r}")
    _check(
        math.isfinite(s.dp_noise_multiplier) and s.dp_noise_multiplier >= 0,
        "dp-noise-multiplier",
        "a number >= 0",
        s.dp_noise_multiplier,
    )
    _check(
        math.isfinite(s.dp_clipping_norm) and s.dp_clipping_norm > 0,
        "dp-clipping-norm",
        "an L2 norm > 0",
        s.dp_clipping_norm,
    )
    _check(
        s.dp_delta == 0 or 0 < s.dp_delta < 1,
        "dp-delta",
        "0 (the default, min(1e-5, num-clients ** -1.1)) or a number in (0, 1)",
        s.dp_delta,
    )
    _check(
        0 <= s.dp_target_quantile <= 1,
        "dp-target-quantile",
        "a fraction in [0, 1] (of updates the adaptive norm should clip)",
        s.dp_target_quantile,
    )
    _check(
        math.isfinite(s.dp_clip_lr) and s.dp_clip_lr > 0,
        "dp-clip-lr",
        "a learning rate > 0 (of the adaptive clipping norm)",
        s.dp_clip_lr,
    )
    _check(
        math.isfinite(s.dp_clipped_count_stddev) and s.dp_clipped_count_stddev >= 0,
        "dp-clipped-count-stddev",
        "a number >= 0 (0: clients-per-round / 20, at least dp-noise-multiplier)",
        s.dp_clipped_count_stddev,
    )
    if not s.dp:
        # Without a mode they would silently do nothing.
        _defaults_only(s, _DEFAULTS, "unless dp is set")
        return
    if s.dp not in ADAPTIVE_MODES:
        _defaults_only(s, _ADAPTIVE_DEFAULTS, f"unless dp is adaptive, not {s.dp!r}")
    _check(
        s.dp_noise_multiplier > 0,
        "dp-noise-multiplier",
        f"a number > 0 with dp {s.dp!r} (the noise is what makes the run private)",
        s.dp_noise_multiplier,
    )
    delta = effective_delta(s.dp_delta, s.num_clients)
    _check(
        delta < 1 / s.num_clients,
        "dp-delta",
        f"a number below 1 / num-clients = {1 / s.num_clients:.3g} (a larger delta allows "
        "leaking one client's data outright)",
        s.dp_delta,
    )
    if s.dp != "local":
        _check(
            s.strategy in DP_STRATEGIES,
            "strategy",
            f"one of {', '.join(DP_STRATEGIES)} with dp {s.dp!r} (central DP's noise is "
            "calibrated to their unweighted mean of clipped updates; dp 'local' works with any)",
            s.strategy,
        )
        _check(
            s.clients_per_round <= s.num_clients,
            "clients-per-round",
            f"at most num-clients ({s.num_clients}) with dp {s.dp!r}",
            s.clients_per_round,
        )
        # The noise is calibrated to the number of clients sampled: every sampled
        # client must be one whose update the round uses.
        _check(
            s.overcommit == 0,
            "overcommit",
            f"0 with dp {s.dp!r} (the noise is calibrated to the clients sampled, so a "
            "round cannot drop the slowest of them)",
            s.overcommit,
        )
    if s.dp in ADAPTIVE_MODES:
        stddev = clipped_count_stddev(s)
        # Andrew et al.: the count's noise takes part of the budget, which is
        # possible only while the noise multiplier is below 2 x its stddev.
        _check(
            s.dp_noise_multiplier < 2 * stddev,
            "dp-noise-multiplier",
            f"a number below 2 x dp-clipped-count-stddev = {2 * stddev:g} with dp {s.dp!r} "
            "(raise dp-clipped-count-stddev, or set it to 0 for its default)",
            s.dp_noise_multiplier,
        )


def new_accountant(settings: RunSettings) -> RdpAccountant:
    """Return a fresh accountant for the run: Flower's RDP accountant, no amplification.

    Population is ``num-clients``; neighbouring runs differ by one client's
    participation (add or remove one). No amplification by sampling is claimed:
    a deployment's server samples from whichever nodes are connected, not uniformly
    from a known population, and simulated devices come and go; so the epsilon is
    what any one client that took part in every round has spent.
    """
    from flwr.supercore.privacy_accounting import (
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )

    try:
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ConfigError(
            f"dp {settings.dp!r}: expected Google's dp-accounting to report epsilon "
            "(pip install 'flwr[dp]'), got none installed"
        ) from err
    config = PrivacyConfig(
        target_delta=effective_delta(settings.dp_delta, settings.num_clients),
        population_size=settings.num_clients,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    )
    try:
        return RdpAccountant(config)
    except ImportError as err:
        raise ConfigError(
            f"dp {settings.dp!r}: expected Google's dp-accounting to report epsilon "
            f"(pip install 'flwr[dp]'), got: {err}"
        ) from err


def privacy_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Apply the run's client-side DP to a train reply (a Flower mod on the train handler).

    The ClientApp is one object for every run, and Flower fixes a ClientApp's mods
    when it is built; so this mod reads the run's ``dp`` from the run config and
    hands the message to Flower's own mod for it (or to nobody): ``fixedclipping_mod``,
    ``adaptiveclipping_mod`` (the server's wrapper sends the norm) or ``LocalDpMod``
    (clipping norm ``dp-clipping-norm``, sensitivity the same, delta ``dp-delta``,
    and the epsilon that gives noise ``dp-noise-multiplier`` x the norm).
    """
    mode = ctxt.run_config.get("dp", "")
    if mode not in CLIENT_SIDE_MODES:
        return call_next(msg, ctxt)
    from flwr.clientapp.mod import LocalDpMod, adaptiveclipping_mod, fixedclipping_mod

    if mode == "client-fixed":
        return fixedclipping_mod(msg, ctxt, call_next)
    if mode == "client-adaptive":
        return adaptiveclipping_mod(msg, ctxt, call_next)
    from .settings import RunSettings

    settings = RunSettings.from_run_config(ctxt.run_config, complete=True)
    norm = settings.dp_clipping_norm
    delta = effective_delta(settings.dp_delta, settings.num_clients)
    local = LocalDpMod(norm, norm, local_epsilon(settings.dp_noise_multiplier, delta), delta)
    return local(msg, ctxt, call_next)


def _check(ok: bool, key: str, expected: str, got: object) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def _defaults_only(s: RunSettings, defaults: dict[str, Any], when: str) -> None:
    for name, default in defaults.items():
        value = getattr(s, name)
        _check(value == default, name.replace("_", "-"), f"{default!r} {when}", value)
