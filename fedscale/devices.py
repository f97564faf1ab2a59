"""Device profiles: compute speed, bandwidth and availability of each client.

A :class:`DeviceProfile` is what the virtual clock (:mod:`fedscale.clock`) needs to
time a client's round:

- ``samples_per_second``: training samples the device processes per second
  (forward and backward pass) on the reference model; the clock scales it by a
  model's relative cost;
- ``download_kbps`` and ``upload_kbps``: link speeds in kbit/s (1 kbit = 1,000 bits);
- ``availability``: online windows over virtual time (:class:`Availability`);
- ``churn_per_hour``: the rate at which an online device drops out regardless of
  its windows (a user picks the phone up, the network goes away): a Poisson
  process, so the time to the next drop-out is exponential with that rate.

Where profiles come from
------------------------
FedScale (Lai et al., "FedScale: Benchmarking Model and System Performance of
Federated Learning at Scale", ICML 2022; and "Oort: Efficient Federated Learning
via Guided Participant Selection", OSDI 2021) times clients from real traces:
compute from AI Benchmark inference latencies (times 3 for the backward pass),
network throughput from MobiPerf measurements, and availability from a
large-scale mobile user-behaviour trace. Those trace downloads are gone, so the
built-in mixes (:data:`BUILTIN_MIXES`) are parametric stand-ins, each parameter
drawn per client from a log-normal law:

- compute: FedScale's own parametric model,
  ``ClientMetadata.get_completion_time_lognormal`` (fedscale/cloud/internal/
  client_metadata.py): seconds per sample = 0.005 * lognormal(mean=1, sigma=0.6),
  which it attributes to the PAPAYA and GFL production papers. As samples per
  second that is a log-normal with median 1 / (0.005 e) = 73.6 and sigma 0.6.
- download bandwidth: **our assumption**, log-normal with median 10,000 kbit/s
  and sigma 1.0 (so the middle 68% of devices lies between 3.7 and 27 Mbit/s),
  chosen to span a 3G-to-LTE range of orders of magnitude like the MobiPerf
  throughput FedScale plots; not fitted to the trace.
- upload bandwidth: **our assumption**, download times a log-normal ratio with
  median 0.3 and sigma 0.5 (mobile uplinks are a fraction of the downlink).
- availability (``mobile`` only): **our assumption**, one online window a day
  (86,400 s period) starting at a uniformly random time of day, lasting a
  log-normal number of hours with median 4 and sigma 0.75 (clipped to 15 minutes
  .. 24 hours), so about a fifth of the devices are online at any moment; the
  FedScale behaviour trace shows such daily, charging-and-idle availability.
- churn (``mobile`` only): **our assumption**, 0.5 drop-outs per online hour.

Every draw is a pure function of ``(seed, client id)``: a counter-based hash
(splitmix64) turns them into uniform numbers, vectorised over the ids, so a
million-client federation holds no per-client arrays and a round's candidates
are profiled in one numpy pass. A user's trace file (:func:`load_trace`) is the
one source that holds rows in memory: the user gave them.

Trace files
-----------
CSV, with a header; the first four columns are required, the rest optional::

    client_id,compute_speed,download_kbps,upload_kbps,availability,period_s,churn_per_hour
    0,50,20000,5000,,,
    1,12.5,3000,800,0-3600;7200-10800,86400,0.1

``compute_speed`` is training samples per second; ``availability`` is empty
(always online) or ``start-end`` windows in seconds separated by ``;``;
``period_s`` repeats the windows with that period (empty: the windows are
absolute times and the device is offline after the last one); ``churn_per_hour``
defaults to 0. JSON holds the same fields, windows as pairs::

    {"clients": [{"client_id": 1, "compute_speed": 12.5, "download_kbps": 3000,
                  "upload_kbps": 800, "availability": [[0, 3600], [7200, 10800]],
                  "period_s": 86400, "churn_per_hour": 0.1}]}

A client whose id is not in the file gets row ``id mod rows`` (in file order),
as FedScale reuses its traces cyclically; pass ``wrap=False`` to make that an error.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .exceptions import ConfigError

__all__ = [
    "BUILTIN_MIXES",
    "DAY_S",
    "Availability",
    "DeviceMix",
    "DeviceProfile",
    "DeviceSource",
    "FixedDevices",
    "LogNormal",
    "TraceDevices",
    "builtin_mix",
    "churn_interruptions",
    "counter_hash",
    "counter_uniform",
    "device_source",
    "load_trace",
]

DAY_S = 86_400.0
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]

# ------------------------------------------------------------------ availability


@dataclass(frozen=True)
class Availability:
    """When a device is online: windows ``[start, end)`` in seconds of virtual time.

    No windows means always online. With ``period_s`` the windows repeat every
    period (they must lie within ``[0, period_s]``); without it they are absolute
    and the device is offline after the last one.
    """

    windows: tuple[tuple[float, float], ...] = ()
    period_s: float | None = None

    def __post_init__(self) -> None:
        if self.period_s is not None and not (math.isfinite(self.period_s) and self.period_s > 0):
            raise ConfigError(f"availability: expected period_s > 0, got {self.period_s!r}")
        previous_end = -math.inf
        for start, end in self.windows:
            if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end):
                raise ConfigError(
                    f"availability: expected windows with 0 <= start < end, got {start}-{end}"
                )
            if start < previous_end:
                raise ConfigError(
                    "availability: expected sorted, non-overlapping windows, got "
                    f"{start}-{end} after a window ending at {previous_end}"
                )
            if self.period_s is not None and end > self.period_s:
                raise ConfigError(
                    f"availability: expected windows within the period [0, {self.period_s}], "
                    f"got {start}-{end}"
                )
            previous_end = end

    @property
    def always_online(self) -> bool:
        """Whether the device is online at every time."""
        return not self.windows

    def is_online(self, t: float) -> bool:
        """Return whether the device is online at time ``t``."""
        return self.online_until(t) > t

    def online_until(self, t: float) -> float:
        """Return when the device goes offline if online at ``t``; ``t`` itself if offline.

        Windows that touch (also across the period boundary) count as one.
        """
        if self.always_online:
            return math.inf
        if self.period_s is None:
            return self._until(t, self.windows, t)
        period = self.period_s
        local = t % period
        base = t - local
        end = self._until(local, self.windows, local)
        if end == local:
            return t
        if end < period:
            return base + end
        # The window reaches the end of the period: it goes on into the next one
        # if a window starts at 0 there.
        carry = self._until(0.0, self.windows, 0.0)
        if carry >= period:
            return math.inf  # windows cover the whole period: always online
        return base + period + carry

    @staticmethod
    def _until(t: float, windows: Sequence[tuple[float, float]], default: float) -> float:
        end = default
        for start, stop in windows:
            if start <= end < stop:
                end = stop
            elif start > end:
                break
        return end


# ------------------------------------------------------------------ profiles


@dataclass(frozen=True)
class DeviceProfile:
    """One client's device: compute speed, link speeds, availability and churn."""

    samples_per_second: float
    download_kbps: float
    upload_kbps: float
    availability: Availability = field(default_factory=Availability)
    churn_per_hour: float = 0.0

    def __post_init__(self) -> None:
        for name in ("samples_per_second", "download_kbps", "upload_kbps"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"device profile: expected {name} > 0, got {value!r}")
        if not (math.isfinite(self.churn_per_hour) and self.churn_per_hour >= 0):
            raise ConfigError(
                f"device profile: expected churn_per_hour >= 0, got {self.churn_per_hour!r}"
            )


