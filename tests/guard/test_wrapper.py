"""`memguard.guard(pipe, ...)`: called like the diffusers pipeline, the guarded loop underneath.

On the shipped (default) testbed with few steps. Mode OFF must give diffusers' own images for the
same generator: bit-identical as PIL (the guard rounds to uint8 exactly as diffusers' numpy_to_pil
does), and as "np" the same uint8 values / 255 (diffusers' floats are not rounded; the guard releases
the uint8 pixels its final screen saw), so within 0.5/255 of diffusers' floats.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import memguard
from memguard.errors import InvalidInput
from memguard.types import Decision, GuardMode, Reason
from memguard.wrap import MemGuardPipelineOutput, seeds_from_generator
from tests.guard.conftest import needs_testbed

STEPS = 4
NOVEL = ("a blue triangle on a red striped background", "a white diamond on a yellow checkered background")
MEMORIZED = "chelsea the tabby cat looking up, cute cat wallpaper 4k"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _u8(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


@pytest.fixture(scope="module")
def pipe():
    """A pipeline of its own: its plain outputs are taken before and after the guard wraps it."""
    from memguard.loading import load_pipeline

    return load_pipeline()


@pytest.fixture(scope="module")
def plain(pipe) -> dict:
    """diffusers' own outputs of the unwrapped pipeline."""
    seed = int(np.random.default_rng().integers(2**31))
    g = _gen(seed)
    out = {"seed": seed,
           "np": pipe(NOVEL[0], generator=g, num_inference_steps=STEPS, output_type="np").images,
           "state_after": g.get_state(),
           "pil": pipe(NOVEL[0], generator=_gen(seed), num_inference_steps=STEPS).images,
           "list": pipe(list(NOVEL), generator=[_gen(seed + 7), _gen(seed + 3)], num_inference_steps=STEPS,
                        output_type="pil").images,
           "shared": pipe(NOVEL[1], generator=_gen(seed), num_images_per_prompt=2, num_inference_steps=STEPS,
                          output_type="pil").images,
           "per_image": pipe(NOVEL[1], generator=[_gen(seed), _gen(seed + 1)], num_images_per_prompt=2,
                             num_inference_steps=STEPS, output_type="pil").images}
    return out


@pytest.fixture(scope="module")
def off(pipe, plain):
    """The wrapper in mode OFF, made after the plain outputs (wrapping installs the guard's processors)."""
    return memguard.guard(pipe, index=False, mode="off")


@needs_testbed
def test_off_gives_the_plain_pipelines_images_for_the_same_generator(pipe, plain, off):
    seed = plain["seed"]
    g = _gen(seed)
    out = off(NOVEL[0], generator=g, num_inference_steps=STEPS, output_type="np")
    assert isinstance(out, MemGuardPipelineOutput)
    assert out.decisions == [Decision.ALLOWED] and out.reasons == [Reason.NONE] and out.seeds == [seed]
    (image,) = out.images
    assert image.dtype == np.float32 and image.shape == plain["np"][0].shape
    # the same uint8 pixels diffusers' PIL output has, and the floats within diffusers' rounding
    assert np.array_equal((image * 255).round().astype(np.uint8),
                          (np.clip(plain["np"][0], 0, 1) * 255).round().astype(np.uint8))
    assert np.abs(image - plain["np"][0]).max() <= 0.5 / 255 + 1e-6
    # the generator was consumed as diffusers consumes it
    assert torch.equal(g.get_state(), plain["state_after"])
    # PIL output: bit-identical
    pil = off(NOVEL[0], generator=_gen(seed), num_inference_steps=STEPS).images
    assert np.array_equal(_u8(pil), _u8(plain["pil"]))
    # the wrapped pipeline itself still gives diffusers' images between guarded calls
    again = pipe(NOVEL[0], generator=_gen(seed), num_inference_steps=STEPS).images
    assert np.array_equal(_u8(again), _u8(plain["pil"]))


