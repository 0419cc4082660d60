"""Screening one image against the index: copy matches per signal, and faces.

Candidates are the closest items of each signal (training rows and protected images); every
candidate is then scored on every signal exactly, so a match reports all its evidence. A signal
`crossed` when its score is at least as close as the calibrated threshold; a candidate is a copy
when any signal crossed. When the index stores latent maps, the plain latent search's shortlist
is re-scored under crop/shift/rotation hypotheses (memguard.index.align); the item that stands out
carries the `aligned` signal, its z statistic.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from memguard.index.align import ALIGN_SHORTLIST, aligned_scores, standout
from memguard.index.builder import MAPS
from memguard.index.config import crosses, higher_is_closer
from memguard.index.pdq import check_image, pdq_hash
from memguard.index.signals import exact_scores

SCREEN_K = 5          # candidates per signal
FACE_K = 3


@dataclass
class SignalScore:
    score: float        # cosine (latent, clip), distance (pdq bits, face) or standout z (aligned)
    threshold: float
    crossed: bool


@dataclass
class CopyMatch:
    item_id: str                     # training item id, or the protected subject
    protected: bool                  # a protection covers this item
    signals: dict[str, SignalScore]
    is_copy: bool
    protection_ids: list[str] = field(default_factory=list)
    near_duplicates: int = 0         # other training items of its cluster (copies of one image), reported as one


@dataclass
class FaceMatch:
    box: tuple[int, int, int, int]   # left, top, right, bottom in the screened image
    identity: str | None             # closest identity (training "item#faceN" or a protected name)
    distance: float | None           # Euclidean descriptor distance to it
    threshold: float
    matched: bool                    # distance ≤ threshold
    protected: bool                  # the identity is a protected one
    item_id: str | None = None       # training item the identity comes from
    protection_id: str | None = None


@dataclass
class ScreenResult:
    is_copy: bool
    protected: bool                  # a protected item or identity matched
    matches: list[CopyMatch]         # candidates, copies first, closest first
    faces: list[FaceMatch]
    signals: list[str]               # the signals that were checked
    calibrated: bool
    seconds: float

    @property
    def copies(self) -> list[CopyMatch]:
        return [m for m in self.matches if m.is_copy]

    def to_json(self) -> dict:
        return asdict(self)


def _queries(index, image: np.ndarray, snap) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Query vectors per signal, and the latent map when the index can re-score aligned."""
    queries, latent_map = {"pdq": pdq_hash(image)[0]}, None
    if "latent" in index.signals or snap.count("latent"):
        fingerprint, maps = index.latent_encoder().encode_with_maps([image])
        queries["latent"] = fingerprint[0]
        latent_map = maps[0] if index.maps is not None else None
    if "clip" in index.signals:
        queries["clip"] = index.clip_encoder().encode([image])[0]
    return queries, latent_map


def _shortlist(index, fingerprint: np.ndarray, k: int) -> np.ndarray:
    """The plain latent search's k closest training rows, closest first."""
    found, _ = index.signals["latent"].search(fingerprint[None], k)
    return found[0][found[0] >= 0]


