"""Best cosine match of each query fingerprint among candidate fingerprints.

    sim[b, k]  = q_b · c_k / (max(‖q_b‖, 1e-12) · max(‖c_k‖, 1e-12))   (exact cosine; for unit
                 vectors, as produced by memguard.kernels.fingerprint.latent_fingerprint, the dot product)
    best_sim[b] = max over unmasked k of sim[b, k];  best_idx[b] = the first k reaching it

Candidates are per sample ([B, K, F]) or shared ([M, F]). Masked candidates never win, and
neither do candidates whose similarity is NaN; if no candidate is left, best_sim = -inf and
best_idx = -1.

The Triton kernel is a blocked "matmul + running max": grid (query blocks, candidate chunks); each
program streams its chunk of candidates in [BLOCK_K, BLOCK_F] tiles (every candidate byte is read
once per query block; shared candidates serve up to 16 queries per read), keeps a running
(max, argmax) per query, and writes one partial (max, argmax) per chunk; a tiny torch reduction
over chunks (first chunk wins ties) gives the answer.
"""
from __future__ import annotations

from typing import Optional

import torch

from memguard.kernels import dispatch
from memguard.kernels.dispatch import HAVE_TRITON, next_pow2, tl, triton

NAME = "similarity"
EPS = 1e-12

