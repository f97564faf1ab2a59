"""The virtual clock: how long a round takes on the clients' devices, and who makes it.

A client's round time, as FedScale models it, is::

    download = model_bytes * 8 / 1000 / download_kbps          (seconds)
    compute  = num_samples * local_epochs * compute_scale / samples_per_second
    upload   = update_bytes * 8 / 1000 / upload_kbps

``compute_scale`` is the model's cost per sample relative to the reference model
the profiles' ``samples_per_second`` was measured on (1.0: the same).

:func:`simulate_round` takes the clients a round offered work to (for
over-commitment, ``overcommit_count(k, overcommit)`` of them) and decides, in
virtual time from the round's start:

- a client offline at the start is dropped (``offline``; resolved at 0 s);
- a client whose online window closes before it finishes is dropped
  (``went-offline``, at the window's end);
- churn: a client whose ``interrupt_after_s`` (its next random drop-out, from
  :func:`fedscale.devices.churn_interruptions`) comes before it finishes is
  dropped (``churn``, at that time);
- with a deadline, a client that would finish after it is dropped (``deadline``,
  resolved at the deadline);
- of the clients that finish, the first ``k`` (by finish time, ties by id) are
  accepted; later finishers are dropped (``over-commit``, at their finish time):
  their work is discarded.

Whichever of these events comes first decides a client's fate. The round ends
when the ``k``-th accepted client finishes, so it lasts as long as its slowest
accepted client. If fewer than ``k`` clients finish, the server waits until every
offered client has resolved (finished or dropped out), which with a deadline is
at most the deadline: a server cannot tell a slow client from a lost one before
then. The next round starts when this one ends (:attr:`RoundTiming.end`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from .devices import DeviceProfile
from .exceptions import ConfigError

__all__ = [
    "ClientTask",
    "ClientTime",
    "DropReason",
    "Dropped",
    "RoundCost",
    "RoundTiming",
    "client_time",
    "overcommit_count",
    "simulate_round",
    "time_to_accuracy",
]

DropReason = Literal["offline", "went-offline", "churn", "deadline", "over-commit"]


@dataclass(frozen=True)
class ClientTask:
    """A client offered work in a round: its training samples, device and churn draw."""

    client_id: int
    num_samples: int
    profile: DeviceProfile
    interrupt_after_s: float = math.inf

    def __post_init__(self) -> None:
        if self.num_samples < 0:
            raise ConfigError(
                f"client {self.client_id}: expected num_samples >= 0, got {self.num_samples}"
            )
        if not self.interrupt_after_s >= 0:
            raise ConfigError(
                f"client {self.client_id}: expected interrupt_after_s >= 0, "
                f"got {self.interrupt_after_s}"
            )


@dataclass(frozen=True)
class RoundCost:
    """What a round asks of each client: bytes to move and epochs to train."""

    model_bytes: int
    update_bytes: int
    local_epochs: int = 1
    compute_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.model_bytes < 0 or self.update_bytes < 0:
            raise ConfigError(
                f"round cost: expected model_bytes and update_bytes >= 0, got "
                f"{self.model_bytes} and {self.update_bytes}"
            )
        if self.local_epochs < 0:
            raise ConfigError(f"round cost: expected local_epochs >= 0, got {self.local_epochs}")
        if not (math.isfinite(self.compute_scale) and self.compute_scale > 0):
            raise ConfigError(f"round cost: expected compute_scale > 0, got {self.compute_scale}")


@dataclass(frozen=True)
class ClientTime:
    """A client's download, compute and upload time in seconds."""

    download_s: float
    compute_s: float
    upload_s: float

    @property
    def total_s(self) -> float:
        """Download, compute and upload together."""
        return self.download_s + self.compute_s + self.upload_s


@dataclass(frozen=True)
class Dropped:
    """A client whose update the round does not use, why, and when it was known."""

    client_id: int
    reason: DropReason
    at_s: float


@dataclass(frozen=True)
class RoundTiming:
    """The outcome of a round in virtual time.

    ``times`` holds every offered client's would-be times (also the dropped
    ones'), ``accepted`` the clients whose updates count, in finish order, and
    ``dropped`` the others with their reasons.
    """

    start: float
    duration: float
    times: Mapping[int, ClientTime]
    accepted: tuple[int, ...]
    dropped: tuple[Dropped, ...]

    @property
    def end(self) -> float:
        """The clock after the round: when the next round can start."""
        return self.start + self.duration

    def dropped_by_reason(self) -> dict[str, list[int]]:
        """Return the dropped client ids grouped by reason."""
        out: dict[str, list[int]] = {}
        for d in self.dropped:
            out.setdefault(d.reason, []).append(d.client_id)
        return out


