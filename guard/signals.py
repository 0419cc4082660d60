"""Per-step memorization signals, computed on the device from tensors the step already holds.

Per sample and step (all float32, [B]):

* ``divergence``: ‖ε(x_t, c) − ε(x_t, ∅)‖₂ (Wen et al.), from `kernels.cfg_with_divergence`.
* ``entropy``: entropy (nats) of the cross-attention mass over the prompt's tokens, averaged over
  the UNet's cross-attention layers (Ren et al.), from the mass `kernels.cross_attention_with_stats`
  accumulates in `memguard.attention.AttentionControl`.
* ``bos``: the share of that mass on the BOS token (Ren et al.: memorized prompts pull mass off it).
* ``similarity``: cosine of the fingerprint of x̂0 to the sample's closest candidate training /
  protected item. Candidates come from the index once, at an early step (`retrieve`); after that
  `kernels.fingerprint_match` tracks them on the device, without decoding or embedding.
* ``standout``: how far that closest candidate stands out, as Lowe's ratio test for a distinctive
  match: log(d₂ / d₁), d = 1 − cosine, d₁ to the closest candidate, d₂ to the closest one that is
  not a copy of it (fingerprint cosine to it under the index's copy threshold). A memorized
  trajectory heads for one training image; a novel one lies among many alike. The ratio, not the
  cosine gap, because a generation unlike everything indexed (a prompt the model cannot draw) can
  have a large gap to a far-off best match, but not a small d₁. Near-duplicate variants of one
  image (not folded at build) do not count as the runner-up, so the most duplicated images, the
  likeliest memorized, still stand out.

No direction is fixed here: `memguard calibrate` learns how the signals combine for each model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from memguard import kernels

SIGNALS: tuple[str, ...] = ("divergence", "entropy", "bos", "similarity", "standout")
MIN_DISTANCE = 1e-4   # floor of 1 − cosine in the standout ratio


def attention_signals(mean_mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy over all tokens and BOS share of the layer-averaged token mass.

    mean_mass: [B, T] (cond rows of AttentionControl.mean_mass(), rows sum to 1).
    returns entropy [B], bos share [B], float32.
    """
    stats = kernels.attention_entropy(mean_mass[:, None, :], per_head=False)
    return stats.entropy, stats.bos_share


@dataclass
class Candidates:
    """Each sample's candidate training / protected items, on the device.

    vectors [B, K, F] float32 (unit fingerprints), mask [B, K] bool (False: empty slot),
    ids: per sample K item ids ("" for an empty slot). Membership information: audit scope only.
    """
    vectors: torch.Tensor
    mask: torch.Tensor
    ids: list[list[str]] = field(default_factory=list)

    @classmethod
    def empty(cls, batch: int, k: int, dim: int, device: torch.device) -> "Candidates":
        return cls(torch.zeros(batch, k, dim, device=device), torch.zeros(batch, k, dtype=torch.bool, device=device),
                   [[""] * k for _ in range(batch)])

    def keep(self, rows: torch.Tensor, row_list: list[int]) -> "Candidates":
        """The candidates of the rows still in the batch."""
        return Candidates(self.vectors[rows], self.mask[rows], [self.ids[i] for i in row_list])

    def replace(self, rows: list[int], ids: list[list[str]], vectors: torch.Tensor) -> None:
        """Put freshly retrieved candidates (vectors [len(rows), K', F], K' ≤ K) into `rows`."""
        k = min(vectors.shape[1], self.vectors.shape[1])
        index = torch.tensor(rows, device=self.vectors.device, dtype=torch.long)
        new_vec = torch.zeros(len(rows), *self.vectors.shape[1:], device=self.vectors.device)
        new_vec[:, :k] = vectors[:, :k].to(self.vectors.device, torch.float32)
        new_mask = torch.zeros(len(rows), self.mask.shape[1], dtype=torch.bool, device=self.mask.device)
        for j, item_ids in enumerate(ids):
            filled = [bool(x) for x in item_ids[:k]]
            new_mask[j, :len(filled)] = torch.tensor(filled, dtype=torch.bool)
            self.ids[rows[j]] = list(item_ids[:k]) + [""] * (self.mask.shape[1] - len(filled))
        self.vectors[index] = new_vec
        self.mask[index] = new_mask.to(self.mask.device)


def retrieve(index, x0_hat: torch.Tensor, k: int) -> tuple[list[list[str]], torch.Tensor, torch.Tensor]:
    """Nearest indexed items of each x̂0 (one host round trip): ids [B][K'], scores [B, K'] (cosine,
    best first), vectors [B, K', F]. Uses `kernels.latent_fingerprint`, the index's definition."""
    fingerprints = kernels.latent_fingerprint(x0_hat)
    ids, scores, vectors = index.search_latent(fingerprints, k)
    return ids, scores, vectors


def track_similarity(x0_hat: torch.Tensor, candidates: Candidates,
                     copy_cosine: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best cosine of fingerprint(x̂0) to each sample's candidates, and how far it stands out.

    returns best_sim [B], best_idx [B] (−1: no candidate), standout [B] (all float32 but the index).
    copy_cosine: fingerprint cosine at which two items are copies of one image (the index's latent
    copy threshold). A sample without any candidate gets similarity and standout 0 (not −inf, which
    would poison statistics); without a runner-up, the runner-up's cosine counts as 0.
    """
    sim, idx, fp = kernels.fingerprint_match(x0_hat, candidates.vectors, candidate_mask=candidates.mask)
    sim = torch.where(torch.isfinite(sim), sim, torch.zeros_like(sim))
    return sim, idx, standout(fp, candidates, idx, sim, copy_cosine)


def standout(fingerprints: torch.Tensor, candidates: Candidates, best_idx: torch.Tensor, best_sim: torch.Tensor,
             copy_cosine: float) -> torch.Tensor:
    """log((1 − c₂) / (1 − best_sim)), c₂ the best cosine among candidates that are not copies of the
    best one (0 if none). [B] float32; distances floored at MIN_DISTANCE (an exact match is finite).

    fingerprints [B, F] (the kernel's, unit rows); candidates as tracked; best_idx [B], best_sim [B].
    K ≤ 32 candidates of F ≤ 1024: two small batched products, no host sync.
    """
    vec, mask = candidates.vectors, candidates.mask
    cos = torch.einsum("bf,bkf->bk", fingerprints.float(), vec)
    best = vec[torch.arange(len(vec), device=vec.device), best_idx.clamp(min=0)]          # [B, F]
    same_image = torch.einsum("bf,bkf->bk", best, vec) >= copy_cosine
    same_image.scatter_(1, best_idx.clamp(min=0)[:, None], True)          # the best itself, whatever rounding
    runner_up = torch.where(mask & ~same_image, cos, torch.full_like(cos, -math.inf)).amax(dim=1)
    runner_up = torch.where(torch.isfinite(runner_up), runner_up, torch.zeros_like(runner_up))
    ratio = torch.log((1 - runner_up).clamp(min=MIN_DISTANCE) / (1 - best_sim).clamp(min=MIN_DISTANCE))
    return torch.where(best_idx >= 0, ratio, torch.zeros_like(best_sim))


def stack_signals(divergence: torch.Tensor, entropy: torch.Tensor, bos: torch.Tensor,
                  similarity: torch.Tensor, standout_: torch.Tensor) -> torch.Tensor:
    """[B, S] float32 in SIGNALS order."""
    return torch.stack([divergence.float(), entropy.float(), bos.float(), similarity.float(), standout_.float()],
                       dim=1)
