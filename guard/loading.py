"""Loading a local diffusers pipeline, and plain (unguarded) sampling through diffusers itself.

Plain sampling is the baseline the guard is judged against: the testbed report and the quality
benchmark use diffusers' own `__call__`, so a copy is established independently of our code.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from memguard.errors import MissingResource

TESTBED_MODEL_DIR = Path(__file__).resolve().parent / "testbed" / "model"


def load_pipeline(model_dir: str | os.PathLike | None = None, *, device: str = "cpu",
                  dtype: torch.dtype = torch.float32):
    """A supported diffusers pipeline from a local directory (default: the testbed). Never downloads.

    The model family comes from model_index.json's `_class_name` (memguard.families): SD 1.x/2.x
    (StableDiffusionPipeline) or SDXL (StableDiffusionXLPipeline); any other class is an
    UnsupportedModel error naming it and the supported ones.
    """
    import diffusers

    from memguard.families import family_for_directory, pipeline_class_name

    path = Path(model_dir) if model_dir is not None else TESTBED_MODEL_DIR
    if not (path / "model_index.json").is_file():
        hint = "build it with `memguard testbed build`" if model_dir is None else "pass a pipeline directory"
        raise MissingResource(f"no diffusers pipeline at {path} (model_index.json missing): {hint}")
    family = family_for_directory(path)
    cls = getattr(diffusers, pipeline_class_name(path))
    pipe = cls.from_pretrained(path, local_files_only=True, **_load_options(dtype), **family.load_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_options(dtype: torch.dtype) -> dict:
    """from_pretrained's dtype and memory options, so that loading warns about nothing a user can act on.

    Recent diffusers (0.42 here) take `dtype` and warn on `torch_dtype` (FutureWarning); older ones
    know only `torch_dtype`. low_cpu_mem_usage defaults to True and, without accelerate (not a dependency:
    nothing here needs it), warns "install accelerate" on every load and falls back to False: ask
    for it only where accelerate is installed."""
    from diffusers.utils import deprecation_utils, is_accelerate_available

    dtype_key = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    return {dtype_key: dtype, "low_cpu_mem_usage": is_accelerate_available()}


@torch.no_grad()
def sample_plain(pipe, prompts: list[str], seeds: list[int], *, steps: int = 30, guidance_scale: float = 7.5,
                 batch_size: int = 16) -> np.ndarray:
    """Unguarded images, one per (prompt, seed) pair. Returns uint8 [N, H, W, 3]."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        images = pipe(prompts[i:i + batch_size], generator=gens, num_inference_steps=steps,
                      guidance_scale=guidance_scale, height=size, width=size, output_type="np").images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)
