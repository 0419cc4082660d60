"""Compile every GPU variant of the kernels ahead of time, without a GPU.

    python -m memguard.kernels.aot_check [--arch 90] [--quick]

Runs Triton's full CUDA pipeline (TTIR → TTGIR → LLVM → PTX → cubin with ptxas) for the block
sizes the launch wrappers pick on a GPU, and prints each variant's shared memory. It catches what
the interpreter cannot: code-generation errors, type errors in compiled mode, and shared memory
beyond the device's limit. It needs triton's CUDA backend and ptxas, not a GPU; it must run
without TRITON_INTERPRET (it removes it and refuses if the kernels are already interpreted).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from memguard.kernels import cfg_divergence as cd  # noqa: E402
from memguard.kernels import cross_attention as ca  # noqa: E402
from memguard.kernels import dispatch  # noqa: E402
from memguard.kernels import fused_fingerprint as ff  # noqa: E402
from memguard.kernels import similarity as sm  # noqa: E402

SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _compile(kernel, types: dict, consts: dict, target, num_warps: int, num_stages: int = 1) -> int:
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, sig, consts), target=target,
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return int(compiled.metadata.shared)


def variants(quick: bool):
    """(label, kernel, types, constexprs, num_warps, num_stages) for the GPU block choices."""
    out = []
    attn = [("fp16", 40, 77), ("fp16", 160, 77), ("fp32", 160, 77)] if quick else [
        (dt, d, t) for dt in ("fp16", "bf16", "fp32") for d in (40, 80, 160, 256) for t in (77, 256)]
    for dt, d, t in attn:
        bn, bt, bd, warps = ca._blocks(4096, t, d, False, 4 if dt == "fp32" else 2)
        p = "*" + dt
        types = dict(q_ptr=p, k_ptr=p, v_ptr=p, o_ptr=p, kls_ptr="*fp32", km_ptr="*u8", mass_ptr="*fp32",
                     qk_scale="fp32")
        consts = dict(BLOCK_N=bn, BLOCK_T=bt, BLOCK_D=bd, NUM_T_BLOCKS=triton.cdiv(t, bt), HAS_KLS=True,
                      HAS_MASK=True, DOT_F32=False, IEEE=dt == "fp32", BF16_RTNE=False)
        out.append((f"cross_attention {dt} D={d} T={t}", ca._kernel, types, consts, warps, 1))
    for dt in (("fp16",) if quick else ("fp16", "bf16", "fp32")):
        p = "*" + dt
        types = dict(eu_ptr=p, ec_ptr=p, xt_ptr=p, eps_ptr=p, x0_ptr=p, part_ptr="*fp32", w_ptr="*fp32",
                     ab_ptr="*fp32", w_val="fp32", ab_val="fp32")
        consts = dict(BLOCK=1024, W_TENSOR=True, AB_TENSOR=False, BF16_RTNE_EPS=False, BF16_RTNE_X0=False)
        out.append((f"cfg_divergence {dt}", cd._kernel, types, consts, 4, 1))
    for shared in (True, False):
        bb, bk, bf, _ = sm._blocks(4, 10_000, 256, shared, False)
        types = dict(q_ptr="*fp32", c_ptr="*fp16", m_ptr="*u8", psim_ptr="*fp32", pidx_ptr="*i64")
        consts = dict(BLOCK_B=bb, BLOCK_K=bk, BLOCK_F=bf, HAS_MASK=True)
        out.append((f"similarity {'shared' if shared else 'per-sample'}", sm._kernel, types, consts, 4, 1))
    for c in ((4,) if quick else (4, 16)):
        bc, bp, bk, _ = ff._blocks(c, 64 * 64, 10_000, 8, False)
        types = dict(x_ptr="*fp16", c_ptr="*fp16", m_ptr="*u8", fp_ptr="*fp32", psim_ptr="*fp32", pidx_ptr="*i64")
        consts = dict(G=8, BLOCK_C=bc, BLOCK_P=bp, BLOCK_K=bk, HAS_MASK=True)
        out.append((f"fingerprint_match C={c}", ff._kernel, types, consts, 4, 1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memguard.kernels.aot_check", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90 (default 90)")
    ap.add_argument("--quick", action="store_true", help="one variant per kernel and dtype family")
    args = ap.parse_args(argv)
    if dispatch.is_interpreted(ca._kernel):
        print("kernels were imported with TRITON_INTERPRET set; run in a fresh process", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    limit = SHARED_LIMIT.get(args.arch, 99 * 1024)
    failed = 0
    for label, kernel, types, consts, warps, stages in variants(args.quick):
        t0 = time.perf_counter()
        try:
            shared = _compile(kernel, types, consts, target, warps, stages)
        except Exception as exc:  # report every variant, then fail
            failed += 1
            print(f"FAIL {label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        over = shared > limit
        failed += over
        print(f"{'FAIL' if over else 'ok  '} {label:<36} shared {shared / 1024:6.1f} KiB "
              f"(limit {limit // 1024} KiB)  {time.perf_counter() - t0:5.1f}s", flush=True)
    print(f"sm_{args.arch}: {'all variants compiled' if not failed else f'{failed} variant(s) failed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
