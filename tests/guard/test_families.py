"""Model families (issue 30): one guarded loop over small per-family adapters; SDXL end to end.

The SDXL pipeline here has SDXL's structure at tiny widths (memguard.models.build_tiny_sdxl_pipeline:
two CLIP encoders, the second with a projection, a `text_time` UNet, Euler, SDXL's VAE scaling); it
is saved to a directory and loaded back through memguard.loading, as a product's model would be.
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from memguard.families import (StableDiffusionFamily, StableDiffusionXLFamily, UnsupportedModel, adapter_for,
                               family_for_directory)
from memguard.loading import load_pipeline, sample_plain
from memguard.pipeline import GuardConfig, GuardedPipeline
from memguard.policy import Policy
from memguard.signals import SIGNALS
from memguard.types import Decision, GenerationRequest, GuardMode, Reason

STEPS = 4
PROMPTS = ["a red circle on a blue plain background", "two yellow squares on a green plain background"]


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from memguard.models import build_tiny_sdxl_pipeline

    torch.manual_seed(int(np.random.default_rng().integers(2**31)))   # fresh random weights each run
    out = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl_pipeline().save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_dir):
    return load_pipeline(sdxl_dir)


@pytest.fixture(scope="module")
def sdxl_index_dir(sdxl_dir, tmp_path_factory):
    """A small index built with the SDXL model's own VAE (x̂0 is compared in its latent space)."""
    from memguard.index.api import FingerprintIndex
    from memguard.index.config import IndexConfig
    from memguard.index.sources import ImageFolderSource
    from memguard.testbed.dataset import TestbedDataConfig, build_training_set, write_image_folder

    items = build_training_set(TestbedDataConfig(num_procedural=12))
    folder = write_image_folder(items, tmp_path_factory.mktemp("sdxl-images"))
    out = tmp_path_factory.mktemp("sdxl-index") / "index"
    FingerprintIndex.build(out, ImageFolderSource(folder), model_dir=sdxl_dir, progress=False,
                           cfg=IndexConfig(faces=False))
    return out


@pytest.fixture()
def sdxl_index(sdxl_index_dir, sdxl_dir):
    from memguard.index.api import FingerprintIndex

    index = FingerprintIndex.open(sdxl_index_dir, model_dir=sdxl_dir)
    yield index
    index.close()


def _requests(mode, size=128, prompts=PROMPTS, seeds=(11, 12), **kw):
    return [GenerationRequest(p, seed=s, steps=STEPS, mode=mode, height=size, width=size, **kw)
            for p, s in zip(prompts, seeds)]


def _images(batch):
    return np.stack([rs[0].image for rs in batch.results])


# ----------------------------------------------------------------------------- choosing the family
def test_family_is_read_from_model_index_and_from_the_pipeline_class(sdxl_dir, sdxl_pipe, tiny_model_dir, tiny_pipe):
    from diffusers import StableDiffusionXLPipeline

    assert family_for_directory(sdxl_dir) is StableDiffusionXLFamily
    assert family_for_directory(tiny_model_dir) is StableDiffusionFamily
    assert isinstance(sdxl_pipe, StableDiffusionXLPipeline)
    assert isinstance(adapter_for(sdxl_pipe), StableDiffusionXLFamily)
    assert isinstance(adapter_for(tiny_pipe), StableDiffusionFamily)
    assert adapter_for(sdxl_pipe).default_size == 128 and adapter_for(tiny_pipe).default_size == 64


def test_an_unsupported_pipeline_directory_fails_naming_its_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.0",
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(UnsupportedModel) as err:
        load_pipeline(tmp_path)
    message = str(err.value)
    assert "StableDiffusion3Pipeline" in message
    assert "StableDiffusionPipeline" in message and "StableDiffusionXLPipeline" in message


def test_an_unsupported_pipeline_object_fails_naming_its_class(tiny_pipe):
    class FluxPipeline:            # any class the guard has no adapter for
        scheduler = tiny_pipe.scheduler
        unet = tiny_pipe.unet

    with pytest.raises(UnsupportedModel, match="FluxPipeline.*supported: StableDiffusionPipeline"):
        GuardedPipeline(FluxPipeline())


