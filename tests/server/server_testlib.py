"""Helpers for the server tests: channels, live /metrics scrapes, bounded polling."""
from __future__ import annotations

import contextlib
import dataclasses
import time
import urllib.request

import grpc

from memguard.server.app import BackgroundServer
from memguard.server.config import RateLimitConfig, ServerConfig


def make_config(**overrides) -> ServerConfig:
    """Loopback, ephemeral ports, short grace, generous per-key rate limits (tests send many requests
    a key; the defaults are tested on their own); `batching={...}`, `rate_limits={...}`,
    `admission={...}`, `uploads={...}` override those sections' fields."""
    base = ServerConfig(port=0, metrics_port=0, grace_s=5.0, default_steps=4,
                        rate_limits=RateLimitConfig(generate_per_s=1000.0, generate_burst=10_000,
                                                    screen_per_s=1000.0, screen_burst=10_000))
    for section in ("batching", "rate_limits", "admission", "uploads"):
        if section in overrides:
            overrides[section] = dataclasses.replace(getattr(base, section), **overrides[section])
    return dataclasses.replace(base, **overrides)


@contextlib.contextmanager
def channel(server: BackgroundServer):
    ch = grpc.insecure_channel(server.target)
    try:
        yield ch
    finally:
        ch.close()


def scrape_text(server: BackgroundServer) -> str:
    url = f"http://127.0.0.1:{server.server.endpoints.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def scrape(server: BackgroundServer) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} from a live /metrics scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(scrape_text(server)):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(server: BackgroundServer, name: str, **labels) -> float:
    return scrape(server).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(predicate, timeout: float = 120.0, poll: float = 0.1):
    """Poll until predicate() is truthy (bounded); return its value. Not a timing assertion: the
    bound only keeps a broken server from hanging the suite."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(poll)
