"""Cross-attention that also returns how much attention each text token received.

    out[b,h,n,:]   = Σ_t P[b,h,n,t] · v[b,h,t,:]
    P[b,h,n,:]     = softmax_t( scale · q[b,h,n]·k[b,h,t] · key_logit_scale[b,t] ),  keys with
                     key_mask[b,t] False excluded (logit -inf)
    token_mass[b,h,t] = Σ_n P[b,h,n,t]          (float32; Σ_t token_mass[b,h,t] = N)

The Triton kernel is flash-attention style: one program per (block of queries, b·h), keys
processed in blocks with an online softmax, the probabilities never written to memory. When all
keys fit one block (T ≤ 128 on the GPU, T ≤ 256 in the interpreter; T = 77 for CLIP prompts) it is
a single pass. Otherwise pass 1 runs the online max/sum over the key blocks and pass 2 recomputes
each block's logits to produce the normalised P, accumulating P·v and P's column sums, so out
needs no rescaling and the column sums are exact. Each program writes its query block's column
sums to a [B·H, num_query_blocks, T] float32 buffer, summed afterwards (deterministic, no atomics).
"""
from __future__ import annotations

import math
import weakref
from typing import NamedTuple, Optional

import torch

from memguard.kernels import dispatch
from memguard.kernels.dispatch import HAVE_TRITON, next_pow2, tl, triton

if HAVE_TRITON:
    from memguard.kernels._jit import cast_out

