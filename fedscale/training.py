"""Local training and evaluation, and the choice of compute device."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F

from .exceptions import ConfigError, DeviceError
from .linear_chain import Chain, train_chain, trainable_chain
from .settings import parse_device_name

__all__ = [
    "EvalResult",
    "TrainResult",
    "evaluate",
    "resolve_device",
    "shuffle_seed",
    "train",
]


@dataclass(frozen=True)
class TrainResult:
    """What one local training run did."""

    loss: float
    num_examples: int
    steps: int


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracy of a model on a labelled set."""

    loss: float
    accuracy: float
    num_examples: int


def resolve_device(name: str = "auto") -> torch.device:
    """Return the torch device for ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    ``auto`` picks CUDA, then Apple MPS, then the CPU. Naming a device that is not
    there is an error, never a silent fallback to the CPU.
    """
    parse_device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise DeviceError(
                "device mps: expected Apple Metal (MPS) support, but this torch build "
                "or machine has none; use device 'auto' or 'cpu'"
            )
        return torch.device("mps")
    # cuda or cuda:N
    if not torch.cuda.is_available():
        build = torch.version.cuda or "none (a CPU-only build)"
        raise DeviceError(
            f"device {name}: expected a CUDA GPU, but torch sees none "
            f"(torch {torch.__version__}, CUDA {build}); use device 'auto' or 'cpu'"
        )
    device = torch.device(name)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(
            f"device {name}: expected a GPU index below {count}, the number of GPUs here"
        )
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _move(model: nn.Module, device: torch.device) -> None:
    # Module.to walks every tensor even when nothing moves; skip it then.
    first = next(model.parameters(), None)
    if first is None or first.device != device:
        model.to(device)


def _as_tensor(array: npt.NDArray[np.generic], device: torch.device) -> torch.Tensor:
    # Dataset arrays are read-only; torch.from_numpy warns on those, so copy them.
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).to(device)


def shuffle_seed(run_seed: int, server_round: int, client: int) -> int:
    """Return the shuffle seed of ``client`` (its partition id) in ``server_round`` of a run.

    Every runtime and both training paths (per client, or a cohort at once) draw
    a client's batches from this seed, so the same run, round and partition
    shuffle alike everywhere: partition ids agree between runtimes, node ids do not.
    """
    state = np.random.SeedSequence([run_seed, server_round, client])
    return int(state.generate_state(1)[0])