class DeviceSource(Protocol):
    """Maps client ids to device profiles, on demand."""

    def profile(self, client_id: int) -> DeviceProfile:
        """Return the profile of client ``client_id``."""
        ...

    def online(self, client_ids: IntArray, t: float) -> BoolArray:
        """Return, for each id, whether that client is online at time ``t``."""
        ...

    def profiles(self, client_ids: IntArray) -> list[DeviceProfile]:
        """Return the profiles of many clients at once (as :meth:`profile` would)."""
        ...


@dataclass(frozen=True)
class FixedDevices:
    """Every client has the same device profile."""

    device: DeviceProfile

    def profile(self, client_id: int) -> DeviceProfile:
        """Return the one profile."""
        _check_id(client_id)
        return self.device

    def online(self, client_ids: IntArray, t: float) -> BoolArray:
        """Return the one profile's availability for every id."""
        return np.full(len(client_ids), self.device.availability.is_online(t), dtype=np.bool_)

    def profiles(self, client_ids: IntArray) -> list[DeviceProfile]:
        """Return the one profile once per id."""
        for cid in client_ids:
            _check_id(int(cid))
        return [self.device] * len(client_ids)


# ------------------------------------------------------------------ counter-based draws

# Streams of the counter-based draws: one per drawn quantity, so adding one never
# changes another. Churn streams also carry the round number.
_COMPUTE, _DOWN, _UP_RATIO, _PHASE, _HOURS, _CHURN = 1, 2, 3, 4, 5, 6


