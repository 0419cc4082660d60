"""Opt-in: compile the kernels' GPU variants ahead of time (no GPU needed, ptxas is).

Slow (seconds to a minute per variant), so off by default: MEMGUARD_TEST_AOT=1 turns it on.
The full check is `python -m memguard.kernels.aot_check`.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.skipif(os.environ.get("MEMGUARD_TEST_AOT") != "1", reason="set MEMGUARD_TEST_AOT=1 (slow)")
def test_gpu_variants_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "memguard.kernels.aot_check", "--quick", "--arch", "90"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all variants compiled" in res.stdout
