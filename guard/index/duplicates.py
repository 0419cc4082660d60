"""Duplicates in a training set: exact copies folded at build time, near copies found in the index.

Memorization follows duplication (Carlini et al. 2023; Webster 2023 found Stable Diffusion's
memorized prompts among LAION's most-duplicated images), so data owners de-duplicate before
training, and `memguard calibrate` takes the captions of the largest clusters as likely-memorized
prompts. Two stages:

- `DedupedSource` wraps any image source of a build: identical images (same decoded pixels) fold
  into the first record, which carries `copies`, the folded ids and their distinct captions in its
  metadata. The index then holds one row per distinct image, so a copy stands out from its
  neighbours in the screen instead of tying with its own duplicates.
- `find_clusters` lists the distinct items that are near copies of each other: the index's
  near-duplicate clusters (memguard.index.clusters: two copy signals must agree; one alone joins
  look-alike procedural images); a cluster's size counts every folded copy of its members.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np

from memguard.index.sources import SourceRecord

MAX_LISTED_IDS = 32        # folded ids kept per item (the count is exact)
MAX_LISTED_CAPTIONS = 16   # distinct captions kept per item


def content_key(image: np.ndarray) -> str:
    """sha256 of a decoded image's shape and pixels: equal for byte-different encodings of one image."""
    h = hashlib.sha256(repr(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


class DedupedSource:
    """A source whose identical images are folded into their first record (two passes over `source`).

    The first pass hashes every decodable image; the second yields each distinct image once, with
    meta `copies` (how many records it stands for), `copy_ids` and `captions` (first ones, capped).
    Records without an image (errors, precomputed vectors) pass through unchanged.
    """

    def __init__(self, source):
        self.source = source
        self._groups: dict[str, dict] | None = None
        self._passthrough = 0   # records without an image, counted by the scan

    def describe(self) -> dict:
        inner = self.source.describe() if hasattr(self.source, "describe") else {}
        return {**inner, "dedupe": "exact (decoded pixels)"}

    def _scan(self) -> dict[str, dict]:
        if self._groups is None:
            groups: dict[str, dict] = {}
            for rec in self.source.records(0):
                if rec.image is None:
                    self._passthrough += 1
                    continue
                g = groups.setdefault(content_key(rec.image), {"first": rec.item_id, "copies": 0, "ids": [],
                                                                "captions": []})
                g["copies"] += 1
                if len(g["ids"]) < MAX_LISTED_IDS:
                    g["ids"].append(rec.item_id)
                if rec.caption and rec.caption not in g["captions"] and len(g["captions"]) < MAX_LISTED_CAPTIONS:
                    g["captions"].append(rec.caption)
            self._groups = groups
        return self._groups

    def count(self) -> int:
        return len(self._scan()) + self._passthrough

    def records(self, start: int = 0) -> Iterator[SourceRecord]:
        groups = self._scan()
        n = 0
        for rec in self.source.records(0):
            if rec.image is not None:
                g = groups[content_key(rec.image)]
                if g["first"] != rec.item_id:
                    continue
                if g["copies"] > 1:
                    rec.meta = {**rec.meta, "copies": g["copies"], "copy_ids": g["ids"], "captions": g["captions"]}
            if n >= start:
                yield rec
            n += 1


@dataclass
class Cluster:
    """A group of training images that are copies of one another."""
    cluster: int
    size: int                     # training records it stands for (folded copies included)
    items: list[str]              # distinct indexed items (rows of the index)
    captions: list[str] = field(default_factory=list)
    exact_copies: int = 0         # records folded at build time into its items
    near_copies: int = 0          # distinct items joined as near copies

    def to_json(self) -> dict:
        return asdict(self)


def _items(index) -> list[tuple[int, str, str, dict]]:
    rows = index.items._query("SELECT row, item_id, caption, meta FROM items ORDER BY row")
    return [(r, i, c or "", json.loads(m or "{}")) for r, i, c, m in rows]


def find_clusters(index, *, min_size: int = 2, neighbours: int | None = None) -> list[Cluster]:
    """Clusters of at least `min_size` training records, largest first: the index's stored
    near-duplicate clusters (memguard.index.clusters), or, for an index built before them, the
    same rule computed now (`neighbours` per item and signal; default the rule's)."""
    from memguard.index import clusters as near

    items = _items(index)
    labels = index.cluster_labels
    if labels is None or neighbours is not None:
        labels = near.labels_from_pairs(len(items), near.copy_pairs(index, index.thresholds,
                                                                     neighbours=neighbours or near.NEIGHBOURS))
    groups: dict[int, list[int]] = {}
    for k, (row, *_rest) in enumerate(items):
        groups.setdefault(int(labels[row]), []).append(k)
    out = []
    for members in groups.values():
        copies = [int(items[k][3].get("copies", 1)) for k in members]
        size = sum(copies)
        if size < min_size:
            continue
        captions: list[str] = []
        for k in members:
            for cap in [items[k][2], *items[k][3].get("captions", [])]:
                if cap and cap not in captions:
                    captions.append(cap)
        out.append(Cluster(0, size, [items[k][1] for k in members], captions[:MAX_LISTED_CAPTIONS],
                           exact_copies=size - len(members), near_copies=len(members) - 1))
    out.sort(key=lambda c: (-c.size, c.items[0]))
    for i, c in enumerate(out):
        c.cluster = i
    return out


def clusters_table(clusters: list[Cluster], width: int = 70) -> str:
    """A plain-text table: cluster, size, exact / near copies, first member, first caption."""
    lines = [f"{'cluster':>7}  {'size':>6}  {'exact':>5}  {'near':>4}  {'first item':<28}  caption"]
    for c in clusters:
        caption = (c.captions[0] if c.captions else "")[:width]
        lines.append(f"{c.cluster:>7}  {c.size:>6}  {c.exact_copies:>5}  {c.near_copies:>4}  {c.items[0]:<28}  {caption}")
    return "\n".join(lines)
