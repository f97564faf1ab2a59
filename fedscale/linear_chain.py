"""Plain stacks of ``Linear`` and ``ReLU`` layers, trained without autograd.

A model that is such a chain (the built-in ``mlp``, or an ``nn.Sequential`` of
``Flatten``, ``Linear`` and ``ReLU``) has a backward pass short enough to write
out: the gradient of the mean cross-entropy at the logits is
``(softmax - onehot) / batch``, a linear layer passes ``grad @ W`` down and its
weights take ``grad^T @ input``, and a relu passes the gradient where its output
is positive. Both training paths use that:

- :func:`fedscale.training.train` (one client) runs :func:`train_chain` on such a
  model: the same batches, the same plain SGD update and the same reported loss
  as its autograd loop, within float rounding, at under half the cost of a step
  on small models (on a 60-128-10 MLP with batches of 10: about 40 us a step
  against 94 us through autograd and ``nn.Module`` calls);
- :mod:`fedscale.cohort`'s ``linear`` engine runs the same pass batched over the
  stacked parameters of a cohort of clients.

Why our own: autograd records and replays a graph for every step and
``nn.Module.__call__`` dispatches through hooks; for a model this small that
bookkeeping, not arithmetic, is most of a step. Neither ``torch.func`` nor
``torch.compile`` removes it on a CPU without a compiler toolchain.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from .models import MLP

__all__ = ["Chain", "Op", "linear_chain", "train_chain", "trainable_chain"]

# One op of a linear chain: ("flatten",), ("relu",) or ("linear", weight name, bias name or "").
Op = tuple[str, ...]


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module]] | None:
    """Return the layers of ``model`` with their names, if it is the mlp or a Sequential."""
    if type(model) is MLP:
        return ((f"net.{i}", layer) for i, layer in enumerate(model.net))
    if type(model) is nn.Sequential:
        return ((str(i), layer) for i, layer in enumerate(model))
    return None


def linear_chain(model: nn.Module) -> list[Op] | None:
    """Return ``model`` as a list of flatten, linear and relu ops, or None if it is not one."""
    layers = _walk(model)
    if layers is None:
        return None
    ops: list[Op] = []
    for name, layer in layers:
        if type(layer) is nn.Flatten and not ops and (layer.start_dim, layer.end_dim) == (1, -1):
            ops.append(("flatten",))
        elif type(layer) is nn.Linear:
            bias = f"{name}.bias" if layer.bias is not None else ""
            ops.append(("linear", f"{name}.weight", bias))
        elif type(layer) is nn.ReLU:
            ops.append(("relu",))
        elif type(layer) is not nn.Identity:
            return None
    if not ops or ops[-1][0] != "linear":
        return None
    return ops


@dataclass(frozen=True)
class Chain:
    """A chain's layers as :func:`train_chain` runs them."""

    flatten: bool
    """Whether the samples are flattened first."""
    layers: tuple[tuple[torch.Tensor, ...], ...]
    """Per layer: linear ``(weight,)`` or ``(weight, bias)``, detached; relu ``()``."""

    @property
    def in_features(self) -> int:
        """Features the first linear layer takes."""
        return int(self.layers[0][0].shape[1])

    @property
    def num_classes(self) -> int:
        """Logits the last linear layer gives."""
        return int(self.layers[-1][0].shape[0])


def trainable_chain(model: nn.Module, parameters: Sequence[nn.Parameter]) -> Chain | None:
    """Return ``model``'s chain if :func:`train_chain` trains it as autograd would, else None.

    ``parameters`` is ``list(model.parameters())``. Beyond being a chain: these
    are exactly the chain's weights and biases, in order, all trainable
    (autograd leaves frozen ones alone), and no module of the chain carries
    hooks, which would see forward and backward calls this pass does not make.
    """
    ops = linear_chain(model)
    if ops is None:
        return None
    seq = cast(nn.Sequential, model.net if type(model) is MLP else model)
    modules = [model, seq, *seq] if seq is not model else [model, *seq]
    if any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in modules
    ):
        return None
    layers: list[tuple[torch.Tensor, ...]] = []
    chained: list[torch.Tensor] = []
    for layer in seq:
        if type(layer) is nn.Linear:
            own = [layer.weight] if layer.bias is None else [layer.weight, layer.bias]
            chained += own
            layers.append(tuple(p.detach() for p in own))
        elif type(layer) is nn.ReLU:
            layers.append(())
    if len(chained) != len(parameters) or any(
        p is not q or not p.requires_grad for p, q in zip(chained, parameters, strict=False)
    ):
        return None
    return Chain(flatten=ops[0][0] == "flatten", layers=tuple(layers))