def client_time(task: ClientTask, cost: RoundCost) -> ClientTime:
    """Return how long ``task``'s client takes to download, train and upload."""
    p = task.profile
    return ClientTime(
        download_s=cost.model_bytes * 8 / 1000 / p.download_kbps,
        compute_s=task.num_samples * cost.local_epochs * cost.compute_scale / p.samples_per_second,
        upload_s=cost.update_bytes * 8 / 1000 / p.upload_kbps,
    )


def overcommit_count(k: int, overcommit: float) -> int:
    """Return how many clients to offer work to: ``ceil(k * (1 + overcommit))``.

    Rounded to nine decimals first, so that ``k = 10, overcommit = 0.3`` gives 13
    despite ``10 * 1.3 = 13.000000000000002`` in binary floating point.
    """
    if not isinstance(k, int) or k < 0:
        raise ConfigError(f"clients per round: expected an integer >= 0, got {k!r}")
    if not (math.isfinite(overcommit) and overcommit >= 0):
        raise ConfigError(f"over-commit: expected a fraction >= 0 (0.3 = 30%), got {overcommit!r}")
    return math.ceil(round(k * (1 + overcommit), 9))


def simulate_round(
    tasks: Sequence[ClientTask],
    *,
    start: float,
    k: int,
    cost: RoundCost,
    deadline_s: float | None = None,
) -> RoundTiming:
    """Time one round that offered work to ``tasks``, keeping the first ``k`` to finish."""
    if not isinstance(k, int) or k < 0:
        raise ConfigError(f"clients per round: expected an integer >= 0, got {k!r}")
    if deadline_s is not None and not deadline_s > 0:
        raise ConfigError(f"deadline: expected seconds > 0, got {deadline_s!r}")
    if not math.isfinite(start):
        raise ConfigError(f"round start: expected a finite time, got {start!r}")
    ids = [t.client_id for t in tasks]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"round: expected distinct client ids, got {sorted(ids)}")
    deadline = math.inf if deadline_s is None else deadline_s
    times: dict[int, ClientTime] = {}
    finished: list[tuple[float, int]] = []
    dropped: list[Dropped] = []
    for task in tasks:
        cid = task.client_id
        availability = task.profile.availability
        if not availability.is_online(start):
            dropped.append(Dropped(cid, "offline", 0.0))
            continue
        t = client_time(task, cost)
        times[cid] = t
        # The first event decides: finishing, the window closing, churn, the
        # deadline. On a tie finishing wins: a client done as its window closes
        # (or at the deadline) has delivered its update.
        events: list[tuple[float, int, DropReason | None]] = [
            (t.total_s, 0, None),
            (availability.online_until(start) - start, 1, "went-offline"),
            (task.interrupt_after_s, 2, "churn"),
            (deadline, 3, "deadline"),
        ]
        when, _, reason = min(events, key=lambda e: (e[0], e[1]))
        if reason is None:
            finished.append((when, cid))
        else:
            dropped.append(Dropped(cid, reason, when))
    finished.sort()
    accepted = finished[:k]
    for when, cid in finished[k:]:
        dropped.append(Dropped(cid, "over-commit", when))
    if k > 0 and len(accepted) == k:
        duration = accepted[-1][0]
    else:
        resolved = [when for when, _ in finished] + [d.at_s for d in dropped]
        duration = max(resolved, default=0.0)
    dropped.sort(key=lambda d: (d.at_s, d.client_id))
    return RoundTiming(
        start=start,
        duration=duration,
        times=times,
        accepted=tuple(cid for _, cid in accepted),
        dropped=tuple(dropped),
    )


def time_to_accuracy(points: Iterable[tuple[float, float]], target: float) -> float | None:
    """Return the first simulated time at which accuracy reached ``target``, else ``None``.

    ``points`` are ``(simulated time, accuracy)`` pairs, one per evaluated round.
    """
    best: float | None = None
    for time, accuracy in points:
        if not (math.isfinite(time) and math.isfinite(accuracy)):
            raise ConfigError(
                f"time to accuracy: expected finite (time, accuracy) pairs, got ({time}, "
                f"{accuracy})"
            )
        if accuracy >= target and (best is None or time < best):
            best = time
    return best
