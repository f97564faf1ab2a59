"""Synthetic(alpha, beta): Li et al.'s heterogeneous federated data, generated per client.

Source: T. Li, A. K. Sahu, M. Zaheer, M. Sanjabi, A. Talwalkar, V. Smith,
"Federated Optimization in Heterogeneous Networks" (FedProx), MLSys 2020, Sec. 5.1
and its appendix, with the reference generator
``data/synthetic_1_1/generate_synthetic.py`` of github.com/litian96/FedProx.
For client ``k``::

    u_k ~ N(0, alpha)          B_k ~ N(0, beta)
    W_k[i, j] ~ N(u_k, 1)      W_k in R^{10 x 60}
    b_k[i]    ~ N(u_k, 1)      b_k in R^10
    v_k[j]    ~ N(B_k, 1)      v_k in R^60
    x ~ N(v_k, Sigma)          Sigma diagonal, Sigma_jj = j^(-1.2), j = 1..60
    y = argmax(softmax(W_k x + b_k))

``alpha`` controls how much the local models differ between clients and
``beta`` how much their inputs differ. As in the reference code, ``alpha`` and
``beta`` are the *standard deviations* passed to ``np.random.normal`` (the paper
writes ``N(0, alpha)``; the two agree for the usual ``synthetic:1,1`` and
``synthetic:0,0``). Samples per client follow the reference code's power law,
``int(lognormal(mean=4, sigma=2)) + 50``, and the first 90% of a client's samples
are its training split, the last 10% its held-out test split (as there, where the
samples are shuffled first; ours are drawn independently, so no shuffle is needed).

Unlike the reference code, which draws all clients from one global stream, every
client here has its own streams, derived from ``(seed, client id)`` with numpy's
``SeedSequence`` and the Philox bit generator: any client's data is reproducible
without generating any other client, so a federation of a million clients costs
nothing until a client is selected. The server's test set is the union of the
held-out splits of a fixed set of clients (``0 .. test_clients - 1``), capped per
client so that one heavy-tailed client cannot dominate it.

The dataset spec is ``synthetic:<alpha>,<beta>``, e.g. ``synthetic:1,1``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .exceptions import DataError
from .population import ClientData

__all__ = [
    "ClientParameters",
    "Synthetic",
    "SyntheticSpec",
    "is_synthetic_spec",
    "parse_synthetic_spec",
]

DIMENSION = 60
NUM_CLASSES = 10
TRAIN_FRACTION = 0.9
# Stream tags: a client's sample count, its model (u, B, W, b, v) and its inputs
# come from separate streams, so counting samples does not generate data.
_TAG = 0x5E_1D_A7A  # distinguishes synthetic-data streams from any other use of a seed
_COUNT, _MODEL, _INPUTS = 0, 1, 2
_SPEC = re.compile(r"synthetic:([^,]*),([^,]*)")


@dataclass(frozen=True)
class SyntheticSpec:
    """A parsed ``synthetic:<alpha>,<beta>`` spec."""

    alpha: float
    beta: float

    def __str__(self) -> str:
        return f"synthetic:{self.alpha:g},{self.beta:g}"


def is_synthetic_spec(spec: str) -> bool:
    """Return whether ``spec`` names the synthetic dataset (well-formed or not)."""
    return spec == "synthetic" or spec.startswith("synthetic:")


def parse_synthetic_spec(spec: str) -> SyntheticSpec:
    """Parse ``synthetic:<alpha>,<beta>`` with finite ``alpha, beta >= 0``."""
    match = _SPEC.fullmatch(spec.strip())
    expected = (
        "expected synthetic:<alpha>,<beta> with numbers alpha, beta >= 0 (e.g. synthetic:1,1)"
    )
    if match is None:
        raise DataError(f"dataset: {expected}; got {spec!r}")
    values = []
    for name, text in zip(("alpha", "beta"), match.groups(), strict=True):
        try:
            value = float(text)
        except ValueError:
            raise DataError(f"dataset {spec!r}: {name} must be a number; {expected}") from None
        if not math.isfinite(value) or value < 0:
            raise DataError(f"dataset {spec!r}: {name} must be finite and >= 0; {expected}")
        values.append(value)
    return SyntheticSpec(values[0], values[1])


@dataclass(frozen=True, eq=False)
class ClientParameters:
    """Client ``k``'s generating parameters: ``u_k``, ``B_k``, ``W_k``, ``b_k``, ``v_k``."""

    u: float
    b_mean: float
    weights: npt.NDArray[np.float64]
    bias: npt.NDArray[np.float64]
    input_mean: npt.NDArray[np.float64]


