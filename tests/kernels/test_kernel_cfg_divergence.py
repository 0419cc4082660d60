"""cfg_with_divergence: Triton vs reference, reference vs naive float64."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import kernel_testlib as lib
from memguard.kernels import cfg_divergence as cd
from memguard.kernels.cfg_divergence import (cfg_with_divergence, cfg_with_divergence_reference,
                                    cfg_with_divergence_triton)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def naive(eu, ec, xt, w, ab):
    eu, ec, xt = eu.double().cpu(), ec.double().cpu(), xt.double().cpu()
    B = xt.shape[0]
    w = w.double().cpu().view(B, 1, 1, 1) if isinstance(w, torch.Tensor) else w
    ab = ab.double().cpu().view(B, 1, 1, 1) if isinstance(ab, torch.Tensor) else torch.tensor(ab, dtype=torch.float64)
    eps = eu + w * (ec - eu)
    div = torch.sqrt(((ec - eu) ** 2).sum(dim=(1, 2, 3)))
    x0 = (xt - torch.sqrt(1 - ab) * eps) / torch.sqrt(ab)
    return eps, div, x0


def make(shape, dtype, xt_dtype, per_sample, key):
    g = lib.gen(shape, str(dtype), str(xt_dtype), per_sample, key)
    eu = lib.randn(shape, dtype, g)
    ec = lib.randn(shape, dtype, g, scale=0.9, offset=0.05)   # correlated with eu in practice
    xt = lib.randn(shape, xt_dtype, g, scale=3.0)
    B = shape[0]
    if per_sample:
        w = (1 + 9 * torch.rand(B, generator=g)).to(lib.DEVICE)
        ab = (0.02 + 0.96 * torch.rand(B, generator=g)).to(lib.DEVICE)
    else:
        w, ab = 7.5, 0.3
    return eu, ec, xt, w, ab


def run_case(shape, dtype, xt_dtype=None, per_sample=True, block=None):
    lib.require_triton(cd._kernel)
    xt_dtype = xt_dtype or dtype
    eu, ec, xt, w, ab = make(shape, dtype, xt_dtype, per_sample, block)
    eps, div, x0 = cfg_with_divergence_triton(eu, ec, xt, w, ab, block=block)
    r_eps, r_div, r_x0 = cfg_with_divergence_reference(eu, ec, xt, w, ab)
    lib.check("cfg_divergence", "triton vs ref: eps", dtype, eps, r_eps)
    lib.check("cfg_divergence", "triton vs ref: divergence", dtype, div, r_div, tol=1e-5)
    lib.check("cfg_divergence", "triton vs ref: x0_hat", xt_dtype, x0, r_x0)
    n_eps, n_div, n_x0 = naive(eu, ec, xt, w, ab)
    lib.check("cfg_divergence", "ref vs float64: eps", dtype, r_eps.double().cpu(), n_eps)
    lib.check("cfg_divergence", "ref vs float64: divergence", dtype, r_div.double().cpu(), n_div, tol=1e-5)
    lib.check("cfg_divergence", "ref vs float64: x0_hat", xt_dtype, r_x0.double().cpu(), n_x0)
    assert div.dtype == torch.float32 and eps.dtype == dtype and x0.dtype == xt_dtype


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=lib.dname)
@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (1, 4, 128, 128), (3, 4, 37, 45), (2, 16, 32, 32)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("per_sample", [True, False], ids=["tensor-w-ab", "float-w-ab"])
def test_shapes(poison, shape, dtype, per_sample):
    run_case(shape, dtype, per_sample=per_sample)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=lib.dname)
@pytest.mark.parametrize("block", [256, 1024])
def test_multiple_chunks(poison, dtype, block):
    """Several programs per sample: the [B, chunks] partial sums must all be written and summed."""
    run_case((2, 4, 37, 45), dtype, block=block)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=lib.dname)
def test_float32_latents_with_low_precision_eps(poison, dtype):
    run_case((2, 4, 64, 64), dtype, xt_dtype=F32)


def test_strided_batch(poison):
    """eps halves of the CFG batch (noise_pred.chunk(2)) and a non-contiguous x_t."""
    lib.require_triton(cd._kernel)
    g = lib.gen("strided")
    pred = lib.randn((4, 4, 32, 32), F16, g)
    eu, ec = pred.chunk(2)
    xt = lib.randn((2, 32, 32, 4), F16, g).permute(0, 3, 1, 2)       # channels-last
    out = cfg_with_divergence_triton(eu, ec, xt, 5.0, 0.5)
    ref = cfg_with_divergence_reference(eu, ec, xt, 5.0, 0.5)
    for what, a, b in zip(("eps", "divergence", "x0_hat"), out, ref):
        lib.check("cfg_divergence", f"triton vs ref: {what}", F16, a, b)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 3), C=st.integers(1, 8), h=st.integers(1, 70), w=st.integers(1, 70),
       dtype=st.sampled_from([F32, F16, BF16]), per_sample=st.booleans(),
       block=st.sampled_from([None, 128, 512]))
def test_property_random_shapes(poison, B, C, h, w, dtype, per_sample, block):
    run_case((B, C, h, w), dtype, per_sample=per_sample, block=block)


def test_bad_inputs():
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="alpha_bar"):
        cfg_with_divergence(x, x, x, 7.5, 0.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        cfg_with_divergence(x, x, x, torch.ones(3), 0.5)
    with pytest.raises(ValueError):
        cfg_with_divergence(x, x[:1], x, 7.5, 0.5)
    with pytest.raises(TypeError):
        cfg_with_divergence(x, x.half(), x, 7.5, 0.5)


def test_zero_divergence_when_branches_agree(poison):
    lib.require_triton(cd._kernel)
    x = lib.randn((2, 4, 16, 16), F32, lib.gen("agree"))
    eps, div, x0 = cfg_with_divergence_triton(x, x, x, 7.5, 1.0)
    assert torch.equal(div, torch.zeros(2)) and torch.equal(eps, x) and torch.equal(x0, x)
