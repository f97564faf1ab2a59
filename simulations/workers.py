"""Worker processes for the in-process engine's general path.

With ``workers=N`` (N >= 2) :func:`~fedscale.simulations.engine.run_in_process`
forks N worker processes once the run's ClientApp, data caches, array codec and
torch thread cap are in place, so each starts in milliseconds and shares the
parent's read-only memory copy-on-write. The grid stays in the parent: it picks
the nodes, keeps every node's ``Context``, runs the simulated system's clock and
the ServerApp; workers only call the ClientApp.

Each ``pull_messages`` batch of two or more messages is split into small
contiguous chunks handed out as workers finish the previous ones (two chunks in
flight each, chunks that shrink as the batch runs out), which balances clients
of uneven cost without knowing their data sizes, and the replies are returned in
the order asked for, so the strategy aggregates in the same order as with one
process. The parent trains nothing itself: measured on two cores, letting it
train a share (one worker fewer) was slower on synthetic clients (480 against
536 client updates a second at 100 a round) and no help on digits. Native thread
pools (OpenBLAS, OpenMP) are capped at one thread for the pool's life: a
worker's numpy otherwise starts a spinning BLAS thread per core, and two workers
then ran each call 1.8x slower. Flower's semantics are those of the one-process
grid: each node gets its own copy of the content, a reply answers its message's
id and gets an id of its own, a ClientApp that raises yields an error reply
(code 2) and its edits to the node's state are discarded, and a successful
call's ``Context`` (state included) comes back and is kept.

What crosses the process boundary is Flower's own wire form (its protobuf serde,
through :mod:`._flower`), never a pickle: per message its metadata and the node's
``Context``, and the content once per worker per batch when many messages share
it (a round's instructions do). Arrays are encoded with fedscale's fast codec,
which workers inherit from the parent.

If a worker process dies (a ClientApp that segfaults, runs out of memory or is
killed), the message it was running gets an error reply with Flower's
``CLIENT_APP_CRASHED`` code (8, what a SuperNode replies when its ClientApp
process stops responding) and no state change, the messages queued behind it are
delivered by the other workers, a fresh worker is forked in its place, and the
run goes on. A ClientApp that raises ``BaseException`` (``SystemExit``,
``KeyboardInterrupt``) ends its worker the same way. Every worker is stopped, by
PID, when the run ends or fails; a worker whose parent dies sees its pipe close
and exits.

Forking is Linux-only here (other systems' ``fork`` is unsafe with the threads
their frameworks start): elsewhere the run goes on in one process with a warning.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import os
import queue
import signal
import statistics
import struct
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, Final, Literal

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedscale.exceptions import ConfigError

from ._flower import (
    CLIENT_APP_CRASHED,
    copy_record_dict,
    decode_context,
    decode_delivered,
    decode_message,
    decode_records,
    encode_context,
    encode_message,
    encode_metadata,
    encode_records,
    error_reply,
    set_message_id,
)
from .grid import BatchDelivery, call_client_app

if TYPE_CHECKING:
    from .grid import InProcessGrid

__all__ = [
    "AUTO",
    "AutoWorkers",
    "WorkerPool",
    "Workers",
    "native_threads",
    "resolve_workers",
    "worker_delivery",
    "worker_pool",
    "workers_supported",
]

log = logging.getLogger(__name__)

# Worker processes on every core once a batch shows they pay (AutoWorkers).
AUTO: Final = "auto"
# How many worker processes: AUTO, or a count (1: this process alone, 0: one per core).
Workers = int | Literal["auto"]

# Frames from the parent: a first byte says what follows.
_CLEAR = b"X"  # forget the previous batch's contents
_RUN_CONFIG = b"R"  # an encoded Context holding the run config every node's Context holds
_CONTENT = b"D"  # u64 key, then an encoded RecordDict
_CHUNK = b"C"  # u32 count, then per message: u64 key, u32 length, metadata, u32, context
_QUIT = b"Q"
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
# A worker's reply frame: succeeded, seconds in the ClientApp, reply length; then
# the encoded reply and (on success) the node's encoded Context.
_REPLY = struct.Struct("<?dI")
# Content key of a message sent whole (one without content to share).
_WHOLE = 0
# Chunks are at most this many messages, and each worker has two in flight.
_MAX_CHUNK = 32
_IN_FLIGHT_CHUNKS = 2


def _chunk_size(remaining: int, workers: int) -> int:
    """Messages in the next chunk: a quarter of a fair share of what is left.

    Chunks shrink as the batch runs out (guided self-scheduling), and so does a
    worker's queue (two chunks), so that the workers finish together: at the end
    of a round of heavy-tailed clients, one worker's full queue would otherwise
    leave the other core idle.
    """
    return max(1, min(_MAX_CHUNK, math.ceil(remaining / (4 * workers))))


# Seconds a worker has to leave after being asked, and after SIGTERM.
_STOP_GRACE_S = 2.0


def workers_supported() -> bool:
    """Say whether this system can run worker processes (Linux, with ``fork``)."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def resolve_workers(workers: Workers) -> int:
    """Return the number of worker processes ``workers`` asks for (0 and auto: one per core)."""
    if workers == AUTO:
        workers = 0
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(
            f"workers: expected {AUTO!r} or an integer >= 0 (0: one per CPU core), got {workers!r}"
        )
    if workers == 0:
        if hasattr(os, "sched_getaffinity"):
            return len(os.sched_getaffinity(0))
        return os.cpu_count() or 1
    return workers