# ----------------------------------------------------------------------------- SDXL encoding
def test_sdxl_encoding_is_diffusers(sdxl_pipe):
    """Context = both encoders' penultimate states (D1 + D2 wide), pooled = the second's projection,
    time ids = (H, W, 0, 0, H, W), an empty negative prompt is zeros; a given one is encoded."""
    family = adapter_for(sdxl_pipe)
    enc = family.encode(PROMPTS, ["", "blurry"], height=64, width=128, device=torch.device("cpu"))
    cond, neg, pooled, neg_pooled = sdxl_pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                            do_classifier_free_guidance=True)
    width = sdxl_pipe.text_encoder.config.hidden_size + sdxl_pipe.text_encoder_2.config.hidden_size
    assert enc.cond.shape == (2, 77, width)
    assert torch.equal(enc.cond, cond) and torch.equal(enc.added_cond["text_embeds"], pooled)
    assert torch.equal(enc.uncond[0], neg[0]) and not enc.uncond[0].any()       # empty → zeros (diffusers' default)
    assert not torch.equal(enc.uncond[1], neg[1])                               # "blurry" is encoded
    _, neg_b, _, neg_pooled_b = sdxl_pipe.encode_prompt(PROMPTS[1], device="cpu", num_images_per_prompt=1,
                                                        do_classifier_free_guidance=True, negative_prompt="blurry")
    assert torch.allclose(enc.uncond[1], neg_b[0], atol=1e-5)
    assert torch.allclose(enc.added_uncond["text_embeds"][1], neg_pooled_b[0], atol=1e-5)
    assert enc.added_cond["time_ids"].tolist() == [[64, 128, 0, 0, 64, 128]] * 2
    assert enc.eos == [len(sdxl_pipe.tokenizer(p).input_ids) - 1 for p in PROMPTS]


# ----------------------------------------------------------------------------- SDXL, every mode
def test_sdxl_off_reproduces_diffusers_bit_for_bit(sdxl_pipe):
    reference = sample_plain(sdxl_pipe, PROMPTS, [11, 12], steps=STEPS)
    batch = GuardedPipeline(sdxl_pipe).generate(_requests(GuardMode.OFF))
    assert np.array_equal(_images(batch), reference)
    # at a size other than the model's (time ids follow the request)
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    other = sdxl_pipe(PROMPTS, generator=gens, num_inference_steps=STEPS, guidance_scale=7.5, height=64, width=128,
                      output_type="np").images
    batch = GuardedPipeline(sdxl_pipe).generate([dataclasses.replace(r, height=64, width=128)
                                                 for r in _requests(GuardMode.OFF)])
    assert np.array_equal(_images(batch), (np.clip(other, 0, 1) * 255).round().astype(np.uint8))


def test_sdxl_v_prediction_off_reproduces_diffusers(sdxl_dir):
    pipe = load_pipeline(sdxl_dir)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="v_prediction")
    guarded = GuardedPipeline(pipe)
    assert guarded.v_prediction
    batch = guarded.generate(_requests(GuardMode.OFF))
    assert np.array_equal(_images(batch), sample_plain(pipe, PROMPTS, [11, 12], steps=STEPS))
    monitor = guarded.generate(_requests(GuardMode.MONITOR))
    assert all(np.isfinite(row[s]) for rs in monitor.results for row in rs[0].report.trace for s in SIGNALS)


def test_sdxl_monitor_scores_every_signal_and_changes_nothing(sdxl_pipe, sdxl_index, monkeypatch):
    """Divergence, attention (token mass over the 77 prompt tokens), similarity and standout all
    computed on SDXL; MONITOR releases what OFF computes in the same batch."""
    import memguard.pipeline as pipeline_module

    masses = []
    real = pipeline_module.attention_signals
    monkeypatch.setattr(pipeline_module, "attention_signals", lambda mass: masses.append(mass.clone()) or real(mass))
    guarded = GuardedPipeline(sdxl_pipe, index=sdxl_index)
    mixed = guarded.generate(_requests(GuardMode.MONITOR) + _requests(GuardMode.OFF))
    images = _images(mixed)
    assert np.array_equal(images[:2], images[2:])
    assert all(rs[0].decision == Decision.ALLOWED for rs in mixed.results)
    for rs in mixed.results[:2]:
        trace = rs[0].report.trace
        assert len(trace) == STEPS and all(np.isfinite(row[s]) for row in trace for s in SIGNALS)
        assert any(row["similarity"] != 0 for row in trace)       # candidates came from the SDXL index
        assert all(row["divergence"] > 0 for row in trace)
    assert len(masses) == STEPS
    for mass in masses:                    # per cond row: 77 tokens, one distribution
        assert mass.shape == (4, 77)
        assert torch.allclose(mass.sum(dim=1), torch.ones(4), atol=1e-4)
    assert mixed.stats.host_syncs > 0 and len(mixed.stats.guard_seconds) == STEPS
    plain = _images(guarded.generate(_requests(GuardMode.OFF)))
    assert np.abs(images[:2].astype(int) - plain.astype(int)).max() <= 2


