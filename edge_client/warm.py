"""fedscale's warm SuperExec: every ClientApp task in a forked child of one warm process.

By default a Flower SuperNode starts Flower's SuperExec, which starts a fresh
``flwr-clientapp`` interpreter for every message; that interpreter imports torch,
Flower and the app again each round, seconds of a small device's time. With
``flower-supernode --isolation process`` the SuperNode starts no SuperExec and
waits for one to poll its Runtime API; this is that process. It imports the
ClientApp (and torch, Flower) once, then for each ClientApp task it acquires it
forks a child that runs Flower's own ClientApp process body with the task's
token and exits. So Flower's protocol and its one-process-per-message isolation
stay: a task's crash, leaked state or changed globals end with its child.

Forking after importing torch is safe while the parent never runs a torch op:
torch starts its thread pools lazily, on first use, which happens in the child.
Each child reseeds Python's and NumPy's global random generators from the OS, as
a fresh interpreter would; torch's default generator is untouched by the parent,
so a child starts from the same state as a fresh interpreter.

Run it as ``python -m fedscale.edge_client.warm --runtime-api-address HOST:PORT
--insecure``; ``fedscale edge-client`` does, next to ``flower-supernode
--isolation process``. Only ClientApp tasks are taken (not Flower's AgentApp
tasks), and no dependencies are installed at run time. Modules preloaded here
win over same-named modules inside a FAB, so preload only installed code, and
none that starts threads on import (onnxruntime does: a child would inherit its
state but not its threads); the ClientApp imports those itself, in the child.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from fedscale.exceptions import ConfigError, FedscaleError
from fedscale.flower_app import CLIENT_APP_REF

if TYPE_CHECKING:
    from ._flower import AcquiredTask, RuntimeClient

__all__ = ["DEFAULT_PRELOAD", "WarmOptions", "WarmSuperExec", "main"]

log = logging.getLogger(__name__)

# fedscale's ClientApp module: imports torch, Flower and the training code.
DEFAULT_PRELOAD = (CLIENT_APP_REF.partition(":")[0],)
_UNREACHABLE_LOG_EVERY = 30.0


@dataclass(frozen=True)
class WarmOptions:
    """Where the SuperNode's Runtime API is, and how the warm SuperExec behaves."""

    runtime_api_address: str
    insecure: bool = True
    root_certificates: str | None = None
    parent_pid: int | None = None
    poll_interval: float = 0.1
    max_workers: int = 2
    preload: tuple[str, ...] = DEFAULT_PRELOAD
    stop_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not self.runtime_api_address.strip():
            raise ConfigError("--runtime-api-address: expected HOST:PORT, got nothing")
        if not 0.005 <= self.poll_interval <= 60:
            raise ConfigError(
                f"--poll-interval: expected 0.005 to 60 seconds, got {self.poll_interval}"
            )
        if self.max_workers < 1:
            raise ConfigError(f"--max-workers: expected at least 1, got {self.max_workers}")
        if self.stop_timeout <= 0:
            raise ConfigError(f"stop timeout: expected a positive number, got {self.stop_timeout}")


@dataclass
class _Worker:
    task: AcquiredTask
    started: float = field(default_factory=time.monotonic)


