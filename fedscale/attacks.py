"""Byzantine clients, for testing robust aggregation.

A run's ``attack`` setting makes a fixed fraction of its clients Byzantine
(``attack-fraction``): after training, such a client replaces its honest update
(the delta from the global model it received) by a malicious one, and replies
with ``global + malicious delta``. The attacks:

- ``sign-flip``: the update reversed, ``-delta``;
- ``scale:<factor>``: the update times ``factor`` (``scale:-4`` reverses and
  amplifies it; a large positive factor overshoots);
- ``noise:<std>``: the update replaced by Gaussian noise of standard deviation
  ``std`` per element, drawn from the run seed, the round and the client, so a
  rerun sends the same noise.

Only floating-point arrays are changed: integer buffers (such as BatchNorm's
batch counter) stay as trained, as they are counts, not parameters.

Which clients are Byzantine is a pure function of the run seed and the partition
id: the clients ``p`` with ``P(p) < m``, where ``P`` is a keyed pseudo-random
permutation of ``0 .. n - 1`` (:class:`fedscale.population.LazyPermutation`)
and ``m = round(attack-fraction * n)``. So exactly ``m`` of the ``n`` clients
are Byzantine, the same ones in every round and on every runtime, and deciding
for one client costs O(1) whatever ``n`` is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .exceptions import ConfigError

__all__ = ["ATTACK_KINDS", "Attack", "apply_attack", "byzantine_count", "is_byzantine"]

AttackKind = Literal["sign-flip", "scale", "noise"]
ATTACK_KINDS: tuple[str, ...] = ("sign-flip", "scale:<factor>", "noise:<std>")
# Salts the permutation key so the Byzantine set is independent of the other
# draws made from the run seed (partitions, sampling, devices).
_BYZANTINE_SALT = 0xB12A_4711
_NOISE_SALT = 0x0015_E0A7
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_SPEC = re.compile(rf"(sign-flip)|(scale):({_NUMBER})|(noise):({_NUMBER})")


@dataclass(frozen=True)
class Attack:
    """A parsed attack: its kind and its number (the factor or the noise's std)."""

    kind: AttackKind
    value: float = -1.0

    @classmethod
    def parse(cls, spec: str) -> Attack | None:
        """Parse an ``attack`` setting; ``''`` is no attack (``None``)."""
        if spec == "":
            return None
        match = _SPEC.fullmatch(spec) if isinstance(spec, str) else None
        expected = f"'' (none) or one of {', '.join(ATTACK_KINDS)}"
        if match is None:
            raise ConfigError(f"attack: expected {expected}, got {spec!r}")
        if match.group(1):
            return cls("sign-flip")
        if match.group(2):
            factor = float(match.group(3))
            if not math.isfinite(factor) or factor == 1.0:
                raise ConfigError(
                    f"attack: expected scale:<factor> with a finite factor other than 1 "
                    f"(1 is the honest update), got {spec!r}"
                )
            return cls("scale", factor)
        std = float(match.group(5))
        if not (math.isfinite(std) and std > 0):
            raise ConfigError(f"attack: expected noise:<std> with a finite std > 0, got {spec!r}")
        return cls("noise", std)

    def malicious_delta(
        self, delta: npt.NDArray[np.floating[Any]], rng: np.random.Generator
    ) -> npt.NDArray[np.floating[Any]]:
        """Return the update a Byzantine client sends instead of ``delta``."""
        if self.kind == "sign-flip":
            return -delta
        if self.kind == "scale":
            return delta * delta.dtype.type(self.value)
        noise = rng.normal(0.0, self.value, size=delta.shape)
        return noise.astype(delta.dtype, copy=False)


def byzantine_count(fraction: float, num_clients: int) -> int:
    """Return how many of ``num_clients`` clients ``fraction`` makes Byzantine (rounded)."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"attack-fraction: expected a number in [0, 1], got {fraction!r}")
    return int(math.floor(fraction * num_clients + 0.5))


def is_byzantine(seed: int, partition_id: int, num_clients: int, fraction: float) -> bool:
    """Say whether client ``partition_id`` of ``num_clients`` is Byzantine in run ``seed``."""
    from .population import LazyPermutation  # numpy only; kept lazy for `import fedscale`

    if not 0 <= partition_id < num_clients:
        raise ConfigError(
            f"partition-id: expected an id in 0..{num_clients - 1} for an attack, "
            f"got {partition_id}"
        )
    count = byzantine_count(fraction, num_clients)
    if count == 0:
        return False
    permutation = LazyPermutation(num_clients, _key(seed, _BYZANTINE_SALT))
    return bool(permutation[partition_id][0] < count)


def apply_attack(
    attack: Attack,
    received: Mapping[str, npt.NDArray[Any]],
    trained: Mapping[str, npt.NDArray[Any]],
    *,
    seed: int,
    server_round: int,
    partition_id: int,
) -> dict[str, npt.NDArray[Any]]:
    """Return the arrays a Byzantine client replies with instead of ``trained``.

    ``received`` is the global model it was sent. Float arrays become
    ``received + malicious delta`` (computed in the array's own dtype); others
    are returned as trained.
    """
    if set(received) != set(trained):
        raise ConfigError(
            f"attack: expected the trained model to have the received model's arrays, "
            f"got {sorted(trained)} for {sorted(received)}"
        )
    rng = np.random.default_rng([_key(seed, _NOISE_SALT), server_round, partition_id])
    out: dict[str, npt.NDArray[Any]] = {}
    for name, after in trained.items():
        if not np.issubdtype(after.dtype, np.floating):
            out[name] = after
            continue
        before = received[name].astype(after.dtype, copy=False)
        out[name] = before + attack.malicious_delta(after - before, rng)
    return out


def _key(seed: int, salt: int) -> int:
    return int(np.random.SeedSequence([seed & 0xFFFF_FFFF_FFFF_FFFF, salt]).generate_state(1)[0])
