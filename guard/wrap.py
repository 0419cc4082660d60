"""`memguard.guard(pipe, ...)`: a guarded pipeline that is called like the diffusers pipeline it wraps.

    import torch, memguard
    from memguard.loading import load_pipeline

    guarded = memguard.guard(load_pipeline(), index="guard/testbed/index", policy="guard/testbed/policy.json")
    out = guarded("a red circle on a blue plain background", num_inference_steps=30,
                  generator=torch.Generator().manual_seed(1))
    out.images[0], out.decisions[0], out.reasons[0]      # PIL image (None if blocked), ALLOWED, NONE

Underneath it is `GuardedPipeline.generate` (memguard.pipeline), the one guarded loop the CLI and
the server use: the call becomes one `GenerationRequest` per image; nothing here denoises.

The output, `MemGuardPipelineOutput`, is a diffusers `BaseOutput` like `StableDiffusionPipelineOutput`
(which carries `nsfw_content_detected` beside the images): per image, in diffusers' order (prompt
major, then `num_images_per_prompt`), its decision, the coarse reason, its seed and its report.
**A blocked image is None** in `images`, at its own position, so `images[i]` always belongs to
`decisions[i]`; `images` is therefore a list for every `output_type` ("pil": PIL images, "np":
float32 [H, W, 3] in [0, 1], "pt": float32 [3, H, W]), never one stacked array.

Released pixels are the ones the final screen saw: the guard decodes to uint8 (diffusers'
`numpy_to_pil` rounding), so "pil" output is bit-identical to diffusers' own, and "np"/"pt" are
those uint8 values / 255 (within 0.5/255 of diffusers' unrounded floats).

Generators (`generator=`, one or one per image, as in diffusers) are honoured through seeds, since
the guard draws each image's noise from its own seed (and uses that seed again for a reroute's
fresh start and a second pass):

- a freshly seeded generator (`torch.Generator().manual_seed(s)`, state untouched) gives seed `s`,
  and the image's starting noise is diffusers' (`torch.randn` of the latent shape on that
  generator), so mode OFF returns the plain pipeline's image exactly; one generator per image
  (a list) does so for every image;
- one generator for several images: image j gets seed `s + j` (the guard's own convention);
  diffusers draws all of them from one stream instead, so images after the first differ from
  diffusers' (the first is the same: CPU `randn` fills a batch in order, in blocks of 16 values,
  and an SD latent's size is a multiple of 16);
- a generator already used: a seed is drawn from it (reproducible from its state, not
  diffusers' noise);
- after the call the generator is advanced exactly as diffusers' call would have advanced it (fresh
  case) so that code reusing it keeps its own sequence;
- noise is always drawn on the CPU: a CUDA generator gives its seed's CPU noise, not diffusers'
  CUDA noise.

Differences from diffusers' `__call__` beyond these: classifier-free guidance always runs (diffusers
skips the unconditional pass when `guidance_scale <= 1`); `latents`, `prompt_embeds`, callbacks,
`eta != 0`, `guidance_rescale != 0`, `cross_attention_kwargs` and `output_type="latent"` are refused
with a TypeError (each would bypass or change what the guard scores). `on_step` receives the guard's
`StepEvent`s per image instead.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers.utils import BaseOutput

from memguard.errors import InvalidInput
from memguard.pipeline import GuardConfig, GuardedPipeline, PipelineStats
from memguard.policy import Policy
from memguard.types import Decision, FaceAction, GenerationRequest, GuardMode, GuardReport, Reason, StepEvent

log = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt")
SEED_SPACE = 2 ** 63                  # GenerationRequest.seed lies in 0..2^63-1
# diffusers __call__ arguments that the guarded loop does not take, and why
_REFUSED = {
    "latents": "the guard draws each image's noise from its seed (pass generator=)",
    "prompt_embeds": "the guard encodes the prompt itself (pass prompt=)",
    "negative_prompt_embeds": "the guard encodes the negative prompt itself (pass negative_prompt=)",
    "ip_adapter_image": "not supported by the guarded loop",
    "ip_adapter_image_embeds": "not supported by the guarded loop",
    "cross_attention_kwargs": "the guard owns the attention processors",
    "callback": "use on_step= (the guard's per-step events)",
    "callback_steps": "use on_step= (the guard's per-step events)",
    "callback_on_step_end": "use on_step= (the guard's per-step events)",
    "callback_on_step_end_tensor_inputs": "use on_step= (the guard's per-step events)",
    "timesteps": "the guard sets the scheduler's timesteps from num_inference_steps",
    "sigmas": "the guard sets the scheduler's timesteps from num_inference_steps",
    "clip_skip": "not supported by the guarded loop",
}


@dataclass
class MemGuardPipelineOutput(BaseOutput):
    """Per image, in diffusers' order: the image (None if blocked), decision, reason, seed, report."""
    images: list
    decisions: list[Decision]
    reasons: list[Reason]
    seeds: list[int]
    reports: list[GuardReport]

    @property
    def blocked(self) -> list[bool]:
        return [d == Decision.BLOCKED for d in self.decisions]


