"""DynamicBatcher: one inference thread per model gathering concurrent requests into one forward.

The event loop validates, enqueues and awaits, and once per pass either runs what waits itself
or wakes the thread. A model's batch expected to take under ON_LOOP_S runs on the loop's own
thread: handing it to the inference thread and its answers back cost more than such a forward.
A longer one goes to the thread, which takes the next batch the moment it is free (so the next
batch is collected while the current one computes), runs it, and hands each request its own
rows back through its future. One forward of a model runs at a time, wherever it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from app.errors import InferenceFailed, InferenceTimeout, ModelportError, QueueFull
from app.observability.metrics import Metrics
from app.serving.allocator import release_free_memory
from app.serving.cores import WIDE_FROM_S, on_threads, process_share
from app.serving.runtime import ModelRuntime

logger = logging.getLogger(__name__)

ON_LOOP_S = 0.001
"""The longest a batch may be expected to take (:meth:`DynamicBatcher._expected_s`) to run on
the event loop's thread, on one intra-op thread. Waking the inference thread cost the loop a
tenth of its time on `tiny` at 64 connections (a futex wake with the interpreter lock held),
and each answer came back through a second wake-up. Longer forwards stay on the thread, so that
the loop goes on reading requests meanwhile."""
IDLE_TRIM_S = 1.0
"""How long an inference thread waits with nothing to do before it gives the memory its
forwards freed back to the system (app.serving.allocator)."""
Result = tuple[ModelRuntime, Any]
Batch = dict[str, np.ndarray]
"""A checked input batch: one array per input name, all of one length (the batch dimension)."""


@dataclass(frozen=True)
class BatchPolicy:
    """When a batch closes, and how much may wait."""

    max_batch_size: int = 32
    """Samples per forward; 1 turns batching off."""
    max_batch_delay_s: float = 0.002
    """Longest a batch keeps collecting once it has its first request."""
    max_queue: int = 1024
    """Requests that may wait; beyond, 503 with Retry-After."""
    timeout_s: float = 30.0
    """A request not answered by then gets 504; if its forward has not started it is dropped."""


@dataclass(eq=False)
class _Request:
    inputs: Batch
    runtime: ModelRuntime | None  # a pinned version; None: whichever is active when it runs
    postprocess: bool
    future: asyncio.Future[Result]
    loop: asyncio.AbstractEventLoop
    deadline: float
    """When it times out, in its loop's time."""
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    size: int = 0

    def __post_init__(self) -> None:
        self.size = len(next(iter(self.inputs.values())))


@dataclass
class _Watch:
    """A loop's requests waiting for their answer, oldest first, and the timer of the oldest."""

    waiting: deque[_Request] = field(default_factory=deque)
    timer: asyncio.TimerHandle | None = None


@dataclass
class _Batch:
    runtime: ModelRuntime
    requests: list[_Request] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(request.size for request in self.requests)