def _rescore(index, latent_map: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Aligned scores of `rows` (in their order); the maps are read in row order (memory-mapped)."""
    order = np.argsort(rows)
    scores = np.empty(len(rows), np.float32)
    scores[order] = aligned_scores(latent_map, np.asarray(index.maps[rows[order]], np.float32),
                                   index.manifest.maps["channels"])
    return scores


def _per_cluster(rows: np.ndarray, scores: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """One candidate per cluster, in the order of its first row, carrying the cluster's best aligned
    score: a photo's near duplicates are one candidate, not rivals that hide its standout."""
    if labels is None:
        return rows, scores
    first: dict[int, int] = {}
    out_rows, out_scores = [], []
    for r, sc in zip(rows.tolist(), scores.tolist()):
        lab = int(labels[r])
        if lab not in first:
            first[lab] = len(out_rows)
            out_rows.append(r)
            out_scores.append(sc)
        elif sc > out_scores[first[lab]]:
            out_rows[first[lab]], out_scores[first[lab]] = r, sc
    return np.asarray(out_rows, np.int64), np.asarray(out_scores, np.float32)


def aligned_own_and_left_out(index, fingerprint: np.ndarray, latent_map: np.ndarray, own_row: int,
                             labels: np.ndarray | None = None) -> tuple[float, float]:
    """Calibration's pair for an augmented copy of training row `own_row`, from one re-score of the
    shortlist: the standout z when own_row's cluster is the standout (else -inf), and the standout z
    with own_row's whole cluster left out of the index (nan when too few candidates). The same
    shortlists as aligned_standout without and with exclude_row; protections play no part in
    thresholds. `labels`: the clusters to use (default: the index's)."""
    labels = index.cluster_labels if labels is None else labels
    rows = _shortlist(index, fingerprint, ALIGN_SHORTLIST + index._overfetch(1))
    scores = _rescore(index, latent_map, rows)
    mine = (labels[rows] == labels[own_row]) if labels is not None else rows == own_row
    best_rows, best_scores = _per_cluster(rows, scores, labels)
    hit = standout(best_scores[:ALIGN_SHORTLIST])
    own_label = labels[own_row] if labels is not None else own_row
    hit_label = None if hit is None else (labels[best_rows[hit[0]]] if labels is not None else best_rows[hit[0]])
    own = hit[1] if hit is not None and hit_label == own_label else -math.inf
    miss = standout(_per_cluster(rows[~mine], scores[~mine], labels)[1][:ALIGN_SHORTLIST])
    return own, (miss[1] if miss is not None else math.nan)


def aligned_standout(index, fingerprint: np.ndarray, latent_map: np.ndarray, snap,
                     exclude_row: int | None = None, labels: np.ndarray | None = None) -> tuple[dict, float] | None:
    """The shortlisted candidate whose aligned score stands out, and its z; None if too few.

    The shortlist is the plain latent search's ALIGN_SHORTLIST closest training clusters (without
    `exclude_row`'s cluster: calibration's leave-one-out), each carried by its best aligned row,
    plus every protected image that has a map. The candidate is {"row": r} or {"pid": p}.
    `labels`: the clusters to use (default: the index's; calibration passes the ones it is forming)."""
    labels = index.cluster_labels if labels is None else labels
    rows = _shortlist(index, fingerprint, ALIGN_SHORTLIST + index._overfetch(1) - 1 + (exclude_row is not None))
    if exclude_row is not None:
        rows = rows[labels[rows] != labels[exclude_row]] if labels is not None else rows[rows != exclude_row]
    rows, train_scores = _per_cluster(rows, _rescore(index, latent_map, rows), labels)
    rows, train_scores = rows[:ALIGN_SHORTLIST], train_scores[:ALIGN_SHORTLIST]
    scores = [train_scores]
    owners = [{"row": int(r)} for r in rows]
    if snap.count(MAPS):
        # a protection of a shortlisted training item is that item: as a second candidate it
        # would be its own look-alike and hide the standout
        shortlisted = set(index.items.ids_of_rows(rows.tolist()).values())
        keep = [j for j, row in enumerate(snap.rows[MAPS]) if row.subject not in shortlisted]
        if len(keep) > ALIGN_SHORTLIST:   # a large registry is shortlisted like the training set
            latent_of = {row.pid: vec for row, vec in zip(snap.rows["latent"], snap.vectors["latent"])}
            closeness = [float(latent_of[snap.rows[MAPS][j].pid] @ fingerprint) for j in keep]
            keep = [keep[i] for i in np.argsort(closeness, kind="stable")[::-1][:ALIGN_SHORTLIST]]
        scores.append(aligned_scores(latent_map, snap.vectors[MAPS][keep], index.manifest.maps["channels"]))
        owners += [{"pid": snap.rows[MAPS][j].pid} for j in keep]
    best = standout(np.concatenate(scores))
    return None if best is None else (owners[best[0]], best[1])


def _copy_matches(index, queries: dict[str, np.ndarray], latent_map: np.ndarray | None, snap) -> list[CopyMatch]:
    train_rows: set[int] = set()
    prot_pids: set[str] = set()
    for signal, query in queries.items():
        for hit in index.search_signal(signal, query, index._overfetch(SCREEN_K), snap):
            (prot_pids.add(hit["pid"]) if hit["protected"] else train_rows.add(hit["row"]))
    aligned = None
    if latent_map is not None and "latent" in index.signals:
        aligned = aligned_standout(index, queries["latent"], latent_map, snap)
        if aligned is not None:
            owner = aligned[0]
            train_rows.add(owner["row"]) if "row" in owner else prot_pids.add(owner["pid"])
    names = index.items.ids_of_rows(sorted(train_rows))
    protected_by: dict[str, list[str]] = {}
    for pid, prot in snap.protections.items():
        protected_by.setdefault(prot.subject, []).append(pid)
    th = index.thresholds
    by_cluster: dict[int, list[CopyMatch]] = {}
    for row in sorted(train_rows):
        scores = {s: float(index.signals[s].score_rows(q, [row])[0]) for s, q in queries.items() if s in index.signals}
        if aligned is not None and aligned[0].get("row") == row:
            scores["aligned"] = aligned[1]
        by_cluster.setdefault(index.cluster_of(row), []).append(
            _match(names[row], scores, th, protected_by.get(names[row], [])))
    matches = [_cluster_match(index, label, found) for label, found in by_cluster.items()]
    for pid in sorted(prot_pids):
        prot = snap.protections[pid]
        scores = {}
        for s, q in queries.items():
            vecs = [v for v, _ in prot.vectors.get(s, [])]
            if vecs:
                scores[s] = float(exact_scores(s, np.stack(vecs), q).max() if higher_is_closer(s)
                                  else exact_scores(s, np.stack(vecs), q).min())
        if aligned is not None and aligned[0].get("pid") == pid:
            scores["aligned"] = aligned[1]
        matches.append(_match(prot.subject, scores, th, protected_by.get(prot.subject, [pid])))
    key = lambda m: (not m.is_copy, -m.signals["latent"].score if "latent" in m.signals else 0.0)
    return sorted(matches, key=key)


def _cluster_match(index, label: int, found: list[CopyMatch]) -> CopyMatch:
    """A cluster's near duplicates are one image: one match, its closest member's, with every
    signal at its best over the members found, and the protections of any of them."""
    best = min(found, key=lambda m: (not m.is_copy, -m.signals["latent"].score if "latent" in m.signals else 0.0))
    merged = dict(best.signals)
    for m in found:
        for s, sc in m.signals.items():
            have = merged.get(s)
            if have is None or (sc.crossed and not have.crossed) or \
                    (sc.crossed == have.crossed and (sc.score > have.score if higher_is_closer(s) else sc.score < have.score)):
                merged[s] = sc
    pids = sorted({p for m in found for p in m.protection_ids})
    members = index.cluster_size(label) - 1
    return CopyMatch(best.item_id, bool(pids), merged, any(x.crossed for x in merged.values()), pids, members)


def _match(item_id: str, scores: dict[str, float], th, pids: list[str]) -> CopyMatch:
    signals = {s: SignalScore(round(v, 6), getattr(th, s), crosses(s, v, getattr(th, s))) for s, v in scores.items()}
    return CopyMatch(item_id, bool(pids), signals, any(x.crossed for x in signals.values()), list(pids))


def _face_matches(index, image: np.ndarray, snap) -> list[FaceMatch]:
    """One FaceMatch per detected face. A protected identity within the threshold wins over a
    closer training identity: a protection must never be hidden behind the training set."""
    th = index.thresholds.face
    out = []
    for face in index.face_embedder().detect(image):
        hits = index.search_signal("face", face.descriptor, FACE_K, snap)
        if not hits:
            out.append(FaceMatch(face.box, None, None, th, False, False))
            continue
        protected_hits = [h for h in hits if h["protected"]]
        best = protected_hits[0] if protected_hits and protected_hits[0]["score"] <= th else hits[0]
        dist = round(best["score"], 6)
        if best["protected"]:
            out.append(FaceMatch(face.box, best["subject"], dist, th, best["score"] <= th, True,
                                 protection_id=best["pid"]))
            continue
        item_row, identity = index.items.faces_of_rows([best["row"]])[best["row"]]
        # one image's near duplicates hold one face: reported as the cluster's first item, and a
        # protection of any of them covers it
        members = index.items.ids_of_rows(index.cluster_members(item_row))
        item_id = members.get(index.cluster_of(item_row), members.get(item_row))
        protected = identity in snap.protected_subjects or any(m in snap.protected_subjects for m in members.values())
        out.append(FaceMatch(face.box, identity, dist, th, best["score"] <= th, protected, item_id=item_id))
    return out


def screen_image(index, image: np.ndarray) -> ScreenResult:
    t0 = time.perf_counter()
    image = check_image(image, "image")
    snap = index.snapshot()
    queries, latent_map = _queries(index, image, snap)
    matches = _copy_matches(index, queries, latent_map, snap)
    faces = []
    if "face" in index.signals or snap.count("face"):
        faces = _face_matches(index, image, snap)
    protected = any(m.is_copy and m.protected for m in matches) or any(f.matched and f.protected for f in faces)
    return ScreenResult(any(m.is_copy for m in matches), protected, matches, faces,
                        sorted(queries) + (["aligned"] if latent_map is not None else [])
                        + (["face"] if faces or "face" in index.signals else []),
                        index.thresholds.calibrated, round(time.perf_counter() - t0, 4))
