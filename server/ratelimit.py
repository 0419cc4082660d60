"""Per-key token buckets for Generate and Screen (RESOURCE_EXHAUSTED with a retry delay).

A bucket holds up to `burst` tokens and refills at `rate` per second; a request takes one (Generate
takes one per image). Buckets are keyed by (key name, RPC family) and idle ones are dropped, so the
table stays bounded by the number of active keys.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from memguard.errors import MemGuardError
from memguard.server.config import RateLimitConfig

MAX_BUCKETS = 10_000     # distinct (key, family) pairs kept; the oldest idle ones go first


class RateLimited(MemGuardError):
    """Over the key's rate limit (RESOURCE_EXHAUSTED); `retry_after_s` says when a token is back."""

    def __init__(self, family: str, retry_after_s: float):
        self.family, self.retry_after_s = family, retry_after_s
        super().__init__(f"rate limit: {family} over this key's quota; retry after {retry_after_s:.2f} s")


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    def __init__(self, config: RateLimitConfig, clock=time.monotonic):
        config.validate()
        self.limits = {"generate": (config.generate_per_s, config.generate_burst),
                       "screen": (config.screen_per_s, config.screen_burst)}
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, who: str, family: str, cost: float = 1.0) -> None:
        """Take `cost` tokens from who's `family` bucket or raise RateLimited."""
        rate, burst = self.limits[family]
        if rate <= 0:
            return
        cost = min(cost, burst)           # a request larger than the burst still passes once full
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get((who, family))
            if bucket is None:
                self._evict(now)
                bucket = self._buckets[(who, family)] = _Bucket(float(burst), now)
            bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.stamp) * rate)
            bucket.stamp = now
            if bucket.tokens < cost:
                raise RateLimited(family, math.ceil((cost - bucket.tokens) / rate * 100) / 100)
            bucket.tokens -= cost

    def _evict(self, now: float) -> None:
        if len(self._buckets) < MAX_BUCKETS:
            return
        for key in sorted(self._buckets, key=lambda k: self._buckets[k].stamp)[: MAX_BUCKETS // 10]:
            del self._buckets[key]
