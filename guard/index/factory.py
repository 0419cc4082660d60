"""The one place that chooses, parses and tunes faiss index structures.

Structure is a faiss factory string (faiss's own grammar, parsed by `faiss.index_factory`). This
module picks one from the collection size when the config does not override it, builds empty
indexes from strings (float indexes use inner product: fingerprints are L2-normalised, so inner
product is cosine), and applies search-time parameters to loaded indexes.
"""
from __future__ import annotations

import math

import faiss

from memguard.errors import InvalidInput
from memguard.index.config import IndexConfig

BINARY_FACTORY = "BFlat"   # PDQ codes: exact Hamming scan (32 bytes an item scans fast)
MIN_TRAIN_PER_LIST = 39    # faiss warns below this many training points per IVF list


def _ivf_lists(n: int) -> int:
    """About 4·√n lists (a power of two), at most n / MIN_TRAIN_PER_LIST so k-means is trained."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** max(6, round(math.log2(target)))
    while nlist > 64 and nlist * MIN_TRAIN_PER_LIST > n:
        nlist //= 2
    return nlist


def _pq_subquantizers(dim: int) -> int:
    """4-bit fast-scan PQ with 2 dimensions a sub-quantizer: d/4 bytes a vector. (4 dimensions a
    sub-quantizer halves the codes but ranks near-copies inside a tight cluster too coarsely: the
    source of a near-copy fell out of the re-ranked candidates in ~40 % of queries.)"""
    m = dim // 2 if dim % 2 == 0 else dim
    return max(m, 1)


def choose_factory(n_items: int, dim: int, cfg: IndexConfig, override: str | None = None) -> str:
    """The factory string for a float index of `n_items` vectors of length `dim`.

    Explicit `override` (or cfg.factory) wins; else "Flat" (exact) up to cfg.exact_max_items,
    "HNSW{cfg.hnsw_m},Flat" (a graph on the fingerprints themselves, searched at cfg.hnsw_ef and
    re-ranked exactly) above it. IVF partitions cap recall on clustered fingerprints: IVF4096,Flat
    and IVF4096,PQ128x4fs both stop at recall@10 0.893 at nprobe 256 on 1M (benchmarks/index_scale),
    because true neighbours spread over more cells than a 2 ms probe budget visits; the graph does
    not partition. `ivf_pq_factory` gives the compact alternative (d/4 bytes an item) for hosts
    that cannot hold ~1.3 KB an item in memory.
    """
    chosen = override or cfg.factory
    if chosen:
        return chosen
    if n_items <= cfg.exact_max_items:
        return "Flat"
    return f"HNSW{cfg.hnsw_m},Flat"


def ivf_pq_factory(n_items: int, dim: int) -> str:
    """IVF-PQ with 4-bit fast-scan codes, sized for n_items (the pre-HNSW default)."""
    return f"IVF{_ivf_lists(n_items)},PQ{_pq_subquantizers(dim)}x4fs"


def make_index(factory: str, dim: int, field_name: str = "factory", metric: str = "ip") -> faiss.Index:
    """An empty faiss index for `factory` (metric "ip": inner product, "l2": squared Euclidean).

    InvalidInput names the field if faiss rejects the string.
    """
    if not isinstance(factory, str) or not factory.strip():
        raise InvalidInput(field_name, "factory string must be a non-empty string")
    if "IDMap" in factory:
        # rows are added in order so positions are ids; IDMap2 over IVF-PQ corrupts ids on removal
        raise InvalidInput(field_name, f"{factory!r}: IDMap is not needed (rows are ids) and not supported")
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "rejected"
        raise InvalidInput(field_name, f"faiss cannot build {factory!r} for dimension {dim}: {first}") from exc


def make_binary_index(bits: int, factory: str = BINARY_FACTORY) -> faiss.IndexBinary:
    try:
        return faiss.index_binary_factory(bits, factory)
    except RuntimeError as exc:
        raise InvalidInput("binary_factory", f"faiss cannot build {factory!r} for {bits} bits") from exc


def needs_training(index: faiss.Index) -> bool:
    return not index.is_trained


def is_exact(factory: str) -> bool:
    return factory.strip() in ("Flat", "IDMap,Flat", "IDMap2,Flat")


def tune(index: faiss.Index, cfg: IndexConfig) -> faiss.Index:
    """Apply search-time parameters (nprobe for IVF, efSearch for HNSW) in place; returns index."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(cfg.nprobe, ivf.nlist)
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = cfg.hnsw_ef
    return index


def build_float_index(vectors, factory: str, cfg: IndexConfig, field_name: str = "factory",
                      metric: str = "ip") -> faiss.Index:
    """Train (on at most cfg.train_sample rows) and fill an index with `vectors` [N, D] float32, row order."""
    import numpy as np

    n, dim = vectors.shape
    index = make_index(factory, dim, field_name, metric)
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:   # graph quality is fixed at insertion time
        hnsw.efConstruction = cfg.hnsw_ef_construction
    if needs_training(index):
        if n == 0:
            raise InvalidInput(field_name, f"{factory!r} needs training vectors but the index is empty")
        rng = np.random.default_rng(cfg.seed)
        take = np.sort(rng.choice(n, size=min(n, cfg.train_sample), replace=False))
        index.train(np.ascontiguousarray(vectors[take], dtype=np.float32))
    step = 65_536
    for start in range(0, n, step):
        index.add(np.ascontiguousarray(vectors[start:start + step], dtype=np.float32))
    return tune(index, cfg)
