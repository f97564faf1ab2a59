"""Train a cohort of clients at once: the in-process engine's fast path.

:func:`train_cohort` gives, for every client of a cohort, what
:func:`fedscale.training.train` gives for that client alone (the same shuffle
from the same seed, the same batches, plain SGD with the same learning rate, the
same reported loss and counts), within float rounding, but in one vectorised
computation over the cohort's stacked copies of the global model instead of one
small training loop per client. Small models on few cores spend most of a
per-client loop in per-call overhead; one batched step serves every client.

How a step is batched. Each client's batches (every epoch's shuffle, in order)
form its own sequence of steps; the cohort is sorted by number of steps, longest
first, so the clients still training at step ``s`` are always a prefix of the
stacked parameters and a step updates a slice, never masks idle clients. A
client's last batch of an epoch may be partial: a step computes as many samples
per client as its fullest batch has (a step of one-sample batches computes one),
shorter batches are padded with one of the client's own samples at weight zero,
and the real samples are weighted ``1 / count``, which is the mean ``train``
takes over that batch. Sorting leaves no idle clients in a step and trimming
leaves little padding (measured: 1.5-3% of computed samples on ``synthetic:1,1``
with batch 16, none on digits clients of one or two samples), so the cohort is
not further split by size; chunks (``chunk_size``) exist for cache and memory.

Two engines compute a step:

- ``linear``: for plain stacks of ``Linear`` and ``ReLU`` (the ``mlp`` model, or
  an ``nn.Sequential`` of ``Flatten``, ``Linear``, ``ReLU``), a forward and
  backward pass written out as batched matrix products (``baddbmm``/``bmm``) over
  the stacked weights. Fastest on CPUs for small models.
- ``vmap``: any eligible model, through ``torch.func.functional_call`` under
  ``torch.func.vmap`` of ``torch.func.grad``.

Eligibility. Batching changes which samples share a forward call, so a model
qualifies only if it treats the samples of a batch independently and keeps no
state: no buffers (no BatchNorm running statistics), no batch statistics at all,
no active dropout (train mode would draw other random numbers than ``train``),
no recurrent modules (not supported under ``vmap``), no frozen or shared
parameters. The model must also be declared: the built-in ``mlp`` and ``cnn``,
classes registered with :func:`register_cohort_model`, classes with a class
attribute ``supports_cohort = True``, or a plain ``nn.Sequential`` of
``Flatten``, ``Linear`` and ``ReLU`` (which is one by construction).
:func:`cohort_support` says whether a model qualifies and, if not, why;
:func:`train_cohort` refuses the others with a
:class:`~fedscale.exceptions.ModelError`, so callers fall back to ``train``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F

from .exceptions import ConfigError, DataError, ModelError
from .linear_chain import Op, linear_chain
from .models import CNN, MLP
from .training import TrainResult

__all__ = [
    "CPU_CHUNK_BYTES",
    "CohortSupport",
    "CohortTrained",
    "cohort_support",
    "register_cohort_model",
    "train_cohort",
]

Method = Literal["auto", "linear", "vmap"]
_METHODS = ("auto", "linear", "vmap")
Params = dict[str, torch.Tensor]

# Classes declared fit for cohort training (see the module docstring).
_COHORT_CLASSES: set[type[nn.Module]] = {MLP, CNN}
# Modules that mix or carry state across the samples of a batch, or draw random numbers.
_REFUSED: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.modules.batchnorm._BatchNorm, "batch normalisation uses statistics of the whole batch"),
    (nn.modules.instancenorm._InstanceNorm, "instance normalisation may track running statistics"),
    (nn.RNNBase, "recurrent modules are not supported under torch.func.vmap"),
)


def register_cohort_model(cls: type[nn.Module]) -> type[nn.Module]:
    """Declare that models of class ``cls`` may be trained as a cohort.

    The declaration promises that the model's forward treats each sample of a
    batch on its own and is a pure function of its parameters and input (no
    randomness, no state). The structural checks of :func:`cohort_support` still
    apply. Usable as a class decorator.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelError(f"register_cohort_model: expected a torch.nn.Module subclass, got {cls!r}")
    _COHORT_CLASSES.add(cls)
    return cls