@contextmanager
def worker_pool(client_app: ClientApp, workers: int) -> Iterator[WorkerPool | None]:
    """Run ``workers`` worker processes meanwhile; ``None`` for one (the parent alone).

    Start it once everything the ClientApp needs is loaded: workers see the parent
    as it was when they were forked.
    """
    count = resolve_workers(workers)
    if count < 2:
        yield None
        return
    if not workers_supported():
        log.warning(
            "workers=%d: worker processes need Linux (fork); running in one process on %s",
            count,
            sys.platform,
        )
        yield None
        return
    with native_threads(1):
        pool = WorkerPool(client_app, count)
        try:
            yield pool
        finally:
            pool.close()


@contextmanager
def worker_delivery(client_app: ClientApp, workers: Workers) -> Iterator[BatchDelivery | None]:
    """Deliver through worker processes meanwhile, as ``workers`` asks; ``None``: this process.

    An integer starts that many workers now (:func:`worker_pool`). ``auto`` starts
    one per core only once a batch shows they pay (:class:`AutoWorkers`).
    """
    if workers != AUTO:
        with worker_pool(client_app, workers) as pool:
            yield None if pool is None else pool.deliver
        return
    count = resolve_workers(AUTO)
    if count < 2 or not workers_supported():
        yield None
        return
    auto = AutoWorkers(client_app, count)
    try:
        yield auto.deliver
    finally:
        auto.close()


