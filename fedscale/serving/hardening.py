"""What keeps one ``fedscale serve`` answering under abuse: slots, deadlines, a key.

- :class:`ConcurrencyLimiter`: at most ``max_concurrency`` inferences run at once,
  across REST and gRPC, and at most ``max_queue`` more wait for a slot; anything
  beyond is refused at once (503 with ``Retry-After``, gRPC RESOURCE_EXHAUSTED)
  instead of piling up until clients time out. A waiter gives up at its deadline.
- :class:`Watchdog`: one thread that sets onnxruntime's ``RunOptions.terminate``
  on runs that outlive their deadline, so a slow inference ends (504, gRPC
  DEADLINE_EXCEEDED) and frees its slot instead of holding it for as long as the
  model takes.
- :class:`ApiKey`: the optional bearer key, read from a file or the environment
  (never from the command line, where ``ps`` would show it), compared in constant
  time.

The refusals are :class:`~fedscale.serving.protocol.RequestError` subclasses with
their HTTP status, so both servers answer them as they answer any bad request.
"""

from __future__ import annotations

import asyncio
import heapq
import hmac
import itertools
import os
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from time import monotonic, perf_counter, thread_time
from typing import Any

import numpy as np
import onnxruntime as ort

from fedscale.exceptions import ConfigError

from .protocol import InferRequest, RequestError, run_inference
from .repository import LoadedModel

__all__ = [
    "API_KEY_ENV",
    "RETRY_AFTER_S",
    "ApiKey",
    "ConcurrencyLimiter",
    "DeadlineExceeded",
    "Overloaded",
    "Unauthorized",
    "Watchdog",
    "default_max_concurrency",
    "default_max_queue",
    "run_with_deadline",
]

API_KEY_ENV = "FEDSCALE_SERVE_API_KEY"
RETRY_AFTER_S = 1
"""What a 503 tells the client to wait: slots free up in milliseconds to seconds."""


class Overloaded(RequestError):
    """Every slot is busy and the wait queue is full (or the wait outlived the deadline)."""

    def __init__(self, message: str):
        super().__init__(503, message)


class DeadlineExceeded(RequestError):
    """The inference did not finish within the request's deadline."""

    def __init__(self, message: str):
        super().__init__(504, message)


class Unauthorized(RequestError):
    """The API key is missing or wrong."""

    def __init__(self, message: str):
        super().__init__(401, message)


