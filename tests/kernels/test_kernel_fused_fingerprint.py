"""fingerprint_match (fused latent_fingerprint + similarity) against the composition of the
references, and latent_fingerprint itself against a naive float64 pooling."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import kernel_testlib as lib
from memguard.kernels import fused_fingerprint as ff
from memguard.kernels.fingerprint import FINGERPRINT_GRID, latent_fingerprint
from memguard.kernels.fused_fingerprint import fingerprint_match, fingerprint_match_reference, fingerprint_match_triton

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def naive_fingerprint(x, grid):
    """Float64 adaptive average pooling by explicit cells, centring and L2 normalisation."""
    x = x.double().cpu()
    B, C, h, w = x.shape
    pooled = torch.empty(B, C, grid, grid, dtype=torch.float64)
    for i in range(grid):
        r0, r1 = (i * h) // grid, -((-(i + 1) * h) // grid)
        for j in range(grid):
            c0, c1 = (j * w) // grid, -((-(j + 1) * w) // grid)
            pooled[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
    cen = (pooled - pooled.mean(dim=(2, 3), keepdim=True)).flatten(1)
    return cen / cen.norm(dim=1, keepdim=True).clamp_min(1e-12)


def make(shape, K, shared, dtype, key, mask_p=0.3):
    g = lib.gen(shape, K, shared, str(dtype), key)
    x = lib.randn(shape, dtype, g)
    B, C = shape[:2]
    F = C * FINGERPRINT_GRID ** 2
    c = torch.nn.functional.normalize(lib.randn((K, F) if shared else (B, K, F), F32, g), dim=-1)
    fp = latent_fingerprint(x)
    if K:   # plant a noisy copy of the true fingerprint, as the index would hold
        if shared:
            c[K // 3] = fp[0] + 0.05 * c[K // 3]
        else:
            c[:, K // 3] = fp + 0.05 * c[:, K // 3]
    mask = (torch.rand(c.shape[:-1], generator=g) > mask_p).to(lib.DEVICE) if mask_p is not None else None
    return x, c, mask


def run_case(shape, K, shared, dtype, blocks=None, mask_p=0.3):
    lib.require_triton(ff._kernel)
    x, c, mask = make(shape, K, shared, dtype, blocks, mask_p)
    sim, idx, fp = fingerprint_match_triton(x, c, candidate_mask=mask, blocks=blocks)
    r_sim, r_idx, r_fp = fingerprint_match_reference(x, c, candidate_mask=mask)
    tol = lib.TOL[F32]                                 # float32 math whatever the latent dtype
    lib.check("fingerprint_match", "triton vs ref: fingerprint", dtype, fp, r_fp, tol=tol)
    lib.check("fingerprint_match", "triton vs ref: best_sim", dtype, sim, r_sim, tol=tol)
    assert idx.dtype == torch.int64 and not (idx == lib.INT_POISON).any()
    assert torch.equal(idx, r_idx) or torch.allclose(sim, r_sim, rtol=1e-5, atol=1e-6)
    lib.check("fingerprint_match", "ref vs float64: fingerprint", dtype, r_fp.double().cpu(),
              naive_fingerprint(x, FINGERPRINT_GRID), tol=tol)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=lib.dname)
@pytest.mark.parametrize("shape,K,shared", [((2, 4, 64, 64), 100, False), ((1, 4, 128, 128), 2000, True),
                                            ((3, 4, 37, 45), 50, False), ((2, 4, 8, 8), 20, True),
                                            ((2, 16, 32, 32), 64, True)],
                         ids=["sd512-per-sample", "sd1024-shared", "odd-hw", "h=w=grid", "16ch"])
def test_shapes(poison, shape, K, shared, dtype):
    run_case(shape, K, shared, dtype)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-sample"])
def test_chunks(poison, shared):
    run_case((2, 4, 24, 20), 150, shared, F32, blocks=(4, 64, 16, 4))


def test_all_masked(poison):
    lib.require_triton(ff._kernel)
    x, c, _ = make((2, 4, 16, 16), 10, False, F32, "masked", mask_p=None)
    mask = torch.ones(2, 10, dtype=torch.bool, device=c.device)
    mask[0] = False
    sim, idx, fp = fingerprint_match_triton(x, c, candidate_mask=mask)
    assert sim[0] == float("-inf") and idx[0] == -1 and idx[1] >= 0
    torch.testing.assert_close(fp, latent_fingerprint(x), rtol=1e-5, atol=1e-6)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 3), C=st.integers(1, 6), h=st.integers(8, 50), w=st.integers(8, 50),
       K=st.integers(0, 60), shared=st.booleans(), dtype=st.sampled_from([F32, F16, BF16]))
def test_property_random_shapes(poison, B, C, h, w, K, shared, dtype):
    run_case((B, C, h, w), K, shared, dtype)


def test_public_entry_point_and_bad_inputs():
    x = torch.randn(2, 4, 16, 16)
    c = torch.randn(2, 5, 4 * FINGERPRINT_GRID ** 2)
    sim, idx, fp = fingerprint_match(x, c)
    assert sim.shape == idx.shape == (2,) and fp.shape == (2, 256)
    with pytest.raises(ValueError, match="smaller than grid"):
        fingerprint_match(torch.randn(2, 4, 4, 16), c)
    with pytest.raises(ValueError):
        fingerprint_match(x, torch.randn(2, 5, 100))