class AutoWorkers:
    """Call the ClientApp in this process until a batch shows worker processes pay.

    With workers, the parent encodes and decodes each message's wire form (W a
    message) while the workers call the ClientApp (C a message) and do their own
    half of the wire form: about C + 2W of CPU a message instead of C. On two
    cores that pays at best 2C / (C + 2W), less the pipes' latency: measured,
    1.5x for synthetic clients (C/W about 7; 1.7x at 10-15, before training got
    cheaper) and 0.85x for digits clients (C/W 2.5-4, where that bound says
    1.15-1.33x). Since replies decode faster (:mod:`._flower`), W is smaller and
    the ratios larger: measured on 2026-11-27, digits 2.8-5.7, synthetic 10-12.
    The threshold sits nearer synthetic's: a batch that falls short is probed
    again next round, while tiny clients get a chance to tip over every round.
    So each batch's first :data:`PROBE` messages are delivered here,
    each call timed, and W is timed on the last of them (:func:`_wire_seconds`);
    once the mean call, less the slowest (a run's first call also builds the
    model and loads the data), is at least :data:`MIN_CALL_TO_WIRE` times W
    (between the two kinds of client, with room for timing noise; both scale
    with the machine's speed and load, so a slow machine does not tip tiny
    clients over) and the rest of the batch is large enough to share
    (:data:`MIN_SHARE` messages per worker), ``count`` workers are forked and
    deliver that rest and every later batch. The results are the same either
    way (see :class:`WorkerPool`), as is the order replies are aggregated in.
    A mean, not a median: heavy-tailed client sizes (synthetic's) are work the
    workers share, which a median leaves out.
    """

    PROBE = 8
    MIN_CALL_TO_WIRE = 8.0
    MIN_SHARE = 4

    def __init__(self, client_app: ClientApp, count: int) -> None:
        self._client_app = client_app
        self._count = count
        self._pool: WorkerPool | None = None
        self._started = ExitStack()  # the worker_pool context, once entered

    def deliver(self, grid: InProcessGrid, messages: list[Message]) -> dict[str, Message]:
        """Deliver ``messages``: probe here first, through the workers once they pay."""
        if self._pool is not None:
            return self._pool.deliver(grid, messages)
        if len(messages) < self.PROBE + self.MIN_SHARE * self._count:
            return {}  # too few to share: the grid delivers them here
        replies: dict[str, Message] = {}
        seconds = []
        for message in messages[: self.PROBE]:
            started = time.perf_counter()
            replies[message.metadata.message_id] = grid.deliver_here(message)
            seconds.append(time.perf_counter() - started)
        # The mean call, less the slowest (see the class docstring).
        typical = statistics.fmean(sorted(seconds)[:-1])
        last = messages[self.PROBE - 1]
        wire = _wire_seconds(grid, last, replies[last.metadata.message_id])
        if typical < self.MIN_CALL_TO_WIRE * wire:
            log.debug(
                "ClientApp calls take %.2f ms each, %.1fx their wire form: no workers yet",
                typical * 1e3,
                typical / wire,
            )
            return replies  # the grid delivers the rest here too
        log.info(
            "ClientApp calls take %.2f ms each, %.0fx their wire form: starting %d worker "
            "processes",
            typical * 1e3,
            typical / wire,
            self._count,
        )
        self._pool = self._started.enter_context(worker_pool(self._client_app, self._count))
        if self._pool is not None:
            replies.update(self._pool.deliver(grid, messages[self.PROBE :]))
        return replies

    def close(self) -> None:
        """Stop the workers, if they were started (:func:`worker_pool` does)."""
        self._started.close()


def _wire_seconds(grid: InProcessGrid, message: Message, reply: Message) -> float:
    """Time what the parent does for one message with workers (:meth:`WorkerPool.deliver`).

    It encodes the message's metadata and the node's ``Context`` without the run
    config, and decodes the reply and the node's state that come back; a batch's
    shared content goes once, and the worker encodes the reply, so neither counts.
    """
    node_id = message.metadata.dst_node_id
    context = grid.node_context(node_id)
    encoded_reply = encode_message(reply)
    returned = encode_context(Context(context.run_id, node_id, {}, context.state, {}))
    started = time.perf_counter()
    encode_metadata(message)
    context.run_config = {}
    encode_context(context)
    decode_message(encoded_reply)
    decode_context(returned)
    return time.perf_counter() - started


@contextmanager
def native_threads(count: int) -> Iterator[None]:
    """Cap native thread pools (OpenBLAS, MKL, OpenMP) at ``count`` threads meanwhile.

    A pool already smaller (``OPENBLAS_NUM_THREADS=1``) keeps its size: a cap
    never adds threads. Forked workers inherit the cap. Without it numpy's
    OpenBLAS runs a thread per core, which spins between the small products a
    simulated client computes (synthetic clients' data): measured on two cores,
    one process then kept both busy (30 s of CPU in 16 s) for the same rounds,
    and two workers ran each call 1.8x slower than one process did.
    """
    try:
        from threadpoolctl import (  # type: ignore[import-untyped]
            threadpool_info,
            threadpool_limits,
        )
    except ImportError:  # scikit-learn's dependency; without it, pools keep their size
        log.warning("threadpoolctl is not installed: native thread pools keep their size")
        yield
        return
    limits = {pool["prefix"]: min(count, pool["num_threads"]) for pool in threadpool_info()}
    with threadpool_limits(limits=limits):
        yield


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    conn: Connection
    in_flight: deque[Message] = field(default_factory=deque)
    known: set[int] = field(default_factory=set)
    run_config: dict[str, Any] | None = None

    @property
    def pid(self) -> int:
        pid = self.process.pid
        assert pid is not None  # started before it is stored
        return pid


