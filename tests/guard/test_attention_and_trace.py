"""The stats attention processor against diffusers' AttnProcessor2_0, and trace export."""
from __future__ import annotations

import json

import numpy as np
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from memguard.attention import install_stats_processors
from memguard.models import build_tiny_unet
from memguard.signals import SIGNALS
from memguard.trace import write_trace_json, write_trace_plot
from memguard.types import Decision, GuardReport, ImageResult, Reason


def _unet_inputs(B: int = 2):
    return torch.randn(B, 4, 16, 16), torch.randint(0, 1000, (1,)).item(), torch.randn(B, 77, 64)


@torch.inference_mode()
def test_processor_matches_sdpa_and_publishes_token_mass():
    torch.manual_seed(int(np.random.default_rng().integers(2**31)))
    unet = build_tiny_unet().eval()
    x, t, text = _unet_inputs()
    unet.set_attn_processor(AttnProcessor2_0())
    reference = unet(x, t, encoder_hidden_states=text).sample
    control = install_stats_processors(unet)
    control.stats, control.record = False, False
    assert torch.equal(unet(x, t, encoder_hidden_states=text).sample, reference)     # plain: bit for bit
    control.stats = control.record = True
    control.reset()
    out = unet(x, t, encoder_hidden_states=text).sample
    assert torch.allclose(out, reference, rtol=1e-4, atol=1e-5)
    mass = control.mean_mass()
    assert control.layers == len(control.layer_names) and mass.shape == (2, 77)
    assert torch.allclose(mass.sum(dim=1), torch.ones(2), atol=1e-5)


def test_masked_padding_gets_no_mass_and_only_that_row_changes():
    unet = build_tiny_unet().eval()
    x, t, text = _unet_inputs()
    control = install_stats_processors(unet)
    keep = torch.ones(2, 77, dtype=torch.bool)    # built outside inference mode, as attention_rows does
    keep[1, 10:] = False
    scale = torch.ones(2, 77)
    scale[1, 0] = 1.25
    with torch.inference_mode():
        control.reset()
        plain = unet(x, t, encoder_hidden_states=text).sample
        control.key_mask, control.key_logit_scale = keep, scale
        control.reset()
        out = unet(x, t, encoder_hidden_states=text).sample
    mass = control.mean_mass()
    assert torch.all(mass[1, 10:] == 0) and torch.all(mass[0, 10:] > 0)
    assert torch.allclose(out[0], plain[0], rtol=1e-5, atol=1e-6) and not torch.allclose(out[1], plain[1])


def test_trace_exports_json_and_png(tmp_path):
    rng = np.random.default_rng()
    trace = [{"step": float(s), "timestep": float(999 - 30 * s), "rung": 0.0,
              **{k: float(v) for k, v in zip(SIGNALS, rng.random(len(SIGNALS)))},
              **{f"z_{k}": float(v) for k, v in zip(SIGNALS, rng.normal(size=len(SIGNALS)))},
              "combined": float(rng.normal()), "guidance": 7.5} for s in range(10)]
    result = ImageResult(0, 5, Decision.REROUTED, Reason.MEMORIZATION, None,
                         GuardReport({"combined": 9.0}, 1, 10, ["step 1: rung 1"], trace, {"matched": "photo-x"}))
    doc = json.loads(write_trace_json(result, tmp_path / "t.json", threshold=3.2,
                                      verify_threshold=float("inf")).read_text())
    assert doc["decision"] == "REROUTED" and len(doc["trace"]) == 10 and "audit" not in doc
    assert doc["thresholds"] == {"combined": 3.2, "verify_similarity_z": None}
    png = write_trace_plot(result, tmp_path / "t.png", threshold=3.2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
