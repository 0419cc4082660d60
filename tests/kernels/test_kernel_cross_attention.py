"""cross_attention_with_stats: Triton vs reference, reference vs naive float64."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import kernel_testlib as lib
from memguard.kernels import cross_attention as ca
from memguard.kernels.cross_attention import (attention_entropy, cross_attention_with_stats,
                                     cross_attention_with_stats_reference,
                                     cross_attention_with_stats_triton)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def naive(q, k, v, scale, kls, mask):
    """Float64 attention written out step by step."""
    q64, k64, v64 = q.double().cpu(), k.double().cpu(), v.double().cpu()
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = torch.einsum("bhnd,bhtd->bhnt", q64, k64) * scale
    if kls is not None:
        s = s * kls.double().cpu().expand(q.shape[0], k.shape[2])[:, None, None, :]
    if mask is not None:
        s = s.masked_fill(~mask.cpu().expand(q.shape[0], k.shape[2])[:, None, None, :], float("-inf"))
    e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
    p = e / e.sum(dim=-1, keepdim=True)
    return torch.einsum("bhnt,bhtd->bhnd", p, v64), p.sum(dim=2)


def make(B, H, N, T, D, dtype, key, with_kls=True, with_mask=True, q_layout="bhnd"):
    g = lib.gen(B, H, N, T, D, str(dtype), key)
    if q_layout == "bnhd":  # as diffusers produces it: [B, N, H, D] memory viewed as [B, H, N, D]
        q = lib.randn((B, N, H, D), dtype, g).transpose(1, 2)
    else:
        q = lib.randn((B, H, N, D), dtype, g)
    k = lib.randn((B, H, T, D), dtype, g)
    v = lib.randn((B, H, T, D), dtype, g)
    kls = (0.5 + torch.rand((B, T), generator=g)).to(lib.DEVICE) if with_kls else None
    if kls is not None:
        kls[:, 0] = 1.25                      # the reroute mitigation's BOS boost
    mask = None
    if with_mask:
        mask = torch.rand((B, T), generator=g) > 0.3
        mask[:, 0] = True                     # BOS always kept
        mask = mask.to(lib.DEVICE)
    return q, k, v, kls, mask


def run_case(B, H, N, T, D, dtype, *, with_kls=True, with_mask=True, block_t=None, block_n=None,
             scale=None, q_layout="bhnd"):
    lib.require_triton(ca._kernel)
    q, k, v, kls, mask = make(B, H, N, T, D, dtype, (block_t, block_n, with_kls, with_mask, q_layout),
                              with_kls, with_mask, q_layout)
    out, mass = cross_attention_with_stats_triton(q, k, v, scale=scale, key_logit_scale=kls,
                                                  key_mask=mask, block_t=block_t, block_n=block_n)
    ref_out, ref_mass = cross_attention_with_stats_reference(q, k, v, scale=scale, key_logit_scale=kls,
                                                             key_mask=mask)
    lib.check("cross_attention", "triton vs ref: out", dtype, out, ref_out)
    lib.check("cross_attention", "triton vs ref: token_mass", dtype, mass, ref_mass,
              tol=min(lib.TOL[dtype], 1e-4))
    n_out, n_mass = naive(q, k, v, scale, kls, mask)
    lib.check("cross_attention", "ref vs float64: out", dtype, ref_out.double().cpu(), n_out)
    lib.check("cross_attention", "ref vs float64: token_mass", dtype, ref_mass.double().cpu(), n_mass,
              tol=min(lib.TOL[dtype], 1e-4))
    if mask is not None:
        assert (mass[~mask[:, None, :].expand_as(mass)] == 0).all(), "masked keys must get zero mass"
    torch.testing.assert_close(mass.sum(-1), torch.full((B, H), float(N), device=mass.device), rtol=1e-5, atol=0)


# Stable Diffusion 1.5 cross-attention at 512×512: heads 8, (N, D) = (4096, 40), (1024, 80),
# (256, 160), (64, 160); T = 77; B = 2 (the CFG batch). N = 4096 with B·H = 16 once (fp16) and
# B·H = 2 otherwise, to keep the interpreter quick.
SD_CASES = [
    pytest.param(2, 8, 4096, 77, 40, F16, id="sd-4096x40-bh16-f16"),
    pytest.param(1, 2, 4096, 77, 40, F32, id="sd-4096x40-bh2-f32"),
    pytest.param(1, 2, 4096, 77, 64, BF16, id="sd-4096x64-bh2-bf16"),
    pytest.param(2, 8, 1024, 77, 80, F32, id="sd-1024x80-f32"),
    pytest.param(2, 8, 1024, 77, 80, F16, id="sd-1024x80-f16"),
    pytest.param(2, 8, 256, 77, 160, F32, id="sd-256x160-f32"),
    pytest.param(2, 8, 256, 77, 160, F16, id="sd-256x160-f16"),
    pytest.param(2, 8, 256, 77, 64, BF16, id="sd-256x64-bf16"),
    pytest.param(2, 8, 64, 77, 160, F32, id="sd-64x160-f32"),
    pytest.param(2, 8, 64, 77, 160, F16, id="sd-64x160-f16"),
    pytest.param(2, 8, 64, 77, 40, BF16, id="sd-64x40-bf16"),
]


@pytest.mark.parametrize("B,H,N,T,D,dtype", SD_CASES)
def test_sd_shapes(poison, B, H, N, T, D, dtype):
    run_case(B, H, N, T, D, dtype)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=lib.dname)
@pytest.mark.parametrize("B,H,N,T,D", [(3, 5, 333, 50, 24), (1, 3, 1000, 13, 72), (2, 1, 17, 1, 8),
                                       (1, 2, 130, 256, 256), (1, 1, 5, 77, 100)])
def test_odd_shapes(poison, B, H, N, T, D, dtype):
    run_case(B, H, N, T, D, dtype)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=lib.dname)
@pytest.mark.parametrize("T,block_t,block_n", [(77, 16, 64), (200, 64, None), (256, 128, 32)])
def test_multiple_key_blocks(poison, T, block_t, block_n, dtype):
    """The two-pass path (online max/sum, then normalised P) used when T exceeds one key block."""
    run_case(2, 2, 300, T, 64, dtype, block_t=block_t, block_n=block_n)


@pytest.mark.parametrize("with_kls,with_mask", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [F32, F16], ids=lib.dname)
def test_optional_arguments(poison, with_kls, with_mask, dtype):
    run_case(2, 4, 200, 77, 40, dtype, with_kls=with_kls, with_mask=with_mask, scale=0.11)


@pytest.mark.parametrize("dtype", [F32, F16], ids=lib.dname)
def test_strided_q_and_per_token_arguments(poison, dtype):
    """q as diffusers hands it over ([B, N, H, D] memory), key_logit_scale and key_mask as [T]."""
    run_case(2, 8, 256, 77, 40, dtype, q_layout="bnhd")
    lib.require_triton(ca._kernel)
    q, k, v, _, _ = make(2, 3, 70, 77, 40, dtype, "per-token")
    kls = torch.ones(77, device=q.device)
    kls[0] = 1.25
    mask = torch.arange(77, device=q.device) < 9          # a 7-token prompt + BOS + EOS
    out, mass = cross_attention_with_stats_triton(q, k, v, key_logit_scale=kls, key_mask=mask)
    ref_out, ref_mass = cross_attention_with_stats_reference(q, k, v, key_logit_scale=kls[None].expand(2, 77),
                                                             key_mask=mask[None].expand(2, 77))
    lib.check("cross_attention", "triton vs ref: out", dtype, out, ref_out)
    lib.check("cross_attention", "triton vs ref: token_mass", dtype, mass, ref_mass, tol=1e-4)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 2), H=st.integers(1, 3), N=st.integers(1, 300), T=st.integers(1, 100),
       D=st.integers(1, 96), dtype=st.sampled_from([F32, F16]), with_kls=st.booleans(),
       with_mask=st.booleans())
def test_property_random_shapes(poison, B, H, N, T, D, dtype, with_kls, with_mask):
    run_case(B, H, N, T, D, dtype, with_kls=with_kls, with_mask=with_mask)


def test_all_masked_row_raises():
    q, k, v, _, _ = make(2, 1, 8, 5, 16, F32, "masked", with_kls=False, with_mask=False)
    mask = torch.ones(2, 5, dtype=torch.bool, device=q.device)
    mask[1] = False
    for fn in (cross_attention_with_stats, cross_attention_with_stats_reference,
               cross_attention_with_stats_triton):
        with pytest.raises(ValueError, match=r"excludes every key of batch row\(s\) \[1\]"):
            fn(q, k, v, key_mask=mask)


def test_mask_check_reruns_after_in_place_change():
    q, k, v, _, _ = make(1, 1, 8, 5, 16, F32, "mask-cache", with_kls=False, with_mask=False)
    mask = torch.ones(1, 5, dtype=torch.bool, device=q.device)
    cross_attention_with_stats(q, k, v, key_mask=mask)         # checked and remembered
    mask.fill_(False)                                         # bumps the version counter
    with pytest.raises(ValueError):
        cross_attention_with_stats(q, k, v, key_mask=mask)


def test_bad_inputs():
    q, k, v, _, _ = make(1, 2, 8, 5, 16, F32, "bad", with_kls=False, with_mask=False)
    with pytest.raises(ValueError):
        cross_attention_with_stats(q, k[:, :1], v)
    with pytest.raises(TypeError):
        cross_attention_with_stats(q, k.half(), v)
    with pytest.raises(ValueError):
        cross_attention_with_stats(q, k, v, key_logit_scale=torch.ones(1, 4))
    with pytest.raises(TypeError):
        cross_attention_with_stats(q, k, v, key_mask=torch.ones(1, 5))


def test_empty_queries(poison):
    lib.require_triton(ca._kernel)
    q, k, v, _, _ = make(1, 2, 8, 5, 16, F32, "empty", with_kls=False, with_mask=False)
    out, mass = cross_attention_with_stats_triton(q[:, :, :0], k, v)
    assert out.shape == (1, 2, 0, 16) and torch.equal(mass, torch.zeros(1, 2, 5))


# ---------------------------------------------------------------------------- attention_entropy
def test_attention_entropy():
    T = 77
    uniform = torch.ones(2, 3, T)
    e = attention_entropy(uniform)
    torch.testing.assert_close(e.entropy, torch.full((2, 3), math.log(T)))
    torch.testing.assert_close(e.bos_share, torch.full((2, 3), 1 / T))

    onehot = torch.zeros(2, 3, T)
    onehot[..., 0] = 5.0
    e = attention_entropy(onehot)
    assert torch.equal(e.entropy, torch.zeros(2, 3)) and torch.equal(e.bos_share, torch.ones(2, 3))
    e = attention_entropy(onehot, exclude_bos=True)       # nothing left: entropy 0, share kept
    assert torch.equal(e.entropy, torch.zeros(2, 3)) and torch.equal(e.bos_share, torch.ones(2, 3))

    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[:, :10] = True
    e = attention_entropy(uniform, mask)
    torch.testing.assert_close(e.entropy, torch.full((2, 3), math.log(10)))
    torch.testing.assert_close(e.bos_share, torch.full((2, 3), 0.1))
    e = attention_entropy(uniform, mask, exclude_bos=True, per_head=False)
    assert e.entropy.shape == (2,)
    torch.testing.assert_close(e.entropy, torch.full((2,), math.log(9)))

    g = lib.gen("entropy")
    mass = torch.rand(2, 4, T, generator=g)
    p = mass.double().sum(1) / mass.double().sum((1, 2))[:, None]
    e = attention_entropy(mass, per_head=False)
    torch.testing.assert_close(e.entropy.double(), -(p * p.log()).sum(-1), rtol=1e-5, atol=0)
    assert e.entropy.dtype == torch.float32


def test_attention_entropy_of_kernel_output():
    q, k, v, kls, mask = make(2, 8, 64, 77, 40, F32, "entropy-kernel")
    _, mass = cross_attention_with_stats(q, k, v, key_logit_scale=kls, key_mask=mask)
    e = attention_entropy(mass, mask)
    assert e.entropy.shape == (2, 8) and (e.entropy >= 0).all()
    assert (e.entropy <= torch.log(mask.sum(1).float())[:, None] + 1e-5).all()
    assert ((e.bos_share > 0) & (e.bos_share <= 1)).all()
