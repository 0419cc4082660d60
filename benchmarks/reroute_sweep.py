"""Reroute sweep: decisions, released copies, testbed-CLIP fidelity and cost of rerouted images, per
mitigation variant, on one testbed's memorized prompts (issue 13's meaningful-caption items by default).

    TB=eps SEEDS=2000,2001,2002,2003 python -m memguard.benchmarks.reroute_sweep \
        'default={}' 'strong_push={"push_strength":3.0}' 'no_second_pass={"g_second_pass":False}'

Each argument is NAME=dict of MitigationConfig fields (GuardConfig fields prefixed with g_).
SETS=combos (default: the testbed's memorized compositional captions) or a comma list of prompt sets
(memorized,paraphrased,...). CLIP fidelity is relative to unguarded generations of 24 novel prompts.
"""
import json
import logging
import os
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import torch
from memguard.benchmarks.quality import build_guard, generate_set, judge, reroute_fidelity
from memguard.types import GuardMode, Decision
from memguard.testbed.registry import get_testbed, EPS_COMBOS
from memguard.testbed.dataset import prompt_set_members, build_training_set, memorized_items, caption_for
from memguard.testbed.clip_judge import load_judge
from memguard.mitigation import MitigationConfig
from memguard.pipeline import GuardConfig


def main() -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    tb = get_testbed(os.environ.get("TB", "eps"))
    SETS = os.environ.get("SETS", "combos").split(",")
    args = SimpleNamespace(model=tb.model_dir, index=None, policy=None, self_calibrate=False, device="cpu",
                           dtype="float32", steps=30, size=64, guidance=7.5, batch=16)
    guarded, index = build_guard(args)
    sets = prompt_set_members(tb.data)
    combo_caps = {caption_for(*c) for c in EPS_COMBOS}
    mem = [(p, t) for p, t in sets["memorized"] if p in combo_caps] if SETS == ["combos"] else [m for k in SETS for m in sets[k]]
    novel = sets["novel"][:24]
    seeds = [int(x) for x in os.environ.get("SEEDS", "1000,1001,1002,1003").split(",")]
    items = build_training_set(tb.data)
    train = (np.stack([it.image for it in items]), [it.item_id for it in items])
    memo = {it.item_id for it in memorized_items(items)}
    J = load_judge()
    t0 = time.time()
    mon = generate_set(guarded, "memorized", mem, seeds, GuardMode.MONITOR, args)
    nov = generate_set(guarded, "novel", novel, seeds[:1], GuardMode.MONITOR, args)
    judge(mon, *train, memo)
    nclip = float(np.mean(J.clip_score([r.result.image for r in nov], [r.prompt for r in nov])))
    mclip = float(np.mean(J.clip_score([r.result.image for r in mon], [r.prompt for r in mon])))
    print(f"unguarded: combos copies {sum(bool(r.copy) for r in mon)}/{len(mon)} clip {mclip:.3f}; novel clip {nclip:.3f} ({time.time()-t0:.0f}s)", flush=True)
    variants = {k: json.loads(v.replace("(", "[").replace(")", "]")) for k, v in (a.split("=", 1) for a in sys.argv[1:])} or {"default": {}}
    for name, kw in variants.items():
        gkw = {k[2:]: v for k, v in kw.items() if k.startswith("g_")}
        mkw = {k: (tuple(tuple(r) for r in v) if k == "rungs" else v) for k, v in kw.items() if not k.startswith("g_")}
        guarded.config = replace(GuardConfig(), mitigation=replace(MitigationConfig(), **mkw), **gkw)
        t1 = time.time()
        enf = generate_set(guarded, "memorized", mem, seeds, GuardMode.ENFORCE, args)
        judge(enf, *train, memo)
        rr = [e for e in enf if e.result.decision == Decision.REROUTED]
        dec = {d.name: sum(e.result.decision == d for e in enf) for d in Decision}
        fid = reroute_fidelity({"memorized": mon, "novel": nov}, {"memorized": enf}, args.steps,
                               judge=J).get("memorized", {})
        rel = [e for e in enf if e.result.image is not None]
        for e in enf:
            if e.result.decision == Decision.BLOCKED and os.environ.get("VERBOSE"):
                print("   blocked", e.prompt[:30], e.seed, e.result.reason.name, e.result.report.mitigations,
                      e.result.report.steps_computed, str(e.result.report.audit)[:300])
        print(f"{name}: {dec} rerouted non-copy {sum(not e.copy for e in rr)}/{len(enf)} released copies "
              f"{sum(bool(e.copy) for e in rel)} clip {fid.get('clip_rerouted', np.nan):.3f} "
              f"({fid.get('clip_vs_novel_unguarded', np.nan):.2f} of novel) max pairwise SSIM same seed "
              f"{fid.get('max_pairwise_ssim_same_seed', np.nan):.3f} evals/img vs plain "
              f"{fid.get('unet_evaluations_per_image_vs_plain', 0):.2f} ({time.time()-t1:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
