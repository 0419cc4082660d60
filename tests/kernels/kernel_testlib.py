"""Helpers for the kernel tests: tolerances, the relative-error check, input makers."""
from __future__ import annotations

import zlib

import pytest
import torch

# relative error ‖out − ref‖ / ‖ref‖. bf16 keeps 8 significand bits to fp16's 11: its bound is
# twice fp16's (bf16 results here reach ~5e-5 against the reference, ~2e-3 against float64).
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
INT_POISON = -987654321
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

RECORD: dict[tuple[str, str, str], tuple[float, float]] = {}  # -> (max error, tolerance)


def dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != {tuple(ref64.shape)}")
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / denom if denom > 0 else num


def check(kernel: str, what: str, dtype: torch.dtype, out: torch.Tensor, ref: torch.Tensor,
          tol: float | None = None) -> float:
    """Assert out is finite where ref is, has ref's dtype and shape, and rel_err <= tol; record it."""
    tol = TOL[dtype] if tol is None else tol
    assert out.dtype == ref.dtype, f"{kernel} {what}: dtype {out.dtype} != {ref.dtype}"
    assert out.shape == ref.shape, f"{kernel} {what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    assert not torch.isnan(out).any(), f"{kernel} {what}: NaN in output (unwritten element?)"
    assert torch.equal(torch.isfinite(out).cpu(), finite.cpu()), f"{kernel} {what}: inf pattern differs"
    err = rel_err(torch.where(finite, out, 0), torch.where(finite, ref, 0))
    key = (kernel, what, dname(dtype))
    prev_err, prev_tol = RECORD.get(key, (0.0, tol))
    RECORD[key] = (max(prev_err, err), min(prev_tol, tol))
    assert err <= tol, f"{kernel} {what} {dname(dtype)}: relative error {err:.3e} > {tol:.0e}"
    return err


def summary_lines() -> list[str]:
    lines = [f"{'kernel':<18} {'comparison':<28} {'dtype':<9} {'max rel err':>11}  tolerance"]
    for (kernel, what, dt), (err, tol) in sorted(RECORD.items()):
        lines.append(f"{kernel:<18} {what:<28} {dt:<9} {err:>11.2e}  {tol:.0e}")
    return lines


def gen(*key) -> torch.Generator:
    """A generator seeded from the test's parameters: fresh inputs per case, reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(shape, dtype, g, device=DEVICE, scale=1.0, offset=0.0) -> torch.Tensor:
    x = torch.randn(shape, generator=g, dtype=torch.float32) * scale + offset
    assert x.numel() == 0 or x.abs().sum() > 0    # never all zeros
    return x.to(dtype).to(device)


def require_triton(kernel_obj) -> None:
    from memguard.kernels import dispatch
    if not dispatch.HAVE_TRITON:
        pytest.skip("triton is not installed")
    if DEVICE == "cpu" and not dispatch.is_interpreted(kernel_obj):
        pytest.skip("kernels were imported without TRITON_INTERPRET=1 (scripts/test.sh sets it)")
