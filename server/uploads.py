"""Screen and Protect work (decode, fingerprint, registry write) off the event loop, bounded.

At most `max_queue` uploads are waiting or running; one more answers RESOURCE_EXHAUSTED at once,
so a burst of big uploads cannot stall the loop (health checks, streaming) or grow memory without
bound. The slot is freed when the thread finishes, not when the caller gives up: a cancelled
Screen still holds its slot until its decode is done, so the bound is on real work.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

from memguard.server.batcher import QueueFull
from memguard.server.config import UploadConfig

T = TypeVar("T")


class UploadQueueFull(QueueFull):
    """Too many uploads waiting or running (RESOURCE_EXHAUSTED)."""


class UploadPool:
    def __init__(self, config: UploadConfig, on_depth: Callable[[int], None] | None = None):
        config.validate()
        self.config = config
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="memguard-upload")
        self._lock = threading.Lock()
        self._busy = 0
        self._on_depth = on_depth

    @property
    def depth(self) -> int:
        return self._busy

    def _report(self) -> None:
        if self._on_depth is not None:
            self._on_depth(self._busy)

    def _release(self, _: Future) -> None:
        with self._lock:
            self._busy -= 1
            self._report()

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn()` in a worker thread, or raise UploadQueueFull when max_queue are in flight."""
        with self._lock:
            if self._busy >= self.config.max_queue:
                raise UploadQueueFull(f"upload queue full ({self.config.max_queue} uploads in flight)")
            self._busy += 1
            self._report()
        try:
            future = self._pool.submit(fn)
        except RuntimeError:            # the pool is shut down
            with self._lock:
                self._busy -= 1
            raise
        future.add_done_callback(self._release)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