class WorkerPool:
    """Worker processes that call a ClientApp for the grid's messages.

    Parameters
    ----------
    client_app
        The ClientApp every worker calls (the parent's, inherited by ``fork``).
    workers
        How many worker processes to run (at least 2).

    """

    def __init__(self, client_app: ClientApp, workers: int) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 2:
            raise ValueError(f"workers: expected an integer >= 2, got {workers!r}")
        if not workers_supported():
            raise RuntimeError(f"worker processes need Linux (fork), not {sys.platform}")
        self._client_app = client_app
        self._mp = multiprocessing.get_context("fork")
        self._keys = itertools.count(_WHOLE + 1)
        self._workers: list[_Worker] = []
        self._closed = False
        self.restarts = 0
        try:
            for _ in range(workers):
                self._workers.append(self._spawn())
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        """The process ids of the workers running now."""
        return [w.pid for w in self._workers]

    # ---------------------------------------------------------------- delivery

    def deliver(self, grid: InProcessGrid, messages: list[Message]) -> dict[str, Message]:
        """Deliver ``messages`` through the workers; return the replies by message id.

        A batch of one is left to the grid (the parent delivers it faster than
        it can be sent). Nodes that do not exist or are offline get the grid's
        own error replies.
        """
        if self._closed:
            raise RuntimeError("the worker pool is closed")
        if len(messages) < 2:
            return {}
        replies: dict[str, Message] = {}
        todo: deque[Message] = deque()
        for message in messages:
            unavailable = grid.unavailable_reply(message)
            if unavailable is not None:
                grid.stats.messages += 1
                replies[message.metadata.message_id] = unavailable
            else:
                todo.append(message)
        if not todo:
            return replies
        batch = _Batch(grid, replies, self._keys)
        run_config = grid.run_config
        for worker in self._workers:
            if worker.known:
                self._send(worker, _CLEAR)
                worker.known.clear()
            if worker.run_config != run_config:
                # The run config is the same for every node: sent once, not per message.
                holder = Context(0, 0, {}, RecordDict(), run_config)
                if self._send(worker, _RUN_CONFIG + encode_context(holder)):
                    worker.run_config = run_config
        while True:
            for i, worker in enumerate(self._workers):
                while todo:
                    chunk = _chunk_size(len(todo), len(self._workers))
                    if len(worker.in_flight) >= chunk * _IN_FLIGHT_CHUNKS:
                        break
                    if not self._send_chunk(worker, todo, chunk, batch):
                        self._replace(i, todo, batch)
                        break
            busy = [w for w in self._workers if w.in_flight]
            if not busy:
                break
            ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
            for worker in busy:
                if worker.conn in ready or worker.process.sentinel in ready:
                    if not self._receive(worker, batch):
                        self._replace(self._workers.index(worker), todo, batch)
        return replies

    def _send_chunk(self, worker: _Worker, todo: deque[Message], chunk: int, batch: _Batch) -> bool:
        """Send ``worker`` up to ``chunk`` messages from ``todo``; ``False`` if it is gone."""
        taken = [todo.popleft() for _ in range(min(chunk, len(todo)))]
        parts = [_CHUNK, _U32.pack(len(taken))]
        for message in taken:
            key = batch.content_key(message)
            if key != _WHOLE and key not in worker.known:
                if not self._send(worker, _CONTENT + _U64.pack(key) + batch.encoded[key]):
                    todo.extendleft(reversed(taken))
                    return False
                worker.known.add(key)
            metadata = batch.metadata(message, key)
            node_context = batch.grid.node_context(message.metadata.dst_node_id)
            node_context.run_config = {}  # the worker puts back the one it holds
            context = encode_context(node_context)
            parts += [_U64.pack(key), _U32.pack(len(metadata)), metadata]
            parts += [_U32.pack(len(context)), context]
        if not self._send(worker, b"".join(parts)):
            todo.extendleft(reversed(taken))
            return False
        worker.in_flight.extend(taken)
        return True

    def _receive(self, worker: _Worker, batch: _Batch) -> bool:
        """Take every reply ``worker`` has sent; ``False`` if it has died."""
        grid = batch.grid
        while worker.in_flight:
            try:
                if not worker.conn.poll():
                    return worker.process.is_alive()
                frame = worker.conn.recv_bytes()
            except (EOFError, OSError):
                return False
            ok, seconds, length = _REPLY.unpack_from(frame)
            start = _REPLY.size
            reply = decode_message(frame[start : start + length])
            message = worker.in_flight.popleft()
            node_id = message.metadata.dst_node_id
            if ok:
                grid.commit_context(node_id, decode_context(frame[start + length :]))
            else:
                grid.stats.errors += 1
            grid.stats.messages += 1
            grid.stats.client_seconds += seconds
            set_message_id(reply, uuid.uuid4().hex)
            batch.replies[message.metadata.message_id] = reply
        return True

    def _replace(self, index: int, todo: deque[Message], batch: _Batch) -> None:
        """Answer the message a dead worker was running, requeue the rest, fork anew."""
        dead = self._workers[index]
        dead.process.join(_STOP_GRACE_S)
        if dead.process.is_alive():  # its pipe broke but it runs on: make sure it is gone
            os.kill(dead.pid, signal.SIGKILL)
            dead.process.join(_STOP_GRACE_S)
        code = dead.process.exitcode
        if code is not None and code < 0:
            how = f"was killed by signal {-code}"
        else:
            how = f"exited ({code})"
        dead.conn.close()
        if dead.in_flight:
            message = dead.in_flight.popleft()
            node_id = message.metadata.dst_node_id
            reason = (
                f"worker process {dead.pid} {how} while node {node_id}'s ClientApp ran this message"
            )
            log.error("%s; forking a new worker", reason)
            reply = error_reply(message, CLIENT_APP_CRASHED, reason)
            set_message_id(reply, uuid.uuid4().hex)
            batch.grid.stats.messages += 1
            batch.grid.stats.errors += 1
            batch.replies[message.metadata.message_id] = reply
            todo.extendleft(reversed(dead.in_flight))
        else:
            log.error("worker process %d %s while idle; forking a new worker", dead.pid, how)
        self._workers[index] = self._spawn()
        self.restarts += 1

    def _send(self, worker: _Worker, frame: bytes) -> bool:
        try:
            worker.conn.send_bytes(frame)
        except OSError:  # a dead worker's pipe
            return False
        return True

    # ---------------------------------------------------------------- lifetime

    def _spawn(self) -> _Worker:
        parent_end, child_end = self._mp.Pipe(duplex=True)
        # The child must not hold the other workers' pipes open: a worker (or this
        # parent) that dies has to be seen as a closed pipe.
        inherited = [parent_end, *(w.conn for w in self._workers)]
        process = self._mp.Process(
            target=_worker_main,
            args=(self._client_app, child_end, inherited),
            name="fedscale-sim-worker",
        )
        process.start()
        child_end.close()
        return _Worker(process, parent_end)

    def close(self) -> None:
        """Stop every worker (asked first, then by PID) and wait for each."""
        self._closed = True
        for worker in self._workers:
            self._send(worker, _QUIT)
        deadline = time.monotonic() + _STOP_GRACE_S
        for worker in self._workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [w for w in self._workers if w.process.is_alive()]
            for worker in alive:
                try:
                    os.kill(worker.pid, sig)
                except ProcessLookupError:
                    pass
            for worker in alive:
                worker.process.join(_STOP_GRACE_S)
        for worker in self._workers:
            worker.conn.close()
            if worker.process.exitcode is not None:
                worker.process.close()
        self._workers.clear()


