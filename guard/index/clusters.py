"""Near-duplicate clusters: which training items are copies of one image.

A scraped training set holds a popular image many times: identical files (folded into one item at
build, guard.index.duplicates.DedupedSource) and near duplicates (re-encodes, resizes, watermarks),
which stay separate items. Everything that compares a query with "the other items" must compare it
with the other *clusters*: the screen reports one match per cluster, the aligned re-score's
standout z is taken over clusters (a photo's own re-encode is no rival), the per-step candidates
are distinct clusters, and the screen's calibration takes as a negative the closest item of another
cluster (else a photo's own re-encode is its "closest other item" and the thresholds close down to
exact matches).

Rule: two items are one image when at least two of the pairwise copy signals (latent fingerprint
cosine, PDQ Hamming distance, CLIP cosine: those the index holds) cross at the thresholds in force.
One signal alone joins look-alike procedural images (same shape on the same background: latent up
to 0.94, testbed CLIP up to 0.999); two independent views agreeing do not. At build the thresholds
are the defaults; `memguard index calibrate` clusters again at the calibrated ones (keeping the
build's pairs) and fits on those clusters.

A re-host's crop or caption banner moves a small image's pairwise signals out of reach (on the
64-px v-testbed: PDQ 34-102 bits, latent 0.46-0.95, CLIP 0.79-0.99, as far as look-alikes go), so
calibration adds a second rule, the screen's own view: an item joins the cluster that its clean
image, screened against the index without its own cluster, finds as the aligned standout at the
calibrated z, when one pair signal agrees at the build's thresholds (`aligned_pairs`). One way
only: a crop is a crop of its photo, not the reverse (the photo finds its crop at z 10, the crop
finds the photo at 21). The second vote keeps out a look-alike that stands out by a shared stripe
pattern (z 13.8, CLIP 0.2-0.5 on the v-testbed); a same-caption rendering that CLIP calls the
same picture (0.998) joins. Unjoined, such a variant is "another cluster" whose standout copies
of its photo count as calibration negatives: on the v-testbed two of them lifted the aligned
threshold 8.7 -> 11.3. Calibration fits, joins and fits again until the clusters hold. Each row's label is the smallest row of its cluster; the
labels live in `clusters.npy`, recorded in the manifest. An index built before clusters has none:
every row is its own cluster (logged once).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from memguard.index.config import Thresholds, crosses
from memguard.index.vectors import read_array, write_array

log = logging.getLogger(__name__)
CLUSTERS_FILE = "clusters.npy"
PAIR_SIGNALS = ("latent", "pdq", "clip")
MIN_AGREEING = 2          # signals that must call a pair copies of each other
NEIGHBOURS = 16           # nearest rows examined per item and signal
MAX_ROUNDS = 6            # calibration fits at most: fit, join, fit again until the clusters hold (measured: 3-4)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return int(a)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _rule_signals(index, thresholds: Thresholds) -> list[str]:
    """The pair signals that vote: held by the index and not switched off by calibration."""
    from memguard.index.calibrate import never_crosses

    return [s for s in PAIR_SIGNALS if s in index.signals
            and getattr(thresholds, s) != never_crosses(s)]


def copy_pairs(index, thresholds: Thresholds, *, neighbours: int = NEIGHBOURS, batch: int = 1024) -> set[tuple[int, int]]:
    """Row pairs (a < b) that at least MIN_AGREEING pair signals call copies at `thresholds`.
    Candidates are each row's nearest neighbours on every voting signal; each candidate pair is
    then scored exactly on all of them."""
    signals = _rule_signals(index, thresholds)
    if len(signals) < MIN_AGREEING:
        return set()
    n = index.signals[signals[0]].count
    pairs: set[tuple[int, int]] = set()
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        found: dict[int, set[int]] = {r: set() for r in range(start, stop)}
        for s in signals:
            sig = index.signals[s]
            rows, _ = sig.search(np.asarray(sig.vectors[start:stop]), neighbours + 1)
            for b, row_list in enumerate(rows):
                found[start + b].update(int(r) for r in row_list if r >= 0 and r != start + b)
        for me, others in found.items():
            others = sorted(o for o in others if (min(me, o), max(me, o)) not in pairs)
            if not others:
                continue
            votes = np.zeros(len(others), np.int32)
            for s in signals:
                sig = index.signals[s]
                scores = sig.score_rows(np.asarray(sig.vectors[me]), others)
                votes += np.asarray([crosses(s, float(v), getattr(thresholds, s)) for v in scores], np.int32)
            pairs.update((min(me, o), max(me, o)) for o, v in zip(others, votes) if v >= MIN_AGREEING)
    return pairs


def labels_from_pairs(n: int, pairs) -> np.ndarray:
    """Each row's cluster label (the smallest row of its cluster), int32 [n]."""
    uf = _UnionFind(n)
    for a, b in pairs:
        uf.union(a, b)
    return np.asarray([uf.find(r) for r in range(n)], np.int32)


