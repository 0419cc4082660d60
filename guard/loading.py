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
    """A StableDiffusionPipeline from a local directory (default: the testbed). Never downloads."""
    from diffusers import StableDiffusionPipeline

    path = Path(model_dir) if model_dir is not None else TESTBED_MODEL_DIR
    if not (path / "model_index.json").is_file():
        hint = "build it with `memguard testbed build`" if model_dir is None else "pass a pipeline directory"
        raise MissingResource(f"no diffusers pipeline at {path} (model_index.json missing): {hint}")
    pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


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
