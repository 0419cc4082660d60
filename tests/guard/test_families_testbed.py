"""The SDXL-format testbed recipe (issue 30): `memguard testbed build --testbed sdxl` builds a
StableDiffusionXLPipeline (both text encoders trained with a `text_time` UNet) that loads through
memguard.loading and runs guarded. A quick build only (a few training steps): it checks the build
path, not memorization; the shipped testbed (guard/testbed/sdxl/) is checked with the others in
tests/testbed/."""
from __future__ import annotations

import json

import numpy as np
import torch

from memguard.cli import main
from memguard.loading import load_pipeline
from memguard.pipeline import GuardedPipeline
from memguard.testbed.registry import BUILDABLE, TESTBEDS, get_testbed
from memguard.types import Decision, GenerationRequest, GuardMode


def test_sdxl_testbed_is_shipped():
    assert "sdxl" in TESTBEDS and "sdxl" not in BUILDABLE     # shipped-testbed tests iterate TESTBEDS
    tb = get_testbed("sdxl")
    assert tb.model.image_size == 64 and tb.train.prediction_type == "epsilon"


def test_sdxl_testbed_quick_build_loads_and_generates(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "sdxl"
    assert main(["testbed", "build", "--testbed", "sdxl", "--quick", "--no-report", "--out", str(out)]) == 0
    index = json.loads((out / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert json.loads((out / "MANIFEST.json").read_text())["config"]["model"]["transformer_layers"] == [1, 1, 2]
    pipe = load_pipeline(out / "model")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == (pipe.text_encoder.config.hidden_size
                                                    + pipe.text_encoder_2.config.hidden_size)
    torch.set_num_threads(1)
    batch = GuardedPipeline(pipe).generate([GenerationRequest("a red circle on a blue plain background", seed=0,
                                                              steps=2, mode=GuardMode.OFF)])
    result = batch.results[0][0]
    assert result.decision == Decision.ALLOWED and result.image.shape == (64, 64, 3)
    assert np.isfinite(result.image.astype(float)).all()
