"""The exceptions fedscale raises.

Every message says what was expected and what arrived. The tree::

    FedscaleError
    ├── ConfigError            a setting, run-config value or CLI option is invalid
    │   └── PartitionError     a partition scheme cannot be applied to the data
    ├── DataError              a dataset is missing, unreadable or inconsistent
    ├── ModelError             a model name or factory is unknown or broken
    │   └── ExportError        a model cannot be exported to ONNX faithfully
    ├── DeviceError            the requested compute device is not available
    ├── RecordError            arrays do not match the model they are loaded into
    ├── ModelStoreError        a model directory, manifest or model file is bad
    └── LaunchError            a SuperLink, SuperNode or simulation failed to start

``ConfigError``, ``DataError``, ``ModelError``, ``RecordError`` and
``ModelStoreError`` also derive
from ``ValueError`` so that callers who catch the built-in keep working.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "DeviceError",
    "ExportError",
    "FedscaleError",
    "LaunchError",
    "ModelError",
    "ModelStoreError",
    "PartitionError",
    "RecordError",
]


class FedscaleError(Exception):
    """Base class of every error fedscale raises on purpose."""


class ConfigError(FedscaleError, ValueError):
    """A setting, run-config value or command-line option is invalid."""


class PartitionError(ConfigError):
    """A partition scheme cannot be applied to the data it was given."""


class DataError(FedscaleError, ValueError):
    """A dataset is missing, unreadable or inconsistent."""


class ModelError(FedscaleError, ValueError):
    """A model name or model factory is unknown or returns the wrong thing."""


class ExportError(ModelError):
    """A model cannot be exported to ONNX, or its export computes something else than torch."""


class DeviceError(FedscaleError):
    """The requested compute device is not available on this machine."""


class RecordError(FedscaleError, ValueError):
    """Arrays do not match the model they are loaded into."""


class ModelStoreError(FedscaleError, ValueError):
    """A model directory, its manifest or a model file is missing, corrupt or mismatched."""


class LaunchError(FedscaleError):
    """A SuperLink, SuperNode or simulation runtime failed to start."""