class _Batch:
    """What one ``deliver`` call shares: the grid, the replies, encoded contents."""

    def __init__(
        self, grid: InProcessGrid, replies: dict[str, Message], keys: Iterator[int]
    ) -> None:
        self.grid = grid
        self.replies = replies
        self.encoded: dict[int, bytes] = {}
        self._keys = keys
        # Content objects by id(), held so that no id is reused during the batch.
        self._contents: dict[int, tuple[RecordDict, int]] = {}

    def content_key(self, message: Message) -> int:
        if not message.has_content():
            return _WHOLE
        content = message.content
        held = self._contents.get(id(content))
        if held is not None:
            return held[1]
        key = next(self._keys)
        self._contents[id(content)] = (content, key)
        self.encoded[key] = encode_records(content)
        return key

    def metadata(self, message: Message, key: int) -> bytes:
        return encode_message(message) if key == _WHOLE else encode_metadata(message)


# -------------------------------------------------------------------- worker side


def _worker_main(client_app: ClientApp, conn: Connection, inherited: list[Connection]) -> None:
    """Call ``client_app`` for every message the parent sends, until told to stop."""
    for other in inherited:
        other.close()
    # Ctrl-C reaches the whole process group: the parent decides, and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    # A reader thread keeps the inbound pipe drained, so the parent never blocks
    # on a send while this process blocks on sending it a reply.
    threading.Thread(target=_read_frames, args=(conn, inbox), daemon=True).start()
    contents: dict[int, RecordDict] = {}
    run_config: dict[str, Any] = {}
    while (frame := inbox.get()) is not None:
        kind = frame[:1]
        if kind == _QUIT:
            break
        if kind == _CLEAR:
            contents.clear()
        elif kind == _RUN_CONFIG:
            run_config = decode_context(frame[1:]).run_config
        elif kind == _CONTENT:
            (key,) = _U64.unpack_from(frame, 1)
            contents[key] = decode_records(frame[1 + _U64.size :])
        elif kind == _CHUNK:
            for key, metadata, context in _chunk_items(frame):
                reply = _call(client_app, key, metadata, context, contents, run_config)
                conn.send_bytes(reply)
        else:
            raise RuntimeError(f"worker: unknown frame kind {kind!r}")


