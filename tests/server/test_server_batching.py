"""Micro-batching: compatible requests share one engine call, each gets its own images back."""
from __future__ import annotations

import concurrent.futures as cf
import io

import numpy as np
from PIL import Image

from memguard.types import GenerationRequest
from memguard.proto.memguard.v1 import memguard_pb2 as pb, memguard_pb2_grpc
from server_testlib import channel, metric


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def test_compatible_requests_share_a_batch_and_get_their_own_results(engine, serve):
    requests = [pb.GenerateRequest(prompt="a red apple", steps=3, seed=100, num_images=1),
                pb.GenerateRequest(prompt="a blue car", steps=3, seed=200, num_images=2),
                pb.GenerateRequest(prompt="a blue car", steps=4, seed=300, num_images=1)]   # other step count
    # what each request yields alone, straight from the engine
    solo = [engine.generate([GenerationRequest(prompt=r.prompt, steps=r.steps, seed=r.seed,
                                               num_images=r.num_images)])[0] for r in requests]
    engine.stats()   # not server traffic
    # a full batch (3 images) leaves at once; the incompatible request waits out the queue delay
    server = serve(engine, batching={"max_batch_images": 3, "max_queue_delay_ms": 3000})
    with channel(server) as ch, cf.ThreadPoolExecutor(3) as pool:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        responses = list(pool.map(lambda r: stub.Generate(r, timeout=300), requests))
    assert metric(server, "memguard_batch_size_requests_count") == 2     # {apple, car} and {car, 4 steps}
    assert metric(server, "memguard_batch_size_requests_sum") == 3
    assert metric(server, "memguard_batch_size_images_sum") == 4
    for response, alone, request in zip(responses, solo, requests):
        assert [im.seed for im in response.images] == [r.seed for r in alone]
        assert [im.report.steps_computed for im in response.images] == [request.steps] * request.num_images
        for image, expected in zip(response.images, alone):
            assert np.abs(pixels(image.png) - expected.image.astype(int)).max() <= 2