@dataclass(frozen=True)
class CohortSupport:
    """Whether a model can be trained as a cohort, and which engine would do it."""

    eligible: bool
    reason: str
    method: Literal["linear", "vmap"] | None = None

    def __bool__(self) -> bool:
        return self.eligible


def cohort_support(model: nn.Module) -> CohortSupport:
    """Return whether :func:`train_cohort` accepts ``model``, and why not if it does not."""
    name = type(model).__name__
    if not isinstance(model, nn.Module):
        return CohortSupport(False, f"expected a torch.nn.Module, got {name}")
    declared = type(model) in _COHORT_CLASSES or getattr(type(model), "supports_cohort", False)
    if declared is not True and linear_chain(model) is None:
        return CohortSupport(
            False,
            f"model class {name} is not declared fit for cohort training (register it with "
            f"fedscale.cohort.register_cohort_model or set supports_cohort = True on the class)",
        )
    for sub_name, sub in model.named_modules():
        where = f"module {sub_name or name!r} ({type(sub).__name__})"
        for kind, why in _REFUSED:
            if isinstance(sub, kind):
                return CohortSupport(False, f"{where}: {why}")
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0:
            return CohortSupport(
                False, f"{where}: dropout with p={sub.p} draws random numbers in training"
            )
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        return CohortSupport(
            False, f"model {name} has buffers ({', '.join(buffers[:3])}), which training may change"
        )
    params = dict(model.named_parameters())
    if not params:
        return CohortSupport(False, f"model {name} has no parameters to train")
    if len(model.state_dict()) != len(params):
        return CohortSupport(False, f"model {name} shares parameters between modules")
    frozen = [n for n, p in params.items() if not p.requires_grad]
    if frozen:
        return CohortSupport(False, f"model {name} has frozen parameters ({', '.join(frozen[:3])})")
    not_float = [n for n, p in params.items() if not p.is_floating_point()]
    if not_float:
        return CohortSupport(False, f"model {name} has non-float parameters ({not_float[0]})")
    method: Literal["linear", "vmap"] = "linear" if linear_chain(model) is not None else "vmap"
    return CohortSupport(True, "eligible", method)


# ------------------------------------------------------------------ results