class DynamicBatcher:
    """Gathers requests for one model into batches run on its dedicated inference thread."""

    def __init__(
        self,
        name: str,
        active: Callable[[], ModelRuntime],
        policy: BatchPolicy,
        metrics: Metrics,
        torch_threads: int | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self.metrics = metrics
        self._waited = metrics.queue_wait_seconds.labels(name)
        self._batch_size = metrics.batch_size.labels(name)
        depth = metrics.queue_depth.labels(name)
        metrics.sample(lambda: depth.set(len(self._queue)))
        self._active = active
        self._torch_threads = torch_threads or os.cpu_count() or 1
        """This worker's share of the cores: a forward's intra-op threads (more when alone)."""
        self._cores = process_share()
        self._lone_s = float("inf")
        """How long the model's last lone forward took on this worker's share (unknown at
        first: the first one is widened)."""
        self._last_s = float("inf")
        """How long the model's last forward took, from its batch's gathering to its answers
        (unknown at first: the first runs on the inference thread)."""
        self._last_size = 1
        self._sample_s = float("inf")
        """The least a sample has cost lately (per sample of a forward; it may grow by a
        quarter a forward)."""
        self._running = False
        """A forward is in progress, on the inference thread or an event loop's."""
        self._queue: deque[_Request] = deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._forwarded = False
        """A forward ran since the memory was last given back."""
        self._wake_on: asyncio.AbstractEventLoop | None = None
        """The loop where a wake-up of the thread is pending."""
        self._watches: dict[asyncio.AbstractEventLoop, _Watch] = {}
        """Each loop's requests waiting for their answer, and the timer of the oldest."""
        self._thread = threading.Thread(target=self._work, name=f"infer-{name}", daemon=True)

    def start(self) -> None:
        """Start the inference thread."""
        self._thread.start()

    def stop(self) -> None:
        """Finish the batch in progress, fail what still waits, and end the thread."""
        with self._ready:
            self._stopping = True
            waiting = list(self._queue)
            self._queue.clear()
            self._ready.notify()
        for request in waiting:
            _resolve(request, error=QueueFull(f"model {self.name!r} is shutting down"))
        if self._thread.is_alive():
            self._thread.join()

    async def submit(
        self, inputs: Batch, *, runtime: ModelRuntime | None = None, postprocess: bool = True
    ) -> Result:
        """Queue a checked input batch; returns the runtime that served it and its outputs
        (one JSON-ready value per sample, or the raw output rows by name with
        ``postprocess=False``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.policy.timeout_s
        request = _Request(inputs, runtime, postprocess, loop.create_future(), loop, deadline)
        with self._ready:
            if self._stopping:
                raise QueueFull(f"model {self.name!r} is shutting down")
            if len(self._queue) >= self.policy.max_queue:
                raise QueueFull(
                    f"model {self.name!r} has {len(self._queue)} requests waiting; retry shortly"
                )
            self._queue.append(request)
        if self._wake_on is not loop:  # (a loop closed with a wake pending is not waited for)
            self._wake_on = loop
            loop.call_soon(self._wake)
        waiting = self._watch(request)
        try:
            return await request.future
        finally:
            if request.future.cancelled():
                request.cancelled = True  # its client left: drop it unless it has started
            while waiting and waiting[0].future.done():
                waiting.popleft()

    def _wake(self) -> None:
        """Once per pass of the event loop, after every request that arrived in that pass has
        joined the queue, run what waits here or wake the inference thread: woken for each
        one, it would take them in more, smaller batches, and each wake-up costs both threads
        a GIL hand-off (measured: mlp served 15% more at 64 connections)."""
        self._wake_on = None
        if not self._run_here(asyncio.get_running_loop()):
            with self._ready:
                self._ready.notify()

    def _run_here(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Run the batches waiting, on the calling event loop's thread, while each is expected
        to take under ON_LOOP_S; False where the inference thread is to take what waits (a
        longer batch, a request of another loop first, or forwards on more than one intra-op
        thread: the loop's thread computes on one, and a second thread computing on several
        would hold a second OpenMP team, :mod:`app.serving.cores`). A forward in progress on
        the thread takes what waits once it is done."""
        if self._torch_threads > 1:
            return False
        while True:
            with self._ready:
                if self._running or self._stopping or not self._queue:
                    return True
                if self._queue[0].loop is not loop:
                    return False
                batch = self._gather()
                if batch is None:
                    continue
                if self._expected_s(batch.size) > ON_LOOP_S:
                    self._queue.extendleft(reversed(batch.requests))  # as they came
                    return False
                self._running = True
            self._run_taken(batch)

    def _expected_s(self, size: int) -> float:
        """How long a forward of ``size`` samples is expected to take: as long as the last one,
        and the least a sample has cost lately for each sample more. A model's fixed cost per
        forward is in the first, and the cost per sample of the larger batches it ran in the
        second (the last forward's own would overstate it for a small model, whose batch of one
        costs about what a batch of thirty does)."""
        more = size - self._last_size
        return self._last_s + (self._sample_s * more if more > 0 else 0.0)

    def _watch(self, request: _Request) -> deque[_Request]:
        """Time ``request`` out at its deadline. A loop's requests wait in the order they came,
        so in the order of their deadlines, and one timer serves them all: a timer armed and
        cancelled per request cost a small model's request 2.5 µs."""
        watch = self._watches.get(request.loop)
        if watch is None:
            watch = self._watches[request.loop] = _Watch()
        watch.waiting.append(request)
        if watch.timer is None:
            watch.timer = request.loop.call_at(request.deadline, self._expire_due, request.loop)
        return watch.waiting

    def _expire_due(self, loop: asyncio.AbstractEventLoop) -> None:
        """Answer 504 now to every request of ``loop`` past its deadline (the thread drops it
        unless its forward has started), then wait for the next deadline."""
        watch = self._watches[loop]
        waiting, now = watch.waiting, loop.time()
        while waiting and (waiting[0].future.done() or waiting[0].deadline <= now):
            request = waiting.popleft()
            if not request.future.done():
                request.cancelled = True
                message = f"model {self.name!r} did not answer within {self.policy.timeout_s:g} s"
                request.future.set_exception(InferenceTimeout(message))
        if waiting:
            watch.timer = loop.call_at(waiting[0].deadline, self._expire_due, loop)
        else:
            del self._watches[loop]

    # --- the inference thread ------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run_taken(batch)

    def _run_taken(self, batch: _Batch) -> None:
        """Run a batch taken from the queue (as the forward in progress), wherever it was
        taken; the next one can be taken once it is done."""
        try:
            self._count_waits(batch)
            self._run(batch)
        finally:
            with self._ready:
                self._running = False

    def _next_batch(self) -> _Batch | None:
        """Wait for a request and no forward in progress, then take the next batch."""
        with self._ready:
            batch = None
            while batch is None:
                while (not self._queue or self._running) and not self._stopping:
                    self._idle()
                if self._stopping:
                    return None
                batch = self._gather()
            self._running = True
        return batch

    def _gather(self) -> _Batch | None:
        """The next batch (holding the lock, with a request queued): up to max_batch_size
        samples of one version, closing early when nothing else waits or once the delay has
        passed; None where its first request cannot run (it is answered)."""
        batch = self._open(self._queue.popleft())
        if batch is None:
            return None
        deadline = time.monotonic() + self.policy.max_batch_delay_s
        while self._queue and time.monotonic() < deadline:
            candidate = self._queue[0]
            if candidate.cancelled:
                self._queue.popleft()  # timed out before its forward: dropped
                continue
            if candidate.runtime is not batch.requests[0].runtime:
                break  # pinned to another version, or to none: it starts the next batch
            if batch.size + candidate.size > self.policy.max_batch_size:
                break
            batch.requests.append(self._queue.popleft())
        return batch

    def _count_waits(self, batch: _Batch) -> None:
        """The metrics of the batch's requests' time in the queue."""
        now = time.perf_counter()
        for request in batch.requests:
            self._waited.observe(now - request.enqueued)
        waited = sum(now - request.enqueued for request in batch.requests)
        self.metrics.tally(self.name, batch.runtime.version).requests(
            "queue", waited, len(batch.requests)
        )

    def _idle(self) -> None:
        """Wait for a request (holding the lock); after forwards (wherever they ran), once
        nothing has come for IDLE_TRIM_S, give their freed memory back to the system (without
        the lock, so that requests still queue meanwhile)."""
        if self._ready.wait(IDLE_TRIM_S) or not self._forwarded:
            return
        self._forwarded = False
        self._ready.release()
        try:
            release_free_memory()
        finally:
            self._ready.acquire()

    def _open(self, first: _Request) -> _Batch | None:
        """A batch around its first request, on the version that serves it; None if the
        request timed out already or no version can serve."""
        if first.cancelled:
            return None
        try:
            runtime = first.runtime or self._active()
        except ModelportError as exc:
            _resolve(first, error=exc)
            return None
        return _Batch(runtime, [first])

    def _run(self, batch: _Batch) -> None:
        # one request with nothing behind it may have every core nobody else computes on
        alone = len(batch.requests) == 1 and not self._queue
        try:
            self._forward(batch.runtime, batch.requests, alone)
        except Exception:
            # one request's inputs may break the model: retry each alone so only it fails
            for request in batch.requests:
                self._forward(batch.runtime, [request], alone=False)

    def _compute(
        self, runtime: ModelRuntime, inputs: Batch, alone: bool
    ) -> dict[str, torch.Tensor]:
        """Run the forward on the intra-op threads it may use, counted in the process's share
        of the cores while it computes. A lone request of a model whose lone forward took
        WIDE_FROM_S or more computes on every core nobody else computes on, on the process's
        wide thread (:mod:`app.serving.cores`)."""

        def timed() -> tuple[dict[str, torch.Tensor], float]:
            started = time.perf_counter()
            return runtime.run(inputs), time.perf_counter() - started

        share = self._torch_threads
        threads = self._cores.begin(share, alone and self._lone_s >= WIDE_FROM_S)
        try:
            if threads > share:
                output, took = self._cores.widened(threads, timed)
            else:
                output, took = on_threads(threads, timed)
        finally:
            self._cores.end()
        if alone:  # in share-thread time: about what a widened forward would take narrow
            self._lone_s = took * threads / share
        return output

    def _forward(self, runtime: ModelRuntime, requests: list[_Request], alone: bool) -> None:
        """Run the requests as one forward; a single request's failure is its answer, a
        batch's failure is raised for :meth:`_run` to split."""
        started = time.perf_counter()
        inputs = (
            requests[0].inputs
            if len(requests) == 1
            else {
                name: np.concatenate([request.inputs[name] for request in requests])
                for name in requests[0].inputs
            }
        )
        size = sum(request.size for request in requests)
        gathered = time.perf_counter()
        try:
            output = self._compute(runtime, inputs, alone)
        except Exception as exc:
            if len(requests) > 1:
                raise
            logger.warning("model %s: forward failed: %s: %s", self.name, type(exc).__name__, exc)
            _resolve(requests[0], error=InferenceFailed(_failure(exc)))
            return
        computed = time.perf_counter()
        self._forwarded = True
        self._batch_size.observe(size)
        answers = _answers(runtime, output, requests, size)
        _resolve_all(requests[0].loop, answers)
        done = time.perf_counter()
        took = done - started
        self._last_s, self._last_size = took, size
        self._sample_s = min(took / size, self._sample_s * 1.25)
        self.metrics.compute_seconds.labels(self.name, runtime.version).observe(took)
        phases = (gathered - started, computed - gathered, done - computed)
        self.metrics.tally(self.name, runtime.version).forward(size, len(requests), phases)


Answer = tuple[_Request, Result | None, ModelportError | None]


def _answers(
    runtime: ModelRuntime, output: dict[str, torch.Tensor], requests: list[_Request], size: int
) -> list[Answer]:
    """Each request's rows of the batch's outputs, postprocessed for those that asked: the
    whole batch in one call, or request by request if that fails, so that only a request whose
    rows break the postprocess fails."""
    together = None
    if any(request.postprocess for request in requests):
        with contextlib.suppress(Exception):
            together = runtime.postprocess(output)
        if together is not None and len(together) != size:
            together = None
    answers: list[Answer] = []
    offset = 0
    for request in requests:
        rows = slice(offset, offset + request.size)
        offset = rows.stop
        if request.postprocess and together is not None:
            answers.append((request, (runtime, together[rows]), None))
            continue
        mine = {name: tensor[rows] for name, tensor in output.items()}
        if not request.postprocess:
            answers.append((request, (runtime, mine), None))
            continue
        try:
            value = runtime.postprocess(mine)
        except Exception as exc:
            answers.append((request, None, InferenceFailed(f"postprocess failed: {_failure(exc)}")))
            continue
        answers.append((request, (runtime, value), None))
    return answers


def _failure(exc: BaseException) -> str:
    return f"the model failed on this input: {type(exc).__name__}: {exc}"


def _resolve(
    request: _Request, *, result: Result | None = None, error: ModelportError | None = None
) -> None:
    """Complete one request's future from any thread."""
    _resolve_all(request.loop, [(request, result, error)])


def _resolve_all(loop: asyncio.AbstractEventLoop, answers: list[Answer]) -> None:
    """Complete a batch's futures with one wake-up of their event loop."""

    def complete() -> None:
        for request, result, error in answers:
            if request.future.done():
                continue  # timed out (or its client left): the answer goes nowhere
            if error is not None:
                request.future.set_exception(error)
            else:
                request.future.set_result(result)  # type: ignore[arg-type]

    if asyncio._get_running_loop() is loop:  # run on the loop's own thread
        complete()
        return
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
        loop.call_soon_threadsafe(complete)
