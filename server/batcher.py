"""Admission queue and dynamic micro-batching in front of one engine (after Triton's dynamic batcher).

Requests wait in a bounded FIFO (full → QueueFull, i.e. RESOURCE_EXHAUSTED). One worker thread
takes the oldest request, waits at most `max_queue_delay_ms` from that request's arrival for
compatible ones (same `engine.batch_key`: size, steps, scheduler) to fill `max_batch_images`, and
runs the engine on them, off the event loop. Results and step events go back to each request's
event loop. A cancelled request leaves the queue at once; one already running is polled between
denoising steps (`is_cancelled`) and its samples leave the batch. When the engine raises on a batch
of several requests, each is re-run alone, so only the request that raises fails.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from memguard.engine import EngineStats, GenerationEngine
from memguard.errors import MemGuardError
from memguard.types import Decision, GenerationRequest, GuardReport, ImageResult, Reason, StepEvent
from memguard.server.config import BatchingConfig

log = logging.getLogger(__name__)


class QueueFull(MemGuardError):
    """The admission queue is full: retry later (RESOURCE_EXHAUSTED)."""


class KeyQueueShare(QueueFull):
    """One key holds its whole share of the admission queue (RESOURCE_EXHAUSTED)."""


class NotServing(MemGuardError):
    """The server is warming up or shutting down and takes no new work (UNAVAILABLE)."""


class DeadlineExceeded(MemGuardError):
    """The request's deadline passed before its images were done (DEADLINE_EXCEEDED)."""


class BatchObserver(Protocol):
    """What the batcher reports (memguard.server.metrics.Metrics implements it)."""

    def queue_depth(self, depth: int) -> None: ...

    def queue_wait(self, seconds: float) -> None: ...

    def batch(self, requests: int, images: int) -> None: ...

    def engine_stats(self, stats: EngineStats) -> None: ...

    def images(self, results: list[ImageResult]) -> None: ...

    def batch_retry(self, outcome: str) -> None: ...


_DONE = object()   # end-of-events marker


