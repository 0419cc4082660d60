"""An SDXL model served over gRPC (issue 30): `memguard serve --model DIR --index IDX` on a tiny
SDXL-structured pipeline saved to disk, a real server on loopback, the usual request fields; an
unset size is the model's own (128 px here, not the testbed's 64)."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from memguard.proto.memguard.v1 import memguard_pb2 as pb, memguard_pb2_grpc
from memguard.server.app import BackgroundServer
from server_testlib import channel

SIZE = 128


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    """(model dir with its uncalibrated policy, index dir built with the model's VAE)."""
    import torch

    from memguard.calibrate import POLICY_FILE_NAME
    from memguard.index.api import FingerprintIndex
    from memguard.index.config import IndexConfig
    from memguard.index.sources import ImageFolderSource
    from memguard.models import build_tiny_sdxl_pipeline
    from memguard.policy import Policy
    from memguard.testbed.dataset import TestbedDataConfig, build_training_set, write_image_folder

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tmp_path_factory.mktemp("sdxl-model")
    build_tiny_sdxl_pipeline().save_pretrained(model, safe_serialization=True)
    Policy.uncalibrated().save(model / POLICY_FILE_NAME)
    folder = write_image_folder(build_training_set(TestbedDataConfig(num_procedural=8)),
                                tmp_path_factory.mktemp("sdxl-images"))
    index = tmp_path_factory.mktemp("sdxl-index") / "index"
    FingerprintIndex.build(index, ImageFolderSource(folder), model_dir=model, progress=False,
                           cfg=IndexConfig(faces=False))
    return model, index


@pytest.fixture(scope="module")
def sdxl_server(sdxl_model):
    """Configured as `memguard serve` configures it from its command line."""
    from memguard.cli import build_parser
    from memguard.server.cli import build_config

    model, index = sdxl_model
    args = build_parser().parse_args(["serve", "--model", str(model), "--index", str(index), "--port", "0",
                                      "--metrics-port", "0", "--torch-threads", "1", "--allow-mode-override"])
    config = dataclasses.replace(build_config(args), default_steps=4, grace_s=5.0)
    config.validate()
    server = BackgroundServer(config)
    server.start()
    yield server
    server.stop()


def _png(image: pb.GeneratedImage) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.png)).convert("RGB"))


def test_sdxl_generates_in_every_mode_at_the_models_size(sdxl_server):
    assert sdxl_server.server.engine.guarded and sdxl_server.server.engine.default_size == SIZE
    with channel(sdxl_server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        responses = {mode: stub.Generate(pb.GenerateRequest(prompt="a red circle on a blue plain background",
                                                             seed=7, mode=mode), timeout=600)
                     for mode in (pb.GUARD_MODE_ENFORCE, pb.GUARD_MODE_MONITOR, pb.GUARD_MODE_OFF)}
        sized = stub.Generate(pb.GenerateRequest(prompt="a red circle on a blue plain background", seed=7,
                                                 height=64, width=128, num_images=2), timeout=600)
    for mode, response in responses.items():
        assert response.effective_mode == mode
        image = response.images[0]
        assert image.decision == pb.DECISION_ALLOWED, (mode, image)
        assert _png(image).shape == (SIZE, SIZE, 3)
    # MONITOR changes nothing: the same image as OFF, within the attention kernel's float rounding
    diff = np.abs(_png(responses[pb.GUARD_MODE_MONITOR].images[0]).astype(int)
                  - _png(responses[pb.GUARD_MODE_OFF].images[0]).astype(int))
    assert diff.max() <= 2
    assert [_png(i).shape for i in sized.images] == [(64, 128, 3)] * 2
    assert all(i.decision == pb.DECISION_ALLOWED for i in sized.images)
