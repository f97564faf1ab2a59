"""The simulated system: which clients are online, and how long a round takes.

A :class:`SimulatedSystem` is what the in-process engine adds to a federation when
a run has a device model (``device-mix``): a :class:`~fedscale.population.Population`
(client id to data size and device profile, nothing stored per client), a virtual
clock, and the round rules of :mod:`fedscale.clock` (deadline, over-commitment).
The engine hands it to :class:`~fedscale.simulations.grid.InProcessGrid`, which
then offers the strategy only the nodes online at the clock's current time, and
the server's round loop (:mod:`fedscale.server.federation`) asks it to plan each
round before sending anything: clients the round drops (offline, churn, the
deadline, over-commitment) never receive a message, so they cost no training.

Node ``FIRST_CLIENT_NODE_ID + i`` is client ``i``, as in the grid.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import get_args

import numpy as np
import numpy.typing as npt

from fedscale.clock import (
    DropReason,
    RoundCost,
    RoundTiming,
    overcommit_count,
    simulate_round,
)
from fedscale.devices import (
    DAY_S,
    Availability,
    DeviceMix,
    DeviceSource,
    FixedDevices,
    TraceDevices,
    device_source,
)
from fedscale.exceptions import ConfigError
from fedscale.node_data import has_natural_clients, natural_provider
from fedscale.population import ClientDataProvider, Population, data_provider
from fedscale.settings import RunSettings

from ._flower import FIRST_CLIENT_NODE_ID

__all__ = ["DROP_REASONS", "RoundPlan", "SimulatedSystem", "system_for"]

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]

DROP_REASONS: tuple[str, ...] = get_args(DropReason)
# Clients scanned at once for availability: bounds the temporaries of a
# many-million-client federation to a few tens of megabytes.
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RoundPlan:
    """A planned round: who trains, who was dropped and why, and how long it lasts."""

    server_round: int
    timing: RoundTiming
    accepted_nodes: frozenset[int]
    dropped: Mapping[str, int]

    @property
    def clients_dropped(self) -> int:
        """Clients offered work whose update the round does not use."""
        return len(self.timing.dropped)


@dataclass(eq=False)
class SimulatedSystem:
    """A population of simulated devices on a virtual clock.

    Parameters
    ----------
    population
        The federation: data sizes and device profiles by client id.
    deadline_s
        A round drops clients that would finish later than this (``None``: no deadline).
    overcommit
        Offer work to ``ceil(k * (1 + overcommit))`` clients and keep the first ``k``.
    compute_scale
        The model's cost per sample relative to the one the device profiles' speeds
        were measured on.
    first_node_id
        Node id of client 0.

    """

    population: Population
    deadline_s: float | None = None
    overcommit: float = 0.0
    compute_scale: float = 1.0
    first_node_id: int = FIRST_CLIENT_NODE_ID
    _now: float = field(default=0.0, init=False)
    _online: tuple[float, BoolArray, list[int]] | None = field(default=None, init=False)
    _trace_index: tuple[IntArray, IntArray] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.deadline_s is not None and not (
            math.isfinite(self.deadline_s) and self.deadline_s > 0
        ):
            raise ConfigError(f"deadline: expected seconds > 0 or none, got {self.deadline_s!r}")
        overcommit_count(1, self.overcommit)  # validates it
        RoundCost(0, 0, 1, self.compute_scale)  # validates it

    # ------------------------------------------------------------ the clock

    @property
    def now(self) -> float:
        """The virtual clock, in simulated seconds since the run started."""
        return self._now

    def resume_at(self, now: float) -> None:
        """Set the clock to ``now``, a checkpoint's time (resuming a run)."""
        if not (math.isfinite(now) and now >= 0):
            raise ConfigError(f"resume: expected a virtual time >= 0, got {now!r}")
        self._now = now
        self._online = None

    @property
    def num_clients(self) -> int:
        """Clients in the federation."""
        return self.population.num_clients

    def offer_count(self, k: int) -> int:
        """Return how many clients to offer work to for ``k`` updates (over-commitment)."""
        return overcommit_count(k, self.overcommit)

    # ------------------------------------------------------------ availability

    def online_node_ids(self) -> list[int]:
        """Return the node ids of the clients online now, in id order."""
        return list(self._online_now()[2])

    def is_online(self, node_id: int) -> bool:
        """Return whether node ``node_id`` exists and is online now."""
        client = node_id - self.first_node_id
        if not 0 <= client < self.num_clients:
            return False
        return bool(self._online_now()[1][client])

    def wait_for_clients(self) -> float:
        """Advance the clock to when the first client comes online; return the new time.

        What a server does when nobody is online: wait. Raises if no client is
        ever online again.
        """
        if self._online_now()[2]:
            return self._now
        soonest = math.inf
        for start in range(0, self.num_clients, _CHUNK):
            ids = np.arange(start, min(self.num_clients, start + _CHUNK), dtype=np.int64)
            soonest = min(soonest, float(np.min(self._next_online(ids, self._now))))
        if not math.isfinite(soonest):
            raise ConfigError(
                f"device-mix: expected clients that come online again, but none of the "
                f"{self.num_clients} is online at or after {self._now:g} s of virtual time"
            )
        log.info("no client online at %.0f s; waiting until %.0f s", self._now, soonest)
        self._now = max(soonest, self._now)
        return self._now

    def _online_now(self) -> tuple[float, BoolArray, list[int]]:
        # The strategy asks for the node ids several times a round (FedAvg: twice
        # in configure_train), always at the same virtual time: compute them once.
        cached = self._online
        if cached is not None and cached[0] == self._now:
            return cached
        masks = [
            self._online_mask(
                np.arange(start, min(self.num_clients, start + _CHUNK), dtype=np.int64),
                self._now,
            )
            for start in range(0, self.num_clients, _CHUNK)
        ]
        mask = np.concatenate(masks) if len(masks) > 1 else masks[0]
        nodes = (np.flatnonzero(mask) + self.first_node_id).tolist()
        self._online = (self._now, mask, nodes)
        return self._online

    def _online_mask(self, ids: IntArray, t: float) -> BoolArray:
        devices = self.population.devices
        if isinstance(devices, TraceDevices):
            # TraceDevices.online asks each id's row in Python; a trace has few rows.
            rows = np.fromiter(
                (p.availability.is_online(t) for p in devices.rows),
                dtype=np.bool_,
                count=len(devices.rows),
            )
            out: BoolArray = rows[self._trace_rows(devices, ids)]
            return out
        return np.asarray(devices.online(ids, t), dtype=np.bool_)

    def _trace_rows(self, devices: TraceDevices, ids: IntArray) -> IntArray:
        """Return each id's row in the trace: its own, else ``id mod rows`` (wrapping)."""
        if self._trace_index is None:
            trace_ids = np.asarray(devices.client_ids, dtype=np.int64)
            order = np.argsort(trace_ids, kind="stable")
            self._trace_index = (trace_ids[order], order.astype(np.int64))
        sorted_ids, order = self._trace_index
        pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        found = sorted_ids[pos] == ids
        if not devices.wrap and not found.all():
            devices.profile(int(ids[~found][0]))  # raises its own clear error
        rows: IntArray = np.where(found, order[pos], ids % len(devices.rows))
        return rows

    def _next_online(self, ids: IntArray, t: float) -> FloatArray:
        """Return, per client, the first time at or after ``t`` it is online (inf: never)."""
        devices = self.population.devices
        if isinstance(devices, DeviceMix):
            if devices.daily_hours is None:
                return np.full(len(ids), t)
            table = devices.table(ids)
            start, length = table["window_start"], table["window_length"]
            into = np.mod(t - start, DAY_S)  # seconds since the window last opened
            out: FloatArray = np.where(into < length, t, t + (DAY_S - into))
            return out
        if isinstance(devices, FixedDevices):
            return np.full(len(ids), _next_online(devices.device.availability, t))
        if isinstance(devices, TraceDevices):
            rows = np.array([_next_online(p.availability, t) for p in devices.rows])
            found: FloatArray = rows[self._trace_rows(devices, ids)]
            return found
        return np.array([_next_online(p.availability, t) for p in devices.profiles(ids)])

    # ------------------------------------------------------------ rounds

    def plan_round(
        self,
        server_round: int,
        node_ids: Sequence[int],
        *,
        k: int,
        model_bytes: int,
        update_bytes: int,
        local_epochs: int,
    ) -> RoundPlan:
        """Decide, in virtual time from now, which of the offered nodes a round keeps.

        The first ``k`` clients to finish (download, train, upload) are accepted;
        the others are dropped with a reason (see :func:`fedscale.clock.simulate_round`).
        Nothing advances until :meth:`finish_round`.
        """
        clients = [self._client(n) for n in node_ids]
        tasks = self.population.tasks(np.asarray(clients, dtype=np.int64), server_round)
        cost = RoundCost(model_bytes, update_bytes, local_epochs, self.compute_scale)
        timing = simulate_round(tasks, start=self._now, k=k, cost=cost, deadline_s=self.deadline_s)
        counts = dict.fromkeys(DROP_REASONS, 0)
        for dropped in timing.dropped:
            counts[dropped.reason] += 1
        return RoundPlan(
            server_round=server_round,
            timing=timing,
            accepted_nodes=frozenset(c + self.first_node_id for c in timing.accepted),
            dropped=counts,
        )

    def job_end(
        self,
        node_id: int,
        start: float,
        *,
        job: int,
        model_bytes: int,
        update_bytes: int,
        local_epochs: int,
    ) -> tuple[float, DropReason | None]:
        """Time one client's job started at ``start``: when it ends, and why it fails (or None).

        For asynchronous training (FedBuff), where each client's job runs on its
        own: the rules of a round of one (:func:`fedscale.clock.simulate_round`
        with ``k = 1``: download, train, upload; the online window, churn and the
        deadline), with the churn draw keyed by ``job`` instead of a round number.
        Returns the virtual time the job finishes, or the time it is lost and the
        reason. The clock does not move.
        """
        client = self._client(node_id)
        task = self.population.tasks(np.asarray([client], dtype=np.int64), job)[0]
        cost = RoundCost(model_bytes, update_bytes, local_epochs, self.compute_scale)
        timing = simulate_round([task], start=start, k=1, cost=cost, deadline_s=self.deadline_s)
        return timing.end, None if timing.accepted else timing.dropped[0].reason

    def finish_round(self, plan: RoundPlan) -> float:
        """Advance the clock to the end of a planned round; return the new time."""
        if plan.timing.start != self._now:
            raise ConfigError(
                f"round {plan.server_round}: expected a plan made at the current virtual time "
                f"{self._now:g} s, got one made at {plan.timing.start:g} s"
            )
        self._now = plan.timing.end
        return self._now

    def _client(self, node_id: int) -> int:
        client = int(node_id) - self.first_node_id
        if not 0 <= client < self.num_clients:
            raise ConfigError(
                f"node id: expected one of this federation's nodes "
                f"({self.first_node_id}..{self.first_node_id + self.num_clients - 1}), "
                f"got {node_id}"
            )
        return client


