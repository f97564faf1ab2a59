"""The same apps on Flower's own Ray simulation engine give the same results."""

import os
import threading
import time
from pathlib import Path

import pytest

from fedscale.simulations import simulate

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class RayActorWatcher:
    """Record the PIDs of Ray ClientApp actor processes while a run goes on."""

    def __init__(self):
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._scan, daemon=True)

    def _scan(self):
        deadline = time.monotonic() + 600
        while not self._stop.is_set() and time.monotonic() < deadline:
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    if b"ClientAppActor" in cmdline.read_bytes():
                        self.pids.add(int(cmdline.parent.name))
                except OSError:
                    continue
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)


def test_ray_engine_matches_in_process_engine(tmp_path):
    # Every client trains every round, so both engines do the same work and the
    # only difference left is the order in which replies are summed.
    settings = dict(num_rounds=6, clients_per_round=10, partition="dirichlet:0.5")
    inprocess = simulate(clients=10, out=str(tmp_path / "inprocess"), **settings)
    with RayActorWatcher() as watcher:
        on_ray = simulate(clients=10, engine="ray", out=str(tmp_path / "ray"), **settings)

    assert watcher.pids, "Ray ClientApp actor processes ran the clients"
    assert os.getpid() not in watcher.pids
    assert len(on_ray.rounds) == len(inprocess.rounds) == 7
    assert all(r["clients_replied"] == 10 for r in on_ray.rounds[1:])
    assert abs(on_ray.final_accuracy - inprocess.final_accuracy) <= 0.02
    for a, b in zip(on_ray.rounds, inprocess.rounds, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    assert inprocess.final_accuracy > inprocess.rounds[0]["accuracy"] + 0.3
    # Every actor process is gone once the run is over.
    time.sleep(1.0)
    assert not [
        p
        for p in watcher.pids
        if Path(f"/proc/{p}").exists()
        and b"Z" not in Path(f"/proc/{p}/stat").read_bytes().split(b")")[-1][:3]
    ]
