"""The faiss backend: vectors in a memory-mapped .npy beside a faiss index file (the embedded default).

Approximate structures return rerank_factor·k candidates that are re-scored exactly against the
stored vectors. The files are immutable once built; add() and remove() change this process's
in-memory view only (appended rows, tombstones), because rewriting a faiss file in place under a
running server is not atomic. Removal uses tombstones rather than faiss's remove_ids: Flat and HNSW
renumber or refuse it, and IDMap2 over IVF-PQ corrupts ids after remove_ids.
Face signals are sealed (memguard.index.sealed): both files are decrypted into memory at open.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from memguard.crypto import DataKey
from memguard.errors import CorruptData, InvalidInput
from memguard.index import factory as fx
from memguard.index import sealed
from memguard.index.backends.base import VectorCollection
from memguard.index.config import IndexConfig
from memguard.index.manifest import SignalInfo
from memguard.index.pdq import PDQ_BITS, PDQ_BYTES
from memguard.index.scores import empty_hits, rank_candidates
from memguard.index.vectors import read_array, read_faiss, write_array, write_bytes, write_faiss


class FaissCollection(VectorCollection):
    def __init__(self, signal: str, info: SignalInfo, directory: Path, cfg: IndexConfig, key: DataKey | None = None):
        self.signal, self.info, self.cfg, self.dim = signal, info, cfg, info.dim
        binary = signal == "pdq"
        self.width, self.dtype = (PDQ_BYTES, np.dtype(np.uint8)) if binary else (info.dim, np.dtype(np.float32))
        vec_path, idx_path = Path(directory) / info.vectors, Path(directory) / info.index
        self.index_file = idx_path
        self.sealed_with = info.backend.get("sealed")
        if self.sealed_with:
            key = sealed.key_for(self.sealed_with, key, Path(directory))
            self.vectors = sealed.open_rows(key, read_array(vec_path, dtype=np.uint8))
            self.index = sealed.open_faiss(key, idx_path)
        else:
            self.vectors = read_array(vec_path, dtype=self.dtype)
            self.index = read_faiss(idx_path, binary=binary)
        if self.vectors.shape != (info.count, self.width):
            raise CorruptData(f"{vec_path}: shape {self.vectors.shape}, manifest says {(info.count, self.width)}")
        if self.index.ntotal != info.count or self.index.d != info.dim:
            raise CorruptData(f"{idx_path}: holds {self.index.ntotal} vectors of {self.index.d}, "
                              f"manifest says {info.count} of {info.dim}")
        if not binary:
            fx.tune(self.index, cfg)
        self.exact = binary or fx.is_exact(info.factory)
        self._extra: list[np.ndarray] = []     # rows added after the build, in row order
        self._removed: set[int] = set()

    def count(self) -> int:
        return int(self.index.ntotal) - len(self._removed)

    def _stored(self, rows: np.ndarray) -> np.ndarray:
        base = len(self.vectors)
        if not self._extra or rows.size == 0 or rows.max() < base:
            return np.asarray(self.vectors[rows])
        extra, old = np.concatenate(self._extra), rows < base
        out = np.empty((len(rows), self.width), self.dtype)
        out[old], out[~old] = self.vectors[rows[old]], extra[rows[~old] - base]
        return out

    def fetch(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.index.ntotal):
            raise InvalidInput("rows", f"rows must lie in [0, {self.index.ntotal}) of the {self.signal} collection")
        return self._stored(rows)

    def search(self, queries: np.ndarray, k: int):
        b = len(queries)
        rows, scores, vecs = empty_hits(self.signal, b, k, self.width, self.dtype)
        if k == 0 or b == 0 or self.count() == 0:
            return rows, scores, vecs
        extra = len(self._removed)
        wide = min(int(self.index.ntotal), (k if self.exact else k * self.cfg.rerank_factor) + extra)
        _, cand = self.index.search(np.ascontiguousarray(queries), wide)
        for i, query in enumerate(queries):
            c = cand[i][cand[i] >= 0]
            if extra:
                c = c[~np.isin(c, list(self._removed))]
            c = np.unique(c)                      # sorted: sequential reads of the memmap
            r, s, v = rank_candidates(self.signal, query, c, self._stored(c), k)
            rows[i, :len(r)], scores[i, :len(r)], vecs[i, :len(r)] = r, s, v
        return rows, scores, vecs

    def add(self, rows, vectors, item_ids, meta, protected: bool = False) -> None:
        rows = np.asarray(rows, np.int64).reshape(-1)
        start = int(self.index.ntotal)
        if not np.array_equal(rows, np.arange(start, start + len(rows))):
            raise InvalidInput("rows", f"faiss assigns ids in order: rows must be {start}..{start + len(rows) - 1}")
        vectors = np.ascontiguousarray(vectors, dtype=self.dtype).reshape(len(rows), self.width)
        self.index.add(vectors)
        self._extra.append(vectors)

    def remove(self, rows) -> int:
        present = {int(r) for r in np.asarray(rows).reshape(-1) if 0 <= r < self.index.ntotal} - self._removed
        self._removed |= present
        return len(present)

    def describe(self) -> dict:
        return {"kind": "faiss", "factory": self.info.factory, "exact": self.exact, "count": self.count(),
                "sealed": bool(self.sealed_with),
                "index_bytes": self.index_file.stat().st_size,   # what faiss holds in memory, serialised
                "search": {"nprobe": self.cfg.nprobe, "hnsw_ef": self.cfg.hnsw_ef,
                           "rerank_factor": None if self.exact else self.cfg.rerank_factor}}


def write_faiss_signal(out: Path, signal: str, array: np.ndarray, cfg: IndexConfig,
                       key: DataKey | None = None) -> SignalInfo:
    """Write `signal`.npy and `signal`.faiss for rows `array` [N, W] (the index directory's files);
    with a key (faces), both are written sealed."""
    vec_name, idx_name = f"{signal}.npy", f"{signal}.faiss"
    write_array(out / vec_name, sealed.seal_rows(key, array, 0) if key else array)
    if signal == "pdq":
        index = fx.make_binary_index(PDQ_BITS)
        index.add(np.ascontiguousarray(array))
        write_faiss(out / idx_name, index)
        return SignalInfo(PDQ_BITS, len(array), fx.BINARY_FACTORY, vec_name, idx_name)
    override = cfg.face_factory if signal == "face" else cfg.factory
    factory = fx.choose_factory(len(array), array.shape[1], cfg, override)
    field_name = "face_factory" if signal == "face" else "factory"
    index = fx.build_float_index(array, factory, cfg, field_name, "l2" if signal == "face" else "ip")
    if key:
        write_bytes(out / idx_name, sealed.seal_faiss(key, index))
        return SignalInfo(int(array.shape[1]), len(array), factory, vec_name, idx_name,
                          {"kind": "faiss", "sealed": key.key_id})
    write_faiss(out / idx_name, index)
    return SignalInfo(int(array.shape[1]), len(array), factory, vec_name, idx_name)
