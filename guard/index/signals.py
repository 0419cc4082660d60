"""One signal of a loaded index: its vector collection on whichever backend holds it.

Scores follow each signal's natural scale (memguard.index.scores): cosine for latent and clip (higher
is closer), Hamming bits for pdq and Euclidean distance for face (lower is closer). Every backend
returns exact scores; approximate structures re-rank a wider shortlist against the stored vectors.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from memguard.crypto import DataKey
from memguard.index.backends import VectorCollection, open_collection
from memguard.index.config import IndexConfig
from memguard.index.manifest import SignalInfo
from memguard.index.scores import best_first, exact_scores

__all__ = ["SignalIndex", "best_first", "exact_scores"]


class RowView:
    """Array-like read access to a collection's stored vectors by row: view[rows], view[a:b], len(view)."""

    def __init__(self, collection: VectorCollection, count: int):
        self.collection, self._count = collection, count
        self.shape = (count, collection.width)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            return self.collection.fetch(np.arange(self._count)[key])
        rows = np.asarray(key, np.int64)
        out = self.collection.fetch(rows.reshape(-1))
        return out.reshape(*rows.shape, self.collection.width)


class SignalIndex:
    def __init__(self, name: str, info: SignalInfo, directory: Path, cfg: IndexConfig, backend: str | None = None,
                 key: DataKey | None = None):
        self.name, self.info, self.cfg = name, info, cfg
        self.collection = open_collection(name, info, Path(directory), cfg, backend, key)
        # faiss keeps a memory-mapped array: hand it out as is, the fastest path for bulk reads
        self.vectors = getattr(self.collection, "vectors", None)
        if self.vectors is None:
            self.vectors = RowView(self.collection, info.count)
        self.exact = bool(getattr(self.collection, "exact", info.backend.get("index_type") == "FLAT"))

    @property
    def count(self) -> int:
        return self.info.count

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest stored rows of each query: (rows [B, k'] int64, scores [B, k'] float32), k' = min(k, count).
        A row of −1 marks a slot an approximate index could not fill."""
        rows, scores, _ = self.search_vectors(queries, k)
        return rows, scores

    def search_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """search() plus the stored vectors of the rows found [B, k', W]."""
        return self.collection.search(np.ascontiguousarray(queries), min(k, self.count))

    def score_rows(self, query: np.ndarray, rows: list[int]) -> np.ndarray:
        """Exact scores of one query against the given stored rows."""
        order = np.asarray(rows, np.int64)
        return exact_scores(self.name, self.collection.fetch(order), query)

    def close(self) -> None:
        self.collection.close()