def _mix64(z: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    # splitmix64's finaliser (Steele, Lea, Flood 2014): a bijection on 64-bit words
    # whose outputs pass BigCrush for consecutive inputs. Array arithmetic wraps
    # modulo 2**64 without warnings.
    z = z + np.uint64(0x9E37_79B9_7F4A_7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58_476D_1CE4_E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D0_49BB_1331_11EB)
    return z ^ (z >> np.uint64(31))


def counter_hash(seed: int, client_ids: npt.ArrayLike, stream: int) -> npt.NDArray[np.uint64]:
    """Return a 64-bit hash of ``(seed, client id, stream)`` for each id."""
    ids = np.asarray(client_ids, dtype=np.int64).reshape(-1)
    if ids.size and ids.min() < 0:
        raise ConfigError(f"client ids: expected integers >= 0, got {int(ids.min())}")
    key = _mix64(np.full(ids.shape, seed & 0xFFFF_FFFF_FFFF_FFFF, dtype=np.uint64))
    h = _mix64(key ^ ids.astype(np.uint64))
    return _mix64(h ^ np.full(ids.shape, stream & 0xFFFF_FFFF_FFFF_FFFF, dtype=np.uint64))


def counter_uniform(seed: int, client_ids: npt.ArrayLike, stream: int) -> FloatArray:
    """Return a uniform number in (0, 1) for each id, a pure function of its inputs."""
    h = counter_hash(seed, client_ids, stream)
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) / float(2**53)


def _counter_normal(seed: int, ids: IntArray, stream: int) -> FloatArray:
    # Box-Muller from two independent uniform streams.
    u1 = counter_uniform(seed, ids, 2 * stream)
    u2 = counter_uniform(seed, ids, 2 * stream + 1)
    out: FloatArray = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return out


def churn_interruptions(
    seed: int, client_ids: npt.ArrayLike, round_number: int, rates_per_hour: npt.ArrayLike
) -> FloatArray:
    """Return, per client, seconds from a round's start until churn takes it offline.

    Churn is a Poisson process of rate ``churn_per_hour``, so the time to the next
    drop-out is exponential; each (client, round) gets its own draw from ``seed``.
    A rate of 0 gives infinity (never).
    """
    if round_number < 0:
        raise ConfigError(f"round: expected an integer >= 0, got {round_number}")
    ids = np.asarray(client_ids, dtype=np.int64).reshape(-1)
    rates = np.broadcast_to(np.asarray(rates_per_hour, dtype=np.float64), ids.shape)
    u = counter_uniform(seed, ids, (_CHURN << 40) + round_number)
    with np.errstate(divide="ignore"):
        out: FloatArray = np.where(rates > 0, -np.log(u) * 3600.0 / rates, np.inf)
    return out


# ------------------------------------------------------------------ parametric mixes


@dataclass(frozen=True)
class LogNormal:
    """A log-normal law by its median and the sigma of its logarithm."""

    median: float
    sigma: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.median) and self.median > 0):
            raise ConfigError(f"log-normal: expected median > 0, got {self.median!r}")
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ConfigError(f"log-normal: expected sigma >= 0, got {self.sigma!r}")

    def transform(self, z: FloatArray) -> FloatArray:
        """Map standard normal draws to this law."""
        out: FloatArray = self.median * np.exp(self.sigma * z)
        return out


