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
  on small models (on a 60-128-10 MLP with batches of 10: about 28 us a step
  against 130 us through autograd and ``nn.Module`` calls, measured side by side);
- :mod:`fedscale.cohort`'s ``linear`` engine runs the same pass batched over the
  stacked parameters of a cohort of clients.

Why our own: autograd records and replays a graph for every step and
``nn.Module.__call__`` dispatches through hooks; for a model this small that
bookkeeping, not arithmetic, is most of a step. Neither ``torch.func`` nor
``torch.compile`` removes it on a CPU without a compiler toolchain.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from .models import MLP

__all__ = ["Chain", "LinearLayer", "Op", "linear_chain", "train_chain", "trainable_chain"]

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
class LinearLayer:
    """One linear layer of a chain as :func:`train_chain` runs it."""

    weight: torch.Tensor
    """The layer's weight, detached (``out x in``)."""
    bias: torch.Tensor | None
    """Its bias, detached, if it has one."""
    relu: bool
    """Whether a relu follows (one or several: relu is idempotent)."""


@dataclass(frozen=True)
class Chain:
    """A chain's layers as :func:`train_chain` runs them."""

    flatten: bool
    """Whether the samples are flattened first."""
    relu_input: bool
    """Whether a relu comes before the first linear layer (it only transforms the data)."""
    linears: tuple[LinearLayer, ...]
    """The linear layers in order; a chain ends with one."""

    @property
    def in_features(self) -> int:
        """Features the first linear layer takes."""
        return int(self.linears[0].weight.shape[1])

    @property
    def num_classes(self) -> int:
        """Logits the last linear layer gives."""
        return int(self.linears[-1].weight.shape[0])

    @property
    def parameters(self) -> list[torch.Tensor]:
        """The weights and biases in order, as ``model.parameters()`` lists them."""
        return [p for layer in self.linears for p in (layer.weight, layer.bias) if p is not None]


