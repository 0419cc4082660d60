"""Backend choice, MEMGUARD_KERNELS forcing, counted and logged fallbacks, lazy imports."""
from __future__ import annotations

import ast
import logging
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import kernel_testlib as lib
from memguard import kernels
from memguard.kernels import dispatch
from memguard.kernels import cross_attention as ca
from memguard.kernels import cfg_divergence as cd
from memguard.kernels.dispatch import kernel_stats

ROOT = pathlib.Path(__file__).resolve().parents[2]


def attn_inputs(dtype=torch.float32):
    g = lib.gen("dispatch", str(dtype))
    return tuple(lib.randn(s, dtype, g, device="cpu") for s in ((1, 2, 16, 8), (1, 2, 5, 8), (1, 2, 5, 8)))


def cfg_inputs(dtype=torch.float32):
    g = lib.gen("dispatch-cfg", str(dtype))
    return tuple(lib.randn((2, 4, 8, 8), dtype, g, device="cpu") for _ in range(3))


def test_public_api_names():
    for name in ("cross_attention_with_stats", "cfg_with_divergence", "fingerprint_similarity",
                 "latent_fingerprint", "fingerprint_match", "attention_entropy", "kernel_stats"):
        assert callable(getattr(kernels, name)), name
    assert "cross_attention_with_stats" in dir(kernels)
    with pytest.raises(AttributeError):
        kernels.no_such_kernel  # noqa: B018


def test_auto_sends_cpu_to_reference(clean_env):
    kernels.cross_attention_with_stats(*attn_inputs())
    kernels.cfg_with_divergence(*cfg_inputs(), 7.5, 0.5)
    s = kernel_stats()
    assert s["cross_attention"] == {"triton_calls": 0, "reference_calls": 1, "fallbacks": 0, "fallback_reasons": {}}
    assert s["cfg_divergence"]["reference_calls"] == 1


def test_forcing_triton_and_reference(clean_env, monkeypatch):
    lib.require_triton(ca._kernel)
    q, k, v = attn_inputs()
    monkeypatch.setenv("MEMGUARD_KERNELS", "triton")
    out_t, mass_t = kernels.cross_attention_with_stats(q, k, v)
    monkeypatch.setenv("MEMGUARD_KERNELS", "reference")
    out_r, mass_r = kernels.cross_attention_with_stats(q, k, v)
    monkeypatch.setenv("MEMGUARD_KERNELS", " Triton ")             # case and spaces tolerated
    kernels.cross_attention_with_stats(q, k, v)
    s = kernel_stats()["cross_attention"]
    assert (s["triton_calls"], s["reference_calls"], s["fallbacks"]) == (2, 1, 0)
    lib.check("cross_attention", "triton vs ref: out", torch.float32, out_t, out_r)


def test_unknown_backend_is_an_error(clean_env, monkeypatch):
    monkeypatch.setenv("MEMGUARD_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MEMGUARD_KERNELS"):
        kernels.cross_attention_with_stats(*attn_inputs())


def test_unsupported_dtype_falls_back_counted_and_logged(clean_env, monkeypatch, caplog):
    lib.require_triton(cd._kernel)
    monkeypatch.setenv("MEMGUARD_KERNELS", "triton")
    caplog.set_level(logging.DEBUG, logger=dispatch.LOGGER_NAME)
    x = cfg_inputs(torch.float64)
    eps, div, x0 = kernels.cfg_with_divergence(*x, 7.5, 0.5)
    kernels.cfg_with_divergence(*x, 7.5, 0.5)
    assert eps.dtype == torch.float64
    s = kernel_stats()["cfg_divergence"]
    reason = "eps_cond dtype float64 not supported by the Triton kernel"
    assert s == {"triton_calls": 0, "reference_calls": 2, "fallbacks": 2, "fallback_reasons": {reason: 2}}
    recs = [r for r in caplog.records if r.name == dispatch.LOGGER_NAME]
    assert [r.levelno for r in recs] == [logging.WARNING, logging.DEBUG]   # warn once per reason
    assert reason in recs[0].getMessage() and "cfg_divergence" in recs[0].getMessage()


def test_head_dim_too_large_falls_back(clean_env, monkeypatch):
    lib.require_triton(ca._kernel)
    monkeypatch.setenv("MEMGUARD_KERNELS", "triton")
    q = torch.randn(1, 1, 4, 300)
    kernels.cross_attention_with_stats(q, q[:, :, :2], q[:, :, :2])
    assert kernel_stats()["cross_attention"]["fallback_reasons"] == {"head dim > 256": 1}


