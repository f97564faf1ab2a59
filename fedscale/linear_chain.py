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

from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from .models import MLP

__all__ = ["Op", "linear_chain", "train_chain", "trainable_chain"]

# One op of a linear chain: ("flatten",), ("relu",) or ("linear", weight name, bias name or "").
Op = tuple[str, ...]


def linear_chain(model: nn.Module) -> list[Op] | None:
    """Return ``model`` as a list of flatten, linear and relu ops, or None if it is not one."""
    if type(model) is MLP:
        seq, prefix = model.net, "net."
    elif type(model) is nn.Sequential:
        seq, prefix = model, ""
    else:
        return None
    ops: list[Op] = []
    for i, layer in enumerate(seq):
        name = f"{prefix}{i}"
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


def trainable_chain(model: nn.Module) -> list[Op] | None:
    """Return ``model``'s chain if :func:`train_chain` trains it as autograd would, else None.

    Beyond being a chain: every parameter is one of the chain's and trainable
    (autograd leaves frozen ones alone), and no module carries hooks, which
    would see the forward and backward calls this pass does not make.
    """
    ops = linear_chain(model)
    if ops is None:
        return None
    names = {name for op in ops if op[0] == "linear" for name in op[1:] if name}
    params = dict(model.named_parameters())
    if set(params) != names or not all(p.requires_grad for p in params.values()):
        return None
    for module in model.modules():
        if (
            module._forward_hooks
            or module._forward_pre_hooks
            or module._backward_hooks
            or module._backward_pre_hooks
            or module._state_dict_hooks
        ):
            return None
    return ops


@torch.no_grad()
def train_chain(
    model: nn.Module,
    ops: Sequence[Op],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    proximal_mu: float = 0.0,
    anchors: Mapping[str, torch.Tensor] | None = None,
) -> tuple[float, int]:
    """Train the chain ``model`` in place with plain SGD on mean cross-entropy.

    The batches are those :func:`fedscale.training.train` draws from
    ``generator`` (one ``randperm`` an epoch, consecutive slices of it), and each
    layer's update is ``W -= lr * grad``, fused into the product that computes
    the gradient after the layer below has used the weights from before it.
    Returns the last epoch's summed batch loss (each batch's mean times its
    size) and the number of steps. ``targets`` must lie in the model's classes.

    With ``proximal_mu > 0``, FedProx's term adds ``mu * (W - anchors[name])``,
    taken at the weights before the step, to each parameter's gradient, as
    :func:`fedscale.training.train` adds it to autograd's.
    """
    named = dict(model.named_parameters())
    pulled = proximal_mu > 0 and anchors is not None
    flatten = ops[0][0] == "flatten"
    # Each linear layer's parameters, a relu as None; with the proximal term each
    # parameter is paired with its anchor.
    body: list[list[tuple[torch.Tensor, torch.Tensor | None]] | None] = []
    for op in ops:
        if op[0] == "relu":
            body.append(None)
        elif op[0] == "linear":
            body.append(
                [
                    (named[name].detach(), anchors[name] if pulled and anchors else None)
                    for name in op[1:]
                    if name
                ]
            )
    last = body[-1]
    assert last is not None  # a chain ends with a linear op
    num_classes = last[0][0].shape[0]
    n = len(inputs)
    x_all = inputs.reshape(n, -1) if flatten else inputs
    onehot_all = F.one_hot(targets, num_classes).to(x_all.dtype)
    loss_sum = torch.zeros((), dtype=torch.float64, device=inputs.device)
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(inputs.device)
        xs, onehots = x_all[order], onehot_all[order]
        loss_sum.zero_()
        for start in range(0, n, batch_size):
            h = xs[start : start + batch_size]
            onehot = onehots[start : start + batch_size]
            # Forward, keeping each layer's input (linear) or output (relu).
            saved: list[torch.Tensor] = []
            for layer in body:
                if layer is None:
                    h = torch.relu(h)
                    saved.append(h)
                else:
                    saved.append(h)
                    weight = layer[0][0]
                    h = (
                        torch.addmm(layer[1][0], h, weight.t())
                        if len(layer) > 1
                        else h.mm(weight.t())
                    )
            log_p = torch.log_softmax(h, dim=1)
            loss_sum.sub_(torch.dot(log_p.view(-1), onehot.reshape(-1)))
            # d(mean loss)/d(logits) = (softmax - onehot) / batch: the 1/batch goes
            # into each update's step size, so grad holds softmax - onehot.
            grad = log_p.exp_().sub_(onehot)
            alpha = -lr / len(onehot)
            for k in range(len(body) - 1, -1, -1):
                layer = body[k]
                if layer is None:
                    grad = grad.mul_(saved[k] > 0)
                    continue
                weight = layer[0][0]
                below = grad.mm(weight) if k > 0 else grad
                if pulled:  # mu * (W - anchor) at the weights before the step
                    pulls = [torch.sub(p, cast(torch.Tensor, anchor)) for p, anchor in layer]
                weight.addmm_(grad.t(), saved[k], alpha=alpha)
                if len(layer) > 1:
                    layer[1][0].add_(grad.sum(dim=0), alpha=alpha)
                if pulled:
                    for (p, _), pull in zip(layer, pulls, strict=True):
                        p.add_(pull, alpha=-lr * proximal_mu)
                grad = below
            steps += 1
    return float(loss_sum), steps
