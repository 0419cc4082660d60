"""benchmarks/kernels.py: the byte model and an end-to-end run at toy sizes."""
from __future__ import annotations

import json

from memguard.benchmarks import kernels as bench


def test_byte_model():
    B, H, N, T, D = 2, 8, 4096, 77, 40
    io = (2 * B * H * N * D + 2 * B * H * T * D) * 2
    assert bench.attn_bytes(B, H, N, T, D, stats="none") == io
    fused = bench.attn_bytes(B, H, N, T, D, stats="fused")
    explicit = bench.attn_bytes(B, H, N, T, D, stats="explicit")
    assert io < fused < 1.05 * io < explicit                      # stats cost < 5 % extra traffic
    assert explicit - io >= 4 * B * H * N * T * 2                 # S and P written and read
    assert bench.cfg_bytes(100, fused=True) == 1000 and bench.cfg_bytes(100, fused=False) == 3200


def test_end_to_end_toy_sizes(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "SD15_LEVELS", {512: [(64, 40), (16, 80)], 1024: [(32, 40)]})
    monkeypatch.setattr(bench, "FP_CANDIDATES", 50)
    monkeypatch.setattr(bench, "LATENT_C", 4)
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--repeats", "1", "--res", "512", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "GPU numbers are absent here" in text and "SDPA + explicit softmax" in text
    data = json.loads(out.read_text())
    assert data["gpu_numbers_absent"] is True
    impls = {r["impl"] for r in data["rows"]}
    assert {"SDPA alone (floor)", "PyTorch unfused", "fingerprint + matmul + max"} <= impls
    assert all(r["ms"] > 0 and r["bytes"] > 0 for r in data["rows"])
