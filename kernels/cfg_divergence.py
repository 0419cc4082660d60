"""Classifier-free guidance, the guidance divergence and the predicted clean latent, in one pass.

    eps        = eps_u + w · (eps_c − eps_u)
    divergence = ‖eps_c − eps_u‖₂ over C·h·w           (float32, one value per sample)
    x0_hat     = (x_t − √(1−ᾱ) · eps) / √ᾱ            (ε-prediction; √(1−ᾱ) clamps 1−ᾱ at 0)

The Triton kernel reads eps_u, eps_c and x_t once and writes eps and x0_hat once, all math in
float32. Grid (B, chunks of C·h·w); each program writes its chunk's sum of squares to a [B, chunks]
float32 buffer that is summed (and square-rooted) afterwards: deterministic, no atomics.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch

from memguard.kernels import dispatch
from memguard.kernels.dispatch import HAVE_TRITON, next_pow2, tl, triton

if HAVE_TRITON:
    from memguard.kernels._jit import cast_out

NAME = "cfg_divergence"
Scalar = Union[float, torch.Tensor]

if HAVE_TRITON:

    @triton.jit
    def _kernel(eu_ptr, ec_ptr, xt_ptr, eps_ptr, x0_ptr, part_ptr, w_ptr, ab_ptr, w_val, ab_val,
                n, s_eu, s_ec, s_xt, s_eps, s_x0,
                BLOCK: tl.constexpr, W_TENSOR: tl.constexpr, AB_TENSOR: tl.constexpr,
                BF16_RTNE_EPS: tl.constexpr, BF16_RTNE_X0: tl.constexpr):
        b = tl.program_id(0)
        chunk = tl.program_id(1)
        b64 = b.to(tl.int64)
        if W_TENSOR:
            w = tl.load(w_ptr + b).to(tl.float32)
        else:
            w = w_val
        if AB_TENSOR:
            ab = tl.load(ab_ptr + b).to(tl.float32)
        else:
            ab = ab_val
        sqrt_ab = tl.sqrt(ab)
        sqrt_1m = tl.sqrt(tl.maximum(1.0 - ab, 0.0))

        offs = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        eu = tl.load(eu_ptr + b64 * s_eu + offs, mask=ok, other=0.0).to(tl.float32)
        ec = tl.load(ec_ptr + b64 * s_ec + offs, mask=ok, other=0.0).to(tl.float32)
        xt = tl.load(xt_ptr + b64 * s_xt + offs, mask=ok, other=0.0).to(tl.float32)
        d = ec - eu
        eps = eu + w * d
        x0 = (xt - sqrt_1m * eps) / sqrt_ab
        tl.store(eps_ptr + b64 * s_eps + offs, cast_out(eps, eps_ptr.dtype.element_ty, BF16_RTNE_EPS), mask=ok)
        tl.store(x0_ptr + b64 * s_x0 + offs, cast_out(x0, x0_ptr.dtype.element_ty, BF16_RTNE_X0), mask=ok)
        tl.store(part_ptr + b64 * tl.num_programs(1) + chunk, tl.sum(d * d, axis=0))
else:  # pragma: no cover
    _kernel = None


class _Inputs(NamedTuple):
    w: Scalar          # float, or [B] float32 tensor on the inputs' device
    alpha_bar: Scalar


def _per_sample(x: Scalar, B: int, device: torch.device, what: str) -> Scalar:
    if isinstance(x, torch.Tensor):
        if x.ndim == 0:
            return float(x)
        if x.shape != (B,):
            raise ValueError(f"{what} must be a float or a [B] = [{B}] tensor, got shape {tuple(x.shape)}")
        return x.to(device=device, dtype=torch.float32)
    try:
        return float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a float or a [B] tensor, got {type(x).__name__}") from None


def _check(eps_uncond, eps_cond, x_t, guidance_scale, alpha_bar) -> _Inputs:
    for name, t in (("eps_uncond", eps_uncond), ("eps_cond", eps_cond), ("x_t", x_t)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{name} must be a [B, C, h, w] tensor, got {getattr(t, 'shape', type(t))}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if not (eps_uncond.shape == eps_cond.shape == x_t.shape):
        raise ValueError(f"shapes differ: eps_uncond {tuple(eps_uncond.shape)}, eps_cond "
                         f"{tuple(eps_cond.shape)}, x_t {tuple(x_t.shape)}")
    if eps_uncond.dtype != eps_cond.dtype:
        raise TypeError(f"eps_uncond and eps_cond must share a dtype, got {eps_uncond.dtype}, {eps_cond.dtype}")
    if not (eps_uncond.device == eps_cond.device == x_t.device):
        raise ValueError("eps_uncond, eps_cond and x_t must be on one device")
    B = x_t.shape[0]
    w = _per_sample(guidance_scale, B, x_t.device, "guidance_scale")
    ab = _per_sample(alpha_bar, B, x_t.device, "alpha_bar")
    if isinstance(ab, float) and not (0.0 < ab <= 1.0):
        raise ValueError(f"alpha_bar must be in (0, 1], got {ab}")
    return _Inputs(w, ab)


def _reference(eps_uncond, eps_cond, x_t, inp: _Inputs):
    B = x_t.shape[0]
    eu, ec, xt = eps_uncond.float(), eps_cond.float(), x_t.float()
    w = inp.w.view(B, 1, 1, 1) if isinstance(inp.w, torch.Tensor) else inp.w
    if isinstance(inp.alpha_bar, torch.Tensor):
        ab = inp.alpha_bar.view(B, 1, 1, 1)
        sqrt_ab, sqrt_1m = ab.sqrt(), (1.0 - ab).clamp_min(0).sqrt()
    else:
        sqrt_ab, sqrt_1m = math.sqrt(inp.alpha_bar), math.sqrt(max(1.0 - inp.alpha_bar, 0.0))
    d = ec - eu
    eps = eu + w * d
    x0 = (xt - sqrt_1m * eps) / sqrt_ab
    divergence = d.flatten(1).norm(dim=1) if B else torch.zeros(0, device=xt.device)
    return eps.to(eps_cond.dtype), divergence.float(), x0.to(x_t.dtype)


def cfg_with_divergence_reference(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, x_t: torch.Tensor,
                                  guidance_scale: Scalar, alpha_bar: Scalar
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`cfg_with_divergence` (float32 math)."""
    return _reference(eps_uncond, eps_cond, x_t, _check(eps_uncond, eps_cond, x_t, guidance_scale, alpha_bar))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, C·h·w] view with unit inner stride (copies only if the sample is not contiguous)."""
    r = x.reshape(x.shape[0], -1)
    return r if r.shape[1] <= 1 or r.stride(1) == 1 else r.contiguous()


def _launch(eps_uncond, eps_cond, x_t, inp: _Inputs, block: Optional[int] = None):
    B = x_t.shape[0]
    n = x_t[0].numel() if B else 0
    eps = torch.empty(x_t.shape, dtype=eps_cond.dtype, device=x_t.device)
    x0 = torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device)
    if B == 0 or n == 0:
        return eps, torch.zeros(B, dtype=torch.float32, device=x_t.device), x0
    interpret = dispatch.is_interpreted(_kernel)
    if block is None:
        block = min(next_pow2(n), 1 << 16) if interpret else 1024
    chunks = triton.cdiv(n, block)
    part = torch.empty((B, chunks), dtype=torch.float32, device=x_t.device)
    eu, ec, xt = _rows(eps_uncond), _rows(eps_cond), _rows(x_t)
    eps_r, x0_r = eps.view(B, n), x0.view(B, n)
    w_t, ab_t = isinstance(inp.w, torch.Tensor), isinstance(inp.alpha_bar, torch.Tensor)
    _kernel[(B, chunks)](
        eu, ec, xt, eps_r, x0_r, part,
        inp.w if w_t else part, inp.alpha_bar if ab_t else part,
        0.0 if w_t else inp.w, 0.0 if ab_t else inp.alpha_bar,
        n, eu.stride(0), ec.stride(0), xt.stride(0), eps_r.stride(0), x0_r.stride(0),
        BLOCK=block, W_TENSOR=w_t, AB_TENSOR=ab_t,
        BF16_RTNE_EPS=interpret and eps.dtype == torch.bfloat16,
        BF16_RTNE_X0=interpret and x0.dtype == torch.bfloat16,
        num_warps=4 if block <= 1024 else 8,
    )
    divergence = (part[:, 0] if chunks == 1 else part.sum(dim=1)).sqrt()
    return eps, divergence, x0


def cfg_with_divergence_triton(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, x_t: torch.Tensor,
                               guidance_scale: Scalar, alpha_bar: Scalar, *, block: Optional[int] = None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton path of :func:`cfg_with_divergence`, no dispatch; `block` (a power of two)
    overrides the elements per program, e.g. to test the multi-chunk reduction."""
    inp = _check(eps_uncond, eps_cond, x_t, guidance_scale, alpha_bar)
    return _launch(eps_uncond, eps_cond, x_t, inp, block)


