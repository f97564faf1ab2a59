"""``--engine ray --ray-address``: a federation on an existing Ray cluster.

The cluster is real: a head and one worker node started with ``ray start`` on
this machine, one CPU each, so Flower's actor pool holds one ClientApp actor per
node. ``ray start`` daemonises, but every process it starts (GCS, raylets, agents,
and the workers and actors the raylets spawn) stays in the process group of the
``ray start`` process, which :func:`fedscale.processes.start` makes a group
leader; :func:`fedscale.processes.stop` ends each group by that PID. Never
``ray stop``: it kills every Ray process of the user, other tests' included.

Ray maps 127.0.0.1 to this machine's outward address (``resolve_ip_for_localhost``)
and its servers listen on every interface, so unlike fedscale's own servers this
cluster cannot be held to loopback.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedscale.cli.main import app as cli_app
from fedscale.exceptions import ConfigError, LaunchError
from fedscale.processes import free_port, start, stop
from fedscale.runs import RunDirectory
from fedscale.simulations import simulate
from fedscale.simulations.ray_engine import (
    check_ray_cluster,
    ray_address_file,
    resolve_ray_address,
    run_on_ray,
)

RAY_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RayCluster:
    """A head and a worker node started by ``ray start``, and where they keep state."""

    address: str
    base: Path  # RAY_TMPDIR that makes `auto` find this cluster
    head: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]

    @property
    def groups(self) -> set[int]:
        """Process groups holding every process of the cluster (one per node)."""
        return {self.head.pid, self.worker.pid}


def _ray_start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Run ``ray start ARGS`` until it has started its node and exited."""
    ray = str(Path(sys.executable).parent / "ray")
    process = start([ray, "start", *args], log_file=log)
    try:
        code = process.wait(timeout=RAY_START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    if code != 0:
        stop(process, timeout=5.0)
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        pytest.fail(f"ray start {' '.join(args)} ended with {code}:\n{tail}")
    return process


def _processes(groups: set[int], marker: bytes | None = None) -> dict[int, int]:
    """Map running (non-zombie) processes in ``groups``, or naming ``marker``, to their group."""
    found: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if state == "Z":
            continue
        if int(pgrp) in groups or (marker is not None and marker in cmdline):
            found[int(stat.parent.name)] = int(pgrp)
    return found


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    # A short base path: Ray puts Unix sockets under it, and their paths are
    # limited to 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="fsray-", dir="/tmp"))  # noqa: S108
    temp_dir = base / "ray"
    port = free_port()
    common = [
        "--num-cpus=1",
        "--num-gpus=0",
        "--object-store-memory=100000000",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    started: list[subprocess.Popen[bytes]] = []
    try:
        head = _ray_start(
            [
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={port}",
                f"--ray-client-server-port={free_port()}",
                "--include-dashboard=false",
                *common,
            ],
            base / "head.log",
        )
        started.append(head)
        worker = _ray_start([f"--address=127.0.0.1:{port}", *common], base / "worker.log")
        started.append(worker)
        yield RayCluster(address=f"127.0.0.1:{port}", base=base, head=head, worker=worker)
    finally:
        for process in reversed(started):
            stop(process, timeout=5.0)
        groups = {p.pid for p in started}
        left = _processes(groups, marker=str(base).encode())
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"Ray processes still running after stop: {sorted(left)}"


class ActorWatcher:
    """Record which process groups (cluster nodes) ran ClientApp actors."""

    def __init__(self, groups: set[int]) -> None:
        self.groups = groups
        self.actors: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._scan, daemon=True)

    def _scan(self) -> None:
        deadline = time.monotonic() + 600
        while not self._stop.is_set() and time.monotonic() < deadline:
            for pid, group in _processes(self.groups).items():
                try:
                    if b"ClientAppActor" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        self.actors[pid] = group
                except OSError:
                    continue
            self._stop.wait(0.2)

    def __enter__(self) -> ActorWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.mark.integration
@pytest.mark.slow
def test_federation_runs_on_the_clusters_nodes(ray_cluster, tmp_path):
    import ray

    out = tmp_path / "run"
    with ActorWatcher(ray_cluster.groups) as watcher:
        result = simulate(
            clients=4,
            engine="ray",
            ray_address=ray_cluster.address,
            dataset="digits",
            model="mlp",
            num_rounds=2,
            clients_per_round=4,
            out=str(out),
        )

    assert [r["round"] for r in result.rounds] == [0, 1, 2]
    # The apps demand every run-config key, so replies also prove that the run
    # config reached the actors on both nodes.
    assert [r["clients_replied"] for r in result.rounds[1:]] == [4, 4]
    assert result.final_accuracy > 0.5  # ten classes: chance is 0.1
    # One actor per node (one CPU each, one CPU per client): the ClientApp ran on
    # the head and on the worker, never in this process.
    assert set(watcher.actors.values()) == ray_cluster.groups
    # The ServerApp runs in this process (the driver): it wrote the run folder here.
    assert len(RunDirectory(out).read_metrics()) == 3
    # The run only disconnected from the cluster: both nodes are still alive.
    assert not ray.is_initialized()
    ray.init(address=ray_cluster.address, include_dashboard=False, logging_level="WARNING")
    try:
        alive = [n for n in ray.nodes() if n["Alive"]]
    finally:
        ray.shutdown()
    assert len(alive) == 2


@pytest.mark.integration
@pytest.mark.slow
def test_cli_auto_joins_the_cluster_ray_start_recorded(ray_cluster, tmp_path, monkeypatch):
    # `ray start --temp-dir BASE/ray` recorded its address in
    # BASE/ray/ray_current_cluster; with RAY_TMPDIR=BASE that is where `auto` looks.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(ray_cluster.base))
    port = ray_cluster.address.rsplit(":", 1)[1]
    assert ray_address_file().read_text().strip().endswith(f":{port}")
    assert resolve_ray_address("auto").endswith(f":{port}")

    out = tmp_path / "cli"
    args = ["simulate", "--engine", "ray", "--ray-address", "auto", "--clients", "2"]
    args += ["--per-round", "2", "--rounds", "1", "--out", str(out)]
    result = CliRunner().invoke(cli_app, args)

    assert result.exit_code == 0, result.output
    rounds = RunDirectory(out).read_metrics()
    assert [r["clients_replied"] for r in rounds] == [0, 2]
    assert len(_processes(ray_cluster.groups)) > 0, "the cluster outlived the run"


def test_nothing_listening_fails_fast_without_starting_ray(tmp_path):
    import ray

    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(LaunchError, match=f"ray address {address}: .*nothing accepts"):
        simulate(
            clients=2,
            engine="ray",
            ray_address=address,
            num_rounds=1,
            clients_per_round=2,
            out=str(tmp_path / "run"),
        )
    assert not ray.is_initialized()


def test_a_server_that_is_not_ray_is_refused_within_the_timeout():
    with socket.socket() as listener:  # accepts connections, never speaks gRPC
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(LaunchError, match="does not answer as a Ray cluster's head"):
            check_ray_cluster(address, timeout=1.0)


def test_auto_prefers_ray_address_then_the_ray_start_file(tmp_path, monkeypatch):
    record = tmp_path / "ray" / "ray_current_cluster"
    record.parent.mkdir()
    record.write_text("10.0.0.5:6380\n")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    assert resolve_ray_address("auto") == "10.0.0.7:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    assert resolve_ray_address("auto") == "10.0.0.5:6380"
    record.unlink()
    with pytest.raises(LaunchError, match=f"RAY_ADDRESS .*{record}"):
        resolve_ray_address("auto")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("10.1.2.3:6379", "10.1.2.3:6379"),
        (" [::1]:6379 ", "[::1]:6379"),
        ("head:7000", "head:7000"),
    ],
)
def test_host_port_addresses_are_kept(given, expected):
    assert resolve_ray_address(given) == expected


@pytest.mark.parametrize("bad", ["head", "head:0", "head:port", "ray://head:10001", ""])
def test_malformed_addresses_are_refused(bad):
    with pytest.raises(ConfigError, match=f"expected HOST:PORT .*got {bad!r}"):
        resolve_ray_address(bad)


def test_cluster_cpus_are_not_set_by_the_driver():
    from fedscale.edge_client.app import app as client_app
    from fedscale.server.app import app as server_app

    with pytest.raises(ConfigError, match="num_cpus: expected none"):
        run_on_ray(server_app, client_app, num_nodes=2, run_config={}, address="h:1", num_cpus=2)
