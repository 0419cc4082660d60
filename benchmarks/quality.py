"""Detection quality and enforce-mode outcomes of the guard, per testbed.

Testbeds (CPU, ~10-15 min each on 2 cores):

    python -m memguard.benchmarks.quality --testbed vpred --seeds 4 --out runs/quality-vpred
    python -m memguard.benchmarks.quality --testbed eps --seeds 4 --out runs/quality-eps

1. MONITOR pass over the memorized, paraphrased, novel and web-style prompt sets × seeds: every
   signal's u-score per step (the policy's benign standardization) and the combined score. ROC AUC
   and TPR at 1 % FPR of memorized (and paraphrased) versus novel, and memorized versus web-style
   generations that resemble no training image, for each signal alone (two-sided: |u|) and for the
   combined score as the policy uses it (its maximum over steps 1..k).
   Calibration is disjoint from what is scored: benign calibration prompts are training captions
   (seeds 900000+), never a novel or web-style prompt; the likely-memorized calibration prompts are
   duplicate-cluster captions (seeds 950000+), so every memorized and paraphrased generation here is
   scored *out of fold*, by the fit that held its cluster out (`Policy.folds`), as a margin over
   that fit's threshold; negatives are scored by every fold.
2. ENFORCE pass over the same generations (the shipped policy): decisions. Every released image is
   judged by an independent pixel-space measure (memguard.testbed.copies), never by the guard's own
   signals; web-style generations are labelled copy / resembles / clean from their unguarded image.
Writes quality.json, quality.md (the tables) and roc.png.

Real Stable Diffusion on a GPU host (Wen et al.'s 500 memorized prompts vs Ren et al.'s 500
non-memorized ones; no training images there, so detection only):

    python -m memguard.benchmarks.quality --model /models/stable-diffusion-v1-4 --device cuda --dtype float16 \\
        --memorized ../shared/data/sdv1_500_memorized.jsonl --novel ../shared/data/memattn_group_nomem500.txt \\
        --self-calibrate --no-enforce --seeds 1 --steps 50 --size 512 --out runs/quality-sd14

`--self-calibrate` splits the novel list in two disjoint halves: even lines calibrate the policy
(benign only: the two-sided distance rule), odd lines are the negatives. Without `--index` the
similarity signal is left out of the combined score.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("memguard.benchmarks.quality")
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
    z: np.ndarray              # [steps, S] u-scores (benign-standardized, unsigned)
    raw: np.ndarray            # [steps, S] raw signal values
    combined: np.ndarray       # [steps] the policy's score
    result: object             # ImageResult
    target: str = ""           # the memorized item a prompt is meant to copy ("" for novel and web prompts)
    timesteps: list = None
    copy: bool | None = None   # independent judge (testbed only)
    nearest: str = ""
    ssim: float = math.nan
    structural: float = math.nan   # colour-blind structural similarity to the closest memorized item
    structural_photo: float = math.nan   # the same over memorized photos only (tinted copies: relabel_tinted)
    label: str = ""            # web-style: copy | resembles | clean (judge, on the unguarded image)
    colour_label: str = ""     # the same by the colour judge alone (before relabel_tinted)


def generate_set(guarded, name: str, members: list[tuple[str, str]], seeds: list[int], mode, args) -> list[Record]:
    from memguard.signals import SIGNALS
    from memguard.types import GenerationRequest

    pairs = [(p, t, s) for p, t in members for s in seeds]
    out = []
    for start in range(0, len(pairs), args.batch):
        chunk = pairs[start:start + args.batch]
        reqs = [GenerationRequest(p, seed=s, steps=args.steps, height=args.size, width=args.size,
                                  guidance_scale=args.guidance, mode=mode) for p, _, s in chunk]
        for (p, t, s), rs in zip(chunk, guarded.generate(reqs).results):
            r = rs[0]
            rows = r.report.trace
            z = np.array([[row.get(f"z_{k}", math.nan) for k in SIGNALS] for row in rows])
            raw = np.array([[row.get(k, math.nan) for k in SIGNALS] for row in rows])
            comb = np.array([row.get("combined", math.nan) for row in rows])
            out.append(Record(name, p, s, z, raw, comb, r, t, [row["timestep"] for row in rows]))
        log.info("%s %s: %d / %d", mode.value, name, min(start + args.batch, len(pairs)), len(pairs))
    return out


STRUCTURAL_THRESHOLD = 0.45   # the judge's SSIM threshold, applied colour-blind
MEANINGFUL_PREFIX = "memo-"   # testbed items rendered from compositional captions (memorized_combos)


def _grey_standardized(image: np.ndarray) -> np.ndarray:
    g = image.astype(np.float32).mean(axis=-1)
    return (g - g.mean()) / (g.std() + 1e-6)


def structural_similarity_to(image: np.ndarray, references: list[np.ndarray]) -> float:
    """Max SSIM of the grey, per-image standardized image to the (standardized) references.

    A second, coarser measure beside memguard.testbed.copies: structure only (grey, standardized), with
    no pixel-distance bound, so it also counts loose copies of a photo that the judge rejects.
    """
    from skimage.metrics import structural_similarity

    g = _grey_standardized(image)
    return max(float(structural_similarity(g, r, data_range=8.0)) for r in references)


def judge(records: list[Record], train_images: np.ndarray, train_ids: list[str], memorized: set[str]) -> None:
    """Judge every released image against the whole training set; label web-style generations."""
    from memguard.testbed import copies
    from memguard.testbed.report import RESEMBLES_SSIM

    photos = [_grey_standardized(im) for im, i in zip(train_images, train_ids) if i in memorized]
    photo_only = [_grey_standardized(im) for im, i in zip(train_images, train_ids)
                  if i in memorized and i.startswith("photo-")] or photos
    references = copies.References.of(train_images)
    for r in records:
        if r.result.image is None:
            continue
        j, score = copies.nearest(r.result.image, references)
        r.copy, r.nearest, r.ssim = score.is_copy, train_ids[j], score.ssim
        r.structural = structural_similarity_to(r.result.image, photos)
        r.structural_photo = (r.structural if len(photo_only) == len(photos)   # the same set: no second pass
                              else structural_similarity_to(r.result.image, photo_only))
        r.label = "copy" if r.copy else "resembles" if r.nearest in memorized and r.ssim >= RESEMBLES_SSIM else "clean"


def relabel_tinted(web: list[Record], novel: list[Record]) -> float:
    """Web-style generations the colour judge calls clean, but that are structurally closer to a
    memorized photo than any novel-prompt generation gets (the null), become "resembles".

    Measured on the v-testbed: the colour SSIM called 40 web-style images clean that the guard acted
    on; on a contact sheet they are Grace Hopper's portrait, the rocket on its pad, the coins, tinted
    green (colour SSIM 0.46-0.49, under the 0.5 bar). A tint is no new picture: copy detectors train
    with colour jitter. Photos only: novel compositions resemble the memorized compositional renderings
    by construction (on the ε-testbed their null was 0.82). Returns the null (the novel generations'
    largest structural similarity to a memorized photo)."""
    null = max((r.structural_photo for r in novel if not math.isnan(r.structural_photo)),
               default=STRUCTURAL_THRESHOLD)
    for r in web:
        r.colour_label = r.label
        if r.label == "clean" and r.structural_photo > null:
            r.label = "resembles"
    return float(null)


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
    from memguard.policy import upper_quantile_threshold

    return float(np.mean(np.asarray(pos) > upper_quantile_threshold(np.asarray(neg), fpr)))


def step_index(label: str, steps: int) -> int:
    return steps - 1 if label == "end" else int(label) - 1


def scores_at(records: list[Record], signal: str, label: str) -> np.ndarray:
    """A signal's u-score at step k (unsigned: its direction is the model's, not ours)."""
    from memguard.signals import SIGNALS

    k = step_index(label, len(records[0].combined))
    return np.array([r.z[k, SIGNALS.index(signal)] for r in records])


def margins(policy, records: list[Record], key: int, label: str) -> np.ndarray:
    """Score over steps 1..k minus the threshold, under fold `key` (or the policy, key −1)."""
    comb, thr = policy.fold_fit(key)
    k = step_index(label, len(records[0].combined))
    raw = np.stack([r.raw for r in records])
    scores = policy.scores(raw, records[0].timesteps, comb)
    return scores[:, :k + 1].max(axis=1) - thr


def combined_scores(policy, pos: list[Record], neg: list[Record], label: str) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold margins: each positive under the fit that held its cluster out; the negatives
    under each of those fits in turn (pooled), so positives and negatives meet the same rules."""
    keys = sorted({policy.fold_index(r.target) for r in pos})
    p_out, n_out = [], []
    for key in keys:
        group = [r for r in pos if policy.fold_index(r.target) == key]
        p_out.append(margins(policy, group, key, label))
        n_out.append(margins(policy, neg, key, label))
    return np.concatenate(p_out), np.concatenate(n_out)


