"""Generate and GenerateStream through the generated stubs, on a real server over loopback."""
from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from memguard.proto.memguard.v1 import memguard_pb2 as pb, memguard_pb2_grpc
from server_testlib import channel, metric


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_novel_prompt_is_allowed_with_decodable_images(server):
    with channel(server) as ch:
        response = memguard_pb2_grpc.MemGuardStub(ch).Generate(
            pb.GenerateRequest(prompt="a wooden boat on a lake", steps=3, seed=11, num_images=2, request_id="r-1"))
    assert response.request_id == "r-1"
    assert response.effective_mode == pb.GUARD_MODE_OFF   # the baseline engine does not guard, and says so
    assert [im.index for im in response.images] == [0, 1]
    assert [im.seed for im in response.images] == [11, 12]
    for image in response.images:
        assert image.decision == pb.DECISION_ALLOWED and image.reason == pb.REASON_NONE
        assert image.report.steps_computed == 3
        pixels = decode(image.png)
        assert pixels.shape == (64, 64, 3) and pixels.std() > 0
        assert not image.report.HasField("audit")
    assert not np.array_equal(decode(response.images[0].png), decode(response.images[1].png))


def test_same_seed_same_image(server):
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        a, b = (stub.Generate(pb.GenerateRequest(prompt="a red apple", steps=3, seed=5)) for _ in range(2))
    diff = np.abs(decode(a.images[0].png).astype(int) - decode(b.images[0].png).astype(int))
    assert diff.max() <= 1


def test_stream_events_arrive_in_step_order_then_result(server):
    steps, images = 5, 2
    with channel(server) as ch:
        events = list(memguard_pb2_grpc.MemGuardStub(ch).GenerateStream(
            pb.GenerateRequest(prompt="a lighthouse at night", steps=steps, seed=3, num_images=images)))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["progress"] * (steps * images) + ["result"]
    for index in range(images):
        progress = [e.progress for e in events[:-1] if e.progress.image_index == index]
        assert [p.step for p in progress] == list(range(steps))
        assert all(p.total_steps == steps and p.action == "continue" for p in progress)
        assert all(not p.signals for p in progress)   # the unguarded engine (mode OFF) scores nothing
    result = events[-1].result
    assert [im.decision for im in result.images] == [pb.DECISION_ALLOWED] * images
    assert result.request_id == events[0].progress.request_id != ""


@pytest.mark.parametrize("fields, bad", [
    (dict(prompt=""), "prompt"),
    (dict(prompt="x", steps=1000), "steps"),
    (dict(prompt="x", height=65), "height"),
    (dict(prompt="x", num_images=99), "num_images"),
    (dict(prompt="x", guidance_scale=-1.0), "guidance_scale"),
    (dict(prompt="x", mode=42), "mode"),
])
def test_invalid_argument_names_the_field(server, fields, bad):
    with channel(server) as ch, pytest.raises(grpc.RpcError) as err:
        memguard_pb2_grpc.MemGuardStub(ch).Generate(pb.GenerateRequest(**fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{bad}:")


def test_scrape_shows_counters_moving(server):
    before_ok = metric(server, "memguard_requests_total", rpc="Generate", code="OK")
    before_images = metric(server, "memguard_images_total", decision="ALLOWED", reason="NONE")
    before_steps = metric(server, "memguard_denoise_steps_total")
    with channel(server) as ch:
        memguard_pb2_grpc.MemGuardStub(ch).Generate(pb.GenerateRequest(prompt="a tree", steps=2, num_images=3))
    assert metric(server, "memguard_requests_total", rpc="Generate", code="OK") == before_ok + 1
    assert metric(server, "memguard_images_total", decision="ALLOWED", reason="NONE") == before_images + 3
    assert metric(server, "memguard_denoise_steps_total") == before_steps + 6
    assert metric(server, "memguard_request_duration_seconds_count", rpc="Generate") >= 1
    assert metric(server, "memguard_ready") == 1


def test_cli_generate_with_server_is_the_client_side(server, tmp_path, capsys):
    """`memguard generate --server HOST:PORT`: one request a prompt, images written per prompt."""
    import json as _json

    from memguard.cli import main

    out = tmp_path / "out"
    argv = ["generate", "--server", server.target, "--prompt", "a red circle on a blue plain background",
            "--prompt", "a green square on a yellow striped background", "--seed", "3", "--steps", "3",
            "--out", str(out), "--json"]
    assert main(argv) == 0
    text, docs, decoder = capsys.readouterr().out, [], _json.JSONDecoder()
    while text.strip():                        # one JSON document a prompt, printed one after another
        doc, end = decoder.raw_decode(text.lstrip())
        docs.append(doc)
        text = text.lstrip()[end:]
    assert [len(d["images"]) for d in docs] == [1, 1]
    for i, d in enumerate(docs):
        image = d["images"][0]
        assert image["seed"] == 3 and image["decision"] == "ALLOWED"
        assert image["path"].startswith(str(out / f"p{i}")) and (out / f"p{i}").is_dir()
    # local-only options are refused with the field named, before anything is sent
    assert main(["generate", "--server", server.target, "--prompt", "x", "--trace", "--out", str(out)]) == 2
    assert "trace" in capsys.readouterr().err
