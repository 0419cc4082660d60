"""fingerprint_similarity: Triton vs reference, reference vs naive float64."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import kernel_testlib as lib
from memguard.kernels import similarity as sm
from memguard.kernels.similarity import (fingerprint_similarity, fingerprint_similarity_reference,
                                fingerprint_similarity_triton)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def naive_sims(q, c, mask):
    """Float64 cosine similarities [B, K] with masked entries -inf, by explicit normalisation."""
    q64 = q.double().cpu()
    c64 = c.double().cpu()
    if c64.ndim == 2:
        c64 = c64.unsqueeze(0).expand(q64.shape[0], -1, -1)
        mask = None if mask is None else mask.cpu().unsqueeze(0).expand(q64.shape[0], -1)
    qn = q64 / q64.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cn = c64 / c64.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sims = (cn * qn[:, None, :]).sum(-1)
    if mask is not None:
        sims = sims.masked_fill(~mask.cpu(), float("-inf"))
    return sims


def check_best(tag, dtype, sim, idx, ref_sim, ref_idx, sims64, tol):
    """best_sim within tol; best_idx equal, or pointing at a candidate that ties in float64."""
    assert not (idx == lib.INT_POISON).any(), "unwritten best_idx"
    lib.check("similarity", f"{tag}: best_sim", dtype, sim, ref_sim, tol=tol)
    for b in range(sim.shape[0]):
        i, j = int(idx[b]), int(ref_idx[b])
        if i != j:
            assert i >= 0 and j >= 0, f"row {b}: idx {i} vs {j}"
            assert abs(sims64[b, i] - sims64[b, j]) <= 4 * tol, f"row {b}: idx {i} vs {j} not a tie"
        elif i >= 0:
            assert abs(float(sim[b]) - sims64[b, i]) <= 4 * tol + 1e-6


def make(B, K, F, shared, dtype, key, mask_p=0.3, normalise=True):
    g = lib.gen(B, K, F, shared, str(dtype), key)
    q = lib.randn((B, F), F32, g)
    q = torch.nn.functional.normalize(q, dim=1).to(dtype)
    c = lib.randn((K, F) if shared else (B, K, F), F32, g)
    if normalise:
        c = torch.nn.functional.normalize(c, dim=-1)
    # plant near-duplicates of the queries so the best match is a real one, as in an index
    if K:
        if shared:
            c[min(3, K - 1)] = q[0].float() + 0.05 * c[min(3, K - 1)]
        else:
            c[:, K // 2] = q.float() + 0.05 * c[:, K // 2]
    c = c.to(dtype)
    mask = None
    if mask_p is not None:
        mask = (torch.rand(c.shape[:-1], generator=g) > mask_p).to(lib.DEVICE)
    return q, c, mask


def run_case(B, K, F, shared, dtype, blocks=None, mask_p=0.3, normalise=True):
    lib.require_triton(sm._kernel)
    q, c, mask = make(B, K, F, shared, dtype, blocks, mask_p, normalise)
    sim, idx = fingerprint_similarity_triton(q, c, candidate_mask=mask, blocks=blocks)
    r_sim, r_idx = fingerprint_similarity_reference(q, c, candidate_mask=mask)
    for s_, i_ in ((sim, idx), (r_sim, r_idx)):
        assert s_.dtype == torch.float32 and i_.dtype == torch.int64 and s_.shape == i_.shape == (B,)
    sims64 = naive_sims(q, c, mask)
    tol = lib.TOL[F32]   # float32 math on exactly representable inputs, whatever their dtype
    check_best("triton vs ref", dtype, sim, idx, r_sim, r_idx, sims64, tol)
    n_sim, n_idx = sims64.max(dim=1) if sims64.shape[1] else (torch.full((B,), float("-inf")), None)
    if n_idx is not None:
        n_idx = torch.where(n_sim == float("-inf"), -1, n_idx)
        check_best("ref vs float64", dtype, r_sim.double().cpu(), r_idx.cpu(), n_sim, n_idx, sims64, tol)
    return sim, idx


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=lib.dname)
@pytest.mark.parametrize("B,K,F,shared", [(2, 16, 256, False), (4, 1000, 256, True), (3, 77, 100, False),
                                          (5, 300, 1024, True), (17, 50, 64, True), (1, 1, 256, False)])
def test_shapes(poison, B, K, F, shared, dtype):
    run_case(B, K, F, shared, dtype)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-sample"])
@pytest.mark.parametrize("blocks", [(2, 16, 32, 3), (4, 32, 64, 11)])
def test_blocking_and_chunks(poison, shared, blocks):
    """Several F tiles, candidate tiles and chunks: the chunk reduction keeps the first best.
    (Small blocks make many interpreter programs: sizes kept small.)"""
    bb = blocks[0] if shared else 1
    run_case(5, 333, 100, shared, F32, blocks=(bb,) + blocks[1:])


def test_unnormalised_candidates_use_cosine(poison):
    run_case(3, 40, 64, False, F32, normalise=False)
    lib.require_triton(sm._kernel)
    q = torch.nn.functional.normalize(torch.randn(1, 32), dim=1).to(lib.DEVICE)
    c = torch.cat([q * 10, -q, torch.zeros(1, 32, device=q.device)])
    sim, idx = fingerprint_similarity_triton(q, c)
    assert int(idx) == 0 and abs(float(sim) - 1.0) < 1e-6


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-sample"])
def test_all_masked_and_empty(poison, shared):
    lib.require_triton(sm._kernel)
    q, c, _ = make(3, 20, 64, shared, F32, "masked", mask_p=None)
    mask = torch.ones(c.shape[:-1], dtype=torch.bool, device=c.device)
    if shared:
        mask[:] = False
    else:
        mask[1] = False
    for fn in (fingerprint_similarity_triton, fingerprint_similarity_reference):
        sim, idx = fn(q, c, candidate_mask=mask)
        rows = [0, 1, 2] if shared else [1]
        assert (sim[rows] == float("-inf")).all() and (idx[rows] == -1).all()
        if not shared:
            assert (idx[[0, 2]] >= 0).all()
        sim, idx = fn(q, c[..., :0, :])                          # K = 0 (or M = 0)
        assert (sim == float("-inf")).all() and (idx == -1).all()


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-sample"])
def test_ties_pick_first(poison, shared):
    lib.require_triton(sm._kernel)
    q, c, _ = make(2, 64, 32, shared, F32, "ties", mask_p=None)
    if shared:
        c[10] = c[40] = q[0]
        c[20] = c[50] = q[1]
    else:
        c[:, 10] = c[:, 40] = q
    for blocks in [None, (1, 16, 16, 4)]:
        sim, idx = fingerprint_similarity_triton(q, c, blocks=blocks)
        ref_sim, ref_idx = fingerprint_similarity_reference(q, c)
        assert idx.tolist() == ([10, 20] if shared else [10, 10]) == ref_idx.tolist()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 20), K=st.integers(0, 400), F=st.integers(1, 300), shared=st.booleans(),
       dtype=st.sampled_from([F32, F16, BF16]), mask_p=st.sampled_from([None, 0.0, 0.5, 0.95]))
def test_property_random_shapes(poison, B, K, F, shared, dtype, mask_p):
    run_case(B, K, F, shared, dtype, mask_p=mask_p)


def test_bad_inputs():
    q = torch.randn(2, 8)
    with pytest.raises(ValueError):
        fingerprint_similarity(q, torch.randn(3, 4, 8))
    with pytest.raises(ValueError):
        fingerprint_similarity(q, torch.randn(5, 7))
    with pytest.raises(ValueError):
        fingerprint_similarity(q, torch.randn(5, 8), candidate_mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError):
        fingerprint_similarity(q, torch.randn(5, 8), candidate_mask=torch.ones(5))
