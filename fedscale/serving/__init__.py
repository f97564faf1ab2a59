"""Serve the newest model of a model directory over the Open Inference Protocol.

``fedscale serve`` runs :class:`ModelServer`: the KServe v2 REST endpoints
(:mod:`.http_server`) and the v2 gRPC service (:mod:`.grpc_server`) over one
onnxruntime session (:mod:`.repository`) that is swapped whenever a new model
lands in the model directory, pulled there from a publishing server with
``--model-url`` (:mod:`.pull`) or written by a training client. Requests are
validated by :mod:`.protocol`.

This package imports onnxruntime, numpy, httptools, orjson and (for gRPC only)
grpcio and protobuf: never torch, flwr or ray, so a device without them serves.
"""

from .http_server import Limits
from .protocol import RequestError
from .pull import ModelPuller
from .repository import LoadedModel, ModelRepository, SessionSettings
from .server import ModelServer, ServeOptions

__all__ = [
    "Limits",
    "LoadedModel",
    "ModelPuller",
    "ModelRepository",
    "ModelServer",
    "RequestError",
    "ServeOptions",
    "SessionSettings",
]
