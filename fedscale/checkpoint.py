"""Resumable checkpoints: everything a run needs to continue after its last round.

After every completed round the server commits one checkpoint into
``runs/<name>/checkpoints/``::

    round-0003.safetensors   the global model (also what `fedscale export` reads)
    state-0003.safetensors   the rest: strategy arrays (server-optimizer moments),
                             RNG states, the round's metrics record, the config hash
    latest.json              the commit point: round, both files and their sha256

``latest.json`` is replaced atomically and last, so a crash at any moment leaves
either the previous checkpoint or the new one, never half of one. Loading checks
both files against the sha256 in ``latest.json`` and refuses a mismatch; nothing
is unpickled (safetensors holds arrays, its metadata holds JSON).

The config hash covers the run config except ``num-rounds`` (a resume may train
further), ``resume`` and ``out``: any other change is refused on resume with the
keys that differ (:func:`config_differences`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from .exceptions import ConfigError, DataError
from .files import atomic_write

__all__ = [
    "INLINE_WRITE_SECONDS",
    "PROBE_EVERY",
    "RESUMABLE_KEYS",
    "BackgroundCommits",
    "Checkpoint",
    "check_resumable",
    "CheckpointStore",
    "EncodedCheckpoint",
    "config_differences",
    "config_hash",
    "restore_rng_state",
    "rng_state",
]

CHECKPOINT_FORMAT = 1
# Run-config keys a resume may change: the rounds to train, and how it was started.
RESUMABLE_KEYS = frozenset({"num-rounds", "resume", "out"})
LATEST = "latest.json"
KEEP_STATES = 2  # state files kept: the latest, and one before it in case of a bad disk
_TORCH_RNG = "rng/torch"
# BackgroundCommits: writes quicker than this stay on the round's thread; while they
# are slower, commits numbered a multiple of PROBE_EVERY are still timed there.
INLINE_WRITE_SECONDS = 0.005
PROBE_EVERY = 32


def config_hash(run_config: Mapping[str, Any]) -> str:
    """Return the sha256 of the run config without the keys a resume may change."""
    fixed = {k: v for k, v in sorted(run_config.items()) if k not in RESUMABLE_KEYS}
    # The type is part of the value: 1 and 1.0, or 1 and true, are different settings.
    text = json.dumps({k: [type(v).__name__, v] for k, v in fixed.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def config_differences(stored: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """Return ``key: stored -> given`` for every key that differs, resumable keys aside."""
    keys = sorted((set(stored) | set(given)) - RESUMABLE_KEYS)
    missing = object()
    out = []
    for key in keys:
        old, new = stored.get(key, missing), given.get(key, missing)
        if old is missing or new is missing or type(old) is not type(new) or old != new:
            shown_old = "(absent)" if old is missing else repr(old)
            shown_new = "(absent)" if new is missing else repr(new)
            out.append(f"{key}: {shown_old} -> {shown_new}")
    return out


def rng_state() -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
    """Return the process's RNG states: JSON-able parts, and arrays.

    Python's ``random`` (Flower's samplers draw from it), numpy's global
    generator and torch's CPU generator.
    """
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = cast(
        tuple[str, npt.NDArray[np.uint32], int, int, float], np.random.get_state(legacy=True)
    )
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return meta, {_TORCH_RNG: torch.get_rng_state().numpy().copy()}


def restore_rng_state(meta: Mapping[str, Any], arrays: Mapping[str, npt.NDArray[Any]]) -> None:
    """Set the RNG states :func:`rng_state` returned."""
    import torch

    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.from_numpy(np.array(arrays[_TORCH_RNG], dtype=np.uint8)))


@dataclass(frozen=True)
class Checkpoint:
    """One committed round: the global model and the server's state after it."""

    round: int
    config_hash: str
    global_arrays: dict[str, npt.NDArray[Any]]
    record: dict[str, Any]
    """The round's ``metrics.jsonl`` object, as written."""
    strategy_meta: dict[str, Any] = field(default_factory=dict)
    strategy_arrays: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    rng_meta: dict[str, Any] = field(default_factory=dict)
    rng_arrays: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    sim_now: float | None = None
    """The virtual clock at the round's end (simulated runs only)."""


@dataclass(frozen=True)
class EncodedCheckpoint:
    """A checkpoint's files as bytes, in the order they are written (``latest.json`` last)."""

    round: int
    files: tuple[tuple[Path, bytes], ...]


