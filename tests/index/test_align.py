"""The aligned re-score (memguard.index.align) against a direct per-hypothesis reference."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memguard.index.align import ALIGN_MIN_REST, ALIGN_REST, aligned_scores, hypotheses, latent_map, standout

C, G = 4, 16


def _unit_ref(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    return x.flatten() / x.flatten().norm()


def _reference(query: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """One item, one hypothesis at a time."""
    q = _unit_ref(torch.from_numpy(query.astype(np.float32)).view(C, G, G))
    out = []
    for m in maps:
        item = torch.from_numpy(m.astype(np.float32)).view(1, C, G, G)
        best = -2.0
        for theta in hypotheses():
            grid = F.affine_grid(theta[None], [1, C, G, G], align_corners=False)
            warped = F.grid_sample(item, grid, padding_mode="border", align_corners=False)[0]
            best = max(best, float(_unit_ref(warped) @ q))
        out.append(best)
    return np.array(out, np.float32)


def _smooth_maps(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random maps with image-like spatial correlation (white noise upsampled from 4×4)."""
    coarse = torch.from_numpy(rng.standard_normal((n, C, 4, 4)).astype(np.float32))
    fine = F.interpolate(coarse, size=(G, G), mode="bicubic", align_corners=False)
    fine = fine + 0.1 * torch.from_numpy(rng.standard_normal((n, C, G, G)).astype(np.float32))
    return fine.flatten(1).numpy().astype(np.float16)


def test_aligned_scores_match_the_direct_reference():
    rng = np.random.default_rng(11)
    maps = rng.standard_normal((12, C * G * G)).astype(np.float16)
    query = rng.standard_normal(C * G * G).astype(np.float16)
    np.testing.assert_allclose(aligned_scores(query, maps, C), _reference(query, maps), atol=1e-5)
    assert aligned_scores(query, maps[:0], C).shape == (0,)


def test_a_crop_of_an_item_stands_out_among_look_alikes():
    rng = np.random.default_rng(12)
    maps = _smooth_maps(rng, 60)
    source = torch.from_numpy(maps[17].astype(np.float32)).view(1, C, G, G)
    # the query: 85 % of the source, off-centre, resampled to the full grid (a cropped repost)
    theta = torch.tensor([[[0.85, 0.0, 0.1], [0.0, 0.85, -0.1]]])
    crop = F.grid_sample(source, F.affine_grid(theta, [1, C, G, G], align_corners=False), align_corners=False)
    query = crop.flatten().numpy().astype(np.float16)
    plain = [float(_unit_ref(torch.from_numpy(m.astype(np.float32)).view(C, G, G))
                   @ _unit_ref(crop[0])) for m in maps]
    scores = aligned_scores(query, maps, C)
    assert scores[17] > 0.99 > plain[17]             # the right hypothesis undoes the crop
    best, z = standout(scores)
    assert best == 17 and z > 6
    # a query that is not in the set: nothing stands out that far
    other = _smooth_maps(np.random.default_rng(99), 1)[0]
    assert standout(aligned_scores(other, maps, C))[1] < z / 2


def test_standout_statistic():
    rng = np.random.default_rng(13)
    scores = rng.uniform(0.2, 0.6, 80).astype(np.float32)
    scores[33] = 0.95
    best, z = standout(scores)
    rest = np.sort(scores)[::-1][1:1 + ALIGN_REST].astype(np.float64)
    assert best == 33 and z == pytest.approx((0.95 - rest.mean()) / rest.std(), rel=1e-5)
    assert standout(scores[:ALIGN_MIN_REST]) is None


def test_latent_map_pools_to_the_grid_and_keeps_values():
    x = torch.randn(2, C, 64, 64)
    m = latent_map(x, G)
    assert m.shape == (2, C * G * G) and m.dtype == np.float16
    np.testing.assert_allclose(m.astype(np.float32), F.adaptive_avg_pool2d(x, G).flatten(1).numpy(), atol=2e-3)
    small = torch.randn(1, C, G, G)
    np.testing.assert_allclose(latent_map(small, G).astype(np.float32), small.flatten(1).numpy(), atol=5e-3)
