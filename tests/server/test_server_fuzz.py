"""Hostile requests against a live server with a real index: never INTERNAL, never down, bounded RSS.

CI runs a small real count per RPC ($MEMGUARD_FUZZ_COUNT, default 30); the acceptance run of
2,000 per RPC against a spawned server is `python tests/server/fuzz_server.py --count 2000`."""
from __future__ import annotations

import os
import resource

import pytest

from memguard.engine import IndexGateway, PipelineEngine
from memguard.server.client import health_status
from fuzz_server import RPCS, build_small_index, run_fuzz

pytest.importorskip("memguard.index.api", reason="the fingerprint index package is not installed")

COUNT = int(os.environ.get("MEMGUARD_FUZZ_COUNT", "30"))


def test_hostile_requests_never_answer_internal(tiny_pipe, serve, tmp_path):
    index_dir, vae = build_small_index(tmp_path)
    engine = PipelineEngine(tiny_pipe, IndexGateway.open(str(index_dir), model_dir=str(vae)))
    server = serve(engine, batching={"max_queue": 16})
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = run_fuzz(server.target, COUNT, seed=1, workers=4)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    print(report.format(), f"\npeak RSS growth {grown_mb:.0f} MB")
    assert report.sent == COUNT * len(RPCS)
    assert report.bad == []
    assert health_status(server.target) == "SERVING"
    assert grown_mb < 1500
    assert report.codes["/memguard.v1.MemGuard/Screen"]["INVALID_ARGUMENT"] > 0   # reached the decoder
    engine.index.close()
