"""Small @triton.jit helpers shared by the kernels."""
from __future__ import annotations

from memguard.kernels.dispatch import HAVE_TRITON, tl, triton

if HAVE_TRITON:

    @triton.jit
    def to_bf16_rtne(x):
        """float32 -> bfloat16 rounded to nearest even, by bit manipulation.

        Only needed in Triton's interpreter, whose float32 -> bfloat16 cast truncates (rounds
        toward zero) and whose explicit RTNE mode drops the carry into the exponent. On the GPU
        a plain ``.to(tl.bfloat16)`` rounds to nearest even already.
        """
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def cast_out(x, dtype: tl.constexpr, BF16_RTNE: tl.constexpr):
        """Cast float32 `x` to the output element type `dtype`, rounding to nearest even."""
        if BF16_RTNE:
            return to_bf16_rtne(x)
        else:
            return x.to(dtype)
