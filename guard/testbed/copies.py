"""An independent, pixel-space judge of near copies (not the guard's own signals).

A generated image is a near copy of a training image when it is structurally similar (SSIM) AND
close in colour (RMSE on [0, 1] pixels). The testbed's VAE caps how close any generation can get:
its reconstructions of the photos reach SSIM ≈ 0.8-0.95 (REPORT.md lists them), so the SSIM
threshold sits below that cap and well above what distinct training images score against each
other (the report shows both).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.metrics import structural_similarity

SSIM_THRESHOLD = 0.5
RMSE_THRESHOLD = 0.12


@dataclass(frozen=True)
class CopyScore:
    ssim: float
    rmse: float

    @property
    def is_copy(self) -> bool:
        return self.ssim >= SSIM_THRESHOLD and self.rmse <= RMSE_THRESHOLD


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 [H, W, 3] images (colour, 7×7 windows)."""
    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square difference on [0, 1] pixels."""
    d = a.astype(np.float32) / 255.0 - b.astype(np.float32) / 255.0
    return float(np.sqrt(np.mean(d * d)))


def copy_score(generated: np.ndarray, reference: np.ndarray) -> CopyScore:
    return CopyScore(ssim(generated, reference), rmse(generated, reference))


def nearest(generated: np.ndarray, references: np.ndarray, shortlist: int = 16) -> tuple[int, CopyScore]:
    """Best-matching reference by SSIM among the `shortlist` closest in RMSE. references: [M, H, W, 3]."""
    g = generated.astype(np.float32).reshape(1, -1) / 255.0
    r = references.astype(np.float32).reshape(len(references), -1) / 255.0
    dist = np.sqrt(((r - g) ** 2).mean(axis=1))
    candidates = np.argsort(dist)[:shortlist]
    scores = [(int(i), copy_score(generated, references[i])) for i in candidates]
    return max(scores, key=lambda s: s[1].ssim)
