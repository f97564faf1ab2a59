"""Start and stop the Flower processes fedscale runs (SuperLink, SuperNode, flwr).

Each process starts in its own session, so that it and every child it spawns
(Flower runs each ServerApp and ClientApp in a subprocess) form one process group
that :func:`stop` ends by the leader's PID.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from .exceptions import LaunchError

__all__ = [
    "flower_executable",
    "free_port",
    "is_loopback",
    "join_address",
    "split_address",
    "start",
    "stop",
    "wait_for_port",
]


def flower_executable(name: str) -> str:
    """Path of a Flower command (``flower-superlink``, ``flwr``, ...) of this Python."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise LaunchError(
            f"expected Flower's {name!r} command beside {sys.executable} or on PATH, "
            "found neither; pip install 'fedscale[train]'"
        )
    return found


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_PORT_TRIES = 64
_FIRST_PICK = 20_000  # above Ray's default worker ports and the usual service ports


def _first_ephemeral_port() -> int:
    """Return where the range the kernel takes outgoing connections' ports from starts."""
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


_RESERVATION_SECONDS = 300.0  # long enough for any process to bind what it was given
_SWEEP_ABOVE = 1024  # reservations kept before expired ones are removed


def _reservations() -> Path | None:
    user = getattr(os, "getuid", lambda: "")()
    folder = Path(tempfile.gettempdir()) / f"fedscale-ports-{user}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return None  # no shared folder: ports are then only checked by binding them
    return folder


def _reserve(folder: Path | None, port: int) -> bool:
    """Claim ``port`` for this caller among every process of this user on this host."""
    if folder is None:
        return True
    path = folder / str(port)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except FileExistsError:
        pass
    try:  # an expired reservation is taken over; os.replace keeps that atomic
        if time.time() - path.stat().st_mtime < _RESERVATION_SECONDS:
            return False
        claim = folder / f".{port}.{os.getpid()}.{threading.get_ident()}"
        claim.touch()
        os.replace(claim, path)
        return True
    except OSError:
        return False


def _sweep(folder: Path | None) -> None:
    if folder is None:
        return
    names = os.listdir(folder)
    if len(names) <= _SWEEP_ABOVE:
        return
    now = time.time()
    for name in names:
        with contextlib.suppress(OSError):
            if now - (folder / name).stat().st_mtime >= _RESERVATION_SECONDS:
                (folder / name).unlink()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago.

    Chosen below the ephemeral range where there is room: a port the kernel
    hands out (``bind(0)``) can be taken again by any outgoing connection, such
    as a SuperNode dialling its SuperLink, in the moment before the process it
    was chosen for binds it. A random pick below the range is only ever taken
    by another deliberate pick. The picks start above Ray's default worker
    ports (10002-19999), which a running Ray hands to its workers.

    A port handed out in the last five minutes, by this process or another of
    the same user, is not handed out again (a file per port in the temp folder
    marks it): callers usually pick several ports before starting anything, and
    a port nobody has bound yet still looks free. Without this, two random
    picks among 12,000 ports collide in a few of every thousand tests.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low = _first_ephemeral_port()
    candidates = range(_FIRST_PICK, low) if low - _FIRST_PICK >= 1024 else range(0)
    rng = random.SystemRandom()
    folder = _reservations()
    _sweep(folder)
    for _ in range(_PORT_TRIES if candidates else 0):
        port = rng.choice(candidates)
        if _bindable(family, host, port) and _reserve(folder, port):
            return port
    for _ in range(_PORT_TRIES):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if _reserve(folder, port):
            return port
    raise LaunchError(
        f"free port: expected a bindable port on {host} that no process of this user "
        f"was handed in the last {_RESERVATION_SECONDS:g} s, found none"
    )


