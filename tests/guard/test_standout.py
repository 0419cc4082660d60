"""The standout signal (guard/signals.py): how far the closest candidate stands out from the others."""
import math

import torch

from memguard.signals import Candidates, standout, track_similarity
from memguard.kernels.fingerprint import latent_fingerprint


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def _reference(fp, vec, mask, copy_cosine):
    """Per sample, by loops: log of (1 − the best cosine among candidates that are no copy of the
    best) over (1 − the best cosine)."""
    out = []
    for b in range(len(fp)):
        cos = [float(fp[b] @ vec[b, k]) if mask[b, k] else None for k in range(vec.shape[1])]
        valid = [k for k, c in enumerate(cos) if c is not None]
        if not valid:
            out.append(0.0)
            continue
        best = max(valid, key=lambda k: cos[k])
        others = [cos[k] for k in valid if k != best and float(vec[b, best] @ vec[b, k]) < copy_cosine]
        runner_up = max(others) if others else 0.0
        out.append(math.log(max(1 - runner_up, 1e-4) / max(1 - cos[best], 1e-4)))
    return torch.tensor(out)


def test_standout_matches_a_loop_reference_on_random_candidates():
    g = torch.Generator().manual_seed(0)
    B, K, C, h = 6, 8, 4, 16
    x0 = torch.randn(B, C, h, h, generator=g)
    fp = latent_fingerprint(x0)
    vec = _unit(torch.randn(B, K, fp.shape[1], generator=g))
    vec[:, 2] = _unit(fp + 0.3 * torch.randn(B, fp.shape[1], generator=g))        # a near match...
    vec[:, 5] = _unit(vec[:, 2] + 0.05 * torch.randn(B, fp.shape[1], generator=g))  # ...and its variant
    mask = torch.rand(B, K, generator=g) > 0.2
    mask[:, 2] = True
    mask[0] = False                                                                  # no candidate at all
    cands = Candidates(vec, mask, [[f"i{k}" for k in range(K)] for _ in range(B)])
    sim, idx, out = track_similarity(x0, cands, 0.95)
    torch.testing.assert_close(out, _reference(fp, vec, mask, 0.95), atol=1e-5, rtol=0)
    assert out[0] == 0 and sim[0] == 0 and idx[0] == -1


def test_a_duplicate_variant_of_the_best_is_not_its_runner_up():
    """One image stored twice (an unfolded near-duplicate) still stands out; at a copy threshold of 1
    (variants counted as rivals) it would not."""
    g = torch.Generator().manual_seed(1)
    fp = _unit(torch.randn(1, 64, generator=g))
    target = _unit(fp + 0.05 * torch.randn(1, 64, generator=g))
    variant = _unit(target + 0.01 * torch.randn(1, 64, generator=g))
    rivals = _unit(torch.randn(1, 3, 64, generator=g))
    vec = torch.cat([target[:, None], variant[:, None], rivals], dim=1)
    mask = torch.ones(1, 5, dtype=torch.bool)
    cands = Candidates(vec, mask, [["t", "v", "a", "b", "c"]])
    best_sim = (fp @ vec[0].T).amax(dim=1)
    best_idx = (fp @ vec[0].T).argmax(dim=1)
    apart = standout(fp, cands, best_idx, best_sim, copy_cosine=0.98)
    together = standout(fp, cands, best_idx, best_sim, copy_cosine=1.01)
    assert float(apart) > 1.0 and float(together) < 0.2


def test_a_far_best_match_does_not_stand_out_like_a_close_one():
    """Equal cosine gaps (0.3) to the runner-up: a best match at 0.95 stands out, one at 0.5 (an image
    unlike everything indexed) hardly: the ratio of distances, not the gap, carries it."""
    e = torch.eye(3)
    fp = torch.tensor([[1.0, 0.0, 0.0]])

    def with_best(cos_best: float, cos_second: float) -> float:
        best = torch.tensor([cos_best, (1 - cos_best ** 2) ** 0.5, 0.0])
        second = torch.tensor([cos_second, 0.0, (1 - cos_second ** 2) ** 0.5])
        vec = torch.stack([best, second, -e[1]])[None]
        cands = Candidates(vec, torch.ones(1, 3, dtype=torch.bool), [["a", "b", "c"]])
        return float(standout(fp, cands, torch.tensor([0]), torch.tensor([cos_best]), copy_cosine=0.98))

    close, far = with_best(0.95, 0.65), with_best(0.5, 0.2)
    assert math.isclose(close, math.log(0.35 / 0.05), rel_tol=1e-5)
    assert math.isclose(far, math.log(0.8 / 0.5), rel_tol=1e-5)
    assert close > 4 * far