if HAVE_TRITON:

    @triton.jit
    def _tile_scores(q_ptr, c_base, offs_b, b_ok, offs_k, k_ok, F, s_qb, s_qf, s_ck, s_cf,
                     BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr):
        """Dot products [BLOCK_B, BLOCK_K] and candidate squared norms [BLOCK_K], float32.

        The candidate tile is loaded once as [BLOCK_K, BLOCK_F] and broadcast over the queries:
        shared candidates serve all BLOCK_B queries; per-sample ones have BLOCK_B = 1.
        """
        dot = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
        cn = tl.zeros([BLOCK_K], tl.float32)
        offs_f0 = tl.arange(0, BLOCK_F)
        for f0 in range(0, F, BLOCK_F):
            offs_f = f0 + offs_f0
            f_ok = offs_f < F
            q = tl.load(q_ptr + offs_b[:, None] * s_qb + offs_f[None, :] * s_qf,
                        mask=b_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
            c = tl.load(c_base + offs_k[:, None] * s_ck + offs_f[None, :] * s_cf,
                        mask=k_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
            dot += tl.sum(q[:, None, :] * c[None, :, :], axis=2)
            cn += tl.sum(c * c, axis=1)
        return dot, cn

    @triton.jit
    def _kernel(q_ptr, c_ptr, m_ptr, psim_ptr, pidx_ptr, B, K, F, k_per_chunk,
                s_qb, s_qf, s_cb, s_ck, s_cf, s_mb, s_mk,
                BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr,
                HAS_MASK: tl.constexpr):
        pid_b = tl.program_id(0)
        chunk = tl.program_id(1)
        offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
        b_ok = offs_b < B

        qn = tl.zeros([BLOCK_B], tl.float32)
        for f0 in range(0, F, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            q = tl.load(q_ptr + offs_b[:, None] * s_qb + offs_f[None, :] * s_qf,
                        mask=b_ok[:, None] & (offs_f[None, :] < F), other=0.0).to(tl.float32)
            qn += tl.sum(q * q, axis=1)
        q_norm = tl.maximum(tl.sqrt(qn), 1e-12)

        # per-sample candidates: BLOCK_B == 1 and this program's sample is pid_b; shared: s_cb == 0
        c_base = c_ptr + pid_b.to(tl.int64) * s_cb
        best = tl.full([BLOCK_B], float("-inf"), tl.float32)
        best_i = tl.full([BLOCK_B], -1, tl.int64)
        k_start = chunk * k_per_chunk
        k_end = tl.minimum(k_start + k_per_chunk, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            k_ok = offs_k < k_end
            dot, cn = _tile_scores(q_ptr, c_base, offs_b, b_ok, offs_k, k_ok, F,
                                   s_qb, s_qf, s_ck, s_cf, BLOCK_B, BLOCK_K, BLOCK_F)
            sim = dot / (q_norm[:, None] * tl.maximum(tl.sqrt(cn), 1e-12)[None, :])
            valid = b_ok[:, None] & k_ok[None, :] & (sim == sim)        # NaN never wins
            if HAS_MASK:
                cm = tl.load(m_ptr + offs_b[:, None] * s_mb + offs_k[None, :] * s_mk,
                             mask=b_ok[:, None] & k_ok[None, :], other=0)
                valid = valid & (cm != 0)
            sim = tl.where(valid, sim, float("-inf"))
            blk_max, blk_arg = tl.max(sim, axis=1, return_indices=True, return_indices_tie_break_left=True)
            upd = blk_max > best                                        # earlier block wins ties
            best = tl.where(upd, blk_max, best)
            best_i = tl.where(upd, k0 + blk_arg.to(tl.int64), best_i)
        n_chunks = tl.num_programs(1)
        tl.store(psim_ptr + offs_b * n_chunks + chunk, best, mask=b_ok)
        tl.store(pidx_ptr + offs_b * n_chunks + chunk, best_i, mask=b_ok)
else:  # pragma: no cover
    _kernel = None


def reduce_partials(psim: torch.Tensor, pidx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-chunk (max, argmax) [B, chunks] into [B]; the first chunk wins ties."""
    if psim.shape[1] == 1:
        return psim[:, 0], pidx[:, 0]
    best, arg = psim.max(dim=1)
    return best, pidx.gather(1, arg[:, None])[:, 0]


def _check(queries, candidates, candidate_mask) -> tuple[bool, Optional[torch.Tensor]]:
    """Validate; return (shared, mask as bool [B, K] or [M], or None)."""
    if not isinstance(queries, torch.Tensor) or queries.ndim != 2:
        raise ValueError(f"queries must be [B, F], got {getattr(queries, 'shape', type(queries))}")
    if not queries.is_floating_point():
        raise TypeError(f"queries must be floating point, got {queries.dtype}")
    return check_candidates(queries.shape[0], queries.shape[1], queries.device, candidates, candidate_mask)


def check_candidates(B: int, F: int, device: torch.device, candidates, candidate_mask
                     ) -> tuple[bool, Optional[torch.Tensor]]:
    """Validate candidates [B, K, F] or [M, F] and their mask for B queries of length F."""
    if not isinstance(candidates, torch.Tensor) or candidates.ndim not in (2, 3):
        raise ValueError(f"candidates must be [B, K, F] or [M, F], got {getattr(candidates, 'shape', type(candidates))}")
    if not candidates.is_floating_point():
        raise TypeError(f"candidates must be floating point, got {candidates.dtype}")
    if candidates.device != device:
        raise ValueError(f"queries on {device}, candidates on {candidates.device}")
    shared = candidates.ndim == 2
    if candidates.shape[-1] != F or (not shared and candidates.shape[0] != B):
        raise ValueError(f"candidates {tuple(candidates.shape)} do not match [B, F] = [{B}, {F}] queries")
    mask = candidate_mask
    if mask is not None:
        want = candidates.shape[:-1]
        if not isinstance(mask, torch.Tensor) or mask.shape != want:
            raise ValueError(f"candidate_mask must have shape {tuple(want)}, got {getattr(mask, 'shape', type(mask))}")
        if mask.dtype != torch.bool:
            raise TypeError(f"candidate_mask must be bool, got {mask.dtype}")
        mask = mask.to(device)
    return shared, mask


def _reference(queries, candidates, shared, mask):
    q = queries.float()
    c = candidates.float()
    qn = q.norm(dim=1).clamp_min(EPS)
    if shared:
        sims = (q @ c.T) / (qn[:, None] * c.norm(dim=1).clamp_min(EPS)[None, :])      # [B, M]
        valid = mask[None, :].expand_as(sims) if mask is not None else None
    else:
        sims = torch.einsum("bf,bkf->bk", q, c) / (qn[:, None] * c.norm(dim=2).clamp_min(EPS))
        valid = mask
    sims = torch.where(torch.isnan(sims), float("-inf"), sims)
    if valid is not None:
        sims = sims.masked_fill(~valid, float("-inf"))
    B = q.shape[0]
    if sims.shape[1] == 0:
        return (torch.full((B,), float("-inf"), device=q.device),
                torch.full((B,), -1, dtype=torch.int64, device=q.device))
    best, idx = sims.max(dim=1)
    idx = torch.where(best == float("-inf"), torch.full_like(idx, -1), idx)
    return best, idx


def fingerprint_similarity_reference(queries: torch.Tensor, candidates: torch.Tensor, *,
                                     candidate_mask: Optional[torch.Tensor] = None
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`fingerprint_similarity` (float32 math)."""
    shared, mask = _check(queries, candidates, candidate_mask)
    return _reference(queries, candidates, shared, mask)


def _blocks(B: int, K: int, F: int, shared: bool, interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_K, BLOCK_F, chunks). GPU values are untuned first guesses."""
    block_b = min(next_pow2(B), 16) if shared else 1
    if interpret:
        block_f = max(16, min(next_pow2(F), 512))
        block_k = max(16, min(next_pow2(K), (1 << 19) // (block_b * block_f)))
        return block_b, block_k, block_f, 1
    block_f = max(16, min(next_pow2(F), 128 if block_b == 1 else 32))
    block_k = 64 if block_b == 1 else max(16, 4096 // (block_b * block_f))
    programs_b = triton.cdiv(B, block_b)
    # enough programs to fill a GPU (~2 per SM on an H100), each with >= 4 tiles of candidates
    chunks = max(1, min(triton.cdiv(K, 4 * block_k), 264 // max(programs_b, 1)))
    return block_b, block_k, block_f, chunks


def _launch(queries, candidates, shared, mask, blocks=None):
    B, F = queries.shape
    K = candidates.shape[-2]
    dev = queries.device
    if B == 0 or K == 0:
        return (torch.full((B,), float("-inf"), device=dev), torch.full((B,), -1, dtype=torch.int64, device=dev))
    bb, bk, bf, chunks = blocks or _blocks(B, K, F, shared, dispatch.is_interpreted(_kernel))
    if not shared and bb != 1:
        raise ValueError("per-sample candidates need BLOCK_B = 1")
    k_per_chunk = triton.cdiv(triton.cdiv(K, chunks), bk) * bk
    chunks = triton.cdiv(K, k_per_chunk)
    psim = torch.empty((B, chunks), dtype=torch.float32, device=dev)
    pidx = torch.empty((B, chunks), dtype=torch.int64, device=dev)
    s_cb, s_ck, s_cf, m_arg, s_mb, s_mk = candidate_args(candidates, mask, shared, psim)
    _kernel[(triton.cdiv(B, bb), chunks)](
        queries, candidates, m_arg, psim, pidx, B, K, F, k_per_chunk,
        queries.stride(0), queries.stride(1), s_cb, s_ck, s_cf, s_mb, s_mk,
        BLOCK_B=bb, BLOCK_K=bk, BLOCK_F=bf, HAS_MASK=mask is not None, num_warps=4,
    )
    return reduce_partials(psim, pidx)


def fingerprint_similarity_triton(queries: torch.Tensor, candidates: torch.Tensor, *,
                                  candidate_mask: Optional[torch.Tensor] = None,
                                  blocks: Optional[tuple[int, int, int, int]] = None
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of :func:`fingerprint_similarity`, no dispatch. `blocks` overrides
    (BLOCK_B, BLOCK_K, BLOCK_F, chunks), e.g. to test several chunks and F tiles."""
    shared, mask = _check(queries, candidates, candidate_mask)
    return _launch(queries, candidates, shared, mask, blocks)


def fingerprint_similarity(queries: torch.Tensor, candidates: torch.Tensor, *,
                           candidate_mask: Optional[torch.Tensor] = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine match of each query among its candidates.

    queries: [B, F] fingerprints (L2-normalised, e.g. kernels.latent_fingerprint; any float dtype).
    candidates: [B, K, F] (each sample's own) or [M, F] (shared by all queries); float dtype.
    candidate_mask: bool, [B, K] or [M]; False candidates never win.
    returns: best_sim [B] float32 (cosine similarity, -inf if no candidate is left),
        best_idx [B] int64 (index into K or M; the first on ties; -1 if no candidate is left).
    CUDA tensors run the Triton kernel, CPU tensors the reference (see memguard.kernels.dispatch).
    """
    shared, mask = _check(queries, candidates, candidate_mask)
    unsupported = dispatch.dtype_reason(dispatch.FLOAT_DTYPES, queries=queries, candidates=candidates)
    return dispatch.run(NAME, queries.device, kernel=_kernel, unsupported=unsupported,
                        triton_fn=lambda: _launch(queries, candidates, shared, mask),
                        reference_fn=lambda: _reference(queries, candidates, shared, mask))


def candidate_args(candidates: torch.Tensor, mask: torch.Tensor | None, shared: bool, placeholder: torch.Tensor):
    """Strides of candidates ([M, F] shared: batch stride 0, or [B, K, F]) and of the optional
    mask, and the mask as uint8 (`placeholder`, never read, when there is none)."""
    if shared:
        s_cb, s_ck, s_cf = 0, candidates.stride(0), candidates.stride(1)
    else:
        s_cb, s_ck, s_cf = candidates.stride()
    if mask is None:
        return s_cb, s_ck, s_cf, placeholder, 0, 0
    s_mb, s_mk = (0, mask.stride(0)) if shared else mask.stride()
    return s_cb, s_ck, s_cf, mask.view(torch.uint8), s_mb, s_mk
