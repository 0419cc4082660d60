"""Reroute mitigations: steer one sample of a batch away from a memorized image, no UNet gradients.

The ladder (`MitigationConfig.rungs`), climbed one rung per failed re-verification. A reroute
must keep the caller's prompt: guidance always comes back, and a sample that would leave the
ladder without enough guided steps is blocked instead (`min_guided_fraction`, checked at the end),
and so is a rerouted image whose prompt no longer stands out in CLIP (guard/fidelity.py).
By default there is one rung: the push-away with a fresh start from noise seeded by the request's
seed and prompt (while x_t is still almost pure noise; later, the push alone); a sample still
heading to an indexed item after that is blocked, or, at the end, generated once more
(GuardConfig.second_pass). The fresh start keeps reroutes of different prompts apart: captions
that the model cannot tell apart (unknown words) otherwise reroute to one image. Measured with
`benchmarks/reroute_sweep.py` on the ε-testbed (2026-12-04): 80 web-style captions, one seed, max
pairwise SSIM of reroutes 0.999 push-first vs 0.774 with the fresh start (29 rerouted, 51 blocked,
vs 42 / 38); meaningful captions 15 of 16 rerouted to a non-copy at 0.93× novel CLIP (vs 13, 0.86×).
`attention`, `basin` and `embed_noise` are available rungs but not defaults. On the ε-testbed's compositional captions (16 generations,
`benchmarks/reroute_sweep.py`, 2026-12-03) every ladder with `attention` lost the prompt: rerouted
images scored 0.31× the testbed-CLIP of unguarded novel prompts and were near-identical across
prompts (SSIM up to 0.95), because masking the padding/summary tokens leaves a small text encoder's
conditioning almost empty (with `mask_eos=False` too: 0.31×; applied only at rung 2: 0.65×).
Holding guidance off in the basin gave 0.23×. The push alone at strength 4 rerouted 14 of 16 to a
non-copy at 0.88× (pairwise SSIM ≤ 0.15), 0 copies released; strength 1.5 rerouted 11, 3.0 13
(the sweep's baseline: 24 novel prompts, one seed; against `memguard.benchmarks.quality`'s 192: 0.96×).

* ``attention``: scale the BOS token's cross-attention logit (×1.25) and mask the end-of-text and
  padding tokens ("summary" tokens), on the sample's conditional rows (Ren et al., ECCV 2024);
* ``basin``: hold guidance off (or opposite) while the sample is inside the attraction basin
  (Jain et al., CVPR 2025), and restore normal guidance once it has left: when the policy's
  memorization score falls to the benign median (`Policy.basin_exit_score`), or at the latest
  after `basin_max_fraction` of the steps (the transition point). Guidance after the transition
  gives back the prompt's content; the push and the attention change keep it off the copy.
  A sample flagged while x_t is still almost pure noise is also *rewound* to its initial noise:
  the one or two guided steps it took already imprint the memorized image faintly, and an
  unguarded model amplifies that imprint (the basin);
* ``push``: move x̂0 away from every candidate it is close to, analytically (below);
* ``embed_noise``: Gaussian noise on the sample's prompt embedding (Somepalli et al., 2023);
* ``reseed``: fresh initial noise, allowed only while x_t is still almost pure noise.

Push-away: x̂0 = (x_t − √(1−ᾱ)·ε)/√ᾱ, so with ε kept, moving x_t by √ᾱ·δ moves x̂0 by exactly δ
(moving ε instead barely moves a DDIM trajectory: its next x_t re-noises x̂0 with the same ε).
For each candidate fingerprint c_k (unit, channel-centred, 8×8 per channel) closer than a floor
f (the benign similarity at this step plus `push_floor_z` benign std), δ removes a share k of
x̂0's pooled component along c_k: δ = up(−Σ_k k·(s_k − f)⁺·‖p‖·c_k), p the centred pooled x̂0,
s_k = cos(p, c_k), `up` a bilinear upsampling (smooth, unlike pooling's exact adjoint). Rerouted samples
get fresh candidates every few steps, so whichever training item the trajectory drifts towards
(often another memorized image: the unconditional model is full of them) is pushed away too.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memguard.kernels.fingerprint import FINGERPRINT_GRID

RUNG_NAMES = ("attention", "basin", "push", "embed_noise", "reseed")


@dataclass(frozen=True)
class MitigationConfig:
    rungs: tuple[tuple[str, ...], ...] = (("push", "reseed"),)
    bos_scale: float = 1.25            # Ren et al.'s factor on the BOS logit
    mask_eos: bool = True              # also mask the end-of-text token (padding is always masked)
    basin_guidance: float = 0.0        # guidance scale inside the basin: 0 none, < 0 opposite
    basin_max_fraction: float = 0.4    # the basin phase ends at the latest after this share of steps
    basin_exit: bool = True            # leave the basin when the memorization score is benign again (Jain et al.)
    min_guided_fraction: float = 0.5   # a rerouted image needs guidance on at least this share of steps
    rewind: bool = True                # entering the basin early, restart from the sample's own noise
    push_strength: float = 4.0         # gain on a close candidate's excess cosine, removed from x̂0 per step
    push_floor_z: float = 1.0          # push from candidates whose cosine z (benign-standardized) exceeds this
    push_until_fraction: float = 1.0   # push until this share of steps (the last steps pull back otherwise)
    embed_noise: float = 1.0           # noise std relative to the embedding's std
    reseed_max_alpha_bar: float = 0.05 # reseeding is a restart only while ᾱ_t is this small

    def __post_init__(self):
        for rung in self.rungs:
            for name in rung:
                if name not in RUNG_NAMES:
                    raise ValueError(f"unknown mitigation {name!r}; expected one of {RUNG_NAMES}")


def active_mitigations(config: MitigationConfig, rung: int) -> set[str]:
    """All mitigations in force at `rung` (1-based; rungs accumulate)."""
    return {name for r in config.rungs[:rung] for name in r}


def prompt_lengths(input_ids: torch.Tensor, eos_token_id: int) -> list[int]:
    """Position of the first end-of-text token of each tokenized prompt ([B, T] ids, on the host)."""
    rows = input_ids.tolist()
    return [row.index(eos_token_id) if eos_token_id in row else len(row) - 1 for row in rows]


def attention_rows(rerouted: list[bool], eos_positions: list[int], tokens: int, config: MitigationConfig,
                   device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """key_logit_scale and key_mask [2B, T] for the UNet's rows (uncond rows, then cond rows).

    Rerouted samples' cond rows get BOS × bos_scale and the padding masked; every other row is
    plain. None, None when no sample is rerouted: the kernel then runs without either.
    """
    if not any(rerouted):
        return None, None
    with torch.inference_mode(False):   # the kernel tracks the mask's version; inference tensors have none
        return _attention_rows(rerouted, eos_positions, tokens, config, device)


def _attention_rows(rerouted, eos_positions, tokens, config, device):
    batch = len(rerouted)
    scale = torch.ones(2 * batch, tokens)
    keep = torch.ones(2 * batch, tokens, dtype=torch.bool)
    for i, on in enumerate(rerouted):
        if on:
            row = batch + i
            scale[row, 0] = config.bos_scale
            last = eos_positions[i] - (1 if config.mask_eos else 0)
            keep[row, max(last, 0) + 1:] = False
    return scale.to(device), keep.to(device)


def push_away(x_t: torch.Tensor, x0_hat: torch.Tensor, alpha_bar: float, candidates: torch.Tensor,
              mask: torch.Tensor, active: torch.Tensor, floor: torch.Tensor | float, config: MitigationConfig,
              grid: int = FINGERPRINT_GRID) -> torch.Tensor:
    """The shift of x_t (DDPM space) that moves x̂0 away from every candidate closer than `floor`.

    x_t, x0_hat: [B, C, h, w]; candidates: [B, K, C·grid²] unit fingerprints, mask [B, K] (False:
    empty slot); active: [B] bool; floor: cosine below which a candidate is left alone (float or
    0-d tensor). Returns √ᾱ·δ, [B, C, h, w] (zero for inactive rows): added to x_t with ε kept,
    x̂0 moves by exactly δ. On-device, no host sync.
    """
    B, C, h, w = x0_hat.shape
    pooled = F.adaptive_avg_pool2d(x0_hat.float(), grid)
    centred = (pooled - pooled.mean(dim=(2, 3), keepdim=True)).flatten(1)      # [B, F]
    norm = centred.norm(dim=1).clamp_min(1e-12)
    cos = torch.einsum("bf,bkf->bk", centred, candidates.float()) / norm[:, None]          # [B, K]
    amount = config.push_strength * (cos - floor).clamp_min(0) * mask * active[:, None]    # [B, K]
    delta = -(torch.einsum("bk,bkf->bf", amount * norm[:, None], candidates.float())).view(B, C, grid, grid)
    # bilinear, not the pooling's exact adjoint (nearest): a smooth shift leaves no 8×8 block pattern
    return (alpha_bar ** 0.5) * F.interpolate(delta, size=(h, w), mode="bilinear", align_corners=False).to(x_t.dtype)


def sample_seed(seed: int, salt: str, prompt: str = "") -> int:
    """A deterministic derived seed (reroutes are reproducible for a given request seed and prompt).
    The prompt is part of it: two prompts the model renders alike from one noise (web-style captions
    it never learned) would otherwise be rerouted to one image (measured: pairwise SSIM 0.997)."""
    digest = hashlib.sha256(f"{seed}:{salt}".encode() + (b"\n" + prompt.encode() if prompt else b"")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def noisy_embedding(embedding: torch.Tensor, seed: int, config: MitigationConfig, prompt: str = "") -> torch.Tensor:
    """[T, D] prompt embedding plus Gaussian noise of std embed_noise · std(embedding)."""
    gen = torch.Generator("cpu").manual_seed(sample_seed(seed, "embed_noise", prompt))
    noise = torch.randn(embedding.shape, generator=gen, dtype=torch.float32).to(embedding.device)
    return (embedding.float() + config.embed_noise * embedding.float().std() * noise).to(embedding.dtype)


def fresh_noise(shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype,
                prompt: str = "") -> torch.Tensor:
    """Initial noise [1, C, h, w] of a seed derived from the request's seed and prompt (the reseed rung)."""
    gen = torch.Generator("cpu").manual_seed(sample_seed(seed, "reseed", prompt))
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def obfuscate_faces(image, boxes: list[tuple[int, int, int, int]], action: str, *, pixel_block: int = 8):
    """Blur or pixelate each (left, top, right, bottom) box of a uint8 [H, W, 3] image (a copy).

    The box is padded by a quarter of its size: detectors box the inner face, and a face whose
    hairline or jaw survives is still recognisable.
    """
    import numpy as np
    from PIL import Image, ImageFilter

    out = Image.fromarray(np.ascontiguousarray(image))
    H, W = image.shape[:2]
    for left, top, right, bottom in boxes:
        pw, ph = max(1, (right - left) // 4), max(1, (bottom - top) // 4)
        box = (max(0, left - pw), max(0, top - ph), min(W, right + pw), min(H, bottom + ph))
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        region = out.crop(box)
        if action == "pixelate":
            small = region.resize((max(1, region.width // pixel_block), max(1, region.height // pixel_block)),
                                  Image.BILINEAR)
            region = small.resize(region.size, Image.NEAREST)
        else:
            region = region.filter(ImageFilter.GaussianBlur(radius=max(2.0, region.width / 4)))
        out.paste(region, box[:2])
    return np.asarray(out, dtype=np.uint8).copy()