def default_max_concurrency() -> int:
    """Return 4 inferences per core this process may use, between 4 and 64."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        cores = os.cpu_count() or 1
    return max(4, min(64, 4 * cores))


def default_max_queue(max_concurrency: int) -> int:
    """Return how many requests may wait for a slot: 4 per slot, at least 64.

    Generous on purpose: a request waits at most its deadline, and 503s should
    mean a server that cannot keep up, not a few dozen clients arriving at once.
    """
    return max(64, 4 * max_concurrency)


class _Waiter:
    __slots__ = ("granted", "event", "loop", "future")

    def __init__(
        self,
        event: threading.Event | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        future: asyncio.Future[None] | None = None,
    ):
        self.granted = False
        self.event = event
        self.loop = loop
        self.future = future

    def wake(self) -> None:
        if self.event is not None:
            self.event.set()
        elif self.loop is not None and self.future is not None:
            self.loop.call_soon_threadsafe(_resolve, self.future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class ConcurrencyLimiter:
    """Slots for running inferences, with a bounded first-come first-served queue.

    Thread-safe: gRPC handlers wait in their threads (:meth:`acquire`), the REST
    event loop waits without blocking (:meth:`acquire_async`). A released slot
    goes straight to the oldest waiter, so a steady stream of new requests cannot
    starve one that is queued.
    """

    def __init__(self, max_concurrency: int, max_queue: int):
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._active = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def active(self) -> int:
        """Slots in use now."""
        return self._active

    @property
    def waiting(self) -> int:
        """Requests queued for a slot now."""
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody is queued; never wait."""
        with self._lock:
            if self._active < self.max_concurrency and not self._waiters:
                self._active += 1
                return True
            return False

    def _enqueue(self, waiter: _Waiter) -> bool:
        """Take a slot (True), queue ``waiter`` (False), or refuse (:class:`Overloaded`)."""
        with self._lock:
            if self._active < self.max_concurrency and not self._waiters:
                self._active += 1
                return True
            if len(self._waiters) >= self.max_queue:
                raise Overloaded(
                    f"server busy: expected a free inference slot, got all "
                    f"{self.max_concurrency} busy (--max-concurrency) and "
                    f"{len(self._waiters)} requests already queued (--max-queue); retry later"
                )
            self._waiters.append(waiter)
            return False

    def _give_up(self, waiter: _Waiter, waited: float) -> None:
        """Leave the queue after a timeout, unless a slot arrived meanwhile."""
        with self._lock:
            if waiter.granted:
                return
            self._waiters.remove(waiter)
        raise Overloaded(
            f"server busy: expected an inference slot within the request's deadline, "
            f"waited {waited:.3g} s; retry later"
        )

    def acquire(self, timeout: float) -> None:
        """Wait in this thread up to ``timeout`` s for a slot; raise :class:`Overloaded`."""
        waiter = _Waiter(event=threading.Event())
        if self._enqueue(waiter):
            return
        assert waiter.event is not None
        if not waiter.event.wait(max(timeout, 0.0)):
            self._give_up(waiter, timeout)

    async def acquire_async(self, timeout: float) -> None:
        """Wait in the running event loop up to ``timeout`` s for a slot."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiter = _Waiter(loop=loop, future=future)
        if self._enqueue(waiter):
            return
        timer = loop.call_later(max(timeout, 0.0), _resolve, future)
        try:
            await future
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        finally:
            timer.cancel()
        if not waiter.granted:
            self._give_up(waiter, timeout)

    def _abandon(self, waiter: _Waiter) -> None:
        with self._lock:
            if not waiter.granted:
                self._waiters.remove(waiter)
                return
        self.release()  # it was granted as it was cancelled: pass the slot on

    def release(self) -> None:
        """Give a slot back: to the oldest waiter if any, else to the pool."""
        with self._lock:
            if self._waiters:
                waiter = self._waiters.popleft()
                waiter.granted = True
            else:
                self._active -= 1
                return
        waiter.wake()


_WATCHDOG_TICK_S = 0.01
"""How late the watchdog may stop a run: deadlines are kept to within this."""


class Watchdog:
    """Terminate onnxruntime runs that outlive their deadline.

    One daemon thread sleeps until the earliest armed deadline, and at least
    :data:`_WATCHDOG_TICK_S`, so it wakes at most 100 times a second however many
    requests arrive. Arming costs a lock and a heap push, and wakes the thread
    only when the new deadline is the earliest, so the per-request cost stays a
    couple of microseconds. A disarmed entry stays in the heap until its deadline
    passes (the thread then drops it).
    """

    def __init__(self) -> None:
        self._lock = threading.Condition(threading.Lock())
        # Entries are [deadline, sequence, options]; disarming sets options to None.
        self._heap: list[list[Any]] = []
        self._counter = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fedscale-watchdog", daemon=True)
        self._thread.start()

    def arm(self, deadline: float) -> tuple[list[Any], ort.RunOptions]:
        """Return a token and the run options to pass to ``session.run``, ended at ``deadline``."""
        options = ort.RunOptions()
        options.log_severity_level = 4  # a terminated run is expected: no ERROR line
        entry = [deadline, next(self._counter), options]
        heap = self._heap
        with self._lock:
            heapq.heappush(heap, entry)
            if heap[0] is entry:  # the earliest now: wake the thread to sleep less
                self._lock.notify()
        return entry, options

    @staticmethod
    def disarm(token: list[Any]) -> None:
        """Forget the run of ``token``: it finished (one store; no lock needed)."""
        token[2] = None

    def terminate_all(self) -> None:
        """Stop every armed run now (the server is shutting down)."""
        with self._lock:
            for entry in self._heap:
                options = entry[2]
                if options is not None:
                    options.terminate = True

    def close(self) -> None:
        """Stop the thread (runs still armed are left alone)."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(5.0)

    def _run(self) -> None:
        heap = self._heap
        with self._lock:
            while not self._closed:
                now = monotonic()
                while heap and heap[0][0] <= now:
                    options = heapq.heappop(heap)[2]
                    if options is not None:  # terminating a run that just ended is harmless
                        options.terminate = True
                # Sleep at least one tick: under load a deadline falls due every few
                # microseconds, and waking for each would cost the event loop a core.
                self._lock.wait(max(heap[0][0] - now, _WATCHDOG_TICK_S) if heap else None)