def cfg_with_divergence(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, x_t: torch.Tensor,
                        guidance_scale: Scalar, alpha_bar: Scalar
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Guided noise, guidance divergence and predicted clean latent, reading each input once.

    eps_uncond, eps_cond: [B, C, h, w], one float dtype (float32 / float16 / bfloat16).
    x_t: [B, C, h, w], any float dtype (may differ from the eps dtype).
    guidance_scale w, alpha_bar ᾱ: a float, or a [B] tensor (one value per sample). A float ᾱ
        must lie in (0, 1]; a tensor ᾱ is not checked (that would sync with the GPU).
    returns: eps [B, C, h, w] in the eps dtype, eps = eps_u + w·(eps_c − eps_u);
        divergence [B] float32, ‖eps_c − eps_u‖₂ over C·h·w;
        x0_hat [B, C, h, w] in x_t's dtype, (x_t − √(1−ᾱ)·eps) / √ᾱ, computed from the float32 eps.
    CUDA tensors run the Triton kernel, CPU tensors the reference (see memguard.kernels.dispatch).
    """
    inp = _check(eps_uncond, eps_cond, x_t, guidance_scale, alpha_bar)
    unsupported = dispatch.dtype_reason(dispatch.FLOAT_DTYPES, eps_cond=eps_cond, x_t=x_t)
    return dispatch.run(NAME, x_t.device, kernel=_kernel, unsupported=unsupported,
                        triton_fn=lambda: _launch(eps_uncond, eps_cond, x_t, inp),
                        reference_fn=lambda: _reference(eps_uncond, eps_cond, x_t, inp))