def test_sdxl_enforce_releases_screened_images(sdxl_pipe, sdxl_index):
    batch = GuardedPipeline(sdxl_pipe, index=sdxl_index).generate(_requests(GuardMode.ENFORCE))
    for rs in batch.results:
        assert rs[0].decision == Decision.ALLOWED and rs[0].image.shape == (128, 128, 3)
        assert "screen" in rs[0].report.audit
    assert len(batch.stats.screen_seconds) == 2


def test_sdxl_enforce_without_an_index_releases_nothing(sdxl_pipe):
    batch = GuardedPipeline(sdxl_pipe, index=None).generate(_requests(GuardMode.ENFORCE)[:1])
    assert batch.results[0][0].image is None and batch.results[0][0].reason == Reason.SCREENING_FAILED


def _flag_everything() -> Policy:
    return dataclasses.replace(Policy.uncalibrated(), threshold=-math.inf)


def test_sdxl_block_leaves_the_batch_and_the_rest_goes_on(sdxl_pipe, sdxl_index):
    """A flagged sample blocked at step 0 leaves the batch with its added conditioning (pooled
    embeds, time ids); the OFF sample beside it finishes as diffusers would have made it."""
    guarded = GuardedPipeline(sdxl_pipe, index=sdxl_index, policy=_flag_everything(),
                              config=GuardConfig(on_flag="block"))
    enforce, off = _requests(GuardMode.ENFORCE)[0], _requests(GuardMode.OFF)[1]
    batch = guarded.generate([enforce, off])
    blocked, released = batch.results[0][0], batch.results[1][0]
    assert blocked.decision == Decision.BLOCKED and blocked.reason == Reason.MEMORIZATION
    assert blocked.report.steps_computed == 1 and batch.stats.steps_saved["blocked"] == STEPS - 1
    reference = sample_plain(sdxl_pipe, PROMPTS[1:], [12], steps=STEPS)[0]
    assert released.decision == Decision.ALLOWED
    assert np.abs(released.image.astype(int) - reference.astype(int)).max() <= 2


def test_sdxl_reroute_ladder_runs(sdxl_pipe, sdxl_index):
    """Flagged ENFORCE samples climb the reroute ladder on SDXL (attention mask over its 77 tokens,
    noisy context, basin guidance, push, reseed) and end REROUTED or BLOCKED, never unscreened."""
    guarded = GuardedPipeline(sdxl_pipe, index=sdxl_index, policy=_flag_everything(),
                              config=GuardConfig(second_pass=False))
    batch = guarded.generate(_requests(GuardMode.ENFORCE))
    assert batch.stats.reroutes == 2
    for rs in batch.results:
        r = rs[0]
        assert r.report.first_flagged_step == 0 and r.report.mitigations
        assert r.decision in (Decision.REROUTED, Decision.BLOCKED)
        assert (r.image is None) == (r.decision == Decision.BLOCKED)


# ----------------------------------------------------------------------------- attention at SDXL's width
def test_stats_processor_and_kernel_take_sdxls_2048_wide_context():
    """SDXL's cross-attention reads a 2048-wide context (768 + 1280) with 64-dim heads: the stats
    processor matches diffusers' AttnProcessor2_0 through the fused kernel and publishes a token mass
    over the 77 tokens; with stats off it is diffusers' arithmetic exactly."""
    from diffusers.models.attention_processor import Attention

    from memguard.attention import AttentionControl, StatsCrossAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=128, cross_attention_dim=2048, heads=2, dim_head=64)
    x, context = torch.randn(2, 256, 128), torch.randn(2, 77, 2048)
    with torch.no_grad():
        reference = attn(x, encoder_hidden_states=context)
        control = AttentionControl()
        attn.set_processor(StatsCrossAttnProcessor(control))
        out = attn(x, encoder_hidden_states=context)
        assert torch.allclose(out, reference, atol=1e-4, rtol=1e-4)
        mass = control.mean_mass()
        assert mass.shape == (2, 77) and torch.allclose(mass.sum(dim=1), torch.ones(2), atol=1e-4)
        control.stats, control.record = False, False
        assert torch.equal(attn(x, encoder_hidden_states=context), reference)
