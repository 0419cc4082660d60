"""manifest.json: what an index directory holds and how to check it.

Written last and atomically by the builder (and rewritten by `calibrate`), so a directory without
a valid manifest is an unfinished build and is never loaded. It records the format version, the
models and dimensions behind each signal, counts, the factory strings, thresholds, and the size
and sha256 of every immutable file. The registry database is mutable (protections) and is checked
by SQLite's own integrity check instead of a checksum.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from memguard.errors import CorruptData, MissingResource
from memguard.index.config import FORMAT_VERSION, Thresholds
from memguard.digest import sha256_file
from memguard.index.vectors import write_bytes

MANIFEST = "manifest.json"
REGISTRY_DB = "registry.sqlite"   # mutable: protections and the mutation log


@dataclass
class SignalInfo:
    """One signal's stored vectors: `count` rows of `dim` (bits for pdq) in `vectors`, searched by `index`
    (file names; empty when the vectors live in Milvus). backend: {"kind": "faiss"} or, for Milvus,
    its URI, collection, index type, metric, build and search parameters."""
    dim: int
    count: int
    factory: str
    vectors: str
    index: str
    backend: dict = field(default_factory=lambda: {"kind": "faiss"})

    @property
    def files(self) -> list[str]:
        return [name for name in (self.vectors, self.index) if name]


@dataclass
class Manifest:
    signals: dict[str, SignalInfo]
    models: dict[str, dict]
    counts: dict[str, int]
    config: dict
    thresholds: Thresholds = field(default_factory=Thresholds)
    files: dict[str, dict] = field(default_factory=dict)   # name -> {"bytes": int, "sha256": str}
    build: dict = field(default_factory=dict)
    maps: dict | None = None      # latent maps for the aligned re-score: file, dim, grid, channels, count
    clusters: dict | None = None  # near-duplicate cluster labels (memguard.index.clusters): file, counts, rule
    format_version: int = FORMAT_VERSION
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        data = asdict(self)
        data["thresholds"] = self.thresholds.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict, path: Path) -> "Manifest":
        try:
            return cls(signals={k: SignalInfo(**v) for k, v in data["signals"].items()},
                       models=data["models"], counts=data["counts"], config=data["config"],
                       thresholds=Thresholds.from_json(data.get("thresholds", {})), files=data["files"],
                       build=data.get("build", {}), maps=data.get("maps"), clusters=data.get("clusters"),
                       format_version=data["format_version"],
                       created=data.get("created", 0.0))
        except (KeyError, TypeError) as exc:
            raise CorruptData(f"{path}: manifest lacks or mangles field {exc}") from exc


def record_files(directory: Path, names: list[str]) -> dict[str, dict]:
    return {n: {"bytes": (directory / n).stat().st_size, "sha256": sha256_file(directory / n)} for n in names}


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST
    write_bytes(path, json.dumps(manifest.to_json(), indent=2, sort_keys=True).encode())
    return path


def read_manifest(directory: Path) -> Manifest:
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise MissingResource(f"{directory}: no such index directory")
    if not path.is_file():
        raise CorruptData(f"{path}: missing (an unfinished build, or not an index directory)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptData(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CorruptData(f"{path}: not a JSON object")
    if data.get("format_version") != FORMAT_VERSION:
        raise CorruptData(f"{path}: format_version {data.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    return Manifest.from_json(data, path)


def check_files(directory: Path, manifest: Manifest, *, checksums: bool = True) -> None:
    """Every recorded file exists with its size (and sha256); CorruptData names the first that fails."""
    for name, info in sorted(manifest.files.items()):
        path = Path(directory) / name
        if not path.is_file():
            raise CorruptData(f"{path}: missing")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CorruptData(f"{path}: {size} bytes, manifest says {info['bytes']} (truncated or replaced)")
        if checksums and sha256_file(path) != info["sha256"]:
            raise CorruptData(f"{path}: sha256 differs from the manifest (corrupted)")