def test_triton_unavailable_falls_back(clean_env, monkeypatch, caplog):
    monkeypatch.setenv("MEMGUARD_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "HAVE_TRITON", False)
    monkeypatch.setattr(dispatch, "TRITON_IMPORT_ERROR", "ModuleNotFoundError: No module named 'triton'")
    with caplog.at_level(logging.WARNING, logger=dispatch.LOGGER_NAME):
        kernels.cross_attention_with_stats(*attn_inputs())
    s = kernel_stats()["cross_attention"]
    assert s["fallbacks"] == 1 and s["triton_calls"] == 0
    (reason,) = s["fallback_reasons"]
    assert reason.startswith("triton unavailable") and "No module named" in reason
    assert any("falling back" in r.getMessage() for r in caplog.records)


def test_cpu_triton_without_interpreter_is_an_error(clean_env, monkeypatch):
    monkeypatch.setenv("MEMGUARD_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "is_interpreted", lambda kernel: False)
    with pytest.raises(dispatch.TritonInterpreterRequired, match="TRITON_INTERPRET=1"):
        kernels.cross_attention_with_stats(*attn_inputs())


def test_cpu_triton_without_interpreter_in_a_fresh_process():
    """The real thing: a process that never set TRITON_INTERPRET and forces Triton on CPU."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MEMGUARD_KERNELS"] = "triton"
    code = ("import torch\nfrom memguard import kernels\n"
            "q = torch.randn(1, 1, 4, 8)\n"
            "try:\n    kernels.cross_attention_with_stats(q, q, q)\n"
            "except RuntimeError as e:\n    print('ERROR:', e)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert "ERROR:" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr


def test_launch_error_falls_back_in_auto_and_raises_when_forced(clean_env, monkeypatch, caplog):
    def boom():
        raise RuntimeError("out of resources: shared memory")

    cuda = torch.device("cuda")                      # auto mode wants Triton for CUDA tensors
    with caplog.at_level(logging.WARNING, logger=dispatch.LOGGER_NAME):
        assert dispatch.run("fake", cuda, kernel=object(), triton_fn=boom, reference_fn=lambda: "ref") == "ref"
    s = kernel_stats()["fake"]
    assert s["fallbacks"] == 1 and s["fallback_reasons"] == {"triton launch failed: RuntimeError": 1}
    assert caplog.records and caplog.records[0].exc_info is not None   # traceback kept in the log
    monkeypatch.setenv("MEMGUARD_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="out of resources"):
        dispatch.run("fake", cuda, kernel=object(), triton_fn=boom, reference_fn=lambda: "ref")


def test_stats_snapshot_is_a_copy(clean_env):
    kernels.cfg_with_divergence(*cfg_inputs(), 7.5, 0.5)
    snap = kernel_stats()
    snap["cfg_divergence"]["reference_calls"] = 99
    assert kernel_stats()["cfg_divergence"]["reference_calls"] == 1
    dispatch.reset_kernel_stats()
    assert kernel_stats() == {}


def test_poison_fixture_fills_and_catches(poison, monkeypatch):
    assert torch.isnan(torch.empty(3)).all() and (torch.empty(2, dtype=torch.int64) == lib.INT_POISON).all()
    assert torch.isnan(torch.empty_like(torch.zeros(2))).all()
    # a launch that skips its last chunk must fail the check
    lib.require_triton(cd._kernel)
    real_cdiv = dispatch.triton.cdiv
    monkeypatch.setattr(dispatch.triton, "cdiv", lambda a, b: max(1, real_cdiv(a, b) - 1))
    x = cfg_inputs()
    eps, _, _ = cd.cfg_with_divergence_triton(*x, 7.5, 0.5, block=64)
    monkeypatch.setattr(dispatch.triton, "cdiv", real_cdiv)
    ref, _, _ = cd.cfg_with_divergence_reference(*x, 7.5, 0.5)
    with pytest.raises(AssertionError, match="NaN"):
        lib.check("meta", "unwritten", torch.float32, eps, ref)
    lib.RECORD.pop(("meta", "unwritten", "float32"), None)


def test_import_kernels_is_lazy():
    code = ("import sys, memguard.kernels\n"
            "print(sorted(m for m in sys.modules if m.startswith(('memguard', 'kernels', 'triton', 'diffusers'))))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "['memguard', 'memguard.kernels']"


def test_kernels_import_only_torch_and_triton():
    allowed = {"torch", "triton"} | set(sys.stdlib_module_names)
    for path in sorted((ROOT / "kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for n in names:
                ok = n.split(".")[0] in allowed or n == "memguard.kernels" or n.startswith("memguard.kernels.")
                assert ok, f"{path.name} imports {n}"
