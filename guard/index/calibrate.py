"""Calibrated thresholds: measure score distributions of augmented copies, pick thresholds for a
stated false-match rate, write them into the manifest.

Positives: augmented copies (crop, resize, JPEG, colour jitter, small rotation) of indexed items,
scored against their own item. Negatives: the same augmented images scored against the closest
*other* item (one score per query: the screen flags a query, not a pair). The aligned signal's
positive is the standout z when the own item stands out; its negative is the standout z with the
own item left out of the index (leave-one-out), exactly what the screen would see for an image
that is not indexed but resembles indexed ones. Each of the k signals in use gets the budget
fmr / k, so the rate of "any signal crossed" stays ≤ fmr (union bound). A signal earns its share:
a signal is dropped when the others, re-thresholded without it, catch clearly more augmented
copies (`select_signals`). On the ε-testbed its small CLIP caught 0-45 % of copies, 2 of 1,500
that no other signal caught, and a fourth share cost PDQ 11 points of JPEG copies: all four
signals caught 69.9 %, any three 67.5-72.1 %. Dropped signals never cross (their vectors are still
searched and reported). Held-out images (never indexed), when given, are an independent check: their false-match rate is reported, not fitted.
Faces: positives are faces found in augmented indexed images scored against their own descriptors;
negatives are faces of other people (skimage's LFW subset by default) scored against all indexed faces.
"""
from __future__ import annotations

import io
import itertools
import logging
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from memguard.errors import InvalidInput
from memguard.index.builder import MAPS
from memguard.index.config import Thresholds, crosses, higher_is_closer
from memguard.index.pdq import pdq_hash

log = logging.getLogger(__name__)
AUGMENTATIONS = ("crop", "resize", "jpeg", "color", "rotate", "vae")
CHECKS = ("jpeg50",)     # positives only reported, never fitted: what the blind-screen warning reads
MIN_COPY_TPR = 0.9       # a screen that catches fewer JPEG copies or VAE round trips than this is not a screen (warned)
BLIND_KINDS = ("jpeg", "jpeg50", "vae")   # re-encoded copies, and what a perfect copy looks like after the model's decoder
SEARCH_K = 32            # nearest rows kept per query and signal: the closest other cluster is among them


# ---- augmentations: RGB uint8 [H, W, 3] in, RGB uint8 out ------------------------------------------
def aug_crop(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep 80-90 % of each side at a random offset (the size changes, as a cropped repost would)."""
    h, w = img.shape[:2]
    f = rng.uniform(0.8, 0.9)
    ch, cw = max(8, round(h * f)), max(8, round(w * f))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return np.ascontiguousarray(img[top:top + ch, left:left + cw])


def aug_resize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rescale by 0.6-0.8× or 1.5-2×."""
    f = rng.uniform(0.6, 0.8) if rng.random() < 0.5 else rng.uniform(1.5, 2.0)
    h, w = img.shape[:2]
    size = (max(8, round(w * f)), max(8, round(h * f)))
    return np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC))


