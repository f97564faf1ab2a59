"""Models by name (``mlp``, ``cnn``, ``char-lstm``, ``char-lstm-small``) or from the user.

A user's factory is called as ``factory(input_shape=..., num_classes=...)`` if it
takes those arguments, else as ``factory()``, and must return a ``torch.nn.Module``
that maps a batch of samples to class logits.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import nn

from .exceptions import ModelError
from .loading import load_object

__all__ = [
    "BUILTIN_MODELS",
    "CNN",
    "MLP",
    "TEXT_MODELS",
    "CharLSTM",
    "build_model",
    "register_model",
]

ModelFactory = Callable[..., nn.Module]
_REGISTERED: dict[str, ModelFactory] = {}


class MLP(nn.Module):
    """One hidden layer on flattened input (about 10k parameters on digits)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch."""
        out: torch.Tensor = self.net(x)
        return out


class CNN(nn.Module):
    """LeNet-5-like: two 5x5 conv + pool stages, then three linear layers.

    Convolutions are padded so that small images (8x8 digits) keep a spatial
    extent; on 28x28 MNIST the feature map before the classifier is 16x7x7.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        if len(input_shape) != 3:
            raise ModelError(
                f"cnn: expected image samples of shape (channels, height, width), "
                f"got {input_shape}; use the mlp model for flat features"
            )
        channels, height, width = input_shape
        if height < 4 or width < 4:
            raise ModelError(f"cnn: expected images of at least 4x4, got {height}x{width}")
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = 16 * (height // 2 // 2) * (width // 2 // 2)
        self.classifier = nn.Sequential(
            nn.Linear(flat, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch."""
        out: torch.Tensor = self.classifier(self.features(x))
        return out


class CharLSTM(nn.Module):
    """Next-character model: embedding, a two-layer LSTM, a linear read-out of its last step.

    LEAF's Shakespeare model (Caldas et al., 2018): an 8-dimensional embedding of
    each character code and two LSTM layers of 256 units (``char-lstm``, about
    824k parameters). Trained on one CPU thread it processes about 350 samples
    of 80 characters a second, so ``char-lstm-small`` (64 units, about 59k
    parameters, about 11x faster) is the one for simulations on a few cores.
    Inputs are integer character codes of shape ``(batch, seq_len)`` (any
    integer dtype, e.g. the ``uint8`` codes of :mod:`fedscale.shakespeare`).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden: int = 256,
        embedding: int = 8,
        layers: int = 2,
    ):
        super().__init__()
        if len(input_shape) != 1:
            raise ModelError(
                f"char-lstm: expected samples that are sequences of character codes, shape "
                f"(seq_len,), got {input_shape}"
            )
        self.embed = nn.Embedding(num_classes, embedding)
        self.lstm = nn.LSTM(embedding, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return next-character logits for a batch of code sequences."""
        out, _ = self.lstm(self.embed(x.long()))
        logits: torch.Tensor = self.head(out[:, -1])
        return logits


def _char_lstm_small(input_shape: tuple[int, ...], num_classes: int) -> CharLSTM:
    return CharLSTM(input_shape, num_classes, hidden=64)


BUILTIN_MODELS: dict[str, ModelFactory] = {"mlp": MLP, "cnn": CNN}
# Models over integer token codes rather than float features: kept apart because
# what holds for every BUILTIN_MODELS entry (float32 input, image or flat samples,
# ONNX export with an FP32 input) does not hold for them.
TEXT_MODELS: dict[str, ModelFactory] = {"char-lstm": CharLSTM, "char-lstm-small": _char_lstm_small}
_BUILTIN: dict[str, ModelFactory] = {**BUILTIN_MODELS, **TEXT_MODELS}


def register_model(name: str, factory: ModelFactory) -> None:
    """Make a model factory available under ``name`` in this process."""
    if name in _BUILTIN:
        raise ModelError(f"model name {name!r} is built in; choose another name")
    # A name is bound once: clients cache model instances by name.
    if _REGISTERED.get(name, factory) is not factory:
        raise ModelError(f"model name {name!r} is already registered; choose another name")
    _REGISTERED[name] = factory


def build_model(
    spec: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    seed: int | None = None,
) -> nn.Module:
    """Build the model ``spec`` for samples of ``input_shape`` and ``num_classes``.

    With ``seed``, the initial weights are the same on every call and machine.
    """
    if spec in _BUILTIN:
        factory = _BUILTIN[spec]
    elif spec in _REGISTERED:
        factory = _REGISTERED[spec]
    elif ":" in spec:
        factory = load_object(spec, what="model")
    else:
        raise ModelError(
            f"model: expected one of {', '.join(_BUILTIN)} or MODULE:ATTR, got {spec!r}"
        )
    if not callable(factory):
        raise ModelError(f"model {spec}: expected a factory function or class, got {factory!r}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = _call_factory(spec, factory, input_shape, num_classes)
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model {spec}: expected the factory to return a torch.nn.Module, "
            f"got {type(model).__name__}"
        )
    return model


def _call_factory(
    spec: str, factory: ModelFactory, input_shape: tuple[int, ...], num_classes: int
) -> object:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    kwargs = {"input_shape": input_shape, "num_classes": num_classes}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    wanted = {k: v for k, v in kwargs.items() if accepts_any or k in params}
    if spec in _BUILTIN:
        wanted = kwargs
    return factory(**wanted)