def run_with_deadline(
    watchdog: Watchdog,
    model: LoadedModel,
    request: InferRequest,
    deadline: float,
    clock: Callable[[], float] = thread_time,
) -> list[np.ndarray]:
    """Run ``model``, terminated at ``deadline`` (monotonic s); add its cost to ``model.cost_s``.

    Raises :class:`DeadlineExceeded` when the watchdog stopped the run. ``clock``
    measures the cost: by default this thread's CPU time, because a worker
    thread's wall time includes waiting for the GIL and for a core, which would
    keep a cheap model looking expensive (and off the fast inline path) on a busy
    machine; the event loop passes ``perf_counter``, since for the loop the wall
    time is the cost (and costs a syscall less).
    """
    token, options = watchdog.arm(deadline)
    started = perf_counter()
    cost_started = clock()
    try:
        results = run_inference(model, request, options)
    except Exception:
        if options.terminate:
            raise DeadlineExceeded(
                f"inference: expected to finish within the request's deadline, stopped after "
                f"{perf_counter() - started:.3g} s (the server's --request-timeout, or the "
                "client's own deadline)"
            ) from None
        raise
    finally:
        watchdog.disarm(token)
    elapsed = clock() - cost_started
    cost = model.cost_s
    # A moving average over about the last five runs; racing threads may lose an update.
    model.cost_s = elapsed if cost == float("inf") else cost + 0.2 * (elapsed - cost)
    return results


class ApiKey:
    """The bearer key that inference and metadata requests must carry."""

    __slots__ = ("_key", "source")

    def __init__(self, key: str, source: str):
        if not key:
            raise ConfigError(f"API key from {source}: expected a key, got an empty one")
        if not all("!" <= c <= "~" for c in key):
            raise ConfigError(
                f"API key from {source}: expected printable ASCII without spaces "
                "(it travels in an HTTP header), got other characters"
            )
        self._key = key.encode("ascii")
        self.source = source

    def __repr__(self) -> str:
        return f"ApiKey(source={self.source!r})"  # never the key itself

    @classmethod
    def load(cls, path: Path | None, environ: dict[str, str] | None = None) -> ApiKey | None:
        """Read the key from ``path`` (surrounding whitespace dropped), else the environment.

        Return None when neither is given: the server then asks for no key.
        """
        if path is not None:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise ConfigError(
                    f"--api-key-file {path}: expected a readable UTF-8 text file, got {err}"
                ) from None
            return cls(text.strip(), f"--api-key-file {path}")
        env = os.environ if environ is None else environ
        value = env.get(API_KEY_ENV)
        if value is None:
            return None
        return cls(value.strip(), f"${API_KEY_ENV}")

    def check(
        self, header: bytes | str | None, carrier: str = "an 'Authorization: Bearer <key>' header"
    ) -> None:
        """Accept ``Bearer <key>`` (scheme in any case); raise :class:`Unauthorized`.

        ``carrier`` names where the key belongs, for the error message.
        """
        if header is None:
            raise Unauthorized(f"authorization: expected {carrier}, got none")
        raw = header.encode("utf-8", "replace") if isinstance(header, str) else header
        scheme, _, token = raw.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            raise Unauthorized(
                "authorization: expected the Bearer scheme ('Bearer <key>'), got another"
            )
        if not hmac.compare_digest(token.strip(), self._key):
            raise Unauthorized("authorization: expected a valid API key, got a wrong one")