@dataclass(frozen=True, eq=False)
class CohortTrained:
    """A trained cohort: every client's parameters, stacked, and its :class:`TrainResult`.

    ``parameters[name][i]`` is client ``i``'s tensor ``name`` (clients in the order
    they were given); since eligible models have no buffers, a client's
    :meth:`state_dict` has the same keys as the model's ``state_dict()``.
    """

    parameters: Params
    results: tuple[TrainResult, ...]

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i: int) -> tuple[Params, TrainResult]:
        return self.state_dict(i), self.results[i]

    def __iter__(self) -> Iterator[tuple[Params, TrainResult]]:
        return (self[i] for i in range(len(self)))

    def state_dict(self, i: int) -> Params:
        """Return client ``i``'s trained parameters (views into :attr:`parameters`)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"client index: expected 0..{len(self) - 1}, got {i}")
        return {name: stacked[i] for name, stacked in self.parameters.items()}


# ------------------------------------------------------------------ training


def train_cohort(
    model: nn.Module,
    datasets: Sequence[tuple[npt.NDArray[Any], npt.NDArray[Any]]],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seeds: Sequence[int],
    device: torch.device,
    state: Mapping[str, torch.Tensor] | None = None,
    method: Method = "auto",
    chunk_size: int | Literal["auto"] | None = "auto",
) -> CohortTrained:
    """Train one copy of ``model`` per client of a cohort, as ``train`` would one by one.

    Parameters
    ----------
    model
        The architecture, and the starting weights unless ``state`` is given; it
        is not modified.
    datasets
        Each client's ``(x, y)`` training arrays (``x`` of one dtype and sample
        shape for the whole cohort, ``y`` integer class labels). Clients given
        in non-increasing order of size save one copy of the result.
    epochs, batch_size, lr, device
        As for :func:`fedscale.training.train`, shared by the cohort.
    seeds
        Each client's shuffle seed, as ``train``'s ``seed``.
    state
        The starting parameters (the global model), by parameter name.
    method
        ``linear``, ``vmap``, or ``auto`` (``linear`` where the model allows it).
    chunk_size
        Train at most this many clients at once (clients of similar step counts
        together), which also bounds memory. ``None``: all at once. ``auto``: on
        a CPU, about :data:`CPU_CHUNK_BYTES` of parameters at once (stacked
        parameters that stay in cache: about 10-15% faster than 1,000 clients
        at once for a 9k-parameter MLP); on other devices, all at once.

    Returns
    -------
    CohortTrained
        Every client's parameters (on ``device``) and result, in input order.

    """
    support = cohort_support(model)
    if not support.eligible:
        raise ModelError(f"cohort training: {support.reason}; train the clients one by one")
    _check_settings(epochs, batch_size, lr, len(datasets), seeds, method, chunk_size)
    start = _start_params(model, state, device)
    xs, ys = _check_data(model, start, datasets)
    names = list(start)
    chain = linear_chain(model)
    if method == "linear" and chain is None:
        raise ModelError(
            f"cohort training: method 'linear' expects a stack of Flatten, Linear and ReLU "
            f"modules, got {type(model).__name__}; use method 'vmap' or 'auto'"
        )
    if chain is not None and method != "vmap":
        step = _linear_step(chain, names)
    else:
        step = _vmap_step(model, names)
    sizes = np.array([len(y) for y in ys], dtype=np.int64)
    # Most steps first, so that the active clients of a step are a prefix; among
    # equal steps, most samples first, so that chunks hold batches of like sizes
    # (less padding); ties in input order.
    steps_per_epoch = -(-sizes // batch_size)
    order = np.lexsort((-sizes, -steps_per_epoch))
    size = _chunk(chunk_size, start, len(order), device)
    out = [torch.empty((len(ys), *p.shape), dtype=p.dtype, device=device) for p in start.values()]
    results: list[TrainResult] = [_NO_RESULT] * len(ys)
    was_training = model.training
    model.train()  # as train() does; eligible models behave alike in either mode
    try:
        for first in range(0, len(order), size):
            members = order[first : first + size]
            in_place = bool((members == np.arange(first, first + len(members))).all())
            if in_place:  # already in step order: train in the output itself
                params = [o[first : first + len(members)] for o in out]
                for p, s in zip(params, start.values(), strict=True):
                    p.copy_(s.expand_as(p))
            else:
                params = [s.expand(len(members), *s.shape).clone() for s in start.values()]
            plan = _plan(
                [xs[i] for i in members],
                [ys[i] for i in members],
                [int(seeds[i]) for i in members],
                epochs,
                batch_size,
                device,
            )
            losses = _run(plan, params, step, lr)
            if not in_place:
                where = torch.as_tensor(members, device=device)
                for o, p in zip(out, params, strict=True):
                    o.index_copy_(0, where, p)
            for i, result in zip(members, _results(plan, losses, epochs), strict=True):
                results[int(i)] = result
    finally:
        model.train(was_training)
    return CohortTrained(dict(zip(names, out, strict=True)), tuple(results))


_NO_RESULT = TrainResult(loss=math.nan, num_examples=0, steps=0)
# Stacked parameters per chunk on a CPU: a few MiB stay in a core's share of cache.
CPU_CHUNK_BYTES = 4 << 20


def _chunk(chunk_size: int | str | None, start: Params, clients: int, device: torch.device) -> int:
    if chunk_size is None or (chunk_size == "auto" and device.type != "cpu"):
        return clients
    if chunk_size == "auto":
        per_client = sum(p.numel() * p.element_size() for p in start.values())
        return max(1, CPU_CHUNK_BYTES // max(1, per_client))
    assert isinstance(chunk_size, int)
    return chunk_size


def _check_settings(
    epochs: int,
    batch_size: int,
    lr: float,
    clients: int,
    seeds: Sequence[int],
    method: str,
    chunk_size: object,
) -> None:
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ConfigError(f"cohort training: expected {name} an integer >= 1, got {value!r}")
    if (
        isinstance(lr, bool)
        or not isinstance(lr, int | float | np.floating)
        or not (math.isfinite(lr) and lr > 0)
    ):
        raise ConfigError(f"cohort training: expected lr a finite number > 0, got {lr!r}")
    if clients < 1:
        raise ConfigError("cohort training: expected at least one client's data, got none")
    if len(seeds) != clients:
        raise ConfigError(
            f"cohort training: expected one seed per client ({clients}), got {len(seeds)}"
        )
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ConfigError(f"cohort training: expected seeds integers >= 0, got {seed!r}")
        if seed >= 2**64:
            raise ConfigError(f"cohort training: expected seeds below 2**64, got {seed}")
    if method not in _METHODS:
        raise ConfigError(f"cohort training: expected method one of {_METHODS}, got {method!r}")
    if (
        chunk_size is not None
        and chunk_size != "auto"
        and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1)
    ):
        raise ConfigError(
            f"cohort training: expected chunk_size an integer >= 1, 'auto' or None, "
            f"got {chunk_size!r}"
        )


def _start_params(
    model: nn.Module, state: Mapping[str, torch.Tensor] | None, device: torch.device
) -> Params:
    params = dict(model.named_parameters())
    if state is None:
        return {n: p.detach().to(device) for n, p in params.items()}
    if set(state) != set(params):
        missing = sorted(set(params) - set(state))
        extra = sorted(set(state) - set(params))
        raise ModelError(
            f"cohort training: expected state with the model's parameters "
            f"{sorted(params)}; missing {missing}, unexpected {extra}"
        )
    start: Params = {}
    for name, p in params.items():
        given = state[name]
        if not isinstance(given, torch.Tensor) or given.shape != p.shape:
            shape = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
            raise ModelError(
                f"cohort training: state {name!r}: expected a tensor of shape "
                f"{tuple(p.shape)}, got {shape}"
            )
        start[name] = given.detach().to(device=device, dtype=p.dtype)
    return start


def _check_data(
    model: nn.Module,
    start: Params,
    datasets: Sequence[tuple[npt.NDArray[Any], npt.NDArray[Any]]],
) -> tuple[list[npt.NDArray[Any]], list[npt.NDArray[np.int64]]]:
    xs: list[npt.NDArray[Any]] = []
    ys: list[npt.NDArray[np.int64]] = []
    for i, pair in enumerate(datasets):
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise DataError(f"client {i}: expected an (x, y) pair of arrays, got {pair!r:.80}")
        x, y = pair
        if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
            raise DataError(
                f"client {i}: expected numpy arrays x and y, got "
                f"{type(x).__name__} and {type(y).__name__}"
            )
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise DataError(
                f"client {i}: expected y a 1-D array of integer labels, got {y.dtype} {y.shape}"
            )
        if len(x) != len(y):
            raise DataError(
                f"client {i}: expected as many labels as samples, got {len(y)} and {len(x)}"
            )
        if len(y) == 0:
            raise DataError(f"client {i}: expected at least one training sample, got none")
        if xs and (x.dtype != xs[0].dtype or x.shape[1:] != xs[0].shape[1:]):
            raise DataError(
                f"client {i}: expected samples like client 0's ({xs[0].dtype}, shape "
                f"{xs[0].shape[1:]}), got {x.dtype}, shape {x.shape[1:]}"
            )
        xs.append(x)
        ys.append(y.astype(np.int64, copy=False))
    classes = _num_outputs(model, start, xs[0])
    labels = np.concatenate(ys)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise DataError(
            f"cohort training: expected labels in 0..{classes - 1} (the model's outputs), "
            f"got labels from {low} to {high}"
        )
    return xs, ys


def _num_outputs(model: nn.Module, start: Params, x: npt.NDArray[Any]) -> int:
    sample = torch.from_numpy(np.array(x[:1])).to(next(iter(start.values())).device)
    try:
        with torch.no_grad():
            logits = torch.func.functional_call(model, start, (sample,))
    except (RuntimeError, TypeError, ValueError) as err:
        raise DataError(
            f"cohort training: expected samples the model takes, but a sample of client 0 "
            f"({x.dtype}, shape {x.shape[1:]}) fails in its forward: {err}"
        ) from err
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 1:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelError(
            f"cohort training: expected the model to map a batch to (batch, classes) "
            f"logits, got {got} for one sample"
        )
    return int(logits.shape[1])


# ------------------------------------------------------------------ the schedule


@dataclass(frozen=True, eq=False)
class _Plan:
    """Every client's batches, laid out step by step.

    Row ``offsets[s] + j`` holds the batch that client ``j`` (in the chunk's
    order, longest first) trains on at step ``s``; ``active[s]`` clients train
    at step ``s``, on at most ``width[s]`` samples each (the fullest batch of
    the step: a step of partial batches only computes what it needs).
    """

    x: torch.Tensor  # every client's samples, concatenated
    y: torch.Tensor
    index: torch.Tensor  # (rows, batch): sample numbers into x and y
    weight: torch.Tensor  # (rows, batch): 1 / batch count for real samples, 0 for padding
    count: npt.NDArray[np.int64]  # (rows,): real samples per row
    offsets: npt.NDArray[np.int64]  # (steps + 1,)
    steps: list[tuple[int, int, int, int]]  # (first row, end row, active, width) per step
    sizes: npt.NDArray[np.int64]  # samples per client
    steps_per_epoch: npt.NDArray[np.int64]


def _plan(
    xs: Sequence[npt.NDArray[Any]],
    ys: Sequence[npt.NDArray[np.int64]],
    seeds: Sequence[int],
    epochs: int,
    batch: int,
    device: torch.device,
) -> _Plan:
    sizes = np.array([len(y) for y in ys], dtype=np.int64)
    per_epoch = -(-sizes // batch)
    steps = epochs * per_epoch  # non-increasing: the caller sorted the clients
    active = (steps[None, :] > np.arange(int(steps[0]))[:, None]).sum(axis=1)
    offsets = np.zeros(len(active) + 1, dtype=np.int64)
    np.cumsum(active, out=offsets[1:])
    rows = int(offsets[-1])
    starts = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])

    # The shuffles, drawn exactly as train() draws them: a generator seeded with the
    # client's seed (one object, reseeded per client), one randperm per epoch. A
    # one-sample client's every shuffle is [0] whatever the seed: no draw needed.
    perms = []
    generator = torch.Generator()
    one = np.zeros(epochs, dtype=np.int64)
    for n, seed in zip(sizes.tolist(), seeds, strict=True):
        if n == 1:
            perms.append(one)
            continue
        generator.manual_seed(seed)
        for _ in range(epochs):
            perms.append(torch.randperm(n, generator=generator).numpy())
    sample = np.concatenate(perms)
    # For every drawn sample: its client, epoch and position in that epoch's order.
    drawn = sizes * epochs
    client = np.repeat(np.arange(len(sizes)), drawn)
    within = np.arange(len(sample)) - np.repeat(np.cumsum(drawn) - drawn, drawn)
    epoch, position = within // sizes[client], within % sizes[client]
    row = offsets[epoch * per_epoch[client] + position // batch] + client
    column = position % batch

    # Padding repeats the client's first sample (at weight zero): data of its own kind.
    row_client = np.arange(rows) - np.repeat(offsets[:-1], active)
    index = np.repeat(starts[row_client][:, None], batch, axis=1)
    index[row, column] = starts[client] + sample
    count = np.bincount(row, minlength=rows).astype(np.int64)
    weight = np.zeros((rows, batch), dtype=np.float32)
    weight[row, column] = 1.0 / count[row]
    width = np.maximum.reduceat(count, offsets[:-1])
    schedule = [
        (int(a), int(b), int(c), int(w))
        for a, b, c, w in zip(offsets[:-1], offsets[1:], active, width, strict=True)
    ]
    return _Plan(
        x=torch.from_numpy(np.concatenate(xs)).to(device),
        y=torch.from_numpy(np.concatenate(ys)).to(device),
        index=torch.from_numpy(index).to(device),
        weight=torch.from_numpy(weight).to(device),
        count=count,
        offsets=offsets,
        steps=schedule,
        sizes=sizes,
        steps_per_epoch=per_epoch,
    )


# A step trains the active clients on one batch each: (each parameter stacked over
# the active clients, updated in place; x; y; weights; lr) -> each client's batch loss.
Step = Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _run(plan: _Plan, params: list[torch.Tensor], step: Step, lr: float) -> torch.Tensor:
    """Run every step of the plan on ``params`` in place; return each row's loss."""
    losses = []
    sample_shape = plan.x.shape[1:]
    for first, end, active, width in plan.steps:
        index = plan.index[first:end, :width]
        x = plan.x[index.reshape(-1)].view(active, width, *sample_shape)
        views = [p[:active] for p in params]
        losses.append(step(views, x, plan.y[index], plan.weight[first:end, :width], lr))
    return torch.cat(losses)


