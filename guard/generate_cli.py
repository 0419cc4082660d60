"""`memguard generate` (guarded generation) and `memguard calibrate` (fit the policy on benign prompts).

    memguard generate --prompt "chelsea the tabby cat looking up, cute cat wallpaper 4k" --seed 1 --out out/ --json
    memguard calibrate --fpr 0.01 --json

Defaults: the testbed model (guard/testbed/model), its index (guard/testbed/index) and its policy
(guard/testbed/policy.json). Released images are written to --out; blocked ones are not.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from memguard.errors import InvalidInput
from memguard.types import FaceAction, GenerationRequest, GuardMode


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="guarded text-to-image generation: writes released images, prints decisions")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for a batch)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--model", type=Path, help="diffusers pipeline directory (default: the testbed)")
    p.add_argument("--index", type=Path, help="fingerprint index directory (default: the testbed's)")
    p.add_argument("--policy", type=Path, help="policy file (default: beside the testbed / in the model dir)")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image (image k uses seed + k)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--size", type=int, default=None, help="height = width in pixels (default: the model's)")
    p.add_argument("--mode", choices=[m.value for m in GuardMode], default=GuardMode.ENFORCE.value)
    p.add_argument("--face-action", choices=[a.value for a in FaceAction], default=FaceAction.BLUR.value)
    p.add_argument("--out", type=Path, required=True, help="directory for released images and traces")
    p.add_argument("--trace", action="store_true", help="also write each image's trace (JSON and PNG plot)")
    p.add_argument("--audit", action="store_true", help="include matched items (audit scope) in the output")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_generate)

    c = sub.add_parser("calibrate", help="run benign prompts and set the policy's thresholds for a target FPR")
    c.add_argument("--model", type=Path, help="diffusers pipeline directory (default: the testbed)")
    c.add_argument("--index", type=Path, help="fingerprint index of the model's training set (default: testbed's)")
    c.add_argument("--prompts", type=Path, help="benign prompts, one a line (default: testbed training captions)")
    c.add_argument("--testbed", help="a shipped testbed by name (vpred, eps, sdxl): its model, index and policy path")
    c.add_argument("--positives", type=Path, help="known memorized prompts, one a line (added to the duplicate "
                                                  "clusters' captions the index finds)")
    c.add_argument("--rule", choices=("auto", "linear", "distance"), help="combination rule (default auto: "
                                                                          "held-out clusters decide)")
    c.add_argument("--count", type=int, help="benign prompts to use (default 512)")
    c.add_argument("--seeds-per-prompt", type=int)
    c.add_argument("--steps", type=int)
    c.add_argument("--fpr", type=float, help="target false-positive rate (default 0.01)")
    c.add_argument("--detect-steps", type=int, help="decide within this many first steps (default 2)")
    c.add_argument("--out", type=Path, help="policy file to write (default: the model's policy path)")
    c.add_argument("--build-index", action="store_true", help="(re)build the testbed's index first")
    c.add_argument("--save-signals", type=Path, help="also write the benign signals measured (.npz)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_calibrate)


def _open_guard(args):
    from memguard.calibrate import (calibration_warnings, check_provenance, default_index_dir, default_policy_path,
                                 resolve_model_dir)
    from memguard.index.api import FingerprintIndex
    from memguard.loading import load_pipeline
    from memguard.pipeline import GuardedPipeline
    from memguard.policy import Policy

    index_dir = args.index or default_index_dir(args.model)
    if index_dir is None:
        raise InvalidInput("index", "give the fingerprint index of this model's training set (--index DIR)")
    policy = Policy.load(args.policy or default_policy_path(args.model))
    index = FingerprintIndex.open(index_dir, model_dir=resolve_model_dir(args.model), device=args.device)
    warnings = calibration_warnings(policy, index) + check_provenance(policy, resolve_model_dir(args.model), index_dir)
    return GuardedPipeline(load_pipeline(args.model, device=args.device), index=index, policy=policy), warnings


def _generate(args) -> int:
    from memguard.trace import trace_document, write_trace_json, write_trace_plot

    if args.num_images < 1:
        raise InvalidInput("num_images", f"{args.num_images} < 1")
    guarded, warnings = _open_guard(args)
    size = args.size or guarded.pipe.unet.config.sample_size * guarded.pipe.vae_scale_factor
    seed = args.seed if args.seed is not None else None
    requests = [GenerationRequest(p, negative_prompt=args.negative_prompt, height=size, width=size, steps=args.steps,
                                  guidance_scale=args.guidance_scale, seed=seed, num_images=args.num_images,
                                  mode=GuardMode(args.mode), face_action=FaceAction(args.face_action),
                                  request_id=f"cli-{i}") for i, p in enumerate(args.prompt)]
    batch = guarded.generate(requests)
    args.out.mkdir(parents=True, exist_ok=True)
    policy = guarded.policy
    rows = []
    for i, results in enumerate(batch.results):
        for r in results:
            stem = f"p{i}_img{r.index}_seed{r.seed}"
            entry = trace_document(r, threshold=policy.threshold, verify_threshold=policy.verify_threshold,
                                   include_audit=args.audit)
            entry.pop("trace")
            entry["prompt"] = requests[i].prompt
            if r.image is not None:
                from PIL import Image
                path = args.out / f"{stem}.png"
                Image.fromarray(r.image).save(path)
                entry["image"] = str(path)
            if args.trace:
                kw = dict(threshold=policy.threshold, verify_threshold=policy.verify_threshold)
                entry["trace_json"] = str(write_trace_json(r, args.out / f"{stem}.trace.json", include_audit=args.audit, **kw))
                entry["trace_png"] = str(write_trace_plot(r, args.out / f"{stem}.trace.png", **kw))
            rows.append(entry)
    doc = {"results": rows, "warnings": warnings,
           "stats": {"steps_computed": batch.stats.sample_steps, "steps_saved": batch.stats.steps_saved,
                     "seconds": round(sum(batch.stats.step_seconds) + batch.stats.decode_seconds, 3)}}
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        for w in warnings:
            print(f"WARNING: {w}", file=sys.stderr)
        for e in rows:
            flagged = "" if e["first_flagged_step"] is None else f" flagged at step {e['first_flagged_step'] + 1}"
            print(f"{e['decision']:<16} {e['reason']:<16} seed {e['seed']:<6} steps {e['steps_computed']:<3}"
                  f"{flagged}  {e.get('image', '(no image)')}  {e['prompt'][:60]}")
    return 0


def _calibrate(args) -> int:
    from memguard.calibrate import (CalibrationConfig, build_testbed_index, calibrate, is_testbed, policy_summary,
                                 with_overrides)

    from memguard.calibrate import testbed_of
    from memguard.testbed.registry import get_testbed

    cfg = with_overrides(CalibrationConfig(), prompts=args.count, seeds_per_prompt=args.seeds_per_prompt,
                         steps=args.steps, target_fpr=args.fpr, detect_steps=args.detect_steps, rule=args.rule)
    if not 0 < cfg.target_fpr < 1:
        raise InvalidInput("fpr", f"{cfg.target_fpr} is not in (0, 1)")
    if args.testbed:
        if args.model:
            raise InvalidInput("testbed", "give --testbed or --model, not both")
        args.model = get_testbed(args.testbed).model_dir
    if args.build_index:
        if not is_testbed(args.model):
            raise InvalidInput("build_index", "only a testbed's index is built here; use `memguard index build`")
        build_testbed_index(testbed_of(args.model), progress=not args.json)
    policy = calibrate(args.model, args.index, args.out, cfg=cfg, prompt_file=args.prompts,
                       positives_file=args.positives, device=args.device, progress=not args.json,
                       signals_out=args.save_signals)
    summary = policy_summary(policy)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        rates = summary.get("rates", {})
        fit = summary.get("fit", {})
        print(f"policy written: rule {policy.combination.rule} (fitted on {fit.get('positives', 0)} likely-memorized "
              f"generations from {fit.get('clusters', 0)} duplicate clusters; held-out TPR {fit.get('heldout_tpr')}), "
              f"threshold {policy.threshold:.3f} over steps 1..{policy.detect_steps}, "
              f"verify {policy.verify_threshold:.3f}; target FPR {policy.target_fpr}; reroute fidelity floor "
              f"{'none (the index has no CLIP)' if policy.reroute_min_fidelity is None else f'{policy.reroute_min_fidelity:.3f}'}")
        for k, v in rates.items():
            print(f"  {k}: {v:.4f}" if isinstance(v, float) and math.isfinite(v) else f"  {k}: {v}")
    return 0
