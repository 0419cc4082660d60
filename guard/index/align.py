"""The aligned re-score: is one shortlisted item a crop, shift or small rotation of the query?

The plain latent fingerprint is a thumbnail: cropping 10-20 % of a picture moves every cell of it,
so a cropped copy scores like an unrelated image. Here each shortlisted item's latent *map* (the
VAE latent pooled to ALIGN_GRID², stored per item) is warped by a fixed set of affine hypotheses
(crops of 80-90 % per side on a 5×5 offset grid, ±3° and ±6° rotations) and compared with the
query's map; an item's aligned score is its best cosine over the hypotheses.

An absolute cut on that score cannot separate copies from look-alikes: near-duplicate families
of training items (the same shape on the same background) score as high as a true crop. The
decision statistic is therefore relative, as in the copy-detection literature's score
normalisation: how far the best item stands out from the next ones,

    z = (best − mean(next)) / std(next),   next = the following ALIGN_REST aligned scores.

A copy of a distinctive image stands out (z ≫ 1); a generic image, or one of a family of
near-identical items, does not. The threshold on z is calibrated like every other signal.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

ALIGN_GRID = 16        # latent maps are pooled to ALIGN_GRID × ALIGN_GRID before storing
ALIGN_SHORTLIST = 64   # items re-scored per query: the plain latent search's closest ones
ALIGN_REST = 50        # scores after the best one that form its reference distribution
ALIGN_MIN_REST = 8     # fewer candidates than this behind the best: no statistic
CROP_SCALES = (0.8, 0.85, 0.9)
ROTATIONS_DEG = (-6.0, -3.0, 3.0, 6.0)


@lru_cache(maxsize=1)
def hypotheses() -> torch.Tensor:
    """Affine sampling grids' parameters [H, 2, 3] (torch.affine_grid convention): the identity,
    crops on a 5×5 offset grid per scale, rotations at full size and at the middle crop scale."""
    params = [(1.0, 0.0, 0.0, 0.0)]
    for s in CROP_SCALES:
        for ox in np.linspace(-(1 - s), 1 - s, 5):
            for oy in np.linspace(-(1 - s), 1 - s, 5):
                params.append((s, float(ox), float(oy), 0.0))
    for deg in ROTATIONS_DEG:
        params += [(1.0, 0.0, 0.0, deg), (CROP_SCALES[1], 0.0, 0.0, deg)]
    theta = []
    for s, ox, oy, deg in params:
        c, si = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        theta.append([[s * c, -s * si, ox], [s * si, s * c, oy]])
    return torch.tensor(theta, dtype=torch.float32)


def latent_map(latents: torch.Tensor, grid: int = ALIGN_GRID) -> np.ndarray:
    """Scaled VAE latents [B, C, h, w] → stored maps [B, C·grid·grid] float16 (pooled, not normalised)."""
    return F.adaptive_avg_pool2d(latents.float(), grid).flatten(1).cpu().numpy().astype(np.float16)


def _unit(maps: torch.Tensor) -> torch.Tensor:
    """[N, C, g, g] → [N, C·g·g]: channel means removed, unit L2 (as the latent fingerprint)."""
    centred = maps - maps.mean(dim=(2, 3), keepdim=True)
    return F.normalize(centred.flatten(1), dim=1, eps=1e-12)


def aligned_scores(query: np.ndarray, maps: np.ndarray, channels: int) -> np.ndarray:
    """Best cosine over the hypotheses of each stored map warped onto the query.

    query: [C·g·g] one map; maps: [M, C·g·g] stored maps (any float dtype).
    returns: [M] float32 in [-1, 1].
    """
    m = len(maps)
    if m == 0:
        return np.zeros(0, np.float32)
    g = int(round(math.sqrt(query.size // channels)))
    theta = hypotheses()
    h = len(theta)
    # items folded into channels: one grid per hypothesis warps every item at once
    items = torch.from_numpy(np.asarray(maps, np.float32)).reshape(1, m * channels, g, g)
    q = _unit(torch.from_numpy(np.asarray(query, np.float32)).view(1, channels, g, g))[0]
    with torch.inference_mode():
        grids = F.affine_grid(theta, [h, m * channels, g, g], align_corners=False)
        warped = F.grid_sample(items.expand(h, -1, -1, -1), grids, padding_mode="border", align_corners=False)
        scores = _unit(warped.view(h * m, channels, g, g)) @ q
        return scores.view(h, m).amax(0).numpy().astype(np.float32)


def standout(scores: np.ndarray) -> tuple[int, float] | None:
    """(position of the best score, its z against the next ALIGN_REST) or None when too few scores."""
    if len(scores) < ALIGN_MIN_REST + 1:
        return None
    order = np.argsort(-scores, kind="stable")
    rest = scores[order[1:1 + ALIGN_REST]].astype(np.float64)
    z = (float(scores[order[0]]) - rest.mean()) / max(float(rest.std()), 1e-6)
    return int(order[0]), float(z)