class WarmSuperExec:
    """Acquire ClientApp tasks from a SuperNode and run each in a forked child."""

    def __init__(self, options: WarmOptions) -> None:
        if not hasattr(os, "fork"):
            raise ConfigError("warm SuperExec: expected a platform with os.fork, this has none")
        self.options = options
        self._workers: dict[int, _Worker] = {}
        self._stop_signal: int | None = None
        self._client: RuntimeClient | None = None

    def run(self) -> int:
        """Serve tasks until SIGTERM/SIGINT or the parent process ends; return 0."""
        from ._flower import RuntimeClient, read_root_certificates

        options = self.options
        certificates = read_root_certificates(options.root_certificates, options.insecure)
        started = time.perf_counter()
        for module in options.preload:
            try:
                importlib.import_module(module)
            except Exception as err:
                raise ConfigError(f"--preload {module}: could not import it: {err}") from err
        # Keep the preloaded objects out of the children's garbage collections,
        # which would otherwise touch (and so copy) every page they live on.
        gc.collect()
        gc.freeze()
        log.info(
            "warm SuperExec pid %d: preloaded %s in %.2f s; polling %s every %g s",
            os.getpid(),
            ", ".join(options.preload) or "nothing",
            time.perf_counter() - started,
            options.runtime_api_address,
            options.poll_interval,
        )
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        self._client = RuntimeClient(
            options.runtime_api_address, insecure=options.insecure, certificates=certificates
        )
        try:
            self._serve(certificates)
        finally:
            self._stop_workers()
            self._client.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0

    # ----------------------------------------------------------------- parent

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signal = signum

    def _serve(self, certificates: bytes | None) -> None:
        from ._flower import RUNTIME_ERRORS

        assert self._client is not None
        options = self.options
        connected = False
        unreachable_since: float | None = None
        last_complaint = 0.0
        while self._stop_signal is None:
            self._reap()
            if options.parent_pid is not None and not _alive(options.parent_pid):
                log.info("parent pid %d has ended; stopping", options.parent_pid)
                return
            if len(self._workers) < options.max_workers:
                try:
                    task = self._client.acquire_client_app_task()
                except RUNTIME_ERRORS as err:
                    now = time.monotonic()
                    if unreachable_since is None:
                        unreachable_since = now
                    if now - last_complaint >= _UNREACHABLE_LOG_EVERY:
                        last_complaint = now
                        log.warning(
                            "SuperNode runtime API at %s not answering (%s); retrying",
                            options.runtime_api_address,
                            err,
                        )
                    time.sleep(min(1.0, 4 * options.poll_interval))
                    continue
                if not connected or unreachable_since is not None:
                    log.info("connected to the SuperNode at %s", options.runtime_api_address)
                    connected, unreachable_since, last_complaint = True, None, 0.0
                if task is not None:
                    self._fork(task, certificates)
            time.sleep(options.poll_interval)
        log.info("signal %d: stopping", self._stop_signal)

    def _fork(self, task: AcquiredTask, certificates: bytes | None) -> None:
        if threading.active_count() > 1:
            log.warning(
                "forking with %d Python threads running; only this one continues in the child",
                threading.active_count(),
            )
        sys.stdout.flush()
        sys.stderr.flush()
        began = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            self._child(task, certificates)
        self._workers[pid] = _Worker(task)
        log.info(
            "task %d (run %d): ClientApp in worker pid %d, forked from pid %d in %.1f ms",
            task.task_id,
            task.run_id,
            pid,
            os.getpid(),
            (time.perf_counter() - began) * 1000,
        )

    def _reap(self) -> None:
        for pid, worker in list(self._workers.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            del self._workers[pid]
            code = os.waitstatus_to_exitcode(status)
            log.log(
                logging.INFO if code == 0 else logging.WARNING,
                "worker pid %d (task %d) exited with code %d after %.2f s",
                pid,
                worker.task.task_id,
                code,
                time.monotonic() - worker.started,
            )

    def _stop_workers(self) -> None:
        # Flower's ClientApp body handles SIGTERM: it reports the task as stopped.
        for sig, wait in ((signal.SIGTERM, self.options.stop_timeout), (signal.SIGKILL, 5.0)):
            for pid in self._workers:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while self._workers and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.02)
            if not self._workers:
                return

    # ------------------------------------------------------------------ child

    def _child(self, task: AcquiredTask, certificates: bytes | None) -> NoReturn:
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            _fresh_random_state()
            log.info(
                "worker pid %d (parent %d) runs task %d of run %d",
                os.getpid(),
                os.getppid(),
                task.task_id,
                task.run_id,
            )
            from ._flower import run_client_app_task

            code = run_client_app_task(
                self.options.runtime_api_address,
                task.token,
                insecure=self.options.insecure,
                certificates=certificates,
                parent_pid=os.getppid(),
            )
        except BaseException:
            log.exception("worker pid %d: task %d failed", os.getpid(), task.task_id)
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            # Never return into the parent's loop, nor run its atexit handlers.
            os._exit(code)


def _fresh_random_state() -> None:
    """Reseed the global generators a fresh interpreter would seed from the OS."""
    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie does not)."""
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fedscale.edge_client.warm",
        description="Run each ClientApp task of a Flower SuperNode (started with "
        "--isolation process) in a forked child of this warm process.",
    )
    parser.add_argument(
        "--runtime-api-address", required=True, help="The SuperNode's Runtime API, HOST:PORT."
    )
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="Plaintext to the Runtime API.")
    tls.add_argument("--root-certificates", help="PEM CA file for a TLS Runtime API.")
    parser.add_argument("--parent-pid", type=int, help="Stop when this process ends.")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=WarmOptions.poll_interval,
        help="Seconds between task polls (default: %(default)s).",
    )
    parser.add_argument(
        "--max-workers",
        type=int,
        default=WarmOptions.max_workers,
        help="Most tasks running at once (default: %(default)s).",
    )
    parser.add_argument(
        "--preload",
        action="append",
        metavar="MODULE",
        help=f"Module to import once before forking (repeatable; default: {DEFAULT_PRELOAD[0]}).",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m fedscale.edge_client.warm``."""
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s fedscale-warm %(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        options = WarmOptions(
            runtime_api_address=args.runtime_api_address,
            insecure=args.insecure,
            root_certificates=args.root_certificates,
            parent_pid=args.parent_pid,
            poll_interval=args.poll_interval,
            max_workers=args.max_workers,
            preload=tuple(args.preload) if args.preload else DEFAULT_PRELOAD,
        )
        return WarmSuperExec(options).run()
    except FedscaleError as err:
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
