"""Exact scores on each signal's natural scale, and their ordering.

Cosine for latent and clip (higher is closer), Hamming bits for pdq and Euclidean distance for face
(lower is closer). Every backend re-scores its candidates with these, so scores never depend on
how a vector engine reports distances (Milvus: squared L2, faiss: squared L2 or inner product).
"""
from __future__ import annotations

import numpy as np

from memguard.index.config import higher_is_closer
from memguard.index.vectors import hamming


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


def empty_hits(signal: str, b: int, k: int, width: int, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows −1, worst scores, zero vectors) for b queries of k slots: slots nothing filled."""
    worst = -np.inf if higher_is_closer(signal) else np.inf
    return (np.full((b, k), -1, np.int64), np.full((b, k), worst, np.float32), np.zeros((b, k, width), dtype))


def rank_candidates(signal: str, query: np.ndarray, rows: np.ndarray, stored: np.ndarray, k: int):
    """Exact top-k of one query among candidate rows [M] with their stored vectors [M, W]:
    (rows [k'], scores [k'], vectors [k', W]), closest first, k' = min(k, M)."""
    scores = exact_scores(signal, stored, query)
    top = best_first(signal, scores)[:k]
    return rows[top], scores[top], stored[top]
