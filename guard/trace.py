"""A generated image's per-step trace: JSON export and a PNG plot of the signals against the step.

The trace lives in `GuardReport.trace`, one dict of floats per computed step:
``step``, ``timestep``, the raw signals (``divergence``, ``entropy``, ``bos``, ``similarity``,
``standout``), their oriented z-scores (``z_<signal>``), ``combined``, ``guidance`` (the scale applied), ``rung`` (the
mitigation rung in force, 0 = none). Thresholds go in the export's header. Membership information
(which training item matched) is not in the trace; it stays in `GuardReport.audit`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from memguard.signals import SIGNALS
from memguard.types import ImageResult


def trace_document(result: ImageResult, *, threshold: float | None = None,
                   verify_threshold: float | None = None, include_audit: bool = False) -> dict:
    """Plain-JSON view of one result: decision, reason, report fields and the per-step trace."""
    report = result.report
    doc = {
        "index": result.index, "seed": result.seed, "decision": result.decision.value,
        "reason": result.reason.value, "first_flagged_step": report.first_flagged_step,
        "steps_computed": report.steps_computed, "scores": _finite(report.scores),
        "mitigations": list(report.mitigations),
        "thresholds": _finite({"combined": threshold, "verify_similarity_z": verify_threshold}),
        "signals": list(SIGNALS), "trace": [_finite(row) for row in report.trace],
    }
    if include_audit:
        doc["audit"] = report.audit
    return doc


def write_trace_json(result: ImageResult, path: str | os.PathLike, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trace_document(result, **kwargs), indent=1, default=str) + "\n")
    return path


def write_trace_plot(result: ImageResult, path: str | os.PathLike, *, threshold: float | None = None,
                     verify_threshold: float | None = None, title: str = "") -> Path:
    """PNG: top, each signal's z-score and the combined score with the thresholds; below, raw values."""
    import matplotlib
    matplotlib.use("Agg")   # headless: never needs a display
    import matplotlib.pyplot as plt

    rows = result.report.trace
    steps = [r["step"] + 1 for r in rows]    # 1-based: "step 1" is the first denoising step
    fig, axes = plt.subplots(1 + len(SIGNALS), 1, figsize=(7, 2.0 * (1 + len(SIGNALS))), sharex=True)
    ax = axes[0]
    for name in SIGNALS:
        ax.plot(steps, [r.get(f"z_{name}", math.nan) for r in rows], label=f"z {name}", lw=1)
    ax.plot(steps, [r.get("combined", math.nan) for r in rows], label="combined", color="black", lw=2)
    if threshold is not None and math.isfinite(threshold):
        ax.axhline(threshold, color="red", ls="--", lw=1, label="flag threshold")
    if verify_threshold is not None and math.isfinite(verify_threshold):
        ax.axhline(verify_threshold, color="orange", ls=":", lw=1, label="verify threshold")
    if result.report.first_flagged_step is not None:
        for a in axes:
            a.axvline(result.report.first_flagged_step + 1, color="red", alpha=0.3)
    ax.set_ylabel("z (benign-standardized)")
    ax.legend(fontsize=6, ncol=3)
    ax.set_title(title or f"image {result.index} seed {result.seed}: {result.decision.value} ({result.reason.value})",
                 fontsize=9)
    for a, name in zip(axes[1:], SIGNALS):
        a.plot(steps, [r.get(name, math.nan) for r in rows], color="tab:blue", lw=1)
        a.set_ylabel(name, fontsize=8)
    axes[-1].set_xlabel("denoising step")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _finite(d: dict) -> dict:
    """JSON has no Infinity/NaN: write null instead."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
