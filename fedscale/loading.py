"""Resolve ``MODULE:ATTR`` references to user code (models, datasets, apps)."""

from __future__ import annotations

import importlib
from typing import Any

from .exceptions import ConfigError

__all__ = ["load_object"]


def load_object(ref: str, *, what: str) -> Any:
    """Import ``MODULE`` and return its attribute ``ATTR`` (dotted paths allowed).

    ``what`` names the thing for error messages ("model", "server app", ...).
    """
    module_name, sep, attr_path = ref.partition(":")
    if not sep or not module_name or not attr_path:
        raise ConfigError(f"{what}: expected MODULE:ATTR (e.g. mypkg.models:make), got {ref!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"{what}: expected an importable module {module_name!r} "
            f"(is it installed or in the current directory?), got: {err}"
        ) from err
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                f"{what}: expected module {module_name!r} to define {attr_path!r}; "
                f"it has no attribute {part!r}"
            ) from None
    return obj