def detection_table(policy, pos: list[Record], neg: list[Record]) -> dict:
    from memguard.signals import SIGNALS

    table = {}
    if not pos or not neg:
        return table
    for signal in (*SIGNALS, "combined"):
        for label in STEPS_REPORTED:
            if signal == "combined":
                p, n = combined_scores(policy, pos, neg, label)
            else:
                p, n = scores_at(pos, signal, label), scores_at(neg, signal, label)
            if np.isnan(p).any() or np.isnan(n).any():
                continue
            auc = roc_auc(p, n)
            if signal != "combined" and auc < 0.5:   # report each signal in its own direction, and say so
                p, n = -p, -n
            table.setdefault(signal, {})[label] = {"auc": roc_auc(p, n), "tpr_at_1pct_fpr": tpr_at_fpr(p, n),
                                                   "falls": bool(signal != "combined" and auc < 0.5)}
    return table


def share(records: list[Record], predicate) -> float:
    return float(np.mean([bool(predicate(r)) for r in records])) if records else math.nan


def enforce_outcomes(enforce: dict[str, list[Record]], steps: int) -> dict:
    from memguard.types import Decision, Reason

    def rerouted(r):
        return r.result.decision in (Decision.REROUTED, Decision.FACE_OBFUSCATED) and bool(r.result.report.mitigations)

    def second_pass(r):
        return any(m.startswith("second pass") for m in r.result.report.mitigations)

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
            # acted on (blocked or rerouted) without a flag in the detection window: decided only at the end,
            # after the whole trajectory was computed
            "acted_on": sum(r.result.decision == Decision.BLOCKED or rerouted(r) for r in recs),
            "decided_only_at_end": sum(r.result.decision == Decision.BLOCKED and r.result.report.first_flagged_step
                                       is None for r in recs),
            # blocked as copies, generated again from fresh noise (GuardConfig.second_pass); of which rerouted
            "second_pass": sum(second_pass(r) for r in recs),
            "second_pass_rerouted": sum(second_pass(r) and rerouted(r) for r in recs),
        }
    return out