class CheckpointStore:
    """Write and read a run's checkpoints (``runs/<name>/checkpoints``)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def model_path(self, server_round: int) -> Path:
        """Return where the global model after ``server_round`` is stored."""
        return self.folder / f"round-{server_round:04d}.safetensors"

    def state_path(self, server_round: int) -> Path:
        """Return where the rest of the server's state after ``server_round`` is stored."""
        return self.folder / f"state-{server_round:04d}.safetensors"

    @property
    def latest_path(self) -> Path:
        """``latest.json``: the last committed round."""
        return self.folder / LATEST

    # ------------------------------------------------------------------ write

    def save_model(
        self, server_round: int, arrays: Mapping[str, npt.NDArray[Any]]
    ) -> tuple[Path, str]:
        """Store the global model as safetensors; return its path and sha256."""
        data = _model_bytes(server_round, arrays)
        path = self.model_path(server_round)
        atomic_write(path, data)
        return path, _sha256(data)

    def commit(self, checkpoint: Checkpoint) -> None:
        """Write ``checkpoint``, its model file included, and commit it."""
        self.write(self.encode(checkpoint))

    def encode(self, checkpoint: Checkpoint) -> EncodedCheckpoint:
        """Return the files that commit ``checkpoint``, as bytes: a copy of its state now."""
        from safetensors.numpy import save

        model = _model_bytes(checkpoint.round, checkpoint.global_arrays)
        arrays = {f"strategy/{k}": v for k, v in checkpoint.strategy_arrays.items()}
        arrays.update(checkpoint.rng_arrays)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "round": checkpoint.round,
            "config_hash": checkpoint.config_hash,
            "record": checkpoint.record,
            "strategy": checkpoint.strategy_meta,
            "rng": checkpoint.rng_meta,
            "sim_now": checkpoint.sim_now,
            "array_keys": list(arrays),
        }
        state = save(
            {k: np.require(v, requirements="C") for k, v in arrays.items()},
            metadata={"fedscale": json.dumps(meta, allow_nan=False)},
        )
        model_file = self.model_path(checkpoint.round)
        state_file = self.state_path(checkpoint.round)
        latest = {
            "format": CHECKPOINT_FORMAT,
            "round": checkpoint.round,
            "model": model_file.name,
            "model_sha256": _sha256(model),
            "state": state_file.name,
            "state_sha256": _sha256(state),
            "config_hash": checkpoint.config_hash,
        }
        return EncodedCheckpoint(
            round=checkpoint.round,
            files=(
                (model_file, model),
                (state_file, state),
                (self.latest_path, (json.dumps(latest, indent=2) + "\n").encode()),
            ),
        )

    def write(self, encoded: EncodedCheckpoint) -> None:
        """Write an encoded checkpoint's files in order, ``latest.json`` last: its commit."""
        # The model file is always written here, never read back: one left by a
        # round that crashed before its commit is stale, and is replaced by this one.
        for path, data in encoded.files:
            atomic_write(path, data)
        self._prune(encoded.round)

    def _prune(self, current: int) -> None:
        states = sorted(self.folder.glob("state-*.safetensors"))
        for old in states[:-KEEP_STATES]:
            if old != self.state_path(current):
                old.unlink(missing_ok=True)

    # ------------------------------------------------------------------- read

    def latest_round(self) -> int | None:
        """Return the last committed round, or ``None`` if there is no checkpoint."""
        if not self.latest_path.is_file():
            return None
        return int(self._latest()["round"])

    def load_latest(self) -> Checkpoint:
        """Load the last committed checkpoint, checking every file against its sha256."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        latest = self._latest()
        model_bytes = self._checked(latest["model"], latest["model_sha256"])
        state_bytes = self._checked(latest["state"], latest["state_sha256"])
        try:
            model = load(model_bytes)
            state = load(state_bytes)
            meta = json.loads(_safetensors_metadata(state_bytes)["fedscale"])
            order = json.loads(_safetensors_metadata(model_bytes)["keys"])
        except (SafetensorError, KeyError, ValueError) as err:
            raise DataError(
                f"checkpoint {self.folder}: expected safetensors files written by fedscale, "
                f"could not read them: {err}"
            ) from err
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("round") != latest["round"]:
            raise DataError(
                f"checkpoint {self.state_path(latest['round'])}: expected format "
                f"{CHECKPOINT_FORMAT} for round {latest['round']}, got format "
                f"{meta.get('format')!r} for round {meta.get('round')!r}"
            )
        strategy_arrays = {
            k.removeprefix("strategy/"): v for k, v in state.items() if k.startswith("strategy/")
        }
        rng_arrays = {k: v for k, v in state.items() if k.startswith("rng/")}
        return Checkpoint(
            round=int(meta["round"]),
            config_hash=str(meta["config_hash"]),
            global_arrays={k: model[k] for k in order},
            record=dict(meta["record"]),
            strategy_meta=dict(meta["strategy"]),
            strategy_arrays=strategy_arrays,
            rng_meta=dict(meta["rng"]),
            rng_arrays=rng_arrays,
            sim_now=meta.get("sim_now"),
        )

    def _latest(self) -> dict[str, Any]:
        path = self.latest_path
        if not path.is_file():
            raise DataError(
                f"run folder {self.folder.parent}: expected a checkpoint to resume from "
                f"({path}), found none; the run did not complete a round"
            )
        try:
            latest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: expected a JSON object, could not read it: {err}") from err
        needed = ("round", "model", "model_sha256", "state", "state_sha256", "config_hash")
        if not isinstance(latest, dict) or any(key not in latest for key in needed):
            raise DataError(f"{path}: expected the keys {', '.join(needed)}, got {latest!r}")
        for key in ("model", "state"):
            name = latest[key]
            if not isinstance(name, str) or Path(name).name != name:
                raise DataError(f"{path}: {key}: expected a file name, got {name!r}")
        return latest

    def _checked(self, name: str, sha256: str) -> bytes:
        path = self.folder / name
        try:
            data = path.read_bytes()
        except OSError as err:
            raise DataError(f"checkpoint file {path}: could not read it: {err}") from err
        actual = _sha256(data)
        if actual != sha256:
            raise DataError(
                f"checkpoint file {path}: expected sha256 {sha256} (from {LATEST}), got "
                f"{actual}; the file changed after it was written, refusing to load it"
            )
        return data


class BackgroundCommits:
    """Commit a run's checkpoints in order, from a writer thread where the disk is slow.

    :meth:`commit` encodes the checkpoint on the caller's thread (the bytes are a
    copy of the state as it is now). Writing and fsyncing its three files is done
    right there while that is quick, and left to a writer thread, overlapping the
    next round, once a write takes :attr:`inline_below` seconds or more (a disk
    whose fsync waits). The thread is not free: each of its system calls takes
    the GIL back from the round's Python, and on a small simulated round those
    hand-offs cost more than a fast disk's write (measured on 2 cores: rounds of
    100 digits clients 21 ms with writes inline, 27 ms with the thread; the
    write itself 1.5 ms). While writes go to the thread, a commit whose number
    (counting from the run's first, 0) is a multiple of :data:`PROBE_EVERY` is
    written inline again to see whether the disk got faster.

    A background write's error is raised by the next :meth:`commit`, or by
    :meth:`close`, which first wait for the write in flight (one at most); an
    inline write's error is raised at once. Either way a failing disk still
    stops the run, one round later at most, and a crash loses at most the commit
    in flight: a resume then starts from the one before, as after a crash a
    moment earlier. ``latest.json`` is still written last and atomically.
    """

    def __init__(self, store: CheckpointStore, *, inline_below: float = INLINE_WRITE_SECONDS):
        self.store = store
        self.inline_below = inline_below
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fedscale-checkpoint")
        self._in_flight: Future[None] | None = None
        self._inline = inline_below > 0
        self._commits = 0

    @property
    def inline(self) -> bool:
        """Whether the next commit is written on the caller's thread."""
        return self._inline or (self.inline_below > 0 and self._commits % PROBE_EVERY == 0)

    def commit(self, checkpoint: Checkpoint) -> None:
        """Encode ``checkpoint`` now; write it now or in the background (see the class)."""
        encoded = self.store.encode(checkpoint)
        self.wait()
        inline = self.inline
        self._commits += 1
        if inline:
            started = time.perf_counter()
            self.store.write(encoded)
            self._inline = time.perf_counter() - started < self.inline_below
        else:
            self._in_flight = self._executor.submit(self.store.write, encoded)

    def wait(self) -> None:
        """Wait for the commit in flight, if any; raise its error."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def close(self) -> None:
        """Wait for the last commit (raising its error) and stop the writer."""
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> BackgroundCommits:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
            return
        # The run's own error is the one to report; the last commit still lands if it can.
        with contextlib.suppress(Exception):
            self.close()


def check_resumable(
    stored_hash: str, stored_config: Mapping[str, Any], given: Mapping[str, Any]
) -> None:
    """Refuse a resume whose run config differs from the checkpoint's, naming the keys."""
    if config_hash(given) == stored_hash:
        return
    differences = config_differences(stored_config, given)
    if not differences:
        differences = ["config.toml no longer matches the checkpoint's config hash"]
    raise ConfigError(
        "resume: expected the run's settings (only num-rounds may change), got "
        + "; ".join(differences)
    )


def _model_bytes(server_round: int, arrays: Mapping[str, npt.NDArray[Any]]) -> bytes:
    from safetensors.numpy import save

    meta = {"round": str(server_round), "keys": json.dumps(list(arrays))}
    return save({k: np.require(v, requirements="C") for k, v in arrays.items()}, metadata=meta)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    # The header is an 8-byte little-endian length, then JSON: read it without
    # the arrays (safetensors.numpy.load drops the metadata).
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return dict(header.get("__metadata__") or {})
