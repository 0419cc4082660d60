"""The load generator against a real server: a short closed-loop and open-loop run."""
from __future__ import annotations

import asyncio

from memguard.benchmarks.load import LoadConfig, format_report, run_load
from server_testlib import metric


def test_closed_and_open_loop_reports(server):
    before = metric(server, "memguard_requests_total", rpc="Generate", code="OK")
    closed = asyncio.run(run_load(LoadConfig(server.target, concurrency=2, duration=2.0, warmup=0.5, steps=2,
                                             mix={"memorized": 1, "novel": 1})))
    assert closed["count"] >= 1 and closed["status_codes"] == {"OK": closed["count"]}
    assert sum(b["count"] for b in closed["histogram"]) == closed["count"]
    assert closed["latency_s"]["p50"] <= closed["latency_s"]["p99"] <= closed["latency_s"]["slowest"]
    assert set(closed["decisions"]) <= {"memorized", "novel"}
    assert sum(sum(c.values()) for c in closed["decisions"].values()) == closed["count"]
    opened = asyncio.run(run_load(LoadConfig(server.target, rate=2.0, duration=2.0, warmup=0.0, steps=2)))
    assert opened["count"] == sum(opened["status_codes"].values())
    served = metric(server, "memguard_requests_total", rpc="Generate", code="OK") - before
    assert served >= closed["count"] + opened["status_codes"].get("OK", 0)   # warm-up requests also ran
    text = format_report(closed)
    assert "p99" in text and "requests/s" in text


def test_soak_refuses_the_excess_and_loses_no_admitted_request(engine, serve):
    """A short soak (CI); the 2-minute acceptance run is `python -m memguard.benchmarks.load --soak --duration 120`."""
    from memguard.benchmarks.load import format_soak, soak

    server = serve(engine, batching={"max_batch_images": 2, "max_queue": 2, "max_queue_delay_ms": 5})
    cfg = LoadConfig(server.target, duration=4.0, warmup=0.0, steps=2)
    result = asyncio.run(soak(cfg, concurrency=4, capacity_s=3.0))
    verdict = result["verdict"]
    assert verdict["capacity_rps"] > 0 and verdict["offered_rps"] == 2 * verdict["capacity_rps"]
    assert verdict["refused_resource_exhausted"] > 0 and verdict["lost"] == 0
    assert "verdict:" in format_soak(result)
