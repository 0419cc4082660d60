"""Fused "x0_hat → fingerprint → best match": one kernel from the step's latent to the score.

The fingerprint is the one defined by :func:`memguard.kernels.fingerprint.latent_fingerprint` (adaptive
average pooling to a FINGERPRINT_GRID × FINGERPRINT_GRID grid, per-channel mean removed, L2
normalised over C·grid·grid), followed by :func:`memguard.kernels.similarity.fingerprint_similarity`'s
best cosine match. The reference is literally that composition.

Triton kernel: grid (B, candidate chunks). Each program pools its sample's latent (C·h·w reads,
served from L2 after the first chunk's program), centres and normalises it in registers, then
streams its chunk of candidates like the similarity kernel; program (b, 0) also writes the
fingerprint. Adaptive pooling is done exactly as PyTorch does it (cell i covers rows
[⌊i·h/g⌋, ⌈(i+1)·h/g⌉)), so any h, w >= grid works, overlapping cells included.
"""
from __future__ import annotations

from typing import Optional

import torch

from memguard.kernels import dispatch, similarity
from memguard.kernels.dispatch import HAVE_TRITON, next_pow2, tl, triton
from memguard.kernels.fingerprint import FINGERPRINT_GRID, latent_fingerprint

NAME = "fingerprint_match"