def pairs_of(labels: np.ndarray) -> set[tuple[int, int]]:
    """The (label, member) pairs that rebuild `labels` (kept when clustering again)."""
    return {(int(lab), r) for r, lab in enumerate(labels) if lab != r}


def compute(index, thresholds: Thresholds | None = None, keep: np.ndarray | None = None) -> np.ndarray:
    """Cluster labels of every training row at `thresholds` (default: the index's), joined with
    the clusters of `keep` (labels from an earlier round)."""
    th = thresholds or index.thresholds
    pairs = copy_pairs(index, th) | (pairs_of(keep) if keep is not None else set())
    return labels_from_pairs(_row_count(index), pairs)


def _row_count(index) -> int:
    return int(index.manifest.counts.get("items", 0))


def write(index, labels: np.ndarray, thresholds: Thresholds) -> dict:
    """Store labels in clusters.npy and the manifest (recorded with its checksum); use them at once."""
    from memguard.index.manifest import record_files, write_manifest

    labels = np.asarray(labels, np.int32)
    write_array(Path(index.path) / CLUSTERS_FILE, labels)
    sizes = np.bincount(labels, minlength=len(labels))
    info = {"file": CLUSTERS_FILE, "clusters": int((sizes > 0).sum()), "largest": int(sizes.max(initial=0)),
            "joined_items": int((labels != np.arange(len(labels))).sum()),
            "rule": {"signals": _rule_signals(index, thresholds), "min_agreeing": MIN_AGREEING,
                     "thresholds": {s: getattr(thresholds, s) for s in PAIR_SIGNALS}}}
    with index._write_lock:
        index.manifest.clusters = info
        index.manifest.files.update(record_files(Path(index.path), [CLUSTERS_FILE]))
        write_manifest(index.path, index.manifest)
        index._cluster_labels, index._cluster_sizes = labels, sizes
    return info


def read(path: Path, manifest) -> np.ndarray | None:
    """Labels of an index directory, or None when it was built before clusters."""
    info = getattr(manifest, "clusters", None)
    if not info:
        return None
    labels = np.asarray(read_array(Path(path) / info["file"], dtype=np.int32, ndim=1, mmap=False))
    if len(labels) != int(manifest.counts.get("items", 0)):
        from memguard.errors import CorruptData
        raise CorruptData(f"{path / info['file']}: {len(labels)} labels for {manifest.counts.get('items')} items")
    return labels


def aligned_pairs(index, labels: np.ndarray, z_threshold: float, pair_thresholds: Thresholds, *,
                  progress: bool = False) -> set[tuple[int, int]]:
    """Row pairs that join a row to the cluster the aligned screen finds for its clean image at
    `z_threshold`, when a pair signal also calls them copies at `pair_thresholds` (module docstring).
    Only rows with such a vote towards another cluster among their NEIGHBOURS nearest are re-scored
    (a vector search each); each of those costs one screen's aligned re-score."""
    from tqdm import tqdm

    from memguard.index.protected import ProtectedSnapshot
    from memguard.index.screen import aligned_standout

    signals = [s for s in PAIR_SIGNALS if s in index.signals]
    if index.maps is None or "latent" not in index.signals or not math.isfinite(z_threshold):
        return set()
    latent = index.signals["latent"]
    members: dict[int, list[int]] = {}
    for r, lab in enumerate(labels.tolist()):
        members.setdefault(lab, []).append(r)
    pairs = set()
    for r in tqdm(_one_vote_rows(index, labels, pair_thresholds, signals), desc="aligned joins", disable=not progress):
        hit = aligned_standout(index, np.asarray(latent.vectors[r], np.float32), np.asarray(index.maps[r], np.float32),
                               ProtectedSnapshot(), exclude_row=r, labels=labels)
        if hit is None or hit[1] < z_threshold:
            continue
        found = members[int(labels[hit[0]["row"]])]
        for s in signals:
            sig = index.signals[s]
            scores_s = sig.score_rows(np.asarray(sig.vectors[r]), found)
            if any(crosses(s, float(v), getattr(pair_thresholds, s)) for v in scores_s):
                pairs.add((min(r, found[0]), max(r, found[0])))
                break
    return pairs


def _one_vote_rows(index, labels: np.ndarray, thresholds: Thresholds, signals: list[str], *,
                   batch: int = 1024) -> list[int]:
    """Rows that one pair signal calls a copy of a row of another cluster, among their NEIGHBOURS
    nearest: the only rows an aligned join can move."""
    n = _row_count(index)
    hit = np.zeros(n, bool)
    for s in signals:
        sig = index.signals[s]
        for start in range(0, n, batch):
            stop = min(n, start + batch)
            rows, scores = sig.search(np.asarray(sig.vectors[start:stop]), NEIGHBOURS + 1)
            for b in range(stop - start):
                me = start + b
                if hit[me]:
                    continue
                hit[me] = any(r >= 0 and labels[r] != labels[me] and crosses(s, float(v), getattr(thresholds, s))
                              for r, v in zip(rows[b].tolist(), scores[b].tolist()))
    return np.flatnonzero(hit).tolist()
