"""Index backends: where a signal's vectors live and how they are searched.

    faiss   files in the index directory (vectors .npy + a faiss index), the embedded default
    milvus  one Milvus collection per signal (pymilvus; milvus-lite for tests and a single host)

The manifest records each signal's backend (SignalInfo.backend), so an index reopens on the
backend it was built on; `open_collection(..., backend=URI)` points a Milvus index at another
endpoint of the same cluster (e.g. a load balancer in front of its proxies); without one,
$MEMGUARD_MILVUS_URI does the same for every Milvus-backed index a process opens (deployments).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from memguard.crypto import DataKey
from memguard.errors import InvalidInput
from memguard.index.backends.base import BackendURI, VectorCollection, parse_backend
from memguard.index.config import IndexConfig
from memguard.index.manifest import SignalInfo

__all__ = ["BackendURI", "VectorCollection", "parse_backend", "open_collection", "write_signal"]
ENV_MILVUS_URI = "MEMGUARD_MILVUS_URI"
log = logging.getLogger(__name__)


def open_collection(signal: str, info: SignalInfo, directory: Path, cfg: IndexConfig,
                    backend: str | None = None, key: DataKey | None = None) -> VectorCollection:
    """key: the data key that opens sealed (face) files."""
    kind = info.backend.get("kind", "faiss")
    if kind == "faiss":
        if backend is not None and parse_backend(backend).kind != "faiss" and not info.backend.get("sealed"):
            raise InvalidInput("backend", f"{directory}: the {signal} vectors are faiss files; "
                                          "`memguard index migrate` copies them into Milvus")
        from memguard.index.backends.faiss_store import FaissCollection
        return FaissCollection(signal, info, directory, cfg, key)
    if kind == "milvus":
        from memguard.index.backends.milvus_store import MilvusCollection
        given, field_name = (backend, "backend") if backend else (os.environ.get(ENV_MILVUS_URI), ENV_MILVUS_URI)
        target = parse_backend(given, field_name) if given else BackendURI("milvus", info.backend["uri"])
        if target.kind != "milvus":
            raise InvalidInput(field_name, f"{directory}: the {signal} vectors live in Milvus, not {given!r}")
        if target.uri != info.backend["uri"]:
            log.info("%s: %s vectors from %s (recorded at build: %s)", directory, signal, target.uri, info.backend["uri"])
        return MilvusCollection(signal, info, cfg, target)
    raise InvalidInput("backend", f"{directory}: manifest names unknown backend {kind!r} for {signal}")


def write_signal(out: Path, signal: str, array: np.ndarray, cfg: IndexConfig, prefix: str | None,
                 labels: Callable[[int, int], tuple[list[str], list[dict]]], progress: bool) -> SignalInfo:
    """Store one signal's rows [N, W] on cfg.backend; the SignalInfo the manifest records.
    prefix names the Milvus collections of this index; labels(start, stop) → (item ids, metadata)."""
    target = parse_backend(cfg.backend)
    if target.kind == "faiss":
        from memguard.index.backends.faiss_store import write_faiss_signal
        return write_faiss_signal(out, signal, array, cfg)
    from memguard.index.backends.milvus_store import write_milvus_signal
    return write_milvus_signal(target, prefix, signal, array, cfg, labels, progress)