@dataclass(eq=False)
class Job:
    """One admitted request: its future, its optional event stream, and its cancel flag."""
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None                    # time.monotonic() value
    stream: bool = False
    enqueued_at: float = field(default_factory=time.monotonic)
    # set by the worker before the job resolves: when its engine call ran, and the most denoising
    # steps any sample of that call computed (the service pads early-stopped replies with them)
    started_at: float | None = None
    finished_at: float | None = None
    batch_steps: int = 0
    owner: str | None = None                         # the API key's name, for its share of the queue
    future: asyncio.Future = field(init=False)
    events: asyncio.Queue | None = field(init=False, default=None)
    _cancel: threading.Event = field(init=False, default_factory=threading.Event)
    _on_cancel: Callable[["Job"], None] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.future = self.loop.create_future()
        if self.stream:
            self.events = asyncio.Queue()

    # -- any thread ---------------------------------------------------------------------------
    def is_cancelled(self) -> bool:
        return self._cancel.is_set() or self.deadline_passed()

    def deadline_passed(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def cancel(self) -> None:
        """Stop this request: it leaves the queue now, or the batch at the next step."""
        if not self._cancel.is_set():
            self._cancel.set()
            if self._on_cancel is not None:
                self._on_cancel(self)

    # -- worker thread → event loop ----------------------------------------------------------
    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:   # the loop is gone (server torn down): nobody is waiting
            pass

    def emit(self, event: StepEvent) -> None:
        if self.events is not None:
            self._call(self.events.put_nowait, event)

    def resolve(self, results: list[ImageResult] | None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if not self.future.done():
                if error is not None:
                    self.future.set_exception(error)
                else:
                    self.future.set_result(results)
            if self.events is not None:
                self.events.put_nowait(_DONE)
        self._call(settle)

    async def stream_events(self):
        """Step events in the order the engine produced them, until the job settles."""
        assert self.events is not None, "submit(stream=True) to get events"
        while (item := await self.events.get()) is not _DONE:
            yield item


def cancelled_results(request: GenerationRequest) -> list[ImageResult]:
    """Results for a request that never ran: every image BLOCKED / CANCELLED, no steps."""
    seed = request.seed or 0
    return [ImageResult(i, (seed + i) % 2**63, Decision.BLOCKED, Reason.CANCELLED, None, GuardReport())
            for i in range(request.num_images)]


class Batcher:
    def __init__(self, config: BatchingConfig, observer: BatchObserver | None = None):
        config.validate()
        self.engine: GenerationEngine | None = None   # bound by start(), once loaded and warm
        self.config = config
        self.observer = observer
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- event loop side --------------------------------------------------------------------
    def start(self, engine: GenerationEngine) -> None:
        self.engine = engine
        self._thread = threading.Thread(target=self._worker, name="memguard-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest, *, deadline: float | None = None, stream: bool = False,
               owner: str | None = None, owner_slots: int | None = None) -> Job:
        """Admit a request or raise QueueFull / KeyQueueShare / NotServing. Call from the event loop.

        `owner` (an API key's name) may hold at most `owner_slots` waiting requests, so that one key
        cannot fill the queue for everyone."""
        job = Job(request, asyncio.get_running_loop(), deadline, stream)
        job.owner = owner
        job._on_cancel = self._withdraw
        with self._cond:
            if self._thread is None or self._closing:
                raise NotServing("the server is " + ("shutting down" if self._closing else "warming up"))
            if len(self._queue) >= self.config.max_queue:
                raise QueueFull(f"admission queue full ({self.config.max_queue} waiting requests)")
            if owner is not None and owner_slots is not None and \
                    sum(1 for j in self._queue if j.owner == owner) >= owner_slots:
                raise KeyQueueShare(f"admission queue: this key already has {owner_slots} waiting requests "
                                    "(its share of the queue)")
            self._queue.append(job)
            self._report_depth()
            self._cond.notify()
        return job

    async def close(self) -> None:
        """Finish what is queued and stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    @property
    def depth(self) -> int:
        return len(self._queue)

    # -- worker thread ----------------------------------------------------------------------
    def _withdraw(self, job: Job) -> None:
        """A cancelled job that is still waiting frees its slot at once."""
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self._report_depth()
            else:
                return
        results = cancelled_results(job.request)
        job.resolve(results)
        self._observe("images", results)

    def _report_depth(self) -> None:
        self._observe("queue_depth", len(self._queue))

    def _observe(self, what: str, *args) -> None:
        if self.observer is not None:
            try:
                getattr(self.observer, what)(*args)
            except Exception:  # metrics must never take the worker down
                log.exception("batch observer %s failed", what)

    def _worker(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _next_batch(self) -> list[Job] | None:
        """Block until a batch is due: full, or its oldest request waited max_queue_delay_ms."""
        delay = self.config.max_queue_delay_ms / 1000.0
        with self._cond:
            while True:
                self._purge_expired()
                if not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                head = self._queue[0]
                batch = self._compatible(head)
                remaining = head.enqueued_at + delay - time.monotonic()
                full = sum(j.request.num_images for j in batch) >= self.config.max_batch_images
                if full or remaining <= 0 or self._closing:
                    for job in batch:
                        self._queue.remove(job)
                    self._report_depth()
                    return batch
                self._cond.wait(timeout=remaining)

    def _compatible(self, head: Job) -> list[Job]:
        """The head plus, in FIFO order, the compatible jobs that still fit in the batch."""
        key = self.engine.batch_key(head.request)
        batch, images = [head], head.request.num_images
        for job in list(self._queue)[1:]:
            n = job.request.num_images
            if images + n <= self.config.max_batch_images and self.engine.batch_key(job.request) == key:
                batch.append(job)
                images += n
        return batch

    def _purge_expired(self) -> None:
        expired = [j for j in self._queue if j.is_cancelled()]
        for job in expired:
            self._queue.remove(job)
            results = cancelled_results(job.request)
            job.resolve(results)
            self._observe("images", results)
        if expired:
            self._report_depth()

    def _run(self, batch: list[Job]) -> None:
        now = time.monotonic()
        for job in batch:
            self._observe("queue_wait", now - job.enqueued_at)
        error = self._generate(batch)
        if error is not None and len(batch) > 1:
            # one request may have broken the whole batch: re-run each alone, so only it fails
            log.warning("engine failed on a batch of %d requests (%s); re-running each alone",
                        len(batch), type(error).__name__)
            for job in batch:
                if job.is_cancelled():
                    results = cancelled_results(job.request)
                    job.resolve(results)
                    self._observe("images", results)
                    continue
                alone = self._generate([job])
                self._observe("batch_retry", "ok" if alone is None else "error")
                if alone is not None:
                    job.resolve(None, alone)
        elif error is not None:
            batch[0].resolve(None, error)
        self._observe("engine_stats", self.engine.stats())

    def _generate(self, batch: list[Job]) -> BaseException | None:
        """One engine call; resolve the jobs on success, return the exception otherwise."""
        self._observe("batch", len(batch), sum(j.request.num_images for j in batch))
        started = time.monotonic()
        try:
            results = self.engine.generate(
                [j.request for j in batch],
                on_step=lambda i, event: batch[i].emit(event),
                is_cancelled=lambda i: batch[i].is_cancelled())
        except Exception as exc:  # the worker lives on; MemGuardErrors keep their type
            if not isinstance(exc, MemGuardError):
                log.exception("engine.generate failed on a batch of %d requests", len(batch))
            return exc
        finished = time.monotonic()
        steps = max((r.report.steps_computed for rs in results for r in rs), default=0)
        for job, result in zip(batch, results):
            job.started_at, job.finished_at, job.batch_steps = started, finished, steps
            job.resolve(result)
            self._observe("images", result)
        return None