def train(
    model: nn.Module,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    device: torch.device,
    seed: int,
    proximal_mu: float = 0.0,
    global_params: Sequence[torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``model`` in place with minibatch SGD and cross-entropy.

    Batches are shuffled by a generator seeded with ``seed``, so the same inputs
    give the same weights. The reported loss is the mean over the last epoch.

    ``proximal_mu > 0`` adds FedProx's proximal term (Li et al., 2020)
    ``mu / 2 * ||w - w_global||^2`` to every batch's loss, which keeps local
    training near the global model on heterogeneous data. ``global_params`` are
    the global weights, one per trainable parameter in ``model.parameters()``
    order; by default the model's weights when training starts (the received
    global model). The term's gradient ``mu * (w - w_global)`` is added to the
    batch gradient exactly; the reported loss stays the cross-entropy alone, so
    it compares across strategies.

    A plain stack of ``Linear`` and ``ReLU`` layers (the built-in ``mlp``) is
    trained by :func:`fedscale.linear_chain.train_chain`, its backward pass
    written out instead of recorded by autograd: the same batches, updates and
    loss within float rounding, at under half the cost of a step on small models.
    Any other model takes the autograd loop.
    """
    if not (math.isfinite(proximal_mu) and proximal_mu >= 0):
        raise ConfigError(f"proximal-mu: expected a finite number >= 0, got {proximal_mu!r}")
    _move(model, device)
    inputs = _as_tensor(x, device)
    targets = _as_tensor(y, device)
    generator = torch.Generator().manual_seed(seed)
    n = len(inputs)
    chain = _chain_without_autograd(model, inputs, targets)
    if chain is not None:
        # No model.train(): a chain has no mode-dependent layer, and the walk costs
        # more than a one-sample client's step.
        anchors = _anchors(chain.parameters, global_params) if proximal_mu > 0 else None
        loss_sum, steps = train_chain(
            chain,
            inputs,
            targets,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            generator=generator,
            proximal_mu=proximal_mu,
            anchors=anchors,
        )
        return TrainResult(loss=loss_sum / n, num_examples=n, steps=steps)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = _anchors(params, global_params) if proximal_mu > 0 else None
    steps = 0
    epoch_loss = 0.0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        if device.type != "cpu":
            order = order.to(device)
        # The epoch's samples in shuffled order, once: each batch is then a slice
        # (the same rows as indexing with `order[start:end]`, two gathers fewer a step).
        shuffled_inputs, shuffled_targets = inputs[order], targets[order]
        epoch_loss = 0.0
        for start in range(0, n, batch_size):
            batch = slice(start, start + batch_size)
            for p in params:
                p.grad = None
            loss = F.cross_entropy(model(shuffled_inputs[batch]), shuffled_targets[batch])
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
            if anchors is not None:
                _add_proximal_grad(params, anchors, proximal_mu)
            _sgd_step(params, lr)
            epoch_loss += float(loss.detach()) * (min(start + batch_size, n) - start)
            steps += 1
    return TrainResult(loss=epoch_loss / n, num_examples=n, steps=steps)


def _chain_without_autograd(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> Chain | None:
    """Return ``model``'s linear chain if :func:`train_chain` can train it on this data.

    Anything it would not train exactly as the autograd loop does (another
    model, a frozen parameter, a hook, no samples, other dtypes or shapes,
    labels outside the classes) takes the autograd loop, which also raises
    its usual errors on bad data.
    """
    chain = trainable_chain(model)
    if chain is None or len(inputs) == 0 or targets.dtype != torch.int64:
        return None
    if chain.flatten:
        features = math.prod(inputs.shape[1:])
    elif inputs.dim() == 2:
        features = inputs.shape[1]
    else:
        return None
    if features != chain.in_features or inputs.dtype != chain.linears[0].weight.dtype:
        return None
    if targets.shape != (len(inputs),):
        return None
    low, high = targets.aminmax()
    return chain if 0 <= int(low) and int(high) < chain.num_classes else None


def _anchors(
    params: Sequence[torch.Tensor], global_params: Sequence[torch.Tensor] | None
) -> list[torch.Tensor]:
    """Return detached copies of the proximal term's global weights, checked against ``params``."""
    if global_params is None:
        return [p.detach().clone() for p in params]
    anchors = list(global_params)
    if len(anchors) != len(params) or any(
        a.shape != p.shape for a, p in zip(anchors, params, strict=False)
    ):
        raise ConfigError(
            f"global_params: expected {len(params)} tensors shaped like the model's trainable "
            f"parameters {[tuple(p.shape) for p in params]}, got "
            f"{[tuple(a.shape) for a in anchors]}"
        )
    return [
        a.detach().to(device=p.device, dtype=p.dtype, copy=True)
        for a, p in zip(anchors, params, strict=True)
    ]


@torch.no_grad()
def _add_proximal_grad(params: list[nn.Parameter], anchors: list[torch.Tensor], mu: float) -> None:
    """Add the gradient of ``mu / 2 * ||w - w_global||^2``, ``mu * (w - w_global)``."""
    for p, anchor in zip(params, anchors, strict=True):
        prox = (p - anchor).mul_(mu)
        if p.grad is None:
            p.grad = prox
        else:
            p.grad.add_(prox)


@torch.no_grad()
def _sgd_step(params: list[nn.Parameter], lr: float) -> None:
    """Take one plain SGD step: ``p -= lr * grad``.

    The very update ``torch.optim.SGD(params, lr)`` makes without momentum or
    weight decay (``param.add_(grad, alpha=-lr)``, bit for bit; a test checks
    it), without its per-step bookkeeping, which on a small model costs about a
    third of a step; nor is there an optimizer to build for every client.
    """
    stepped: list[torch.Tensor] = [p for p in params if p.grad is not None]
    grads: list[torch.Tensor] = [cast(torch.Tensor, p.grad) for p in stepped]
    # One foreach call, not one add_ a tensor: the same per-element update.
    torch._foreach_add_(stepped, grads, alpha=-lr)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    *,
    device: torch.device,
    batch_size: int = 1024,
) -> EvalResult:
    """Return mean cross-entropy loss and accuracy of ``model`` on ``(x, y)``."""
    _move(model, device)
    model.eval()
    total_loss = 0.0
    correct = 0
    for start in range(0, len(x), batch_size):
        inputs = _as_tensor(x[start : start + batch_size], device)
        targets = _as_tensor(y[start : start + batch_size], device)
        logits = model(inputs)
        total_loss += float(F.cross_entropy(logits, targets, reduction="sum"))
        correct += int((logits.argmax(dim=1) == targets).sum())
    n = len(x)
    return EvalResult(loss=total_loss / n, accuracy=correct / n, num_examples=n)
