"""Backend choice for the guard kernels, and the counters that make every fallback visible.

Rules (read on every call, so tests and operators can flip them at run time):

* ``MEMGUARD_KERNELS`` unset or ``auto``: CUDA tensors go to the Triton kernel, every other
  device to the PyTorch reference.
* ``MEMGUARD_KERNELS=triton``: always the Triton kernel. On CPU tensors this means Triton's
  interpreter, which Triton only enables for kernels decorated while ``TRITON_INTERPRET=1`` was
  set: set it before the first ``kernels.<kernel>`` module is imported, or this raises
  :class:`TritonInterpreterRequired`.
* ``MEMGUARD_KERNELS=reference``: always the PyTorch reference.

A *fallback* is a call that wanted Triton and ran the reference instead: Triton not importable,
inputs the kernel does not support (float64, head dim > 256, ...), or - in ``auto`` mode only - an
exception raised by the Triton launch. Fallbacks are never silent: each one is counted per kernel
and per reason (:func:`kernel_stats`), and logged on the ``memguard.kernels`` logger, at WARNING
the first time a (kernel, reason) pair occurs and at DEBUG afterwards so that a per-step fallback
does not flood the log. With ``MEMGUARD_KERNELS=triton`` a Triton launch error is re-raised, not
caught.

This module imports torch and (optionally) triton, nothing else of the project.
"""
from __future__ import annotations

import copy
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar

import torch

try:  # Triton is Linux-only in pyproject; everything here must still work without it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
    TRITON_IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - exercised only where triton is absent
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAVE_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

ENV_VAR = "MEMGUARD_KERNELS"
BACKENDS = ("auto", "triton", "reference")
LOGGER_NAME = "memguard.kernels"

_log = logging.getLogger(LOGGER_NAME)
R = TypeVar("R")


class TritonInterpreterRequired(RuntimeError):
    """Triton was forced for CPU tensors but the kernels were not built for the interpreter."""


# --------------------------------------------------------------------------------------------
# Counters
# --------------------------------------------------------------------------------------------
@dataclass
class KernelCounters:
    """What one kernel did since the last reset."""
    triton_calls: int = 0
    reference_calls: int = 0          # includes the fallbacks
    fallbacks: int = 0
    fallback_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class KernelStats:
    """Per-kernel counters, process-wide; thread-safe. Read them with :func:`kernel_stats`."""
    kernels: dict[str, KernelCounters] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def _get(self, name: str) -> KernelCounters:
        c = self.kernels.get(name)
        if c is None:
            c = self.kernels[name] = KernelCounters()
        return c

    def count_triton(self, name: str) -> None:
        with self._lock:
            self._get(name).triton_calls += 1

    def count_reference(self, name: str) -> None:
        with self._lock:
            self._get(name).reference_calls += 1

    def count_fallback(self, name: str, reason: str) -> bool:
        """Count a fallback; True if this (kernel, reason) pair is new."""
        with self._lock:
            c = self._get(name)
            c.fallbacks += 1
            c.reference_calls += 1
            first = reason not in c.fallback_reasons
            c.fallback_reasons[reason] = c.fallback_reasons.get(reason, 0) + 1
            return first

    def snapshot(self) -> dict[str, KernelCounters]:
        with self._lock:
            return copy.deepcopy(self.kernels)

    def reset(self) -> None:
        with self._lock:
            self.kernels.clear()


STATS = KernelStats()


def kernel_stats() -> dict[str, dict[str, Any]]:
    """A snapshot of the counters as plain data, for the metrics layer.

    ``{kernel: {"triton_calls": int, "reference_calls": int, "fallbacks": int,
    "fallback_reasons": {reason: count}}}``; kernels never called are absent.
    """
    return {name: {"triton_calls": c.triton_calls, "reference_calls": c.reference_calls,
                   "fallbacks": c.fallbacks, "fallback_reasons": dict(c.fallback_reasons)}
            for name, c in STATS.snapshot().items()}


def reset_kernel_stats() -> None:
    STATS.reset()


# --------------------------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------------------------
def requested_backend() -> str:
    """The value of ``MEMGUARD_KERNELS`` (``auto`` when unset); ValueError if unknown."""
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={os.environ.get(ENV_VAR)!r}: expected one of {', '.join(BACKENDS)}")
    return value


def interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET is set now (what matters is its value when a kernel was decorated)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def is_interpreted(kernel: Any) -> bool:
    """True if `kernel` (a @triton.jit object) runs in Triton's interpreter."""
    if not HAVE_TRITON or kernel is None:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover
        return False
    return isinstance(kernel, InterpretedFunction)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def run(name: str, device: torch.device, *, kernel: Any,
        triton_fn: Callable[[], R], reference_fn: Callable[[], R],
        unsupported: Optional[str] = None) -> R:
    """Run kernel `name` on the backend the rules above pick; count and log what happened.

    kernel: the module's @triton.jit object (None when Triton is absent), used to tell whether
        it runs in the interpreter. unsupported: why these inputs cannot go to Triton, or None.
    """
    mode = requested_backend()
    if mode == "reference" or (mode == "auto" and device.type != "cuda"):
        STATS.count_reference(name)
        return reference_fn()

    reason: Optional[str] = None
    if not HAVE_TRITON or kernel is None:
        reason = f"triton unavailable ({TRITON_IMPORT_ERROR or 'kernel not defined'})"
    elif unsupported is not None:
        reason = unsupported
    elif device.type not in ("cuda", "cpu"):
        reason = f"device type {device.type!r} not supported by Triton"
    elif device.type == "cpu" and not is_interpreted(kernel):
        raise TritonInterpreterRequired(
            f"{ENV_VAR}=triton with CPU tensors needs Triton's interpreter, but kernel {name!r} was "
            f"compiled for the GPU: set TRITON_INTERPRET=1 in the environment before "
            f"memguard.kernels.{name} is first imported (e.g. export it before starting Python), "
            f"or use {ENV_VAR}=reference.")
    if reason is not None:
        _fallback(name, reason)
        return reference_fn()

    try:
        result = triton_fn()
    except Exception as exc:
        if mode == "triton":
            raise
        _fallback(name, f"triton launch failed: {type(exc).__name__}", exc_info=True)
        return reference_fn()
    STATS.count_triton(name)
    return result


def _fallback(name: str, reason: str, exc_info: bool = False) -> None:
    first = STATS.count_fallback(name, reason)
    level = logging.WARNING if first else logging.DEBUG
    _log.log(level, "kernel %s: falling back to the PyTorch reference: %s", name, reason,
             exc_info=exc_info)


def dtype_reason(allowed: tuple[torch.dtype, ...], **tensors: torch.Tensor) -> Optional[str]:
    """A fallback reason if any named tensor has a dtype outside `allowed`."""
    for arg, t in tensors.items():
        if t is not None and t.dtype not in allowed:
            return f"{arg} dtype {str(t.dtype).replace('torch.', '')} not supported by the Triton kernel"
    return None


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