@dataclass(frozen=True)
class DeviceMix:
    """A population of devices whose parameters follow log-normal laws (see module doc).

    ``daily_hours=None`` makes every device always online.
    """

    name: str
    compute: LogNormal
    download_kbps: LogNormal
    upload_ratio: LogNormal
    daily_hours: LogNormal | None = None
    churn_per_hour: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.churn_per_hour) and self.churn_per_hour >= 0):
            raise ConfigError(
                f"device mix {self.name}: expected churn_per_hour >= 0, got {self.churn_per_hour!r}"
            )

    def table(self, client_ids: npt.ArrayLike) -> dict[str, FloatArray]:
        """Return each id's compute, link speeds and daily window, as arrays."""
        ids = np.asarray(client_ids, dtype=np.int64).reshape(-1)
        speed = self.compute.transform(_counter_normal(self.seed, ids, _COMPUTE))
        down = self.download_kbps.transform(_counter_normal(self.seed, ids, _DOWN))
        up = down * self.upload_ratio.transform(_counter_normal(self.seed, ids, _UP_RATIO))
        phase, length = self._window(ids)
        return {
            "samples_per_second": speed,
            "download_kbps": down,
            "upload_kbps": up,
            "window_start": phase,
            "window_length": length,
        }

    def profile(self, client_id: int) -> DeviceProfile:
        """Return client ``client_id``'s profile."""
        _check_id(client_id)
        return self.profiles(np.array([client_id], dtype=np.int64))[0]

    def profiles(self, client_ids: IntArray) -> list[DeviceProfile]:
        """Return the profiles of ``client_ids``, drawn in one vectorised pass."""
        table = self.table(client_ids)
        out = []
        for speed, down, up, start, length in zip(
            table["samples_per_second"].tolist(),
            table["download_kbps"].tolist(),
            table["upload_kbps"].tolist(),
            table["window_start"].tolist(),
            table["window_length"].tolist(),
            strict=True,
        ):
            if length >= DAY_S:
                availability = Availability()
            elif start + length <= DAY_S:
                availability = Availability(((start, start + length),), DAY_S)
            else:  # the window wraps past midnight
                availability = Availability(((0.0, start + length - DAY_S), (start, DAY_S)), DAY_S)
            out.append(DeviceProfile(speed, down, up, availability, self.churn_per_hour))
        return out

    def online(self, client_ids: IntArray, t: float) -> BoolArray:
        """Return, for each id, whether it is inside its daily window at ``t``."""
        ids = np.asarray(client_ids, dtype=np.int64).reshape(-1)
        if self.daily_hours is None:
            return np.ones(len(ids), dtype=np.bool_)
        start, length = self._window(ids)
        out: BoolArray = np.mod(t - start, DAY_S) < length
        return out

    def _window(self, ids: IntArray) -> tuple[FloatArray, FloatArray]:
        if self.daily_hours is None:
            return np.zeros(len(ids)), np.full(len(ids), DAY_S)
        start = counter_uniform(self.seed, ids, 2 * _PHASE) * DAY_S
        hours = self.daily_hours.transform(_counter_normal(self.seed, ids, _HOURS))
        return start, np.clip(hours, 0.25, 24.0) * 3600.0


_MOBILE_COMPUTE = LogNormal(1.0 / (0.005 * math.e), 0.6)
_MOBILE_DOWN = LogNormal(10_000.0, 1.0)
_MOBILE_UP = LogNormal(0.3, 0.5)

BUILTIN_MIXES: Mapping[str, DeviceMix] = {
    # Every device alike and always online: the virtual clock without heterogeneity.
    "uniform": DeviceMix(
        "uniform",
        LogNormal(_MOBILE_COMPUTE.median, 0.0),
        LogNormal(10_000.0, 0.0),
        LogNormal(0.3, 0.0),
    ),
    # Heterogeneous speeds, always online.
    "mobile-always-on": DeviceMix("mobile-always-on", _MOBILE_COMPUTE, _MOBILE_DOWN, _MOBILE_UP),
    # Heterogeneous speeds, one daily online window and churn.
    "mobile": DeviceMix(
        "mobile", _MOBILE_COMPUTE, _MOBILE_DOWN, _MOBILE_UP, LogNormal(4.0, 0.75), 0.5
    ),
}