if HAVE_TRITON:

    @triton.jit
    def _kernel(x_ptr, c_ptr, m_ptr, fp_ptr, psim_ptr, pidx_ptr, C, Hh, Ww, K, k_per_chunk,
                s_xb, s_xc, s_xh, s_xw, s_cb, s_ck, s_cf, s_mb, s_mk,
                G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                HAS_MASK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        GG: tl.constexpr = G * G
        offs_c = tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        cell = tl.arange(0, GG)
        ci = cell // G
        cj = cell % G
        r0 = (ci * Hh) // G
        r1 = ((ci + 1) * Hh + G - 1) // G
        q0 = (cj * Ww) // G
        q1 = ((cj + 1) * Ww + G - 1) // G
        inv_area = 1.0 / ((r1 - r0) * (q1 - q0)).to(tl.float32)

        # adaptive average pooling: pooled[c, cell] = Σ_p x[c, p] · [p in cell] / area(cell)
        pooled = tl.zeros([BLOCK_C, GG], tl.float32)
        P = Hh * Ww
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_ok = offs_p < P
            y = offs_p // Ww
            xx = offs_p % Ww
            x = tl.load(x_ptr + b * s_xb + offs_c[:, None] * s_xc + y[None, :] * s_xh + xx[None, :] * s_xw,
                        mask=c_ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32)
            inside = ((y[:, None] >= r0[None, :]) & (y[:, None] < r1[None, :])
                      & (xx[:, None] >= q0[None, :]) & (xx[:, None] < q1[None, :]))
            wgt = tl.where(inside, inv_area[None, :], 0.0)                       # [BLOCK_P, GG]
            pooled += tl.sum(x[:, :, None] * wgt[None, :, :], axis=1)

        mean = tl.sum(pooled, axis=1) / GG
        cen = tl.where(c_ok[:, None], pooled - mean[:, None], 0.0)
        fp = cen / tl.maximum(tl.sqrt(tl.sum(tl.sum(cen * cen, axis=1), axis=0)), 1e-12)
        f_idx = offs_c[:, None] * GG + cell[None, :]                            # [BLOCK_C, GG]
        tl.store(fp_ptr + b * C * GG + f_idx, fp, mask=c_ok[:, None] & (chunk == 0))
        fp_norm = tl.maximum(tl.sqrt(tl.sum(tl.sum(fp * fp, axis=1), axis=0)), 1e-12)

        best = tl.full([1], float("-inf"), tl.float32)
        best_i = tl.full([1], -1, tl.int64)
        k_start = chunk * k_per_chunk
        k_end = tl.minimum(k_start + k_per_chunk, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            k_ok = offs_k < k_end
            cand = tl.load(c_ptr + b * s_cb + offs_k[:, None, None] * s_ck + f_idx[None, :, :] * s_cf,
                           mask=k_ok[:, None, None] & c_ok[None, :, None], other=0.0).to(tl.float32)
            dot = tl.sum(tl.sum(cand * fp[None, :, :], axis=2), axis=1)
            cn = tl.sum(tl.sum(cand * cand, axis=2), axis=1)
            sim = dot / (fp_norm * tl.maximum(tl.sqrt(cn), 1e-12))
            valid = k_ok & (sim == sim)
            if HAS_MASK:
                cm = tl.load(m_ptr + b * s_mb + offs_k * s_mk, mask=k_ok, other=0)
                valid = valid & (cm != 0)
            sim = tl.where(valid, sim, float("-inf"))
            blk_max, blk_arg = tl.max(sim, axis=0, return_indices=True, return_indices_tie_break_left=True)
            upd = blk_max > best
            best = tl.where(upd, blk_max, best)
            best_i = tl.where(upd, k0 + blk_arg.to(tl.int64), best_i)
        one = tl.arange(0, 1)
        tl.store(psim_ptr + b * tl.num_programs(1) + chunk + one, best)
        tl.store(pidx_ptr + b * tl.num_programs(1) + chunk + one, best_i)
else:  # pragma: no cover
    _kernel = None


def _check(latents, candidates, candidate_mask, grid):
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        raise ValueError(f"latents must be [B, C, h, w], got {getattr(latents, 'shape', type(latents))}")
    if not latents.is_floating_point():
        raise TypeError(f"latents must be floating point, got {latents.dtype}")
    if latents.shape[-2] < grid or latents.shape[-1] < grid:
        raise ValueError(f"latents spatial size {tuple(latents.shape[-2:])} is smaller than grid {grid}")
    B, C = latents.shape[:2]
    return similarity.check_candidates(B, C * grid * grid, latents.device, candidates, candidate_mask)


def _reference(latents, candidates, shared, mask, grid):
    fp = latent_fingerprint(latents, grid)
    sim, idx = similarity._reference(fp, candidates, shared, mask)
    return sim, idx, fp


def fingerprint_match_reference(latents: torch.Tensor, candidates: torch.Tensor, *,
                                candidate_mask: Optional[torch.Tensor] = None,
                                grid: int = FINGERPRINT_GRID
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of :func:`fingerprint_match`: latent_fingerprint, then the similarity reference."""
    shared, mask = _check(latents, candidates, candidate_mask, grid)
    return _reference(latents, candidates, shared, mask, grid)


def _blocks(C, P, K, grid, interpret):
    block_c = max(2, next_pow2(C))
    gg = grid * grid
    if interpret:
        block_p = max(16, min(next_pow2(P), (1 << 18) // (block_c * gg)))
        block_k = max(1, min(next_pow2(K), (1 << 19) // (block_c * gg)))
        return block_c, block_p, block_k, 1
    block_p = max(1, min(64, 8192 // (block_c * gg)))
    block_k = max(1, min(32, 2048 // (block_c * gg)))
    return block_c, block_p, block_k, None


def _launch(latents, candidates, shared, mask, grid, blocks=None):
    B, C, Hh, Ww = latents.shape
    K = candidates.shape[-2]
    dev = latents.device
    fp = torch.empty((B, C * grid * grid), dtype=torch.float32, device=dev)
    if B == 0:
        return torch.empty(0, device=dev), torch.empty(0, dtype=torch.int64, device=dev), fp
    bc, bp, bk, chunks = blocks or _blocks(C, Hh * Ww, K, grid, dispatch.is_interpreted(_kernel))
    if chunks is None:  # GPU: ~2 programs per SM, each with >= 4 candidate tiles
        chunks = max(1, min(triton.cdiv(K, 4 * bk), 264 // B))
    k_per_chunk = max(bk, triton.cdiv(triton.cdiv(max(K, 1), chunks), bk) * bk)
    chunks = max(1, triton.cdiv(K, k_per_chunk))
    psim = torch.empty((B, chunks), dtype=torch.float32, device=dev)
    pidx = torch.empty((B, chunks), dtype=torch.int64, device=dev)
    s_cb, s_ck, s_cf, m_arg, s_mb, s_mk = similarity.candidate_args(candidates, mask, shared, psim)
    _kernel[(B, chunks)](
        latents, candidates, m_arg, fp, psim, pidx, C, Hh, Ww, K, k_per_chunk,
        *latents.stride(), s_cb, s_ck, s_cf, s_mb, s_mk,
        G=grid, BLOCK_C=bc, BLOCK_P=bp, BLOCK_K=bk, HAS_MASK=mask is not None, num_warps=4,
    )
    sim, idx = similarity.reduce_partials(psim, pidx)
    return sim, idx, fp


def fingerprint_match_triton(latents: torch.Tensor, candidates: torch.Tensor, *,
                             candidate_mask: Optional[torch.Tensor] = None, grid: int = FINGERPRINT_GRID,
                             blocks: Optional[tuple] = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton path of :func:`fingerprint_match`, no dispatch; `blocks` overrides
    (BLOCK_C, BLOCK_P, BLOCK_K, chunks)."""
    if grid & (grid - 1):
        raise ValueError(f"the Triton kernel needs a power-of-two grid, got {grid}")
    shared, mask = _check(latents, candidates, candidate_mask, grid)
    return _launch(latents, candidates, shared, mask, grid, blocks)


def fingerprint_match(latents: torch.Tensor, candidates: torch.Tensor, *,
                      candidate_mask: Optional[torch.Tensor] = None, grid: int = FINGERPRINT_GRID
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fingerprint each latent and find its best candidate, in one kernel.

    latents: [B, C, h, w] (e.g. x0_hat from cfg_with_divergence), any float dtype, h, w >= grid.
    candidates, candidate_mask: as for fingerprint_similarity, with F = C·grid·grid.
    returns: best_sim [B] float32, best_idx [B] int64 (as fingerprint_similarity), and the
        fingerprints [B, F] float32 (= latent_fingerprint(latents, grid)).
    """
    shared, mask = _check(latents, candidates, candidate_mask, grid)
    unsupported = dispatch.dtype_reason(dispatch.FLOAT_DTYPES, latents=latents, candidates=candidates)
    if unsupported is None and grid & (grid - 1):
        unsupported = "grid not a power of two"
    return dispatch.run(NAME, latents.device, kernel=_kernel, unsupported=unsupported,
                        triton_fn=lambda: _launch(latents, candidates, shared, mask, grid),
                        reference_fn=lambda: _reference(latents, candidates, shared, mask, grid))
