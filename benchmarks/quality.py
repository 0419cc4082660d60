"""Detection quality and enforce-mode outcomes of the guard.

Testbed (default; CPU, ~15 min on 2 cores):

    python -m benchmarks.quality --seeds 4 --out runs/quality

1. MONITOR pass over the memorized, paraphrased and novel prompt sets × seeds: every signal's
   z-score per step (the policy's benign standardization) and the combined score. ROC AUC and
   TPR at 1 % FPR of memorized (and paraphrased) versus novel, for each signal alone at step 1, 2,
   5 and the last step, and for the combined score as the policy uses it (its maximum over steps
   1..k). The monitor images are the unguarded outputs: their copy rate is the baseline.
2. ENFORCE pass over the same generations: decisions. Every released image is judged by an
   independent pixel-space measure (guard.testbed.copies: SSIM and RMSE against the nearest
   training image), never by the guard's own signals.
Writes quality.json, quality.md (the tables) and roc.png.

Real Stable Diffusion on a GPU host (Wen et al.'s 500 memorized prompts vs Ren et al.'s 500
non-memorized ones; no training images there, so detection only):

    python -m benchmarks.quality --model /models/stable-diffusion-v1-4 --device cuda --dtype float16 \\
        --memorized ../shared/data/sdv1_500_memorized.jsonl --novel ../shared/data/memattn_group_nomem500.txt \\
        --self-calibrate --no-enforce --seeds 1 --steps 50 --size 512 --out runs/quality-sd14

`--self-calibrate` splits the novel list in two disjoint halves: even lines calibrate the
standardization (as `memguard calibrate` would), odd lines are the negatives. Without `--index`
the similarity signal is left out of the combined score.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("benchmarks.quality")
STEPS_REPORTED = ("1", "2", "5", "end")
FPR = 0.01


# ---- prompts and runs ------------------------------------------------------------------------------
def read_prompts(path: Path) -> list[str]:
    """One prompt a line (.txt) or a JSONL file with a caption/prompt field per line."""
    lines = [x.strip() for x in Path(path).read_text().splitlines() if x.strip()]
    if Path(path).suffix == ".jsonl":
        return [json.loads(x).get("caption") or json.loads(x)["prompt"] for x in lines]
    return lines


@dataclass
class Record:
    set: str
    prompt: str
    seed: int
    z: np.ndarray              # [steps, S] oriented z-scores
    raw: np.ndarray            # [steps, S] raw signal values
    combined: np.ndarray       # [steps]
    result: object             # ImageResult
    copy: bool | None = None   # independent judge (testbed only)
    nearest: str = ""
    ssim: float = math.nan
    structural: float = math.nan   # colour-blind structural similarity to the closest memorized photo


def generate_set(guarded, name: str, prompts: list[str], seeds: list[int], mode, args) -> list[Record]:
    from guard.pipeline import COLUMNS
    from guard.signals import SIGNALS
    from guard.types import GenerationRequest

    pairs = [(p, s) for p in prompts for s in seeds]
    out = []
    for start in range(0, len(pairs), args.batch):
        chunk = pairs[start:start + args.batch]
        reqs = [GenerationRequest(p, seed=s, steps=args.steps, height=args.size, width=args.size,
                                  guidance_scale=args.guidance, mode=mode) for p, s in chunk]
        for (p, s), rs in zip(chunk, guarded.generate(reqs).results):
            r = rs[0]
            rows = r.report.trace
            z = np.array([[row.get(f"z_{k}", math.nan) for k in SIGNALS] for row in rows])
            raw = np.array([[row.get(k, math.nan) for k in SIGNALS] for row in rows])
            comb = np.array([row.get("combined", math.nan) for row in rows])
            out.append(Record(name, p, s, z, raw, comb, r))
        log.info("%s %s: %d / %d", mode.value, name, min(start + args.batch, len(pairs)), len(pairs))
    assert "combined" in COLUMNS
    return out


STRUCTURAL_THRESHOLD = 0.45   # the judge's SSIM threshold, applied colour-blind


def _grey_standardized(image: np.ndarray) -> np.ndarray:
    g = image.astype(np.float32).mean(axis=-1)
    return (g - g.mean()) / (g.std() + 1e-6)


def structural_similarity_to(image: np.ndarray, references: list[np.ndarray]) -> float:
    """Max SSIM of the grey, per-image standardized image to the (standardized) references.

    A second, coarser measure beside guard.testbed.copies: structure only (grey, standardized), with
    no pixel-distance bound, so it also counts loose copies of a photo that the judge rejects.
    """
    from skimage.metrics import structural_similarity

    g = _grey_standardized(image)
    return max(float(structural_similarity(g, r, data_range=8.0)) for r in references)


def judge(records: list[Record], train_images: np.ndarray, train_ids: list[str]) -> None:
    from guard.testbed import copies

    photos = [_grey_standardized(im) for im, i in zip(train_images, train_ids) if i.startswith("photo-")]
    references = copies.References.of(train_images)
    for r in records:
        if r.result.image is None:
            continue
        j, score = copies.nearest(r.result.image, references)
        r.copy, r.nearest, r.ssim = score.is_copy, train_ids[j], score.ssim
        r.structural = structural_similarity_to(r.result.image, photos)


def structural_copy(r: Record) -> bool:
    return bool(r.structural >= STRUCTURAL_THRESHOLD)


# ---- metrics ------------------------------------------------------------------------------------
def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score_pos > score_neg) + ½ P(tie): the Mann-Whitney form of the ROC AUC."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float = FPR) -> float:
    """Share of positives strictly above the threshold that at most ⌊fpr·n⌋ negatives exceed."""
    from guard.policy import upper_quantile_threshold

    return float(np.mean(np.asarray(pos) > upper_quantile_threshold(np.asarray(neg), fpr)))


def step_index(label: str, steps: int) -> int:
    return steps - 1 if label == "end" else int(label) - 1


def scores_at(records: list[Record], signal: str, label: str) -> np.ndarray:
    """Signal z at step k, or the combined score as the policy sees it: its max over steps 1..k."""
    from guard.signals import SIGNALS

    k = step_index(label, len(records[0].combined))
    if signal == "combined":
        return np.array([np.nanmax(r.combined[:k + 1]) for r in records])
    return np.array([r.z[k, SIGNALS.index(signal)] for r in records])


def detection_table(monitor: dict[str, list[Record]], positives: str) -> dict:
    from guard.signals import SIGNALS

    table = {}
    for signal in (*SIGNALS, "combined"):
        for label in STEPS_REPORTED:
            pos, neg = scores_at(monitor[positives], signal, label), scores_at(monitor["novel"], signal, label)
            if np.isnan(pos).any() or np.isnan(neg).any():
                continue
            table.setdefault(signal, {})[label] = {"auc": roc_auc(pos, neg), "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg)}
    return table


def share(records: list[Record], predicate) -> float:
    return float(np.mean([bool(predicate(r)) for r in records])) if records else math.nan


def enforce_outcomes(enforce: dict[str, list[Record]], steps: int) -> dict:
    from guard.types import Decision, Reason

    def rerouted(r):
        return r.result.decision in (Decision.REROUTED, Decision.FACE_OBFUSCATED) and bool(r.result.report.mitigations)

    out = {}
    for name, recs in enforce.items():
        blocked = [r for r in recs if r.result.decision == Decision.BLOCKED]
        released = [r for r in recs if r.result.image is not None]
        early = [r for r in blocked if r.result.report.steps_computed < steps]
        final_verify = [r for r in blocked if any("final re-verification" in m for m in r.result.report.mitigations)]
        out[name] = {
            "generations": len(recs),
            "released": len(released),
            "released_copies": sum(bool(r.copy) for r in released),
            "released_photo_copies": sum(bool(r.copy) and r.nearest.startswith("photo-") for r in released),
            "released_structural_copies": sum(structural_copy(r) for r in released),
            "decisions": {d.value: sum(r.result.decision == d for r in recs) for d in Decision},
            "blocked_share": share(recs, lambda r: r.result.decision == Decision.BLOCKED),
            "rerouted_share": share(recs, rerouted),
            "rerouted_non_copy_share": share(recs, lambda r: rerouted(r) and r.copy is False),
            "rerouted_non_copy_share_structural": share(recs, lambda r: rerouted(r) and r.copy is False
                                                        and not structural_copy(r)),
            "flagged_share": share(recs, lambda r: r.result.report.first_flagged_step is not None),
            "blocked_in_loop": len(early),
            "blocked_at_final_reverification": len(final_verify),
            "blocked_at_final_screen": len(blocked) - len(early) - len(final_verify),
            "blocked_screening_failed": sum(r.result.reason == Reason.SCREENING_FAILED for r in blocked),
            "blocked_cost_share_of_full": (float(np.mean([r.result.report.steps_computed for r in early])) / steps
                                           if early else None),
            "first_flagged_steps": sorted({r.result.report.first_flagged_step + 1 for r in recs
                                           if r.result.report.first_flagged_step is not None}),
        }
    return out


def record_rows(runs: dict[str, dict[str, list[Record]]]) -> list[dict]:
    """One row per generation (audit-level detail: which training item is nearest)."""
    rows = []
    for mode, sets in runs.items():
        for name, recs in sets.items():
            for r in recs:
                rep = r.result.report
                rows.append({"mode": mode, "set": name, "prompt": r.prompt, "seed": r.seed,
                             "decision": r.result.decision.value, "reason": r.result.reason.value,
                             "first_flagged_step": rep.first_flagged_step, "steps_computed": rep.steps_computed,
                             "mitigations": rep.mitigations, "copy": r.copy, "nearest": r.nearest,
                             "ssim": None if math.isnan(r.ssim) else round(r.ssim, 4),
                             "structural": None if math.isnan(r.structural) else round(r.structural, 4),
                             "screen_copy": rep.audit.get("screen", {}).get("is_copy"),
                             "combined_by_step": [None if math.isnan(x) else round(float(x), 3)
                                                  for x in np.fmax.accumulate(r.combined)]})
    return rows


def monitor_baseline(monitor: dict[str, list[Record]]) -> dict:
    return {name: {"copies": sum(bool(r.copy) for r in recs), "generations": len(recs),
                   "structural_copies": sum(structural_copy(r) for r in recs),
                   "screen_copies": sum(bool(r.result.report.audit.get("screen", {}).get("is_copy")) for r in recs),
                   "flagged_share": share(recs, lambda r: r.result.report.first_flagged_step is not None)}
            for name, recs in monitor.items()}


# ---- outputs ------------------------------------------------------------------------------------
def markdown(doc: dict) -> str:
    lines = [f"# Guard quality ({doc['model']}; {doc['seeds']} seeds; {doc['steps']} steps)", ""]
    for positives, table in doc["detection"].items():
        lines += [f"## Detection: {positives} vs novel (ROC AUC / TPR at 1 % FPR)", "",
                  "| signal | " + " | ".join(f"step {s}" for s in STEPS_REPORTED) + " |",
                  "|---|" + "---|" * len(STEPS_REPORTED)]
        for signal, row in table.items():
            cells = [f"{row[s]['auc']:.3f} / {row[s]['tpr_at_1pct_fpr']:.3f}" if s in row else "–" for s in STEPS_REPORTED]
            lines.append(f"| {signal} | " + " | ".join(cells) + " |")
        lines.append("")
    if doc.get("baseline"):
        lines += ["## Unguarded (monitor) outputs", "", "| set | generations | near copies (judge) | structural copies "
                  "(colour-blind) | index-screen copies | flagged |", "|---|---|---|---|---|---|"]
        for name, b in doc["baseline"].items():
            lines.append(f"| {name} | {b['generations']} | {b['copies']} | {b['structural_copies']} | "
                         f"{b['screen_copies']} | {b['flagged_share']:.3f} |")
        lines.append("")
    if doc.get("enforce"):
        lines += ["## Enforce mode", "", "Near copies: the independent judge (guard.testbed.copies) against every "
                  "training image (in brackets: of a memorized photo); structural: colour-blind SSIM ≥ 0.45 to a "
                  "memorized photo. Rerouted to a non-copy: by the judge / by both measures. Blocked: in the loop / "
                  "at the final re-verification / at the final screen; cost: steps computed by samples blocked in "
                  "the loop, as a share of all steps.", "",
                  "| set | generations | released | released near copies (photos) | released structural copies | "
                  "blocked | rerouted | rerouted to a non-copy | flagged | blocked where | blocked-in-loop cost |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, e in doc["enforce"].items():
            cost = "–" if e["blocked_cost_share_of_full"] is None else f"{e['blocked_cost_share_of_full']:.3f}"
            lines.append(f"| {name} | {e['generations']} | {e['released']} | {e['released_copies']} "
                         f"({e['released_photo_copies']}) | {e['released_structural_copies']} | "
                         f"{e['blocked_share']:.3f} | {e['rerouted_share']:.3f} | {e['rerouted_non_copy_share']:.3f} / "
                         f"{e['rerouted_non_copy_share_structural']:.3f} | {e['flagged_share']:.3f} | "
                         f"{e['blocked_in_loop']} / {e['blocked_at_final_reverification']} / "
                         f"{e['blocked_at_final_screen']} | {cost} |")
        lines.append("")
    lines.append(f"policy: threshold {doc['policy']['threshold']}, detect steps {doc['policy']['detect_steps']}; "
                 f"{doc['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def roc_plot(monitor: dict[str, list[Record]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from guard.signals import SIGNALS

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, label in zip(axes, ("1", "2")):
        for signal in (*SIGNALS, "combined"):
            pos, neg = scores_at(monitor["memorized"], signal, label), scores_at(monitor["novel"], signal, label)
            if np.isnan(pos).any() or np.isnan(neg).any():
                continue
            thr = np.unique(np.concatenate([pos, neg, [np.inf]]))[::-1]
            fpr = [np.mean(neg >= t) for t in thr]
            tpr = [np.mean(pos >= t) for t in thr]
            ax.plot(fpr, tpr, lw=2 if signal == "combined" else 1,
                    label=f"{signal} (AUC {roc_auc(pos, neg):.3f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls=":")
        ax.axvline(FPR, color="red", lw=0.5, ls="--")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(0, 1)
        ax.set_title(f"memorized vs novel, by step {label}")
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def contact_sheet(monitor: list[Record], enforce: list[Record], path: Path, scale: int = 2) -> None:
    """Pairs per generation: the unguarded (monitor) image, then what enforce mode released (grey: blocked)."""
    from PIL import Image

    images = [(m.result.image, e.result.image) for m, e in zip(monitor, enforce) if m.result.image is not None]
    if not images:
        return
    h, w = images[0][0].shape[:2]
    cols = 8
    rows = math.ceil(len(images) / (cols // 2))
    sheet = Image.new("RGB", (cols * w, rows * h), (128, 128, 128))
    for k, (before, after) in enumerate(images):
        r, c = divmod(k, cols // 2)
        sheet.paste(Image.fromarray(before), (2 * c * w, r * h))
        if after is not None:
            sheet.paste(Image.fromarray(after), ((2 * c + 1) * w, r * h))
    sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST).save(path)


# ---- main ---------------------------------------------------------------------------------------
def build_guard(args):
    import torch

    from guard.calibrate import default_index_dir, default_policy_path, resolve_model_dir
    from guard.index.api import FingerprintIndex
    from guard.loading import load_pipeline
    from guard.pipeline import GuardConfig, GuardedPipeline
    from guard.policy import Policy

    pipe = load_pipeline(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    index_dir = args.index or default_index_dir(args.model)
    index = (FingerprintIndex.open(index_dir, model_dir=resolve_model_dir(args.model), device=args.device)
             if index_dir else None)
    policy = Policy.uncalibrated() if args.self_calibrate else Policy.load(args.policy or default_policy_path(args.model))
    return GuardedPipeline(pipe, index=index, policy=policy, config=GuardConfig()), index


def self_calibrate(guarded, benign: list[str], seeds: list[int], args) -> None:
    """Fit the standardization on `benign` (disjoint from the evaluated negatives)."""
    from guard.calibrate import CalibrationConfig, collect_signals, fit_policy

    cfg = CalibrationConfig(steps=args.steps, guidance_scale=args.guidance, batch_size=args.batch, height=args.size)
    prompts = [p for p in benign for _ in seeds]
    raw, timesteps, distances = collect_signals(guarded, prompts, [s + 500_000 for p in benign for s in seeds], cfg)
    policy = fit_policy(raw, timesteps, cfg, np.repeat(np.arange(len(benign)), len(seeds)), distances)
    if guarded.index is None:
        policy.signals["similarity"].enabled = False
    guarded.policy = policy


def prompt_sets(args) -> tuple[dict[str, list[str]], list[str]]:
    from guard.testbed.dataset import PHOTOS, heldout_prompts

    sets = {"memorized": read_prompts(args.memorized) if args.memorized else [p.caption for p in PHOTOS],
            "paraphrased": (read_prompts(args.paraphrased) if args.paraphrased else
                            [] if args.memorized else [q for p in PHOTOS for q in p.paraphrases]),
            "novel": read_prompts(args.novel) if args.novel else heldout_prompts()}
    calibration = []
    if args.self_calibrate:
        calibration, sets["novel"] = sets["novel"][0::2], sets["novel"][1::2]
    if args.limit:
        sets = {k: v[:args.limit] for k, v in sets.items()}
    return {k: v for k, v in sets.items() if v}, calibration


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="diffusers pipeline dir (default: the testbed)")
    p.add_argument("--index", type=Path, help="fingerprint index dir (default: the testbed's)")
    p.add_argument("--policy", type=Path, help="policy file (default: the testbed's)")
    p.add_argument("--memorized", type=Path)
    p.add_argument("--paraphrased", type=Path)
    p.add_argument("--novel", type=Path)
    p.add_argument("--self-calibrate", action="store_true", help="calibrate on half of the novel list")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--seed-base", type=int, default=1000)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--limit", type=int, help="at most this many prompts per set (smoke runs)")
    p.add_argument("--no-enforce", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/quality"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    from guard.types import GuardMode

    torch.set_num_threads(args.threads)
    t0 = time.time()
    guarded, index = build_guard(args)
    sets, calibration = prompt_sets(args)
    seeds = [args.seed_base + i for i in range(args.seeds)]
    if args.self_calibrate:
        self_calibrate(guarded, calibration, seeds, args)
    train = None
    if args.memorized is None:   # the testbed's prompt sets: judge against the testbed's training images
        from guard.testbed.dataset import build_training_set
        items = build_training_set()
        train = (np.stack([it.image for it in items]), [it.item_id for it in items])
    monitor = {k: generate_set(guarded, k, v, seeds, GuardMode.MONITOR, args) for k, v in sets.items()}
    enforce = {} if args.no_enforce else {k: generate_set(guarded, k, v, seeds, GuardMode.ENFORCE, args)
                                          for k, v in sets.items()}
    if train is not None:
        for recs in (*monitor.values(), *enforce.values()):
            judge(recs, *train)
    doc = {"model": str(args.model or "testbed"), "seeds": args.seeds, "steps": args.steps,
           "sets": {k: len(v) for k, v in sets.items()},
           "policy": {"threshold": guarded.policy.threshold, "verify_threshold": guarded.policy.verify_threshold,
                      "detect_steps": guarded.policy.detect_steps, "combine": guarded.policy.combine},
           "detection": {pos: detection_table(monitor, pos) for pos in ("memorized", "paraphrased") if pos in monitor},
           "baseline": monitor_baseline(monitor) if train is not None else {},
           "enforce": enforce_outcomes(enforce, args.steps) if enforce else {},
           "seconds": time.time() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (args.out / "records.json").write_text(json.dumps(record_rows({"monitor": monitor, "enforce": enforce}),
                                                      default=str) + "\n")
    np.savez_compressed(args.out / "signals.npz", **{f"{mode}_{name}_{kind}": np.stack([getattr(r, kind) for r in recs])
                                                     for mode, sets in (("monitor", monitor), ("enforce", enforce))
                                                     for name, recs in sets.items() for kind in ("raw", "z")
                                                     if mode == "monitor"})
    (args.out / "quality.md").write_text(markdown(doc))
    roc_plot(monitor, args.out / "roc.png")
    for name in enforce:
        contact_sheet(monitor[name], enforce[name], args.out / f"sheet_{name}.png")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
