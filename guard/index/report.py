"""stats() and verify() of an open index: what it holds, and whether every part is intact."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from memguard.errors import CorruptData
from memguard.index.manifest import MANIFEST, check_files


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _where(path: Path, sig) -> str:
    """The file or Milvus collection that holds a signal's vectors, for error messages."""
    return str(path / sig.info.vectors) if sig.info.vectors else f"Milvus collection {sig.info.backend['collection']}"


def index_stats(index) -> dict:
    """Counts, dimensions, factory strings, thresholds, models, bytes on disk."""
    counts = dict(index.manifest.counts) | index.registry.counts()
    items = max(counts.get("items", 0), 1)
    total = _dir_bytes(index.path)
    return {
        "path": str(index.path),
        "format_version": index.manifest.format_version,
        "counts": counts,
        "signals": {name: {"dim": s.info.dim, "count": s.count, "factory": s.info.factory,
                           "exact": s.exact, "protected": index.protected.count(name),
                           "bytes": sum((index.path / f).stat().st_size for f in s.info.files),
                           "backend": s.collection.describe()}
                    for name, s in index.signals.items()},
        "maps": None if index.maps is None else index.manifest.maps
        | {"bytes": (index.path / index.manifest.maps["file"]).stat().st_size},
        "thresholds": index.thresholds.to_json(),
        "models": index.manifest.models,
        "search": {"nprobe": index.cfg.nprobe, "hnsw_ef": index.cfg.hnsw_ef, "rerank_factor": index.cfg.rerank_factor},
        "bytes_on_disk": total,
        "bytes_per_item": round(total / items, 1),
        "build": index.manifest.build,
    }


def verify_index(index) -> dict:
    """Check checksums, SQLite integrity, and that counts agree everywhere; CorruptData names the
    first file that fails. Returns the list of checks that passed."""
    path = index.path
    checks = []
    check_files(path, index.manifest, checksums=True)
    checks.append(f"{len(index.manifest.files)} files match their sha256 in {MANIFEST}")
    for store in (index.items, index.registry):
        errors = store.integrity_errors()
        if errors:
            raise CorruptData("; ".join(errors[:3]))
        checks.append(f"{store.label}: integrity ok")
    db_counts = index.items.counts()
    for key in ("items", "faces"):
        if db_counts[key] != index.manifest.counts.get(key, 0):
            raise CorruptData(f"{index.items.path}: {db_counts[key]} {key}, manifest says {index.manifest.counts[key]}")
    for name, sig in index.signals.items():
        want = db_counts["faces" if name == "face" else "items"]
        if sig.count != want:
            raise CorruptData(f"{_where(path, sig)}: {sig.count} rows, {index.items.path.name} has {want}")
        if name in ("latent", "clip"):
            norms = np.linalg.norm(np.asarray(sig.vectors[: min(sig.count, 10_000)], np.float32), axis=1)
            if len(norms) and not np.allclose(norms, 1.0, atol=1e-3):
                raise CorruptData(f"{_where(path, sig)}: rows are not unit vectors")
    if index.maps is not None and len(index.maps) != db_counts["items"]:
        raise CorruptData(f"{path / index.manifest.maps['file']}: {len(index.maps)} rows, "
                          f"{index.items.path.name} has {db_counts['items']}")
    for name, sig in index.signals.items():   # what searches can reach (faiss tombstones, Milvus deletes)
        if sig.collection.count() != sig.count:
            raise CorruptData(f"{_where(path, sig)}: {sig.collection.count()} searchable rows, manifest says {sig.count}")
    checks.append("row counts agree across manifest, items.sqlite, vector files and vector indexes")
    seq, active = index.registry.active()
    for prot in active:
        for signal, entries in prot.vectors.items():
            dim = index.signals[signal].info.dim if signal in index.signals and signal != "pdq" else None
            for vec, _ in entries:
                if dim is not None and vec.shape != (dim,):
                    raise CorruptData(f"{index.registry.label}: protection {prot.pid} has a {signal} vector of "
                                      f"{vec.shape[0]} values, index dimension {dim}")
    checks.append(f"{index.registry.label}: {len(active)} active protections, mutation log at seq {seq}")
    return {"ok": True, "path": str(path), "checks": checks}