NEAR_IDENTICAL_SSIM = 0.9   # issue 13's bar for two rerouted images of different prompts


def _fidelity_judge():
    """The CLIP that scores reroutes: the independent second judge (another seed) when it is built,
    else the guard's own testbed CLIP, said so in the report (its floor already filtered the reroutes)."""
    from memguard.testbed.clip_judge import INDEPENDENT_JUDGE_DIR, JUDGE_DIR, load_judge

    for directory, name in ((INDEPENDENT_JUDGE_DIR, "independent (clip-judge, seed 7)"),
                            (JUDGE_DIR, "the guard's own testbed CLIP: not independent of its fidelity floor")):
        try:
            return load_judge(directory), name
        except Exception as exc:   # noqa: BLE001 - the judge is optional outside the testbed
            log.warning("no CLIP fidelity judge at %s (%s)", directory, exc)
    log.warning("no CLIP fidelity judge: fidelity is not scored")
    return None, "none"


def reroute_fidelity(monitor: dict[str, list[Record]], enforce: dict[str, list[Record]], steps: int,
                     judge=None) -> dict:
    """Rerouted images: copies released, CLIP score kept (testbed judge, loaded if not given), distinct
    outputs, extra cost."""
    from skimage.metrics import structural_similarity

    from memguard.pipeline import UNFAITHFUL_REROUTE
    from memguard.types import Decision

    rerouted = {name: [(m, e) for m, e in zip(monitor[name], recs) if e.result.decision == Decision.REROUTED]
                for name, recs in enforce.items() if name in monitor}
    out: dict = {}
    if judge is None:
        judge, out["judge"] = _fidelity_judge()
    novel_clip = None
    if judge is not None and monitor.get("novel"):
        imgs = [r.result.image for r in monitor["novel"] if r.result.image is not None]
        novel_clip = float(np.mean(judge.clip_score(imgs, [r.prompt for r in monitor["novel"] if r.result.image
                                                             is not None])))
        out["novel_unguarded_clip"] = novel_clip
    for name, pairs in rerouted.items():
        # reroutes the guard blocked for losing the prompt (policy.reroute_min_fidelity, the index's CLIP;
        # out["judge"] says whether this judge is another model)
        unfaithful = sum(any(UNFAITHFUL_REROUTE in m for m in e.result.report.mitigations)
                         for e in enforce[name])
        if not pairs:
            if unfaithful:
                out[name] = {"rerouted": 0, "blocked_unfaithful": unfaithful}
            continue
        row = {"rerouted": len(pairs), "blocked_unfaithful": unfaithful,
               "released_copies": sum(bool(e.copy) for _, e in pairs),
               "unet_evaluations_per_image_vs_plain": float(np.mean([e.result.report.steps_computed for _, e in pairs]))
               / steps}
        if judge is not None:
            clip_r = judge.clip_score([e.result.image for _, e in pairs], [e.prompt for _, e in pairs])
            clip_u = judge.clip_score([m.result.image for m, _ in pairs], [m.prompt for m, _ in pairs])
            row.update(clip_rerouted=float(np.mean(clip_r)), clip_unguarded_same_prompts=float(np.mean(clip_u)),
                       clip_vs_unguarded=float(np.mean(clip_r) / max(np.mean(clip_u), 1e-9)))
            if novel_clip:
                row["clip_vs_novel_unguarded"] = float(np.mean(clip_r) / novel_clip)
        # distinct: pairwise SSIM between rerouted images of different prompts at the same seed; for
        # the near-identical pairs, whether the unguarded model already gave those two prompts nearly
        # the same image (prompts its text encoder cannot tell apart: no reroute that keeps them can)
        worst, pairs_checked, near, near_unguarded, worst_pair = 0.0, 0, 0, 0, None
        by_seed: dict[int, list[tuple[Record, Record]]] = {}
        for m, e in pairs:
            by_seed.setdefault(e.seed, []).append((m, e))
        for group in by_seed.values():
            for i in range(len(group)):
                for j in range(i + 1, len(group)):
                    (mi, ei), (mj, ej) = group[i], group[j]
                    if ei.prompt == ej.prompt:
                        continue
                    ssim = float(structural_similarity(ei.result.image, ej.result.image, channel_axis=2,
                                                       data_range=255))
                    pairs_checked += 1
                    if ssim > worst:
                        worst, worst_pair = ssim, [ei.prompt, ej.prompt]
                    if ssim >= NEAR_IDENTICAL_SSIM:
                        near += 1
                        near_unguarded += structural_similarity(mi.result.image, mj.result.image, channel_axis=2,
                                                                data_range=255) >= NEAR_IDENTICAL_SSIM
        row.update(max_pairwise_ssim_same_seed=worst, pairs_checked=pairs_checked, worst_pair=worst_pair,
                   pairs_near_identical=near, of_which_unguarded_near_identical_too=int(near_unguarded))
        out[name] = row
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
                             "mitigations": rep.mitigations, "copy": r.copy, "label": r.label, "colour_label": r.colour_label, "target": r.target, "nearest": r.nearest,
                             "ssim": None if math.isnan(r.ssim) else round(r.ssim, 4),
                             "structural": None if math.isnan(r.structural) else round(r.structural, 4),
                             "structural_photo": None if math.isnan(r.structural_photo) else round(r.structural_photo, 4),
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
    lines = [f"# Guard quality ({doc['model']}; {doc['seeds']} seeds; {doc['steps']} steps; {doc['machine']})", ""]
    for positives, table in doc["detection"].items():
        lines += [f"## Detection: {positives.replace('_vs_', ' vs ')} (ROC AUC / TPR at 1 % FPR)", "",
                  "Combined: out of fold (each memorized prompt scored by the fit that held its cluster out). "
                  "A signal marked ↓ is lower under memorization on this model.", "",
                  "| signal | " + " | ".join(f"step {s}" for s in STEPS_REPORTED) + " |",
                  "|---|" + "---|" * len(STEPS_REPORTED)]
        for signal, row in table.items():
            cells = [f"{row[s]['auc']:.3f} / {row[s]['tpr_at_1pct_fpr']:.3f}{' ↓' if row[s]['falls'] else ''}"
                     if s in row else "–" for s in STEPS_REPORTED]
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
        lines += ["## Enforce mode", "", "Near copies: the independent judge (memguard.testbed.copies) against every "
                  "training image (in brackets: of a memorized photo); structural: colour-blind SSIM ≥ 0.45 to a "
                  "memorized photo. Rerouted to a non-copy: by the judge / by both measures. Blocked: in the loop / "
                  "at the final re-verification / at the final screen; cost: steps computed by samples blocked in "
                  "the loop, as a share of all steps.", "",
                  "| set | generations | released | released near copies (photos) | released structural copies | "
                  "blocked | rerouted | rerouted to a non-copy | flagged | blocked where | blocked-in-loop cost | "
                  "acted on / decided only at the end | second pass / rerouted by it |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, e in doc["enforce"].items():
            cost = "–" if e["blocked_cost_share_of_full"] is None else f"{e['blocked_cost_share_of_full']:.3f}"
            lines.append(f"| {name} | {e['generations']} | {e['released']} | {e['released_copies']} "
                         f"({e['released_photo_copies']}) | {e['released_structural_copies']} | "
                         f"{e['blocked_share']:.3f} | {e['rerouted_share']:.3f} | {e['rerouted_non_copy_share']:.3f} / "
                         f"{e['rerouted_non_copy_share_structural']:.3f} | {e['flagged_share']:.3f} | "
                         f"{e['blocked_in_loop']} / {e['blocked_at_final_reverification']} / "
                         f"{e['blocked_at_final_screen']} | {cost} | {e['acted_on']} / {e['decided_only_at_end']} | "
                         f"{e['second_pass']} / {e['second_pass_rerouted']} |")
        lines.append("")
    if doc.get("reroutes"):
        lines += ["## Rerouted images", "", "```", json.dumps(doc["reroutes"], indent=1), "```", ""]
    if doc.get("web_labels"):
        lines += [f"Web-style generations, unguarded, by the judge: {doc['web_labels']}; by the colour judge alone: "
                  f"{doc['web_labels_colour_judge']}. A colour-clean image structurally closer to a memorized photo "
                  f"than any novel generation is to one ({doc['resembles_structural_null']:.3f}, colour-blind SSIM) resembles it "
                  "(a tinted copy).", ""]
    lines.append(f"policy: rule {doc['policy']['rule']}, threshold {doc['policy']['threshold']}, detect steps "
                 f"{doc['policy']['detect_steps']}; calibration: {doc['calibration']}; {doc['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def roc_plot(policy, monitor: dict[str, list[Record]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memguard.signals import SIGNALS

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, label in zip(axes, ("1", "2")):
        for signal in (*SIGNALS, "combined"):
            if signal == "combined":
                pos, neg = combined_scores(policy, monitor["memorized"], monitor["novel"], label)
            else:
                pos, neg = scores_at(monitor["memorized"], signal, label), scores_at(monitor["novel"], signal, label)
                if roc_auc(pos, neg) < 0.5:
                    pos, neg = -pos, -neg
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

    from memguard.calibrate import default_index_dir, default_policy_path, resolve_model_dir
    from memguard.index.api import FingerprintIndex
    from memguard.loading import load_pipeline
    from memguard.pipeline import GuardConfig, GuardedPipeline
    from memguard.policy import Policy

    pipe = load_pipeline(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    index_dir = args.index or default_index_dir(args.model)
    index = (FingerprintIndex.open(index_dir, model_dir=resolve_model_dir(args.model), device=args.device)
             if index_dir else None)
    policy = Policy.uncalibrated() if args.self_calibrate else Policy.load(args.policy or default_policy_path(args.model))
    return GuardedPipeline(pipe, index=index, policy=policy, config=GuardConfig()), index


def self_calibrate(guarded, benign: list[str], seeds: list[int], args) -> None:
    """Fit the policy on `benign` alone (disjoint from the evaluated negatives): the distance rule."""
    from memguard.calibrate import CalibrationConfig, collect_signals
    from memguard.policy_fit import SignalSet, fit_policy

    cfg = CalibrationConfig(steps=args.steps, guidance_scale=args.guidance, batch_size=args.batch, height=args.size)
    prompts = [p for p in benign for _ in seeds]
    m = collect_signals(guarded, prompts, [s + 500_000 for p in benign for s in seeds], cfg)
    from memguard.signals import SIGNALS

    enabled = np.array([guarded.index is not None or name != "similarity" for name in SIGNALS])
    guarded.policy = fit_policy(SignalSet(m.raw, np.repeat(np.arange(len(benign)), len(seeds)), m.pdq_distances), m.timesteps,
                                cfg.fit_config(), enabled=enabled)


def prompt_sets(args) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """Sets of (prompt, memorized target item) pairs, and the self-calibration prompts."""
    from memguard.testbed.dataset import prompt_set_members
    from memguard.testbed.registry import get_testbed

    if args.memorized:   # a real model: prompt files, no training images
        sets = {"memorized": [(p, "") for p in read_prompts(args.memorized)],
                "paraphrased": [(p, "") for p in read_prompts(args.paraphrased)] if args.paraphrased else [],
                "novel": [(p, "") for p in read_prompts(args.novel)] if args.novel else []}
    else:
        sets = prompt_set_members(get_testbed(args.testbed).data)
        if args.novel:
            sets["novel"] = [(p, "") for p in read_prompts(args.novel)]
    calibration = []
    if args.self_calibrate:
        calibration, sets["novel"] = [p for p, _ in sets["novel"][0::2]], sets["novel"][1::2]
    if args.limit:
        sets = {k: v[:args.limit] for k, v in sets.items()}
    return {k: v for k, v in sets.items() if v}, calibration


def calibration_disjointness(policy, sets: dict[str, list[tuple[str, str]]]) -> dict:
    """Which benchmarked prompts the policy's calibration used, and how they are kept apart."""
    data = policy.provenance.get("data", {})
    positives = set(data.get("positives", {}).get("prompts", []))
    benchmarked = {name: {p for p, _ in members} for name, members in sets.items()}
    return {"benign_source": data.get("source"), "benign_seeds": data.get("seeds"),
            "positive_seeds": data.get("positives", {}).get("seeds"),
            "positive_prompts_also_benchmarked": {k: len(v & positives) for k, v in benchmarked.items()},
            "scored_out_of_fold": bool(policy.folds),
            "folds": [f["held_out"] for f in policy.folds]}


def main(argv: list[str] | None = None) -> int:
    from memguard.testbed.registry import DEFAULT_TESTBED, TESTBEDS, get_testbed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbed", choices=tuple(TESTBEDS), default=DEFAULT_TESTBED,
                   help="which shipped testbed (model, index, policy, prompt sets)")
    p.add_argument("--model", type=Path, help="diffusers pipeline dir (default: the testbed's)")
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
    import platform

    import torch

    from memguard.types import GuardMode

    torch.set_num_threads(args.threads)
    testbed = None if args.memorized else get_testbed(args.testbed)
    if testbed is not None and args.model is None:
        args.model = testbed.model_dir
    t0 = time.time()
    guarded, index = build_guard(args)
    sets, calibration = prompt_sets(args)
    seeds = [args.seed_base + i for i in range(args.seeds)]
    if args.self_calibrate:
        self_calibrate(guarded, calibration, seeds, args)
    train, memorized_items = None, set()
    if testbed is not None:   # judge against the testbed's training images
        from memguard.testbed.dataset import build_training_set, memorized_items as duplicated
        items = build_training_set(testbed.data)
        train = (np.stack([it.image for it in items]), [it.item_id for it in items])
        memorized_items = {it.item_id for it in duplicated(items)}
    monitor = {k: generate_set(guarded, k, v, seeds, GuardMode.MONITOR, args) for k, v in sets.items()}
    enforce = {} if args.no_enforce else {k: generate_set(guarded, k, v, seeds, GuardMode.ENFORCE, args)
                                          for k, v in sets.items()}
    if train is not None:
        for recs in (*monitor.values(), *enforce.values()):
            judge(recs, *train, memorized_items)
        resembles_null = relabel_tinted(monitor.get("web", []), monitor.get("novel", []))
        for name, recs in enforce.items():   # a generation's label is that of its unguarded image
            for e, m in zip(recs, monitor[name]):
                e.label, e.colour_label = m.label, m.colour_label
    policy = guarded.policy
    detection = {f"{pos}_vs_novel": detection_table(policy, monitor.get(pos, []), monitor.get("novel", []))
                 for pos in ("memorized", "paraphrased")}
    # novel generations the judge finds copying a memorized item are no negatives: the guard should
    # catch them (eps: 10 of 192 land on a memorized rendering). Both tables are kept
    novel_clean = [r for r in monitor.get("novel", []) if r.label == "clean"]
    if train is not None and 0 < len(novel_clean) < len(monitor.get("novel", [])):
        for pos in ("memorized", "paraphrased"):
            detection[f"{pos}_vs_novel_clean"] = detection_table(policy, monitor.get(pos, []), novel_clean)
    # a paraphrase that does not reproduce its item is no positive: the paraphrases whose unguarded image
    # the judge calls a copy, against the novel generations that copy nothing
    paraphrased_copying = [r for r in monitor.get("paraphrased", []) if r.copy]
    if train is not None and 0 < len(paraphrased_copying) < len(monitor.get("paraphrased", [])):
        detection["paraphrased_copying_vs_novel_clean"] = detection_table(
            policy, paraphrased_copying, novel_clean or monitor.get("novel", []))
    web_clean = [r for r in monitor.get("web", []) if r.label == "clean"]
    if web_clean:
        detection["memorized_vs_web_clean"] = detection_table(policy, monitor["memorized"], web_clean)
    if "web" in enforce:
        enforce["web_clean"] = [r for r in enforce["web"] if r.label == "clean"]
        enforce["web_resembling"] = [r for r in enforce["web"] if r.label != "clean"]
        # the colour judge's clean set, tinted copies included: the figure before relabel_tinted
        enforce["web_clean_colour_judge"] = [r for r in enforce["web"] if r.colour_label == "clean"]
    if "novel" in enforce and train is not None:   # novel prompts whose unguarded image copies nothing
        enforce["novel_clean"] = [r for r in enforce["novel"] if r.label == "clean"]
    # memorized items with compositional captions (issue 13): the reroute can keep their meaning
    monitor_split, enforce_split = dict(monitor), dict(enforce)
    for name in ("memorized", "paraphrased"):
        if name in enforce and any(r.target.startswith(MEANINGFUL_PREFIX) for r in enforce[name]):
            for split, recs in ((monitor_split, monitor[name]), (enforce_split, enforce[name])):
                split[f"{name}_meaningful"] = [r for r in recs if r.target.startswith(MEANINGFUL_PREFIX)]
    doc = {"model": str(args.model), "testbed": testbed.name if testbed else None,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.device}, {args.threads} thread(s)",
           "seeds": args.seeds, "seed_base": args.seed_base, "steps": args.steps,
           "sets": {k: len(v) for k, v in sets.items()},
           "policy": {"threshold": policy.threshold, "verify_threshold": policy.verify_threshold,
                      "detect_steps": policy.detect_steps, "rule": policy.combination.rule,
                      "fit": policy.provenance.get("fit")},
           "calibration": calibration_disjointness(policy, sets),
           "detection": {k: v for k, v in detection.items() if v},
           "baseline": monitor_baseline(monitor) if train is not None else {},
           "web_labels": ({lab: sum(r.label == lab for r in monitor["web"]) for lab in ("copy", "resembles", "clean")}
                          if "web" in monitor and train is not None else {}),
           "web_labels_colour_judge": ({lab: sum(r.colour_label == lab for r in monitor["web"])
                                        for lab in ("copy", "resembles", "clean")}
                                       if "web" in monitor and train is not None else {}),
           "resembles_structural_null": resembles_null if train is not None else None,
           "enforce": enforce_outcomes(enforce_split, args.steps) if enforce else {},
           "reroutes": reroute_fidelity(monitor_split, enforce_split, args.steps) if enforce and train is not None else {},
           "seconds": time.time() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (args.out / "records.json").write_text(json.dumps(record_rows({"monitor": monitor, "enforce": enforce}),
                                                      default=str) + "\n")
    np.savez_compressed(args.out / "signals.npz", **{f"monitor_{name}_{kind}": np.stack([getattr(r, kind) for r in recs])
                                                     for name, recs in monitor.items() for kind in ("raw", "z")})
    (args.out / "quality.md").write_text(markdown(doc))
    if "memorized" in monitor and "novel" in monitor:
        roc_plot(policy, monitor, args.out / "roc.png")
    for name in sets:
        if name in enforce:
            contact_sheet(monitor[name], enforce[name], args.out / f"sheet_{name}.png")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