def _bindable(family: socket.AddressFamily, host: str, port: int) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def split_address(address: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``HOST:PORT`` (or ``[v6]:PORT``); ``HOST`` alone takes ``default_port``."""
    host, sep, port = address.rpartition(":")
    if not sep or "]" in port:
        host, port = address, ""
    host = host.strip("[]")
    if not port and default_port is not None:
        return host, default_port
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(f"address: expected HOST:PORT with a port in 1-65535, got {address!r}")
    return host, int(port)


def join_address(host: str, port: int) -> str:
    """Return ``HOST:PORT``, bracketing an IPv6 host (``[::1]:8000``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    return host in ("localhost", "::1") or host.startswith("127.")


def start(
    argv: Sequence[str],
    *,
    log_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    new_session: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``argv``, by default as the leader of a new process group.

    With ``log_file`` its output goes there, else to this process's output. With
    ``new_session=False`` it stays in this process's group, so that whoever
    stops this process's group stops it too.
    """
    out: IO[bytes] | None = None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_file, "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        return subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=new_session,
        )
    except OSError as err:
        raise LaunchError(f"could not start {argv[0]}: {err}") from err
    finally:
        if out is not None:
            out.close()


def stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """Stop a process started by :func:`start`, and what it started, by PID.

    A process that leads its own group (``new_session=True``) is stopped with the
    whole group, even after it has exited itself; any other process with its
    descendants (found through Linux's /proc). SIGTERM first, SIGKILL to whatever
    is left after ``timeout`` seconds. Returns the process's exit code.
    """
    pid = process.pid
    # A group with the id of our child's PID exists only if the child created
    # it, and Linux does not reuse a PID that still names a process group.
    group = any(pgrp == pid for pgrp, _ in _process_table().values()) or (
        process.poll() is None and _pgid(pid) == pid
    )
    pids = [] if group else _descendants(pid)
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        _signal(process, pids, group, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _alive(process, pids, group):
            time.sleep(0.05)
        if not _alive(process, pids, group):
            break
    try:
        return process.wait(timeout=5.0)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
        return None


def _signal(process: subprocess.Popen[bytes], pids: list[int], group: bool, sig: int) -> None:
    targets = list(pids)
    if process.poll() is None:  # never signal a PID we have already reaped
        targets.append(process.pid)
    try:
        if group:
            os.killpg(process.pid, sig)
            return
    except (ProcessLookupError, PermissionError):
        return
    for target in targets:
        try:
            os.kill(target, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(process: subprocess.Popen[bytes], pids: list[int], group: bool) -> bool:
    running = process.poll() is None  # also reaps our own child
    table = _process_table()
    if group:
        return running or any(pgrp == process.pid for pgrp, _ in table.values())
    return running or any(p in table for p in pids)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _descendants(pid: int) -> list[int]:
    table = _process_table()
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, (_, ppid) in table.items() if ppid == parent]
        found += children
        frontier += children
    return found


def _process_table() -> dict[int, tuple[int, int]]:
    """Map running processes (not zombies) to ``(pgrp, ppid)``; Linux /proc."""
    table: dict[int, tuple[int, int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        # Zombies (orphans nobody reaps, as in many containers) no longer run.
        if state != "Z":
            table[int(stat.parent.name)] = (int(pgrp), int(ppid))
    return table


def wait_for_port(
    host: str,
    port: int,
    *,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    what: str = "server",
    log_file: Path | None = None,
) -> None:
    """Wait until ``host:port`` accepts TCP connections, or fail clearly."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise LaunchError(
                f"{what} exited with code {process.returncode} before listening on "
                f"{host}:{port}" + (f"; see {log_file}" if log_file else "") + _tail(log_file)
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise LaunchError(
        f"expected {what} to listen on {host}:{port} within {timeout:g} s; it did not"
        + (f"; see {log_file}" if log_file else "")
        + _tail(log_file)
    )


def _tail(log_file: Path | None, lines: int = 15) -> str:
    """Return the last lines of a log, to put the cause of a failed start in its error."""
    if log_file is None:
        return ""
    try:
        text = log_file.read_text(errors="replace").rstrip()
    except OSError:
        return ""
    if not text:
        return ""
    return "; it ends with:\n" + "\n".join(text.splitlines()[-lines:])
