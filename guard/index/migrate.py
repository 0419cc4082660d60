"""`memguard index migrate`: copy a faiss-backed index directory into Milvus.

The destination is a new index directory whose manifest points each signal at a Milvus collection
({prefix}_{signal}); items.sqlite, the latent maps and the thresholds are copied as they are
(scores are exact on both backends, so calibrated thresholds still hold), the registry through
SQLite's online backup (consistent while a server writes it). The source is left untouched, and
the destination's manifest is written last: an interrupted migration leaves no loadable index.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from memguard.errors import InvalidInput
from memguard.index.backends import parse_backend
from memguard.index.backends.milvus_store import new_prefix, write_milvus_signal
from memguard.index.builder import ITEMS_DB, item_labels
from memguard.index.config import IndexConfig
from memguard.index.manifest import MANIFEST, REGISTRY_DB, check_files, read_manifest, record_files, write_manifest
from memguard.index.store import connect
from memguard.index.vectors import PRIVATE, fsync_dir, read_array


def migrate(src: Path, out: Path, backend: str, *, changes: dict | None = None, progress: bool = True) -> dict:
    """Copy index `src` (faiss) to a new index directory `out` on Milvus `backend`; returns a report.
    changes: IndexConfig fields for the Milvus structure (milvus_index, hnsw_m, milvus_prefix, …)."""
    t0 = time.time()
    src, out = Path(src), Path(out)
    target = parse_backend(backend)
    if target.kind != "milvus":
        raise InvalidInput("backend", "migrate copies a faiss index into Milvus: give milvus://HOST:PORT, "
                                      "http(s)://HOST:PORT or a milvus-lite .db path")
    manifest = read_manifest(src)
    check_files(src, manifest, checksums=True)
    not_faiss = [s for s, info in manifest.signals.items() if info.backend.get("kind", "faiss") != "faiss"]
    if not_faiss:
        raise InvalidInput("src", f"{src}: signals {not_faiss} are not faiss files (already migrated?)")
    if (out / MANIFEST).exists():
        raise InvalidInput("out", f"{out} already holds a built index; migrate into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    cfg = replace(IndexConfig(**manifest.config), **{**(changes or {}), "backend": backend})
    copied = [ITEMS_DB] + ([manifest.maps["file"]] if manifest.maps else []) \
        + ([manifest.clusters["file"]] if manifest.clusters else [])   # near-duplicate clusters travel along
    for name in copied:
        shutil.copyfile(src / name, out / name)
        os.chmod(out / name, PRIVATE)
    if (src / REGISTRY_DB).is_file():   # an embedded registry travels along; a PostgreSQL one is shared already
        _backup_registry(src / REGISTRY_DB, out / REGISTRY_DB)
    items = connect(out / ITEMS_DB, readonly=True)
    prefix, signals = new_prefix(cfg), {}
    try:
        for signal, info in manifest.signals.items():
            if info.backend.get("sealed"):   # sealed faces stay in local files (memguard.index.sealed)
                for name in info.files:
                    shutil.copyfile(src / name, out / name)
                    os.chmod(out / name, PRIVATE)
                copied += info.files
                signals[signal] = info
                continue
            vectors = read_array(src / info.vectors, dtype=np.uint8 if signal == "pdq" else np.float32)
            signals[signal] = write_milvus_signal(target, prefix, signal, vectors, cfg, item_labels(items, signal),
                                                  progress)
    finally:
        items.close()
    migrated = replace(manifest, signals=signals, config=asdict(cfg), files=record_files(out, copied),
                       build=manifest.build | {"migrated_from": str(src.resolve()), "migrated_at": time.time()})
    write_manifest(out, migrated)
    fsync_dir(out)
    return {"out": str(out), "backend": target.uri, "seconds": round(time.time() - t0, 3),
            "signals": {s: {"count": i.count, "collection": i.backend.get("collection"),
                            "index_type": i.backend.get("index_type", i.factory)} for s, i in signals.items()}}


def _backup_registry(src: Path, dst: Path) -> None:
    """SQLite's online backup: a consistent copy even while another process commits protections."""
    os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, PRIVATE))
    with sqlite3.connect(f"file:{src}?mode=ro", uri=True) as source, sqlite3.connect(dst) as copy:
        source.backup(copy)
    source.close()
    copy.close()
