"""The latent fingerprint: one definition, used by the index builder and the per-step signal.

A fingerprint is a compact, L2-normalised view of a latent image (a VAE latent or the
per-step prediction x̂0). Average pooling to a fixed grid keeps the layout and colours of the
image while discarding texture the denoiser has not settled yet; subtracting each channel's
mean makes cosine similarity insensitive to a global brightness/colour offset.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FINGERPRINT_GRID = 8


def fingerprint_dim(latent_channels: int, grid: int = FINGERPRINT_GRID) -> int:
    """Length F of the fingerprint of a latent with `latent_channels` channels."""
    return latent_channels * grid * grid


def latent_fingerprint(latents: torch.Tensor, grid: int = FINGERPRINT_GRID) -> torch.Tensor:
    """Reduce latents to fingerprints.

    latents: [B, C, h, w], any float dtype, h and w >= grid.
    returns: [B, C·grid·grid] float32, each row of unit L2 norm (zero rows stay zero).
    """
    if latents.ndim != 4:
        raise ValueError(f"latents must be [B, C, h, w], got shape {tuple(latents.shape)}")
    if latents.shape[-2] < grid or latents.shape[-1] < grid:
        raise ValueError(f"latents spatial size {tuple(latents.shape[-2:])} is smaller than grid {grid}")
    pooled = F.adaptive_avg_pool2d(latents.float(), grid)
    centred = pooled - pooled.mean(dim=(2, 3), keepdim=True)
    return F.normalize(centred.flatten(1), dim=1, eps=1e-12)
