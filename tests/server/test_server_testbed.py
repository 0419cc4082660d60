"""Acceptance on the trained testbed through the server: memorized prompts come back REROUTED or
BLOCKED, novel ones ALLOWED with a decodable image. Runs once the testbed model is built
(`memguard testbed build`) and the guarded engine is importable; skipped otherwise."""
from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
from PIL import Image

from memguard.engine import EngineConfig, load_engine
from memguard.loading import TESTBED_MODEL_DIR
from memguard.proto.memguard.v1 import memguard_pb2 as pb, memguard_pb2_grpc
from memguard.server.app import BackgroundServer
from memguard.server.demo import load_prompt_sets
from server_testlib import channel, make_config

GUARDED = "memguard.guarded_engine:GuardedEngine"

pytestmark = [
    pytest.mark.skipif(not (TESTBED_MODEL_DIR / "model_index.json").is_file(),
                       reason=f"testbed model not built at {TESTBED_MODEL_DIR} (memguard testbed build)"),
    pytest.mark.skipif(importlib.util.find_spec("memguard.guarded_engine") is None,
                       reason="the guarded engine (issue 5) is not in this tree"),
]


@pytest.fixture(scope="module")
def testbed_server():
    engine = load_engine(GUARDED, EngineConfig(torch_threads=1))
    server = BackgroundServer(make_config(default_steps=30), engine)
    server.start()
    yield server
    server.stop()


def test_memorized_prompts_are_rerouted_or_blocked_and_novel_ones_allowed(testbed_server):
    sets = load_prompt_sets()
    with channel(testbed_server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        memorized = [stub.Generate(pb.GenerateRequest(prompt=p, seed=0, mode=pb.GUARD_MODE_ENFORCE), timeout=600)
                     for p in sets["memorized"][:3]]
        novel = [stub.Generate(pb.GenerateRequest(prompt=p, seed=0, mode=pb.GUARD_MODE_ENFORCE), timeout=600)
                 for p in sets["novel"][:3]]
    for response in memorized:
        assert response.effective_mode == pb.GUARD_MODE_ENFORCE
        image = response.images[0]
        assert image.decision in (pb.DECISION_REROUTED, pb.DECISION_BLOCKED)
        assert image.reason == pb.REASON_MEMORIZATION
        assert (image.png == b"") == (image.decision == pb.DECISION_BLOCKED)
        if image.decision == pb.DECISION_REROUTED:   # what comes back is not a copy
            with channel(testbed_server) as ch:
                screened = memguard_pb2_grpc.MemGuardStub(ch).Screen(pb.ScreenRequest(image=image.png))
            assert not screened.copy_detected
    allowed = [r.images[0] for r in novel if r.images[0].decision == pb.DECISION_ALLOWED]
    assert len(allowed) >= 2
    for image in allowed:
        assert np.asarray(Image.open(io.BytesIO(image.png)).convert("RGB")).shape == (64, 64, 3)


def test_main_job_demo_writes_the_released_images(tmp_path):
    """`memguard demo` (the README's main job): local guarded server, the demo mix, images on disk."""
    import subprocess
    import sys

    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "memguard.cli", "demo", "--per-set", "1", "--steps", "8", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "guarded=True" in r.stdout
    from memguard.server.demo import DEMO_SETS, demo_cases

    rows = [line.split() for line in r.stdout.splitlines() if line.split()[:1] and line.split()[0] in DEMO_SETS]
    assert [row[0] for row in rows] == [c.prompt_set for c in demo_cases(per_set=1)]
    released = [row for row in rows if row[1] != "BLOCKED"]
    assert sorted(p.name.split("-")[1] for p in out.glob("[0-9]*.png")) == sorted(row[0] for row in released)
    assert f"written to {out.resolve()}" in r.stdout and (out / "contact_sheet.png").is_file()