def _next_online(availability: Availability, t: float) -> float:
    """Return the first time at or after ``t`` that ``availability`` is online."""
    if availability.is_online(t):
        return t
    period = availability.period_s
    if period is None:
        return min((s for s, _ in availability.windows if s >= t), default=math.inf)
    local = t % period
    later = [s for s, _ in availability.windows if s >= local]
    if later:
        return t - local + later[0]
    return t - local + period + availability.windows[0][0]


def system_for(settings: RunSettings) -> SimulatedSystem | None:
    """Return the simulated system a run's settings describe, or ``None`` without a device model.

    The population's data sizes come from the same provider the clients train on
    (natural clients), or the same partitions (any other dataset).
    """
    if not settings.device_mix:
        return None
    provider: ClientDataProvider
    if has_natural_clients(settings.dataset):
        provider = natural_provider(settings)
    else:
        provider = data_provider(
            settings.dataset,
            num_clients=settings.num_clients,
            seed=settings.seed,
            partition=settings.partition,
            test_fraction=settings.test_fraction,
            allow_duplicates=settings.allow_duplicate_samples,
            label_column=settings.label_column,
        )
    devices: DeviceSource = device_source(settings.device_mix, settings.seed)
    population = Population(settings.num_clients, provider, devices, seed=settings.seed)
    return SimulatedSystem(
        population,
        deadline_s=settings.deadline or None,
        overcommit=settings.overcommit,
        compute_scale=settings.compute_scale,
    )