@torch.no_grad()
def train_chain(
    chain: Chain,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    proximal_mu: float = 0.0,
    anchors: Sequence[torch.Tensor] | None = None,
) -> tuple[float, int]:
    """Train ``chain``'s parameters in place with plain SGD on mean cross-entropy.

    The batches are those :func:`fedscale.training.train` draws from
    ``generator`` (one ``randperm`` an epoch, consecutive slices of it), and each
    layer's update is ``W -= lr * grad``, fused into the product that computes
    the gradient after the layer below has used the weights from before it.
    Returns the last epoch's summed batch loss (each batch's mean times its
    size) and the number of steps. ``targets`` must lie in the chain's classes.

    With ``proximal_mu > 0``, FedProx's term adds ``mu * (W - anchor)``, taken
    at the weights before the step, to each parameter's gradient, as
    :func:`fedscale.training.train` adds it to autograd's; ``anchors`` are the
    global weights, one per parameter in the chain's order.
    """
    pulls_toward: list[tuple[torch.Tensor, ...]] = []
    if proximal_mu > 0 and anchors is not None:
        rest = iter(anchors)
        pulls_toward = [tuple(next(rest) for _ in layer) for layer in chain.layers]
    n = len(inputs)
    x_all = inputs.reshape(n, -1) if chain.flatten else inputs
    onehot_all = F.one_hot(targets, chain.num_classes).to(x_all.dtype)
    loss_sum = torch.zeros((), dtype=torch.float64, device=inputs.device)
    layers = chain.layers
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(inputs.device)
        xs, onehots = x_all[order], onehot_all[order]
        loss_sum.zero_()
        for start in range(0, n, batch_size):
            h = xs[start : start + batch_size]
            onehot = onehots[start : start + batch_size]
            # Forward, keeping each linear layer's input and each relu's output.
            saved: list[torch.Tensor] = []
            for layer in layers:
                if not layer:
                    h = torch.relu(h)
                    saved.append(h)
                else:
                    saved.append(h)
                    h = (
                        torch.addmm(layer[1], h, layer[0].t())
                        if len(layer) > 1
                        else h.mm(layer[0].t())
                    )
            log_p = torch.log_softmax(h, dim=1)
            loss_sum.sub_(torch.dot(log_p.view(-1), onehot.reshape(-1)))
            # d(mean loss)/d(logits) = (softmax - onehot) / batch: the 1/batch goes
            # into each update's step size, so grad holds softmax - onehot.
            grad = log_p.exp_().sub_(onehot)
            alpha = -lr / len(onehot)
            for k in range(len(layers) - 1, -1, -1):
                layer = layers[k]
                if not layer:
                    grad = grad.mul_(saved[k] > 0)
                    continue
                weight = layer[0]
                below = grad.mm(weight) if k > 0 else grad
                # mu * (W - anchor), at the weights before the step
                pulls = (
                    [torch.sub(p, a) for p, a in zip(layer, pulls_toward[k], strict=True)]
                    if pulls_toward
                    else ()
                )
                weight.addmm_(grad.t(), saved[k], alpha=alpha)
                if len(layer) > 1:
                    layer[1].add_(grad.sum(dim=0), alpha=alpha)
                for p, pull in zip(layer, pulls, strict=False):
                    p.add_(pull, alpha=-lr * proximal_mu)
                grad = below
            steps += 1
    return float(loss_sum), steps