def guard(pipe, index=None, policy=None, *, mode: GuardMode | str = GuardMode.ENFORCE,
          face_action: FaceAction | str = FaceAction.BLUR,
          config: GuardConfig = GuardConfig()) -> "GuardedDiffusionPipeline":
    """Wrap a diffusers SD 1.x/2.x pipeline: the result is called like `pipe`, guarded.

    `index`: a FingerprintIndex or its directory (False: none); `policy`: a Policy or its JSON file.
    For a shipped testbed's pipeline (memguard.loading.load_pipeline()) both default to the testbed's
    own; for any other model give them (without an index every guarded image fails closed: BLOCKED,
    SCREENING_FAILED; mode off needs none). `mode` (enforce, monitor, off) and `face_action` (blur, pixelate, block) are
    defaults that the attributes of the same name and each call's keywords override."""
    return GuardedDiffusionPipeline(pipe, index, policy, mode=mode, face_action=face_action, config=config)


class GuardedDiffusionPipeline:
    """A diffusers text-to-image pipeline behind the guard; see the module docstring."""

    def __init__(self, pipe, index=None, policy=None, *, mode: GuardMode | str = GuardMode.ENFORCE,
                 face_action: FaceAction | str = FaceAction.BLUR, config: GuardConfig = GuardConfig()):
        from memguard.calibrate import calibration_warnings

        index, policy = _resolve(pipe, index, policy)
        self.pipe = pipe
        self.guarded = GuardedPipeline(pipe, index=index, policy=policy, config=config)
        self.mode = mode
        self.face_action = face_action
        self.last_stats: PipelineStats | None = None
        for warning in calibration_warnings(self.guarded.policy, index):
            log.warning(warning)
        if index is None and self.mode != GuardMode.OFF:
            log.warning("memguard.guard without a fingerprint index: every guarded image fails closed (BLOCKED)")

    @property
    def mode(self) -> GuardMode:
        return self._mode

    @mode.setter
    def mode(self, value: GuardMode | str) -> None:
        self._mode = _enum(GuardMode, value, "mode")

    @property
    def face_action(self) -> FaceAction:
        return self._face_action

    @face_action.setter
    def face_action(self, value: FaceAction | str) -> None:
        self._face_action = _enum(FaceAction, value, "face_action")

    @property
    def index(self):
        return self.guarded.index

    @property
    def policy(self) -> Policy:
        return self.guarded.policy

    def __call__(self, prompt: str | Sequence[str], height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: str | Sequence[str] | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True, *, eta: float = 0.0, guidance_rescale: float = 0.0,
                 mode: GuardMode | str | None = None, face_action: FaceAction | str | None = None,
                 on_step: Callable[[int, StepEvent], None] | None = None, **kwargs):
        """Like `StableDiffusionPipeline.__call__` (diffusers' defaults); returns MemGuardPipelineOutput,
        or (images, decisions) with return_dict=False. `on_step(i, event)`: image i's step events."""
        refused = {k: _REFUSED.get(k, "not an argument of the guarded pipeline") for k, v in kwargs.items()
                   if v is not None}
        if eta:
            refused["eta"] = "the guarded loop steps the scheduler deterministically (eta=0)"
        if guidance_rescale:
            refused["guidance_rescale"] = "not supported by the guarded loop"
        if output_type not in OUTPUT_TYPES:
            refused["output_type"] = (f"{output_type!r}: one of {OUTPUT_TYPES} (the guard screens decoded images, "
                                      "so latents are never released)")
        if refused:
            raise TypeError("memguard.guard: " + "; ".join(f"{k}: {why}" for k, why in refused.items()))
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = _negatives(negative_prompt, len(prompts))
        if num_images_per_prompt < 1:
            raise InvalidInput("num_images_per_prompt", f"{num_images_per_prompt} < 1")
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        height, width = height or size, width or size
        n = len(prompts) * num_images_per_prompt
        latent_shape = (self.pipe.unet.config.in_channels, height // self.pipe.vae_scale_factor,
                        width // self.pipe.vae_scale_factor)
        seeds = seeds_from_generator(generator, n, latent_shape, self.pipe.text_encoder.dtype)
        run_mode = self.mode if mode is None else _enum(GuardMode, mode, "mode")
        run_face = self.face_action if face_action is None else _enum(FaceAction, face_action, "face_action")
        requests = [GenerationRequest(prompt=prompts[j // num_images_per_prompt],
                                      negative_prompt=negatives[j // num_images_per_prompt], height=height,
                                      width=width, steps=num_inference_steps, guidance_scale=guidance_scale,
                                      seed=seeds[j], num_images=1, mode=run_mode, face_action=run_face)
                    for j in range(n)]
        batch = self.guarded.generate(requests, on_step=on_step)
        self.last_stats = batch.stats
        results = [rs[0] for rs in batch.results]
        images = [None if r.image is None else _convert(r.image, output_type) for r in results]
        decisions = [r.decision for r in results]
        if not return_dict:
            return images, decisions
        return MemGuardPipelineOutput(images=images, decisions=decisions, reasons=[r.reason for r in results],
                                      seeds=[r.seed for r in results], reports=[r.report for r in results])

    def __repr__(self) -> str:
        index = getattr(self.index, "path", None)
        return (f"GuardedDiffusionPipeline({type(self.pipe).__name__}, index={str(index) if index else None}, "
                f"mode={self.mode.value}, policy_calibrated={self.policy.calibrated})")


def seeds_from_generator(generator, n: int, latent_shape: tuple[int, ...],
                         dtype: torch.dtype = torch.float32) -> list[int | None]:
    """One seed per image from diffusers' `generator` argument (None: the guard draws fresh seeds).

    A freshly seeded generator gives its seed (image j of a shared one: seed + j) and is then advanced
    by the draw diffusers would have made (`randn` of [n, *latent_shape], or [1, *latent_shape] for
    each generator of a list); a generator in any other state gives a seed drawn from it."""
    if generator is None:
        return [None] * n
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        elif len(generator) != n:
            raise InvalidInput("generator", f"a list of {len(generator)} generators for {n} images "
                                            "(give one, or one per image)")
        else:
            return [_seed_of(g, (1, *latent_shape), dtype) for g in generator]
    base = _seed_of(generator, (n, *latent_shape), dtype)
    return [(base + j) % SEED_SPACE for j in range(n)]


def _seed_of(g: torch.Generator, draw: tuple[int, ...], dtype: torch.dtype) -> int:
    if not isinstance(g, torch.Generator):
        raise InvalidInput("generator", f"expected torch.Generator, got {type(g).__name__}")
    seed = g.initial_seed()
    fresh = torch.Generator(device=g.device).manual_seed(seed)
    if seed < SEED_SPACE and torch.equal(g.get_state(), fresh.get_state()):
        torch.randn(draw, generator=g, device=g.device, dtype=dtype)   # advance it as diffusers' call does
        return seed
    return int(torch.randint(0, SEED_SPACE - 1, (1,), generator=g, device=g.device))


def _resolve(pipe, index, policy):
    """Paths → objects; for a shipped testbed's pipeline, its own index and policy by default."""
    from memguard.calibrate import testbed_of

    source = getattr(getattr(pipe, "config", None), "_name_or_path", None) or getattr(pipe, "name_or_path", None)
    testbed = testbed_of(source) if source and os.path.isdir(str(source)) else None
    if index is False:
        index = None
    elif index is None and testbed is not None and testbed.index_dir.is_dir():
        index = testbed.index_dir
    if policy is None and testbed is not None and testbed.policy_path.is_file():
        policy = testbed.policy_path
    if isinstance(index, (str, os.PathLike)):
        from memguard.index.api import FingerprintIndex
        index = FingerprintIndex.open(Path(index), device=str(pipe.device))
    if isinstance(policy, (str, os.PathLike)):
        policy = Policy.load(Path(policy))
    return index, policy


def _negatives(negative_prompt, count: int) -> list[str]:
    if negative_prompt is None:
        return [""] * count
    if isinstance(negative_prompt, str):
        return [negative_prompt] * count
    negatives = list(negative_prompt)
    if len(negatives) != count:
        raise InvalidInput("negative_prompt", f"{len(negatives)} negative prompts for {count} prompts")
    return negatives


def _enum(kind, value, name: str):
    try:
        return kind(value.value if isinstance(value, kind) else str(value).lower())
    except ValueError:
        raise InvalidInput(name, f"{value!r} is not one of {[m.value for m in kind]}") from None


def _convert(image: np.ndarray, output_type: str):
    """A released uint8 [H, W, 3] image in the caller's output type."""
    if output_type == "pil":
        from PIL import Image
        return Image.fromarray(image)
    array = image.astype(np.float32) / 255.0
    return array if output_type == "np" else torch.from_numpy(array).permute(2, 0, 1).contiguous()