def _read_frames(conn: Connection, inbox: queue.SimpleQueue[bytes | None]) -> None:
    try:
        while True:
            inbox.put(conn.recv_bytes())
    except (EOFError, OSError):  # the parent is gone or closed the pipe
        inbox.put(None)


def _chunk_items(frame: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    (count,) = _U32.unpack_from(frame, 1)
    at = 1 + _U32.size
    for _ in range(count):
        (key,) = _U64.unpack_from(frame, at)
        at += _U64.size
        (length,) = _U32.unpack_from(frame, at)
        at += _U32.size
        metadata = frame[at : at + length]
        at += length
        (length,) = _U32.unpack_from(frame, at)
        at += _U32.size
        context = frame[at : at + length]
        at += length
        yield key, metadata, context


def _call(
    client_app: ClientApp,
    key: int,
    metadata: bytes,
    context_bytes: bytes,
    contents: dict[int, RecordDict],
    run_config: dict[str, Any],
) -> bytes:
    """Call the ClientApp as the one-process grid does; return the reply frame."""
    if key == _WHOLE:
        message = decode_message(metadata)
    else:
        # Each node gets its own copy of a shared content, as Flower gives it.
        message = decode_delivered(metadata, copy_record_dict(contents[key]))
    context = decode_context(context_bytes)
    context.run_config = dict(run_config)
    node_id = message.metadata.dst_node_id
    started = time.perf_counter()
    reply, ok = call_client_app(client_app, message, context)
    seconds = time.perf_counter() - started
    encoded = encode_message(reply)
    # Only the state is kept (the parent knows the node and run config).
    state = b""
    if ok:
        state = encode_context(Context(context.run_id, node_id, {}, context.state, {}))
    return b"".join((_REPLY.pack(ok, seconds, len(encoded)), encoded, state))