def trainable_chain(model: nn.Module) -> Chain | None:
    """Return ``model``'s chain if :func:`train_chain` trains it as autograd would, else None.

    Beyond being a chain: its parameters are exactly the linear layers' weights
    and biases, all trainable (autograd leaves frozen ones alone), and no module
    carries hooks, which would see forward and backward calls this pass does
    not make. Read from the modules' own tables, not by walking ``parameters()``
    and ``modules()``, which cost more than a one-sample client's step.
    """
    ops = linear_chain(model)
    if ops is None:
        return None
    seq = cast(nn.Sequential, model.net if type(model) is MLP else model)
    if seq is not model and (model._parameters or list(model._modules) != ["net"]):
        return None
    if seq._parameters:
        return None
    relu_input = False
    linears: list[LinearLayer] = []
    for module in (model, seq, *seq) if seq is not model else (model, *seq):
        if module._forward_hooks or module._forward_pre_hooks:
            return None
        if module._backward_hooks or module._backward_pre_hooks:
            return None
    for layer in seq:
        if layer._modules:
            return None
        if type(layer) is nn.Linear:
            weight, bias = layer.weight, layer.bias
            if set(layer._parameters) != {"weight", "bias"} or not weight.requires_grad:
                return None
            if bias is not None and not bias.requires_grad:
                return None
            linears.append(
                LinearLayer(
                    weight.detach(), bias.detach() if bias is not None else None, relu=False
                )
            )
        elif layer._parameters:
            return None
        elif type(layer) is nn.ReLU:
            if linears:
                linears[-1] = LinearLayer(linears[-1].weight, linears[-1].bias, relu=True)
            else:
                relu_input = True
    return Chain(flatten=ops[0][0] == "flatten", relu_input=relu_input, linears=tuple(linears))


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` with a column of ones after its last: the input a bias multiplies."""
    return torch.cat([x, x.new_ones(len(x), 1)], dim=1)


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

    A layer with a bias is trained as one matrix ``[W | b]`` on its input with a
    column of ones appended: the product then adds the bias, and the update's
    ``grad^T @ [input | 1]`` holds the bias's gradient (the sum of ``grad``
    over the batch) in its last column, two small operations a layer fewer a
    step. Each layer's input lives in a buffer whose ones column is set once;
    the layer below writes its output into the rest.
    """
    n = len(inputs)
    x_all = inputs.reshape(n, -1) if chain.flatten else inputs
    if chain.relu_input:
        x_all = torch.relu(x_all)
    layers = chain.linears
    mats = [
        torch.cat([layer.weight, layer.bias[:, None]], dim=1)
        if layer.bias is not None
        else layer.weight.clone()
        for layer in layers
    ]
    pulls_toward: list[torch.Tensor] = []
    if proximal_mu > 0 and anchors is not None:
        rest = iter(anchors)
        pulls_toward = [
            torch.cat([next(rest), next(rest)[:, None]], dim=1)
            if layer.bias is not None
            else next(rest)
            for layer in layers
        ]
    if layers[0].bias is not None:
        x_all = _with_ones(x_all)
    # Input buffers of the layers after the first, each with its ones column set.
    buffers = [
        x_all.new_ones(batch_size, layer.weight.shape[1] + (layer.bias is not None))
        for layer in layers[1:]
    ]
    # Each layer's weights without the bias column: what the gradient below goes through.
    weights = [mat[:, : layer.weight.shape[1]] for mat, layer in zip(mats, layers, strict=True)]
    transposed = [mat.t() for mat in mats]
    onehot_all = F.one_hot(targets, chain.num_classes).to(x_all.dtype)
    # Each step's log-probabilities, kept for the epoch: its loss is one product at
    # the end (the sum over samples of -log p(target) is the sum of the batch means
    # times their sizes) instead of four small operations a step.
    log_p_all = x_all.new_empty(n, chain.num_classes)
    loss = 0.0
    last = len(layers) - 1
    relu_after = [layer.relu for layer in layers]
    # Per batch size (the full one and a last partial one): each hidden layer's
    # output view and the next layer's input, views of the buffers made once.
    views: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    steps = 0
    for _ in range(epochs):
        if n > 1:
            order = torch.randperm(n, generator=generator).to(inputs.device)
            xs, onehots = x_all[order], onehot_all[order]
        else:  # a one-sample client's every shuffle is [0]
            xs, onehots = x_all, onehot_all
        if n <= batch_size:  # one batch: most small clients' only step
            batches: Iterable[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = [
                (n, xs, onehots, log_p_all)
            ]
        else:
            batches = zip(
                sizes,
                torch.split(xs, batch_size),
                torch.split(onehots, batch_size),
                torch.split(log_p_all, batch_size),
                strict=True,
            )
        for size, h, onehot, log_p in batches:
            hidden = views.get(size)
            if hidden is None:
                hidden = views[size] = [
                    (buffer[:size, : layer.weight.shape[0]], buffer[:size])
                    for buffer, layer in zip(buffers, layers, strict=False)
                ]
            # Forward: each layer's input (with its ones column) and output after its relu.
            ins = [h]
            for k in range(last):
                out, h = hidden[k]
                torch.mm(ins[k], transposed[k], out=out)
                if relu_after[k]:
                    out.relu_()
                ins.append(h)
            torch.log_softmax(h.mm(transposed[last]), dim=1, out=log_p)
            # d(mean loss)/d(logits) = (softmax - onehot) / batch: the 1/batch goes
            # into each update's step size, so grad holds softmax - onehot.
            grad = torch.exp(log_p).sub_(onehot)
            alpha = -lr / size
            for k in range(last, -1, -1):
                below = grad.mm(weights[k]) if k > 0 else grad
                if k > 0 and relu_after[k - 1]:
                    # relu's backward: zero where its output is (autograd's own kernel).
                    below = torch.ops.aten.threshold_backward(below, hidden[k - 1][0], 0)
                if pulls_toward:  # mu * (W - anchor), at the weights before the step
                    pull = torch.sub(mats[k], pulls_toward[k])
                mats[k].addmm_(grad.t(), ins[k], alpha=alpha)
                if pulls_toward:
                    mats[k].add_(pull, alpha=-lr * proximal_mu)
                grad = below
            steps += 1
    if steps:
        # The last epoch's: the one-hot product picks each sample's log p(target)
        # exactly, summed in float64 (float32 on Apple's MPS, which has no float64).
        total = torch.float32 if log_p_all.device.type == "mps" else torch.float64
        loss = -float(torch.mul(log_p_all, onehots).sum(dtype=total))
    for layer, mat in zip(layers, mats, strict=True):
        width = layer.weight.shape[1]
        layer.weight.copy_(mat[:, :width])
        if layer.bias is not None:
            layer.bias.copy_(mat[:, width])
    return loss, steps