@dataclass(frozen=True)
class Synthetic:
    """The Synthetic(alpha, beta) federation for one seed; every client on demand.

    Parameters
    ----------
    alpha, beta
        Heterogeneity of the local models and of the local inputs.
    seed
        Together with a client id, determines everything about that client.
    max_samples
        Optional cap on a client's sample count. The reference power law has a
        heavy tail (``lognormal(4, 2)`` exceeds 100,000 about once in 4,000
        clients); a cap bounds the cost of one client. ``None`` keeps the law.
    test_clients
        The server's test set comes from clients ``0 .. test_clients - 1``.
    test_samples_per_client
        At most this many held-out samples of each of those clients.

    """

    alpha: float
    beta: float
    seed: int = 0
    max_samples: int | None = None
    test_clients: int = 100
    test_samples_per_client: int = 100
    _std: npt.NDArray[np.float64] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise DataError(f"synthetic: expected {name} finite and >= 0, got {value!r}")
        _check_int("seed", self.seed, 0)
        if self.max_samples is not None:
            _check_int("max_samples", self.max_samples, 2)
        _check_int("test_clients", self.test_clients, 1)
        _check_int("test_samples_per_client", self.test_samples_per_client, 1)
        std = np.arange(1, DIMENSION + 1, dtype=np.float64) ** (-1.2 / 2)
        std.setflags(write=False)
        object.__setattr__(self, "_std", std)

    @classmethod
    def from_spec(
        cls,
        spec: str,
        *,
        seed: int = 0,
        max_samples: int | None = None,
        test_clients: int = 100,
        test_samples_per_client: int = 100,
    ) -> Synthetic:
        """Build from a ``synthetic:<alpha>,<beta>`` spec."""
        parsed = parse_synthetic_spec(spec)
        return cls(
            parsed.alpha, parsed.beta, seed, max_samples, test_clients, test_samples_per_client
        )

    # ------------------------------------------------------------ provider protocol

    @property
    def num_classes(self) -> int:
        """Ten classes, as in the paper."""
        return NUM_CLASSES

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Sixty features per sample."""
        return (DIMENSION,)

    @property
    def max_clients(self) -> int | None:
        """No limit: any non-negative client id has data."""
        return None

    def num_samples(self, client_id: int) -> int:
        """Return client ``client_id``'s sample count (train and test)."""
        rng = self._rng(client_id, _COUNT)
        count = int(rng.lognormal(4.0, 2.0)) + 50
        return count if self.max_samples is None else min(count, self.max_samples)

    def num_train_samples(self, client_id: int) -> int:
        """Return the size of client ``client_id``'s training split."""
        return int(TRAIN_FRACTION * self.num_samples(client_id))

    def parameters(self, client_id: int) -> ClientParameters:
        """Return client ``client_id``'s generating parameters."""
        rng = self._rng(client_id, _MODEL)
        u = float(rng.normal(0.0, self.alpha))
        b_mean = float(rng.normal(0.0, self.beta))
        weights = rng.normal(u, 1.0, (NUM_CLASSES, DIMENSION))
        bias = rng.normal(u, 1.0, NUM_CLASSES)
        input_mean = rng.normal(b_mean, 1.0, DIMENSION)
        return ClientParameters(u, b_mean, weights, bias, input_mean)

    def client_data(self, client_id: int) -> ClientData:
        """Generate client ``client_id``'s train and test split."""
        x, y = self._samples(client_id)
        n_train = int(TRAIN_FRACTION * len(y))
        return ClientData(x[:n_train], y[:n_train], x[n_train:], y[n_train:])

    def test_set(self, num_clients: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Return the server's test set: held-out samples of a fixed set of clients.

        Clients ``0 .. min(test_clients, num_clients) - 1`` contribute at most
        ``test_samples_per_client`` of their held-out samples each.
        """
        _check_int("num_clients", num_clients, 1)
        xs, ys = [], []
        for cid in range(min(self.test_clients, num_clients)):
            data = self.client_data(cid)
            xs.append(data.x_test[: self.test_samples_per_client])
            ys.append(data.y_test[: self.test_samples_per_client])
        x, y = np.concatenate(xs), np.concatenate(ys)
        x.setflags(write=False)
        y.setflags(write=False)
        return x, y

    # ------------------------------------------------------------ internals

    def _rng(self, client_id: int, stream: int) -> np.random.Generator:
        _check_int("client id", client_id, 0)
        seq = np.random.SeedSequence(self.seed, spawn_key=(_TAG, client_id, stream))
        return np.random.Generator(np.random.Philox(seq))

    def _samples(self, client_id: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        n = self.num_samples(client_id)
        params = self.parameters(client_id)
        rng = self._rng(client_id, _INPUTS)
        # x ~ N(v_k, Sigma) with diagonal Sigma: v_k + sqrt(Sigma_jj) * z.
        x = (params.input_mean + rng.standard_normal((n, DIMENSION)) * self._std).astype(np.float32)
        # Labels from the float32 inputs a model sees, so they agree exactly; softmax
        # is monotone, so argmax(softmax(Wx + b)) = argmax(Wx + b).
        logits = x.astype(np.float64) @ params.weights.T + params.bias
        y = np.argmax(logits, axis=1).astype(np.int64)
        x.setflags(write=False)
        y.setflags(write=False)
        return x, y


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
        raise DataError(f"synthetic: expected {name} to be an integer >= {minimum}, got {value!r}")
