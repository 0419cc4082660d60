"""One signal of a loaded index: its stored vectors (memory-mapped) and its faiss index.

Scores follow each signal's natural scale: cosine for latent and clip (higher is closer), Hamming
bits for pdq and Euclidean distance for face (lower is closer). Approximate indexes return
`rerank_factor`·k candidates which are re-scored exactly against the stored vectors.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from guard.errors import CorruptData
from guard.index import factory as fx
from guard.index.config import IndexConfig, higher_is_closer
from guard.index.manifest import SignalInfo
from guard.index.pdq import PDQ_BYTES
from guard.index.vectors import hamming, read_array, read_faiss


def exact_scores(signal: str, stored: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Scores of one query [D] against stored rows [M, D] → [M] float32."""
    if len(stored) == 0:
        return np.zeros(0, np.float32)
    if signal == "pdq":
        return hamming(query[None], stored)[0].astype(np.float32)
    if signal == "face":
        return np.linalg.norm(stored.astype(np.float32) - query[None], axis=1).astype(np.float32)
    return (stored.astype(np.float32) @ query.astype(np.float32)).astype(np.float32)


def best_first(signal: str, scores: np.ndarray) -> np.ndarray:
    """Argsort of scores [.., M] along the last axis, closest first."""
    return np.argsort(-scores if higher_is_closer(signal) else scores, axis=-1, kind="stable")


class SignalIndex:
    def __init__(self, name: str, info: SignalInfo, directory: Path, cfg: IndexConfig):
        self.name, self.info, self.cfg = name, info, cfg
        binary = name == "pdq"
        vec_path, idx_path = Path(directory) / info.vectors, Path(directory) / info.index
        self.vectors = read_array(vec_path, dtype=np.uint8 if binary else np.float32)
        width = PDQ_BYTES if binary else info.dim
        if self.vectors.shape != (info.count, width):
            raise CorruptData(f"{vec_path}: shape {self.vectors.shape}, manifest says {(info.count, width)}")
        self.index = read_faiss(idx_path, binary=binary)
        if self.index.ntotal != info.count or self.index.d != info.dim:
            raise CorruptData(f"{idx_path}: holds {self.index.ntotal} vectors of {self.index.d}, "
                              f"manifest says {info.count} of {info.dim}")
        if not binary:
            fx.tune(self.index, cfg)
        self.exact = binary or fx.is_exact(info.factory)

    @property
    def count(self) -> int:
        return self.info.count

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest stored rows of each query: (rows [B, k'] int64, scores [B, k'] float32), k' = min(k, count)."""
        k = min(k, self.count)
        b = len(queries)
        if k == 0 or b == 0:
            return np.zeros((b, 0), np.int64), np.zeros((b, 0), np.float32)
        wide = k if self.exact else min(self.count, k * self.cfg.rerank_factor)
        dist, rows = self.index.search(np.ascontiguousarray(queries), wide)
        if self.exact:
            scores = np.sqrt(np.maximum(dist, 0)) if self.name == "face" else dist
            return rows.astype(np.int64), scores.astype(np.float32)
        return self._rerank(queries, rows, k)

    def _rerank(self, queries: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        out_rows = np.full((len(queries), k), -1, np.int64)
        out_scores = np.full((len(queries), k), -np.inf if higher_is_closer(self.name) else np.inf, np.float32)
        for b, query in enumerate(queries):
            rows = np.unique(cand[b][cand[b] >= 0])          # sorted: sequential reads of the memmap
            scores = exact_scores(self.name, self.vectors[rows], query)
            top = best_first(self.name, scores)[:k]
            out_rows[b, :len(top)], out_scores[b, :len(top)] = rows[top], scores[top]
        return out_rows, out_scores

    def score_rows(self, query: np.ndarray, rows: list[int]) -> np.ndarray:
        """Exact scores of one query against the given stored rows."""
        order = np.asarray(rows, np.int64)
        return exact_scores(self.name, self.vectors[order] if len(order) else self.vectors[:0], query)