def builtin_mix(name: str, seed: int = 0) -> DeviceMix:
    """Return the built-in mix ``name`` drawing from ``seed``."""
    if name not in BUILTIN_MIXES:
        raise ConfigError(f"device mix: expected one of {', '.join(BUILTIN_MIXES)}, got {name!r}")
    mix = BUILTIN_MIXES[name]
    return DeviceMix(
        mix.name,
        mix.compute,
        mix.download_kbps,
        mix.upload_ratio,
        mix.daily_hours,
        mix.churn_per_hour,
        seed,
    )


def device_source(spec: str, seed: int = 0) -> DeviceSource:
    """Return the devices for ``spec``: a built-in mix name or a ``.csv``/``.json`` trace."""
    if spec in BUILTIN_MIXES:
        return builtin_mix(spec, seed)
    if spec.lower().endswith((".csv", ".json")):
        return load_trace(spec)
    raise ConfigError(
        f"devices: expected one of {', '.join(BUILTIN_MIXES)} or a path to a .csv or "
        f".json trace file, got {spec!r}"
    )


# ------------------------------------------------------------------ trace files

_REQUIRED = ("client_id", "compute_speed", "download_kbps", "upload_kbps")
_OPTIONAL = ("availability", "period_s", "churn_per_hour")


@dataclass(frozen=True, eq=False)
class TraceDevices:
    """Device profiles from a user's trace file, looked up by client id."""

    source: str
    client_ids: tuple[int, ...]
    rows: tuple[DeviceProfile, ...]
    wrap: bool = True
    _by_id: dict[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.rows or len(self.rows) != len(self.client_ids):
            raise ConfigError(
                f"device trace {self.source}: expected one or more rows, one per client id; "
                f"got {len(self.rows)} profiles for {len(self.client_ids)} ids"
            )
        object.__setattr__(self, "_by_id", {cid: i for i, cid in enumerate(self.client_ids)})

    def __len__(self) -> int:
        return len(self.rows)

    def profile(self, client_id: int) -> DeviceProfile:
        """Return the row for ``client_id``, or row ``client_id mod rows`` when wrapping."""
        _check_id(client_id)
        row = self._by_id.get(client_id)
        if row is None:
            if not self.wrap:
                raise ConfigError(
                    f"device trace {self.source}: expected a row for client {client_id}, "
                    f"the file has {len(self.rows)} rows with ids "
                    f"{min(self.client_ids)}..{max(self.client_ids)}"
                )
            row = client_id % len(self.rows)
        return self.rows[row]

    def profiles(self, client_ids: IntArray) -> list[DeviceProfile]:
        """Return the rows of ``client_ids``."""
        return [self.profile(int(c)) for c in client_ids]

    def online(self, client_ids: IntArray, t: float) -> BoolArray:
        """Return, for each id, whether its row's availability is online at ``t``."""
        return np.fromiter(
            (self.profile(int(c)).availability.is_online(t) for c in client_ids),
            dtype=np.bool_,
            count=len(client_ids),
        )


def load_trace(path: str | Path, *, wrap: bool = True) -> TraceDevices:
    """Read a device trace file (``.csv`` or ``.json``; format in the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"device trace: expected a file at {p}, found nothing there")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(p)
    elif suffix == ".json":
        rows = _json_rows(p)
    else:
        raise ConfigError(f"device trace: expected a .csv or .json file, got {p.name!r}")
    ids: list[int] = []
    profiles: list[DeviceProfile] = []
    first_seen: dict[int, str] = {}
    for where, row in rows:
        cid, profile = _parse_row(row, where)
        if cid in first_seen:
            raise ConfigError(
                f"{where}: expected unique client ids, client_id {cid} already appears at "
                f"{first_seen[cid]}"
            )
        first_seen[cid] = where
        ids.append(cid)
        profiles.append(profile)
    if not profiles:
        raise ConfigError(f"device trace {p}: expected at least one client row, got none")
    return TraceDevices(str(p), tuple(ids), tuple(profiles), wrap)


def _csv_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise ConfigError(f"device trace {path}: expected a header row, the file is empty")
        columns = [h.strip() for h in header]
        _check_columns(columns, str(path))
        rows = []
        for line_no, values in enumerate(reader, start=2):
            if not any(v.strip() for v in values):
                continue  # blank line
            where = f"device trace {path}, line {line_no}"
            if len(values) != len(columns):
                raise ConfigError(
                    f"{where}: expected {len(columns)} values ({', '.join(columns)}), "
                    f"got {len(values)}"
                )
            rows.append((where, dict(zip(columns, (v.strip() for v in values), strict=True))))
    return rows


def _json_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"device trace {path}: expected valid JSON, got: {err}") from err
    clients = doc.get("clients") if isinstance(doc, dict) else doc
    if not isinstance(clients, list):
        raise ConfigError(
            f'device trace {path}: expected {{"clients": [...]}} or a list of client objects, '
            f"got {type(doc).__name__}"
        )
    rows = []
    for i, item in enumerate(clients):
        where = f"device trace {path}, clients[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected an object, got {type(item).__name__}")
        _check_columns(list(item), where)
        rows.append((where, item))
    return rows


def _check_columns(columns: Iterable[str], where: str) -> None:
    columns = list(columns)
    missing = [c for c in _REQUIRED if c not in columns]
    unknown = [c for c in columns if c not in _REQUIRED + _OPTIONAL]
    if missing or unknown:
        raise ConfigError(
            f"{where}: expected fields {', '.join(_REQUIRED)} and optionally "
            f"{', '.join(_OPTIONAL)}; "
            + "; ".join(
                part
                for part in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"unknown {', '.join(unknown)}" if unknown else "",
                )
                if part
            )
        )


def _parse_row(row: Mapping[str, Any], where: str) -> tuple[int, DeviceProfile]:
    cid = _integer(row["client_id"], "client_id", where)
    speed = _positive(row["compute_speed"], "compute_speed", where)
    down = _positive(row["download_kbps"], "download_kbps", where)
    up = _positive(row["upload_kbps"], "upload_kbps", where)
    period = row.get("period_s")
    period_s = None if period in (None, "") else _positive(period, "period_s", where)
    churn_raw = row.get("churn_per_hour")
    churn = 0.0 if churn_raw in (None, "") else _number(churn_raw, "churn_per_hour", where)
    if churn < 0:
        raise ConfigError(f"{where}: expected churn_per_hour >= 0, got {churn_raw!r}")
    windows = _windows(row.get("availability"), where)
    try:
        availability = Availability(windows, period_s)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return cid, DeviceProfile(speed, down, up, availability, churn)


def _windows(value: Any, where: str) -> tuple[tuple[float, float], ...]:
    expected = "expected availability as start-end windows in seconds (e.g. 0-3600;7200-9000)"
    if value is None or value == "" or (isinstance(value, str) and value.strip() == ""):
        return ()
    pairs: list[Any]
    if isinstance(value, str):
        pairs = []
        for part in value.split(";"):
            start, sep, end = part.strip().partition("-")
            if not sep:
                raise ConfigError(f"{where}: {expected}, got {value!r}")
            pairs.append((start, end))
    elif isinstance(value, list):
        pairs = value
    else:
        raise ConfigError(f"{where}: {expected} or a list of [start, end], got {value!r}")
    windows = []
    for pair in pairs:
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ConfigError(f"{where}: {expected}, got the window {pair!r}")
        windows.append(
            (_number(pair[0], "availability", where), _number(pair[1], "availability", where))
        )
    return tuple(windows)


def _number(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number for {name}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number for {name}, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{where}: expected a finite number for {name}, got {value!r}")
    return number


def _positive(value: Any, name: str, where: str) -> float:
    number = _number(value, name, where)
    if number <= 0:
        raise ConfigError(f"{where}: expected {name} > 0, got {value!r}")
    return number


def _integer(value: Any, name: str, where: str) -> int:
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and text.isdigit():
        return int(text)
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    raise ConfigError(f"{where}: expected {name} to be an integer >= 0, got {value!r}")


def _check_id(client_id: int) -> None:
    if not isinstance(client_id, int | np.integer) or isinstance(client_id, bool) or client_id < 0:
        raise ConfigError(f"client id: expected an integer >= 0, got {client_id!r}")
