"""Kernel tests run Triton in its interpreter on CPU (CI has no GPU).

TRITON_INTERPRET must be set before a kernel module is imported (Triton reads it when the
@triton.jit decorator runs); scripts/test.sh exports it, and this sets it for direct pytest runs.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import kernel_testlib as lib  # noqa: E402


@pytest.fixture
def poison(monkeypatch):
    """Every torch.empty / torch.empty_like made during the test is pre-filled with NaN (floats)
    or a sentinel (integers), so an output element a kernel fails to write fails the test."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        else:
            t.fill_(lib.INT_POISON)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
    yield


@pytest.fixture
def clean_env(monkeypatch):
    """No MEMGUARD_KERNELS override and fresh counters."""
    from memguard.kernels.dispatch import reset_kernel_stats
    monkeypatch.delenv("MEMGUARD_KERNELS", raising=False)
    reset_kernel_stats()
    yield
    reset_kernel_stats()


def pytest_terminal_summary(terminalreporter):
    if lib.RECORD:
        terminalreporter.section("kernel relative errors (max over cases)")
        for line in lib.summary_lines():
            terminalreporter.write_line(line)