NAME = "cross_attention"
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
if HAVE_TRITON:

    @triton.jit
    def _logits(q, k_base, kls_base, km_base, t0, T, D, stride_kt, stride_kd, stride_lt, stride_mt,
                qk_scale, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KLS: tl.constexpr,
                HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
        """Masked logits of one key block, in log2 units: [BLOCK_N, BLOCK_T] float32."""
        offs_t = t0 + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        t_ok = offs_t < T
        k = tl.load(k_base + offs_t[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                    mask=t_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        if HAS_KLS:
            kls = tl.load(kls_base + offs_t * stride_lt, mask=t_ok, other=1.0)
            s = s * kls[None, :]
        valid = t_ok
        if HAS_MASK:
            km = tl.load(km_base + offs_t * stride_mt, mask=t_ok, other=0)
            valid = valid & (km != 0)
        return tl.where(valid[None, :], s, float("-inf"))

    @triton.jit
    def _kernel(q_ptr, k_ptr, v_ptr, o_ptr, kls_ptr, km_ptr, mass_ptr,
                H, N, T, D, qk_scale,
                sqb, sqh, sqn, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                sob, soh, son, sod, slb, slt, smb, smt,
                BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                NUM_T_BLOCKS: tl.constexpr, HAS_KLS: tl.constexpr, HAS_MASK: tl.constexpr,
                DOT_F32: tl.constexpr, IEEE: tl.constexpr, BF16_RTNE: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < N
        d_ok = offs_d < D

        q = tl.load(q_ptr + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        k_base = k_ptr + b * skb + h * skh
        v_base = v_ptr + b * svb + h * svh
        kls_base = kls_ptr + b * slb
        km_base = km_ptr + b * smb
        # column sums of this query block go to mass[pid_bh, pid_n, :]
        mass_base = mass_ptr + (pid_bh.to(tl.int64) * tl.num_programs(0) + pid_n) * T

        # pass 1: running row max m and row sum l (log2 domain); skipped with a single key block
        if NUM_T_BLOCKS > 1:
            m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_N], tl.float32)
            for j in range(NUM_T_BLOCKS):
                s = _logits(q, k_base, kls_base, km_base, j * BLOCK_T, T, D, skt, skd, slt, smt,
                            qk_scale, BLOCK_T, BLOCK_D, HAS_KLS, HAS_MASK, DOT_F32, IEEE)
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all keys so far masked
                l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
                m_i = m_new
            m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
            inv_l = tl.where(l_i > 0, 1.0 / l_i, 0.0)  # a row with every key masked gets P = 0

        # pass 2 (or the only pass): normalised P, out += P·v, column sums of P
        acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for j in range(NUM_T_BLOCKS):
            s = _logits(q, k_base, kls_base, km_base, j * BLOCK_T, T, D, skt, skd, slt, smt,
                        qk_scale, BLOCK_T, BLOCK_D, HAS_KLS, HAS_MASK, DOT_F32, IEEE)
            if NUM_T_BLOCKS == 1:
                m_row = tl.max(s, axis=1)
                m_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
                p = tl.exp2(s - m_safe[:, None])
                l_row = tl.sum(p, axis=1)
                inv_l = tl.where(l_row > 0, 1.0 / l_row, 0.0)
                p = p * inv_l[:, None]
            else:
                p = tl.exp2(s - m_safe[:, None]) * inv_l[:, None]
            offs_t = j * BLOCK_T + tl.arange(0, BLOCK_T)
            t_ok = offs_t < T
            v = tl.load(v_base + offs_t[:, None] * svt + offs_d[None, :] * svd,
                        mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_F32:
                acc += tl.dot(p, v.to(tl.float32))
            elif IEEE:
                acc += tl.dot(p, v, input_precision="ieee")
            else:
                acc += tl.dot(p.to(v.dtype), v)
            col = tl.sum(tl.where(n_ok[:, None], p, 0.0), axis=0)
            tl.store(mass_base + offs_t, col, mask=t_ok)

        tl.store(o_ptr + b * sob + h * soh + offs_n[:, None] * son + offs_d[None, :] * sod,
                 cast_out(acc, o_ptr.dtype.element_ty, BF16_RTNE), mask=n_ok[:, None] & d_ok[None, :])
else:  # pragma: no cover
    _kernel = None


# --------------------------------------------------------------------------------------------
# Input checks shared by both backends
# --------------------------------------------------------------------------------------------
class _Inputs(NamedTuple):
    scale: float
    key_logit_scale: Optional[torch.Tensor]   # [B, T] float32 (possibly stride-0 broadcast)
    key_mask: Optional[torch.Tensor]          # [B, T] bool


# key masks already checked for an all-False row: id -> (weakref, version). Avoids a host sync
# per attention layer when the caller passes the same, unmodified mask tensor every layer.
_checked_masks: dict[int, tuple[weakref.ref, int]] = {}


def _mask_known_good(mask: torch.Tensor) -> bool:
    entry = _checked_masks.get(id(mask))
    return entry is not None and entry[0]() is mask and entry[1] == mask._version


def _remember_mask(mask: torch.Tensor) -> None:
    if len(_checked_masks) > 256:
        _checked_masks.clear()
    try:
        _checked_masks[id(mask)] = (weakref.ref(mask), mask._version)
    except TypeError:  # pragma: no cover - tensors support weakrefs
        pass


def _per_key(x: Optional[torch.Tensor], B: int, T: int, what: str) -> Optional[torch.Tensor]:
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a tensor of shape [B, T] or [T], got {type(x).__name__}")
    if x.shape == (T,):
        x = x.unsqueeze(0)
    if x.ndim != 2 or x.shape[1] != T or x.shape[0] not in (1, B):
        raise ValueError(f"{what} must have shape [B, T] = [{B}, {T}] or [T], got {tuple(x.shape)}")
    return x.expand(B, T)


def _check(q, k, v, scale, key_logit_scale, key_mask) -> _Inputs:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{name} must be a 4-d tensor, got {getattr(t, 'shape', type(t))}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    B, H, N, D = q.shape
    T = k.shape[2]
    if k.shape != (B, H, T, D) or v.shape != (B, H, T, D):
        raise ValueError(f"k and v must be [B, H, T, D] = [{B}, {H}, T, {D}] with q [B, H, N, D]; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if T < 1:
        raise ValueError("k and v need at least one key (T >= 1)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    kls = _per_key(key_logit_scale, B, T, "key_logit_scale")
    if kls is not None:
        kls = kls.to(device=q.device, dtype=torch.float32)
    km = _per_key(key_mask, B, T, "key_mask")
    if km is not None:
        if km.dtype != torch.bool:
            raise TypeError(f"key_mask must be a bool tensor, got {km.dtype}")
        km = km.to(q.device)
        if not _mask_known_good(key_mask):
            if B > 0 and not bool(km.any(dim=1).all()):
                bad = (~km.any(dim=1)).nonzero().flatten().tolist()
                raise ValueError(f"key_mask excludes every key of batch row(s) {bad}: softmax over no "
                                 f"keys is undefined; keep at least one key (e.g. BOS) per row")
            _remember_mask(key_mask)
    return _Inputs(scale, kls, km)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def cross_attention_with_stats_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                         scale: Optional[float] = None,
                                         key_logit_scale: Optional[torch.Tensor] = None,
                                         key_mask: Optional[torch.Tensor] = None
                                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`cross_attention_with_stats` (float32 math, materialises P)."""
    inp = _check(q, k, v, scale, key_logit_scale, key_mask)
    return _reference(q, k, v, inp)


def _reference(q, k, v, inp: _Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * inp.scale      # [B, H, N, T]
    if inp.key_logit_scale is not None:
        s = s * inp.key_logit_scale[:, None, None, :]
    if inp.key_mask is not None:
        s = s.masked_fill(~inp.key_mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = torch.matmul(p, v.float()).to(q.dtype)
    return out, p.sum(dim=2)


# --------------------------------------------------------------------------------------------
# Triton launch
# --------------------------------------------------------------------------------------------
def _blocks(N: int, T: int, D: int, interpret: bool, elt: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_T, BLOCK_D, num_warps); elt = bytes per input element.

    GPU values are untuned first guesses: BLOCK_T ≤ 128 and halved until a k plus a v tile fit
    128 KB of shared memory (fp16 D=160 keeps T=77 in one block; fp32 D=160 uses 32-key blocks).
    """
    block_d = max(16, next_pow2(D))
    if interpret:  # few, large programs: the interpreter's cost is per op, not per element
        block_t = max(16, min(next_pow2(T), 256))
        block_n = max(16, min(next_pow2(N), 4096, (1 << 20) // max(block_t, block_d)))
        return block_n, block_t, block_d, 4
    block_t = max(16, min(next_pow2(T), 128))
    while block_t > 16 and 2 * block_t * block_d * elt > (128 << 10):
        block_t //= 2
    block_n = 128 if block_d <= 64 else 64 if block_d <= 128 else 32
    return block_n, block_t, block_d, 4 if block_d <= 64 else 8


def cross_attention_with_stats_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                      scale: Optional[float] = None,
                                      key_logit_scale: Optional[torch.Tensor] = None,
                                      key_mask: Optional[torch.Tensor] = None,
                                      block_n: Optional[int] = None, block_t: Optional[int] = None
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of :func:`cross_attention_with_stats`, no dispatch. block_n / block_t
    override the block sizes (powers of two >= 16), e.g. to test the multi-key-block path."""
    inp = _check(q, k, v, scale, key_logit_scale, key_mask)
    return _launch(q, k, v, inp, block_n, block_t)


def _launch(q, k, v, inp: _Inputs, block_n=None, block_t=None):
    B, H, N, D = q.shape
    T = k.shape[2]
    interpret = dispatch.is_interpreted(_kernel)
    bn, bt, bd, warps = _blocks(N, T, D, interpret, q.element_size())
    bn, bt = block_n or bn, block_t or bt
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out, torch.zeros((B, H, T), dtype=torch.float32, device=q.device)
    n_blocks = triton.cdiv(N, bn)
    partial = torch.empty((B * H, n_blocks, T), dtype=torch.float32, device=q.device)
    kls, km = inp.key_logit_scale, inp.key_mask
    kls_arg = kls if kls is not None else partial          # dummy pointer, never read
    km_arg = km.view(torch.uint8) if km is not None else partial
    slb, slt = (kls.stride(0), kls.stride(1)) if kls is not None else (0, 0)
    smb, smt = (km.stride(0), km.stride(1)) if km is not None else (0, 0)
    _kernel[(n_blocks, B * H)](
        q, k, v, out, kls_arg, km_arg, partial,
        H, N, T, D, inp.scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), slb, slt, smb, smt,
        BLOCK_N=bn, BLOCK_T=bt, BLOCK_D=bd, NUM_T_BLOCKS=triton.cdiv(T, bt),
        HAS_KLS=kls is not None, HAS_MASK=km is not None,
        DOT_F32=interpret and q.dtype == torch.bfloat16, IEEE=q.dtype == torch.float32,
        BF16_RTNE=interpret and q.dtype == torch.bfloat16,
        num_warps=warps, num_stages=1,   # 1-2 key blocks: nothing worth pipelining
    )
    mass = partial[:, 0] if n_blocks == 1 else partial.sum(dim=1)
    return out, mass.view(B, H, T)


# --------------------------------------------------------------------------------------------
# Public, dispatching entry point
# --------------------------------------------------------------------------------------------
def cross_attention_with_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                               scale: Optional[float] = None,
                               key_logit_scale: Optional[torch.Tensor] = None,
                               key_mask: Optional[torch.Tensor] = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and per-token attention mass, in one pass over q.

    q: [B, H, N, D]; k, v: [B, H, T, D]; float32, float16 or bfloat16, one dtype and device; any
        strides. D <= 256 for the Triton kernel (larger falls back to the reference).
    scale: logit scale, default 1/sqrt(D).
    key_logit_scale: [B, T] or [T], any float dtype: multiplies each key's logit (after scale).
    key_mask: [B, T] or [T] bool: False keys are excluded. Every row must keep at least one key,
        else ValueError (checked once per unmodified mask tensor: the check syncs with the GPU).
    returns: out [B, H, N, D] in q's dtype; token_mass [B, H, T] float32,
        token_mass[b, h, t] = Σ_n P[b, h, n, t] (masked keys get 0; each row of P sums to 1, so
        Σ_t token_mass[b, h, t] = N).
    CUDA tensors run the Triton kernel, CPU tensors the reference (see memguard.kernels.dispatch).
    """
    inp = _check(q, k, v, scale, key_logit_scale, key_mask)
    unsupported = dispatch.dtype_reason(dispatch.FLOAT_DTYPES, q=q)
    if unsupported is None and q.shape[-1] > MAX_HEAD_DIM:
        unsupported = f"head dim > {MAX_HEAD_DIM}"
    return dispatch.run(NAME, q.device, kernel=_kernel, unsupported=unsupported,
                        triton_fn=lambda: _launch(q, k, v, inp),
                        reference_fn=lambda: _reference(q, k, v, inp))


# --------------------------------------------------------------------------------------------
# Statistics of the token mass (pure torch, tiny)
# --------------------------------------------------------------------------------------------
class AttentionEntropy(NamedTuple):
    entropy: torch.Tensor     # float32, nats
    bos_share: torch.Tensor   # float32 in [0, 1]


def attention_entropy(token_mass: torch.Tensor, key_mask: Optional[torch.Tensor] = None, *,
                      per_head: bool = True, exclude_bos: bool = False) -> AttentionEntropy:
    """How spread the attention over the prompt tokens is, from ``token_mass``.

    token_mass: [B, H, T] (as returned by :func:`cross_attention_with_stats`; any non-negative
        mass works). key_mask: [B, T] or [T] bool; False tokens are left out of the distribution.
    per_head: True gives [B, H] results; False first sums the mass over heads, giving [B].
    exclude_bos: leave token 0 (BOS) out of the entropy's distribution (bos_share is unaffected).
    returns AttentionEntropy(entropy, bos_share), float32:
        entropy   = -Σ_t p_t log p_t (nats) with p_t = mass_t / Σ_t' mass_t' over the kept tokens;
                    0 <= entropy <= log(#kept tokens); 0 when the kept mass is 0.
        bos_share = mass_0 / Σ_t mass_t over the unmasked tokens (0 when that total is 0).
    """
    if token_mass.ndim != 3:
        raise ValueError(f"token_mass must be [B, H, T], got {tuple(token_mass.shape)}")
    mass = token_mass.float().clamp_min(0)
    B, H, T = mass.shape
    if not per_head:
        mass = mass.sum(dim=1, keepdim=True)
    keep = torch.ones((B, T), dtype=torch.bool, device=mass.device)
    if key_mask is not None:
        keep = _per_key(key_mask, B, T, "key_mask").to(mass.device).bool()
    mass = mass * keep[:, None, :]
    total = mass.sum(dim=-1)
    bos_share = torch.where(total > 0, mass[..., 0] / total.clamp_min(1e-30), torch.zeros_like(total))
    if exclude_bos:
        mass = mass.clone()
        mass[..., 0] = 0
        total = mass.sum(dim=-1)
    p = mass / total.clamp_min(1e-30).unsqueeze(-1)
    entropy = -(torch.where(p > 0, p * torch.log(p.clamp_min(1e-30)), torch.zeros_like(p))).sum(dim=-1)
    if not per_head:
        entropy, bos_share = entropy[:, 0], bos_share[:, 0]
    return AttentionEntropy(entropy, bos_share)
