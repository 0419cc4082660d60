"""What one model family is to the guard: a small adapter over a diffusers pipeline's components.

The guarded denoising loop (guard/pipeline.py) is one loop for every family. What differs between
families is local and small, and lives here behind `FamilyAdapter`:

- how prompts become the denoiser's conditioning (`encode`): the per-token context that
  cross-attention reads (the guard's token mass comes from it) and any per-sample added
  conditioning (SDXL's pooled text embedding and size/crop time ids);
- how the denoiser is called (`denoise`);
- how its output becomes ε (`to_eps`) and back (`from_eps`): the guard's signals live in ε-space,
  x̂0 = (x_t − √(1−ᾱ)·ε)/√ᾱ;
- how latents become pixels (`decode`): the VAE's scaling factor, and shift or per-channel
  mean/std where the VAE has them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch

from memguard.errors import InvalidInput

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class PromptEncoding:
    """A batch's conditioning, one row per sample.

    cond / uncond: [B, T, D] per-token context (T = 77 CLIP tokens for the UNet families).
    eos: per sample, the position of the first end-of-text token among the T (token mass, and the
    attention mitigation's padding mask).
    added_cond / added_uncond: per-sample added conditioning, batch-first tensors keyed as the
    denoiser takes them (SDXL: "text_embeds" [B, P], "time_ids" [B, 6]); empty for SD 1.x/2.x.
    """
    cond: torch.Tensor
    uncond: torch.Tensor
    eos: list[int]
    added_cond: dict[str, torch.Tensor] = field(default_factory=dict)
    added_uncond: dict[str, torch.Tensor] = field(default_factory=dict)


class FamilyAdapter:
    """One family's encode / denoise / ε / decode over a diffusers pipeline (subclass per family)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    pipeline_classes: ClassVar[tuple[str, ...]] = ()   # model_index.json `_class_name`s it serves
    load_kwargs: ClassVar[dict] = {}                    # extra from_pretrained arguments

    def __init__(self, pipe):
        self.pipe = pipe
        prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise InvalidInput("model", f"prediction_type {prediction!r} is not supported ({', '.join(PREDICTION_TYPES)})")
        self.prediction_type = prediction

    # ---- what the loop reads -----------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    @property
    def default_size(self) -> int:
        """The image side the model was built for (pixels)."""
        size = self.denoiser.config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size) * self.vae_scale_factor

    @property
    def v_prediction(self) -> bool:
        return self.prediction_type == "v_prediction"

    # ---- per family ---------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negatives: Sequence[str], *, height: int, width: int,
               device: torch.device) -> PromptEncoding:
        raise NotImplementedError

    def denoise(self, model_in: torch.Tensor, t, context: torch.Tensor,
                added: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoiser's raw output for [2B] rows (uncond rows, then cond rows)."""
        raise NotImplementedError

    def to_eps(self, out: torch.Tensor, x_t: torch.Tensor, ab: float) -> torch.Tensor:
        """The denoiser's output as ε, for DDPM-space x_t at ᾱ = ab."""
        if not self.v_prediction:
            return out
        return ab ** 0.5 * out + (1 - ab) ** 0.5 * x_t        # ε = √ᾱ·v + √(1−ᾱ)·x_t

    def from_eps(self, eps: torch.Tensor, x_t: torch.Tensor, ab: float) -> torch.Tensor:
        """ε back into what the scheduler expects (the model's own prediction type)."""
        if not self.v_prediction:
            return eps
        return (eps - (1 - ab) ** 0.5 * x_t) / ab ** 0.5     # the scheduler wants v back

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion-space latents → the VAE decoder's input: undo scaling (and shift, mean/std)."""
        cfg = self.pipe.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            c = latents.shape[1]
            mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, c, 1, 1)
            std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, c, 1, 1)
            return latents * std / cfg.scaling_factor + mean
        shift = getattr(cfg, "shift_factor", None)
        out = latents / cfg.scaling_factor
        return out + shift if shift else out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [-1, 1], [B, 3, H, W], through the pipeline's VAE."""
        vae = self.pipe.vae
        return vae.decode(self.vae_latents(latents), return_dict=False)[0]
