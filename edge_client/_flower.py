"""The one adapter to the Flower internals that fedscale's warm SuperExec uses.

A Flower SuperNode started with ``--isolation process`` launches no SuperExec of
its own: an external one polls the SuperNode's Runtime API for tasks and starts
a process for each. Flower's SuperExec (``flwr.supercore.superexec``) starts a
fresh ``flwr-clientapp`` interpreter per message, which imports torch again
every round. fedscale's warm SuperExec (:mod:`fedscale.edge_client.warm`)
imports once and forks a child per task; the child runs Flower's own ClientApp
process body. That needs these Flower internals, and nothing else does:

- ``flwr.supercore.runtime.RuntimeHttpClient`` and the ``AcquireTask`` request
  (``flwr.proto.runtime_pb2``), as ``flwr/supercore/superexec/run_superexec.py``
  uses them, with ``RuntimeVersionHttpInterceptor`` (the SuperNode checks the
  caller's version header) and ``TaskType.CLIENT_APP``;
- ``flwr.supernode.runtime.run_clientapp.run_clientapp``: what the
  ``flwr-clientapp`` command runs after parsing its arguments (it pulls the
  message, context and FAB with the task's token, loads and calls the ClientApp,
  pushes the reply and the task's status, and exits through ``sys.exit``);
- ``pull_and_inflate_object_from_tree``, as ``run_clientapp`` looks it up in its
  module: the SuperNode creates a task *before* it has pulled the message's
  objects from the SuperLink, and Flower's first retry for an object that is not
  there yet waits 1 s. A fresh interpreter never notices (it takes longer than
  that to start); a forked child does, so in the child only the first retry
  waits 20 ms, doubling up to Flower's own cap.

Flower is pinned ``~=1.42.0``; an upgrade touches this file only.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime import run_clientapp as _run_clientapp_module

from fedscale.exceptions import ConfigError

__all__ = [
    "RUNTIME_ERRORS",
    "AcquiredTask",
    "RuntimeClient",
    "read_root_certificates",
    "run_client_app_task",
]

# What a Runtime API call raises when the SuperNode is not there (yet) or refuses.
RUNTIME_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError,)

# The child's first wait for a message object the SuperNode has not pulled yet.
_CHILD_INITIAL_PULL_BACKOFF = 0.02
_PULL_FUNCTION = "pull_and_inflate_object_from_tree"
_RUNTIME_TIMEOUT = 10.0


@dataclass(frozen=True)
class AcquiredTask:
    """A ClientApp task the SuperNode handed out, and the token that runs it."""

    task_id: int
    run_id: int
    token: str


def read_root_certificates(path: str | None, insecure: bool) -> bytes | None:
    """Return the PEM root certificates for the Runtime API, or ``None`` for plaintext.

    ``None`` with ``insecure=False`` means the system's root certificates.
    """
    if insecure:
        if path is not None:
            raise ConfigError("runtime API: expected --insecure or --root-certificates, got both")
        return None
    if path is None:
        return None
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--root-certificates: expected a PEM file, found nothing at {path}")
    return file.read_bytes()


class RuntimeClient:
    """The SuperExec's side of a SuperNode's Runtime API: acquire ClientApp tasks."""

    def __init__(self, address: str, *, insecure: bool, certificates: bytes | None) -> None:
        verify: ssl.SSLContext | bool = not insecure
        if certificates is not None:
            verify = ssl.create_default_context(cadata=certificates.decode("ascii"))
        # No retry invoker (unlike Flower's SuperExec): the caller's loop waits
        # and retries, and keeps noticing signals meanwhile; a short timeout for
        # the same reason.
        self._client = RuntimeHttpClient(
            f"{'http' if insecure else 'https'}://{address}",
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            verify=verify,
            timeout=_RUNTIME_TIMEOUT,
        )

    def acquire_client_app_task(self) -> AcquiredTask | None:
        """Claim the oldest pending ClientApp task, or return ``None`` if there is none."""
        response = self._client.AcquireTask(
            AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        )
        if not (response.HasField("task") and response.token):
            return None
        return AcquiredTask(
            task_id=int(response.task.task_id),
            run_id=int(response.task.run_id),
            token=response.token,
        )

    def close(self) -> None:
        """Close the HTTP connection to the SuperNode."""
        self._client.close()


def run_client_app_task(
    address: str,
    token: str,
    *,
    insecure: bool,
    certificates: bytes | None,
    parent_pid: int,
) -> int:
    """Run one ClientApp task as ``flwr-clientapp`` would; return its exit code.

    Call it only in a process that exits right after (a forked child): Flower's
    ClientApp process body installs signal handlers, starts threads and patches
    its own module, as a one-task process may.
    """
    pull = getattr(_run_clientapp_module, _PULL_FUNCTION)
    setattr(
        _run_clientapp_module,
        _PULL_FUNCTION,
        functools.partial(pull, initial_backoff=_CHILD_INITIAL_PULL_BACKOFF),
    )
    try:
        _run_clientapp_module.run_clientapp(
            runtime_api_address=address,
            token=token,
            insecure=insecure,
            certificates=certificates,
            parent_pid=parent_pid,
            runtime_dependency_install=False,
        )
    except SystemExit as done:  # Flower's flwr_exit ends the task with sys.exit
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