def aug_jpeg(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """JPEG at quality 30-70."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=int(rng.integers(30, 71)))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def aug_color(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation each scaled by 0.8-1.2."""
    out = Image.fromarray(img)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhance(out).enhance(rng.uniform(0.8, 1.2))
    return np.asarray(out)


def aug_rotate(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate 3-8° either way; corners filled with the image's edge-mean colour."""
    angle = rng.uniform(3, 8) * rng.choice([-1, 1])
    fill = tuple(int(v) for v in np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).mean(0))
    return np.asarray(Image.fromarray(img).rotate(angle, resample=Image.BICUBIC, fillcolor=fill))


def aug_jpeg50(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """JPEG at quality 50: the blind-screen check."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=50)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


# "vae" is the model's own VAE round trip (what a perfect copy looks like after decoding): it needs
# the index's encoder, so _augmented applies it; it has no entry here
AUGMENT = {"crop": aug_crop, "resize": aug_resize, "jpeg": aug_jpeg, "color": aug_color, "rotate": aug_rotate,
           "jpeg50": aug_jpeg50}


# ---- threshold selection ---------------------------------------------------------------------------
def pick_threshold(signal: str, negatives: np.ndarray, fmr: float) -> tuple[float, bool]:
    """The least strict threshold at which at most floor(fmr·N) negatives cross.

    Returns (threshold, resolution_limited): resolution_limited when fmr·N < 1, i.e. the sample is
    too small to resolve the rate and the threshold just clears the closest negative.
    """
    n = len(negatives)
    if n == 0:
        raise InvalidInput("negatives", "no negative scores to calibrate on")
    allowed = int(math.floor(fmr * n + 1e-9))
    if higher_is_closer(signal):
        ranked = np.sort(negatives)[::-1]
        t = float(np.nextafter(np.float32(ranked[allowed]), np.float32(np.inf)))
    else:
        ranked = np.sort(negatives)
        t = float(ranked[allowed] - 1) if signal == "pdq" else float(np.nextafter(np.float32(ranked[allowed]),
                                                                                    np.float32(-np.inf)))
    return t, fmr * n < 1


def never_crosses(signal: str) -> float:
    """A threshold no score reaches: cosines are ≤ 1, distances ≥ 0, the aligned z is finite."""
    return -1.0 if not higher_is_closer(signal) else (1e9 if signal == "aligned" else 2.0)


def _union_rate(pos, neg, signals, fmr: float) -> float:
    """Share of augmented copies that at least one of `signals` catches, each at budget fmr / k."""
    th = {s: pick_threshold(s, np.asarray(neg[s]), fmr / len(signals))[0] for s in signals}
    hits = [np.concatenate([[crosses(s, v, th[s]) for v in pos[s][a]] for a in pos[s]]) for s in signals]
    return float(np.mean(np.any(hits, axis=0)))


def select_signals(pos: dict[str, dict[str, list[float]]], neg: dict[str, list[float]], fmr: float,
                   min_gain: float = 0.005) -> tuple[tuple[str, ...], dict[str, float]]:
    """The signals that earn a share of the budget. Every non-empty set is tried, each signal at
    fmr / k; the largest set that catches within one standard error (at least `min_gain`) of the
    best set's share of augmented copies wins (then the higher share): a signal is dropped only
    when the others, re-thresholded without it, catch clearly more. Returns the set and the caught share of every set ("a+b": rate)."""
    names = sorted(pos)
    tried = {subset: _union_rate(pos, neg, subset, fmr)
             for k in range(1, len(names) + 1) for subset in itertools.combinations(names, k)}
    best = max(tried.values())
    n = sum(len(v) for v in pos[names[0]].values())
    margin = max(min_gain, math.sqrt(best * (1 - best) / n))   # one standard error: small samples keep all
    used = max((subset for subset, rate in tried.items() if rate >= best - margin),
               key=lambda subset: (len(subset), tried[subset]))
    return used, {"+".join(subset): round(rate, 4) for subset, rate in tried.items()}


@dataclass(frozen=True)
class CalibrationConfig:
    false_match_rate: float = 0.01
    samples: int = 300                         # indexed items drawn for augmentation
    augmentations: tuple[str, ...] = AUGMENTATIONS
    seed: int = 0
    face_negatives: Path | None = None         # folder of face images; None = skimage's LFW subset


# ---- measuring ----------------------------------------------------------------------------------------
def _embed(index, images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Query vectors of every stored signal except faces: signal -> [B, D]; latent maps under MAPS
    when the index re-scores aligned."""
    out = {"pdq": np.stack([pdq_hash(im)[0] for im in images])}
    if "latent" in index.signals:
        out["latent"], out[MAPS] = index.latent_encoder().encode_with_maps(images)
    if "clip" in index.signals:
        out["clip"] = index.clip_encoder().encode(images)
    return {s: v for s, v in out.items() if s in index.signals or (s == MAPS and _aligned(index))}


def _aligned(index) -> bool:
    return index.maps is not None and "latent" in index.signals


def _sample(index, source, n: int, rng: np.random.Generator, *, only_rows: set[int] | None = None):
    """Up to n (row, image) pairs of indexed items from the source, a uniform sample (reservoir)."""
    picked, seen = [], 0
    for rec in source.records():
        if rec.image is None:
            continue
        row = index.items.row_of(rec.item_id)
        if row is None or (only_rows is not None and row not in only_rows):
            continue
        seen += 1
        if len(picked) < n:
            picked.append((row, rec.image))
        elif (j := int(rng.integers(0, seen))) < n:
            picked[j] = (row, rec.image)
    return sorted(picked, key=lambda p: p[0])


def _augmented(index, aug: str, images: list[np.ndarray], rng) -> list[np.ndarray]:
    if aug == "vae":
        return index.latent_encoder().round_trip(images)
    return [AUGMENT[aug](im, rng) for im in images]


def _measure(index, pairs, augs: tuple[str, ...], rng, progress: bool) -> list[dict]:
    """Measure once: per augmented copy of a sampled row, each signal's exact score against that
    row and its SEARCH_K nearest rows (and the aligned re-score's shortlist). Positives and
    negatives are then derived for any clustering (_derive) without embedding again."""
    from tqdm import tqdm

    from memguard.index.screen import ALIGN_SHORTLIST, _rescore, _shortlist

    out = []
    k = SEARCH_K + index._overfetch(1) - 1
    for start in tqdm(range(0, len(pairs), 32), desc="calibrate", disable=not progress):
        chunk = pairs[start:start + 32]
        for aug in augs:
            queries = _embed(index, _augmented(index, aug, [im for _, im in chunk], rng))
            found = {s: index.signals[s].search(q, k) for s, q in queries.items() if s != MAPS}
            for b, (row, _) in enumerate(chunk):
                rec = {"aug": aug, "row": row, "signals": {}}
                for s, (rows, scores) in found.items():
                    own = float(index.signals[s].score_rows(queries[s][b], [row])[0])
                    keep = rows[b] >= 0
                    rec["signals"][s] = (own, rows[b][keep], scores[b][keep])
                if MAPS in queries and "latent" in index.signals:
                    short = _shortlist(index, queries["latent"][b], ALIGN_SHORTLIST + index._overfetch(1))
                    rec["aligned"] = (short, _rescore(index, queries[MAPS][b], short))
                out.append(rec)
    return out


def _derive(measured: list[dict], labels: np.ndarray, augs: tuple[str, ...]):
    """positives[signal][aug], negatives[signal] under `labels`: a positive is the best score of the
    copy against its own cluster; a negative the best against any other cluster (one per query: the
    screen flags a query, not a pair). Aligned: the standout z when the own cluster stands out among
    the shortlist's clusters, and the standout z with the own cluster left out."""
    from memguard.index.align import ALIGN_SHORTLIST, standout
    from memguard.index.screen import _per_cluster

    signals = sorted({s for rec in measured for s in rec["signals"]}) + (["aligned"] if any("aligned" in r for r in measured) else [])
    pos = {s: {a: [] for a in augs} for s in signals}
    neg: dict[str, list[float]] = {s: [] for s in signals}
    for rec in measured:
        if rec["aug"] not in augs:
            continue
        mine = labels[rec["row"]]
        for s, (own, rows, scores) in rec["signals"].items():
            same = labels[rows] == mine
            best = max if higher_is_closer(s) else min
            pos[s][rec["aug"]].append(float(best([own, *scores[same].tolist()])))
            if (~same).any():
                neg[s].append(float(scores[~same][0]))
        if "aligned" in rec:
            rows, scores = rec["aligned"]
            best_rows, best_scores = _per_cluster(rows, scores, labels)
            hit = standout(best_scores[:ALIGN_SHORTLIST])
            pos["aligned"][rec["aug"]].append(hit[1] if hit is not None and labels[best_rows[hit[0]]] == mine
                                              else -math.inf)
            same = labels[rows] == mine
            miss = standout(_per_cluster(rows[~same], scores[~same], labels)[1][:ALIGN_SHORTLIST])
            if miss is not None:
                neg["aligned"].append(miss[1])
    return pos, neg


def _rate(signal: str, scores: list[float], threshold: float) -> float:
    return round(float(np.mean([crosses(signal, s, threshold) for s in scores])), 4) if scores else float("nan")


def _quantiles(values: list[float]) -> dict:
    v = np.asarray(values, np.float64)
    return {} if v.size == 0 else {q: round(float(np.quantile(v, p)), 4)
                                   for q, p in (("min", 0), ("p50", .5), ("p99", .99), ("max", 1))}


def _heldout(index, heldout, thresholds: dict[str, float]) -> dict:
    images = [rec.image for rec in heldout.records() if rec.image is not None]
    if not images:
        return {"images": 0}
    best: dict[str, list[float]] = {}
    for start in range(0, len(images), 64):
        queries = _embed(index, images[start:start + 64])
        for signal, q in queries.items():
            if signal == MAPS:
                best.setdefault("aligned", []).extend(_heldout_standout(index, queries))
                continue
            _, scores = index.signals[signal].search(q, 1)
            best.setdefault(signal, []).extend(scores[:, 0].tolist())
    flagged = [any(crosses(s, best[s][i], thresholds[s]) for s in best) for i in range(len(images))]
    return {"images": len(images), "false_matches": int(sum(flagged)), "fmr": round(float(np.mean(flagged)), 4),
            "per_signal": {s: {"fmr": _rate(s, v, thresholds[s]), "closest": _quantiles(v)} for s, v in best.items()}}


def _heldout_standout(index, queries: dict[str, np.ndarray]) -> list[float]:
    from memguard.index.protected import ProtectedSnapshot
    from memguard.index.screen import aligned_standout

    hits = [aligned_standout(index, fp, m, ProtectedSnapshot()) for fp, m in zip(queries["latent"], queries[MAPS])]
    return [h[1] if h is not None else -math.inf for h in hits]


def lfw_faces() -> list[np.ndarray]:
    """The 100 face crops (25×25 grayscale) of skimage's LFW subset, as RGB uint8."""
    from importlib import resources
    path = resources.files("skimage").joinpath("data/lfw_subset.npy")
    faces = np.load(str(path))[:100]
    return [np.repeat((f * 255).round().astype(np.uint8)[..., None], 3, axis=2) for f in faces]


def _face_negative_images(cfg: CalibrationConfig) -> tuple[list[np.ndarray], str]:
    if cfg.face_negatives is None:
        log.info("face negatives: skimage's LFW subset (100 faces of other people)")
        return lfw_faces(), "skimage:data/lfw_subset.npy"
    from memguard.index.sources import ImageFolderSource
    return [r.image for r in ImageFolderSource(cfg.face_negatives).records() if r.image is not None], \
        str(cfg.face_negatives)


def _face_scores(index, source, cfg: CalibrationConfig, rng, repeats: int = 4) -> dict | None:
    """Face positives per augmentation (distance to the item's own faces) and negatives (other people)."""
    sig = index.signals.get("face")
    if sig is None or sig.count == 0:
        return None
    face_rows = index.items.faces_of_rows(list(range(sig.count)))
    own: dict[int, list[int]] = {}   # cluster -> its faces: one image's near duplicates hold one face
    for face_row, (item_row, _) in face_rows.items():
        own.setdefault(index.cluster_of(item_row), []).append(face_row)
    with_faces = {r for r in range(index.manifest.counts.get("items", 0)) if index.cluster_of(r) in own}
    pairs = _sample(index, source, cfg.samples, rng, only_rows=with_faces)
    embedder = index.face_embedder()
    pos = {a: [] for a in cfg.augmentations}
    missed = {a: 0 for a in cfg.augmentations}
    for row, image in pairs:
        for aug in cfg.augmentations:
            for _ in range(repeats):
                found = embedder.detect(_augmented(index, aug, [image], rng)[0])
                if not found:
                    missed[aug] += 1
                    continue
                d = min(float(sig.score_rows(f.descriptor, own[index.cluster_of(row)]).min()) for f in found)
                pos[aug].append(d)
    images, origin = _face_negative_images(cfg)
    neg = []
    for image in images:
        for face in embedder.detect(image):
            _, dist = sig.search(face.descriptor[None], 1)
            neg.append(float(dist[0, 0]))
    return {"pos": pos, "missed": missed, "neg": neg, "origin": origin, "items": len(pairs),
            "negative_images": len(images), "trials_per_aug": len(pairs) * repeats}


def _face_report(faces: dict, fmr: float) -> tuple[float, dict]:
    if not faces["neg"]:
        raise InvalidInput("face_negatives", f"no face detected in {faces['origin']}")
    t, limited = pick_threshold("face", np.asarray(faces["neg"]), fmr)
    tpr = {a: round((sum(d <= t for d in v)) / max(faces["trials_per_aug"], 1), 4) for a, v in faces["pos"].items()}
    return t, {"threshold": t, "negatives": len(faces["neg"]), "negative_source": faces["origin"],
               "resolution_limited": limited, "fmr": _rate("face", faces["neg"], t),
               "tpr": tpr, "missed_detections": faces["missed"], "items": faces["items"],
               "positive_distances": _quantiles([d for v in faces["pos"].values() for d in v]),
               "negative_distances": _quantiles(faces["neg"])}


def _fit(pos, neg, cfg: CalibrationConfig, current: dict[str, float]) -> tuple[dict[str, float], dict]:
    """Thresholds of the copy signals at cfg.false_match_rate, and their report."""
    used, caught = select_signals(pos, neg, cfg.false_match_rate)
    budget = cfg.false_match_rate / len(used)
    values = dict(current)
    report: dict = {"per_signal_budget": budget, "signals": {}, "signals_used": list(used), "caught_by_set": caught}
    for signal in pos:
        t, limited = pick_threshold(signal, np.asarray(neg[signal]), budget)
        if signal not in used:
            log.warning("index calibration: signal %s does not pay for its share of the false-match budget "
                        "(the others catch more copies without it): it never crosses", signal)
            t, limited = never_crosses(signal), False
        values[signal] = t
        report["signals"][signal] = {
            "threshold": t, "negatives": len(neg[signal]), "resolution_limited": limited, "used": signal in used,
            "fmr": _rate(signal, neg[signal], t), "negative_scores": _quantiles(neg[signal]),
            "tpr": {a: _rate(signal, v, t) for a, v in pos[signal].items()}}
    return values, report


def _combined_tpr(pos, values: dict[str, float]) -> dict[str, float]:
    """Per kind of positive: the share of copies that at least one signal catches (what the screen sees)."""
    augs = next(iter(pos.values())).keys()
    return {a: round(float(np.mean([any(crosses(s, pos[s][a][i], values[s]) for s in pos)
                                    for i in range(len(next(iter(pos.values()))[a]))])), 4) for a in augs}


def calibrate(index, source, *, heldout=None, cfg: CalibrationConfig = CalibrationConfig(),
              progress: bool = True, write: bool = True) -> dict:
    """Measure, pick thresholds for cfg.false_match_rate, store them in the manifest; returns the report.

    Near-duplicate clusters (memguard.index.clusters) decide what "another item" is. The copies
    are embedded once; thresholds are fitted on the index's clusters, the clusters are formed again
    at those thresholds (keeping the old ones), and, if that joined anything, fitted once more."""
    from memguard.index import clusters

    if not 0 < cfg.false_match_rate < 1:
        raise InvalidInput("false_match_rate", f"must be in (0, 1), got {cfg.false_match_rate}")
    unknown = set(cfg.augmentations) - set(AUGMENT) - {"vae"}
    if unknown or not cfg.augmentations:
        raise InvalidInput("augmentations", f"choose from {AUGMENTATIONS}; got {sorted(unknown) or 'none'}")
    if "vae" in cfg.augmentations and "latent" not in index.signals:
        cfg = replace(cfg, augmentations=tuple(a for a in cfg.augmentations if a != "vae"))
        log.warning("index calibration: no VAE in this index (no latent signal): no VAE round-trip positives")
    rng = np.random.default_rng(cfg.seed)
    pairs = _sample(index, source, cfg.samples, rng)
    if len(pairs) < 2:
        raise InvalidInput("source", "fewer than 2 of its images are in the index; calibrate with the build's source")
    measured = _measure(index, pairs, tuple(cfg.augmentations) + CHECKS, rng, progress)
    n_items = int(index.manifest.counts.get("items", 0))
    labels = index.cluster_labels if index.cluster_labels is not None else np.arange(n_items, dtype=np.int32)
    current = {f.name: getattr(index.thresholds, f.name) for f in fields(Thresholds)
               if f.name in ("latent", "aligned", "pdq", "clip", "face")}
    values, fit = _fit(*_derive(measured, labels, cfg.augmentations), cfg, current)
    rounds = 1
    # cluster again where the calibrated screen calls items copies (pair signals at the calibrated
    # thresholds; an aligned standout with one pair signal at the build's, the defaults), fit on the
    # new clusters, until they hold
    while "latent" in index.signals and rounds < clusters.MAX_ROUNDS:
        again = clusters.compute(index, Thresholds(**values), keep=labels)
        joins = clusters.aligned_pairs(index, again, values["aligned"], Thresholds(), progress=progress)
        again = clusters.labels_from_pairs(len(again), clusters.pairs_of(again) | joins)
        if np.array_equal(again, labels):
            break
        labels, rounds = again, rounds + 1
        values, fit = _fit(*_derive(measured, labels, cfg.augmentations), cfg, current)
    pos, _ = _derive(measured, labels, cfg.augmentations + CHECKS)
    report: dict = {"false_match_rate": cfg.false_match_rate, "items": len(pairs),
                    "augmentations": list(cfg.augmentations), **fit, "cluster_rounds": rounds,
                    "clusters": {"count": int(len(np.unique(labels))), "joined_items": int((labels != np.arange(len(labels))).sum())},
                    "combined_tpr": _combined_tpr({s: {a: v for a, v in pos[s].items() if a in cfg.augmentations} for s in pos}, values),
                    "checks": _combined_tpr({s: {a: pos[s][a] for a in CHECKS} for s in pos}, values)}
    rates = {**report["combined_tpr"], **report["checks"]}
    blind = {a: rates[a] for a in BLIND_KINDS if a in rates and rates[a] < MIN_COPY_TPR}
    if blind:
        report["blind"] = blind
        log.warning("index calibration: the screen catches only %s of JPEG copies / VAE round trips at false-match "
                    "rate %s (under %s): it cannot see a copy", blind, cfg.false_match_rate, MIN_COPY_TPR)
    if write and (index.cluster_labels is None or not np.array_equal(labels, index.cluster_labels)):
        clusters.write(index, labels, Thresholds(**values))
    faces = _face_scores(index, source, cfg, rng)
    if faces is not None:
        values["face"], report["faces"] = _face_report(faces, cfg.false_match_rate)
    if heldout is not None:
        report["heldout"] = _heldout(index, heldout, values)
    thresholds = Thresholds(**values, calibrated=True, false_match_rate=cfg.false_match_rate, details=report)
    if write:
        index.set_thresholds(thresholds)
    report["thresholds"] = {k: values[k] for k in values}
    return report