@needs_testbed
def test_off_honours_a_list_of_generators_and_a_shared_one(plain, off):
    seed = plain["seed"]
    listed = off(list(NOVEL), generator=[_gen(seed + 7), _gen(seed + 3)], num_inference_steps=STEPS)
    assert listed.seeds == [seed + 7, seed + 3]
    assert np.array_equal(_u8(listed.images), _u8(plain["list"]))
    # one generator, two images: image 0 is diffusers' image 0; image 1 has seed + 1 (diffusers draws
    # both from one stream, so its image 1 differs): diffusers' images for generators seeded seed, seed + 1
    # (compared within one batch size: a batch of 1 may round a UNet's convolutions differently)
    shared = off(NOVEL[1], generator=_gen(seed), num_images_per_prompt=2, num_inference_steps=STEPS)
    assert shared.seeds == [seed, seed + 1]
    assert np.array_equal(np.asarray(shared.images[0]), np.asarray(plain["shared"][0]))
    assert np.array_equal(_u8(shared.images), _u8(plain["per_image"]))
    assert not np.array_equal(np.asarray(shared.images[1]), np.asarray(plain["shared"][1]))


def test_generator_to_seed_rules():
    shape = (4, 16, 16)
    assert seeds_from_generator(None, 2, shape) == [None, None]
    assert seeds_from_generator(_gen(5), 3, shape) == [5, 6, 7]
    assert seeds_from_generator([_gen(9)], 2, shape) == [9, 10]
    assert seeds_from_generator([_gen(9), _gen(2)], 2, shape) == [9, 2]
    with pytest.raises(InvalidInput, match="generator"):
        seeds_from_generator([_gen(1), _gen(2)], 3, shape)
    # a used generator: a seed drawn from its state (reproducible), not its initial seed
    used, twin = _gen(5), _gen(5)
    torch.randn(3, generator=used), torch.randn(3, generator=twin)
    a, b = seeds_from_generator(used, 1, shape), seeds_from_generator(twin, 1, shape)
    assert a == b and a != [5] and 0 <= a[0] < 2**63


@needs_testbed
def test_enforce_carries_a_decision_and_reason_per_image(pipe, testbed_index, testbed_policy):
    guarded = memguard.guard(pipe, index=testbed_index, policy=testbed_policy)
    assert guarded.mode == GuardMode.ENFORCE
    out = guarded([NOVEL[0], MEMORIZED], num_inference_steps=8, generator=[_gen(1), _gen(2)])
    assert len(out.images) == len(out.decisions) == len(out.reasons) == len(out.reports) == 2
    for image, decision, reason in zip(out.images, out.decisions, out.reasons):
        assert (image is None) == (decision == Decision.BLOCKED)        # blocked: None at its own position
        assert (reason == Reason.NONE) == (decision == Decision.ALLOWED)
    assert out.blocked == [d == Decision.BLOCKED for d in out.decisions]
    assert out.decisions[1] != Decision.ALLOWED, out.reports[1].mitigations    # a memorized photo's caption
    assert out.reports[1].first_flagged_step is not None
    images, decisions = guarded([NOVEL[0], MEMORIZED], num_inference_steps=8, generator=[_gen(1), _gen(2)],
                                return_dict=False)
    assert decisions == out.decisions
    # monitor, set on the object or per call: everything released, ALLOWED, with the reason it would have had
    guarded.mode = "monitor"
    watched = guarded([NOVEL[0], MEMORIZED], num_inference_steps=8, generator=[_gen(1), _gen(2)], output_type="pt")
    assert watched.decisions == [Decision.ALLOWED, Decision.ALLOWED]
    assert all(isinstance(im, torch.Tensor) and im.shape[0] == 3 for im in watched.images)
    assert watched.reasons[1] == Reason.MEMORIZATION
    per_call = guarded(MEMORIZED, num_inference_steps=8, generator=_gen(2), mode=GuardMode.ENFORCE)
    assert per_call.decisions == out.decisions[1:] and guarded.mode == GuardMode.MONITOR


@needs_testbed
def test_refuses_what_would_bypass_the_guard(off):
    with pytest.raises(TypeError, match="latents"):
        off("a red apple", latents=torch.zeros(1, 4, 16, 16))
    with pytest.raises(TypeError, match="output_type"):
        off("a red apple", output_type="latent")
    with pytest.raises(TypeError, match="prompt_embeds"):
        off("a red apple", prompt_embeds=torch.zeros(1, 77, 32))
    with pytest.raises(InvalidInput, match="mode"):
        off.mode = "loose"


def test_guard_is_exported_lazily_from_outside_the_repository(tmp_path):
    code = ("import sys, memguard\n"
            "light = 'torch' not in sys.modules and 'memguard.wrap' not in sys.modules\n"
            "print(light, memguard.guard.__module__, memguard.MemGuardPipelineOutput.__name__, "
            "'guard' in dir(memguard))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["True", "memguard.wrap", "MemGuardPipelineOutput", "True"]