def _results(plan: _Plan, losses: torch.Tensor, epochs: int) -> list[TrainResult]:
    """Return each client's TrainResult, its loss summed as train() sums it."""
    loss = losses.cpu().numpy().astype(np.float64)
    per_epoch = plan.steps_per_epoch
    total = np.zeros(len(per_epoch), dtype=np.float64)
    clients = np.arange(len(per_epoch))
    # train() adds float(batch loss) * batch size over the last epoch, in order.
    for j in range(int(per_epoch.max())):
        sel = clients[per_epoch > j]
        rows = plan.offsets[(epochs - 1) * per_epoch[sel] + j] + sel
        total[sel] += loss[rows] * plan.count[rows]
    return [
        TrainResult(loss=float(t / n), num_examples=int(n), steps=int(epochs * k))
        for t, n, k in zip(total, plan.sizes, per_epoch, strict=True)
    ]


# ------------------------------------------------------------------ the vmap engine


def _vmap_step(model: nn.Module, names: list[str]) -> Step:
    def loss_fn(
        params: Params, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.func.functional_call(model, params, (x,))
        per_sample = F.cross_entropy(logits, y, reduction="none")
        # where, not a product: padding must add exact zeros to the loss and its gradient.
        loss = torch.where(w > 0, per_sample * w, 0.0).sum()
        return loss, loss.detach()

    batched = torch.func.vmap(torch.func.grad(loss_fn, has_aux=True))

    def step(
        params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, lr: float
    ) -> torch.Tensor:
        grads, loss = batched(dict(zip(names, params, strict=True)), x, y, w)
        assert isinstance(loss, torch.Tensor)
        with torch.no_grad():
            for name, p in zip(names, params, strict=True):
                p.add_(grads[name], alpha=-lr)  # train()'s plain SGD step
        return loss

    return step


# ------------------------------------------------------------------ the linear engine


def _linear_step(ops: list[Op], names: list[str]) -> Step:
    """Return a step that runs the chain forward and backward as batched matmuls.

    What autograd would compute for ``F.cross_entropy`` (a mean over each
    client's real samples) and the linear and relu layers, written out: the
    gradient of the weighted loss at the logits is ``(softmax - onehot) * w``.
    The step runs without autograd, so it needs no ``no_grad``.
    """
    flatten = ops[0][0] == "flatten"
    at = {name: i for i, name in enumerate(names)}
    # ("linear", weight index, bias index or -1) or ("relu", -1, -1)
    body = [
        (op[0], at[op[1]], at[op[2]] if op[2] else -1) if op[0] == "linear" else (op[0], -1, -1)
        for op in ops
        if op[0] != "flatten"
    ]

    def step(
        params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, lr: float
    ) -> torch.Tensor:
        # Without Flatten the samples are flat: _num_outputs saw (batch, classes) logits.
        h = x.reshape(x.shape[0], x.shape[1], -1) if flatten else x
        # Forward, keeping each linear op's input and each relu's output.
        saved: list[torch.Tensor] = []
        for kind, weight, bias in body:
            if kind == "linear":
                saved.append(h)
                wt = params[weight].transpose(1, 2)
                if bias >= 0:
                    h = torch.baddbmm(params[bias].unsqueeze(1), h, wt)
                else:
                    h = torch.bmm(h, wt)
            else:
                h = torch.relu(h)
                saved.append(h)
        # Cross-entropy: each client's loss is the weighted sum over its batch.
        log_p = torch.log_softmax(h, dim=2)
        target = y.unsqueeze(2)
        loss = -(log_p.gather(2, target).squeeze(2) * w).sum(dim=1)
        grad = log_p.exp()
        grad.scatter_add_(2, target, torch.full_like(target, -1, dtype=grad.dtype))
        grad.mul_(w.unsqueeze(2))
        # Backward through the ops in reverse, each layer's SGD update fused into the
        # matmul that computes its gradient (W += -lr * grad^T h), after the gradient
        # for the layer below has used the weights from before the update.
        for k in range(len(body) - 1, -1, -1):
            kind, weight, bias = body[k]
            if kind == "linear":
                below = torch.bmm(grad, params[weight]) if k > 0 else grad
                params[weight].baddbmm_(grad.transpose(1, 2), saved[k], alpha=-lr)
                if bias >= 0:
                    params[bias].add_(grad.sum(dim=1), alpha=-lr)
                grad = below
            else:
                grad = grad * (saved[k] > 0)
        return loss

    return step
