"""Inputs of an index build, each an ordered, restartable stream of records.

- ImageFolderSource: a folder of images, with an optional captions.jsonl (one JSON object a line:
  file, caption, item_id, plus any metadata such as licence, consent, source URL).
- TarShardSource: webdataset-style tar shards: members grouped by key (the name before the first
  dot), an image member (jpg/jpeg/png/webp), optional .txt caption and .json metadata.
- EmbeddingSource: precomputed vectors (LAION-style): .npy [N, D] with an optional JSONL of
  per-row metadata, or .parquet with an embedding column.

A record whose image cannot be decoded carries an `error` instead; the builder skips, counts and
lists it. `records(start)` skips the first `start` records without decoding them (resume).
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from memguard.errors import InvalidInput, MissingResource

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ID_KEYS = ("item_id", "key", "id", "__key__")
CAPTION_KEYS = ("caption", "text", "txt")
SOURCE_KEYS = ("source", "url", "path")
EMBEDDING_KEYS = ("embedding", "vector", "image_embedding", "emb")


@dataclass
class SourceRecord:
    ref: str                          # where it came from, for reports: a path or shard:member
    item_id: str
    caption: str = ""
    source: str = ""
    meta: dict = field(default_factory=dict)
    image: np.ndarray | None = None   # RGB uint8 [H, W, 3]
    vector: np.ndarray | None = None  # a precomputed embedding [D]
    error: str | None = None


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes → RGB uint8 [H, W, 3]; raises ValueError with PIL's reason if unreadable."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except UnidentifiedImageError as exc:
        raise ValueError("unreadable image: not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"unreadable image: {exc}") from exc


def _pick(meta: dict, keys: tuple[str, ...], default: str = "") -> str:
    for key in keys:
        if meta.get(key) not in (None, ""):
            return str(meta.pop(key))
    return default


def _record(ref: str, default_id: str, meta: dict, data: bytes | None, default_source: str) -> SourceRecord:
    meta = dict(meta)
    rec = SourceRecord(ref, _pick(meta, ID_KEYS, default_id), _pick(meta, CAPTION_KEYS),
                       _pick(meta, SOURCE_KEYS, default_source), meta)
    if data is None:
        rec.error = "image missing"
        return rec
    try:
        rec.image = decode_image(data)
    except ValueError as exc:
        rec.error = str(exc)
    return rec


class ImageFolderSource:
    def __init__(self, folder: Path, captions: str = "captions.jsonl"):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InvalidInput("images", f"{self.folder} is not a directory")
        self.captions = self.folder / captions

    def describe(self) -> dict:
        return {"type": "image_folder", "path": str(self.folder.resolve())}

    def _entries(self) -> Iterator[tuple[str, dict | None, str | None]]:
        """(file name, metadata, error) in a fixed order."""
        if self.captions.is_file():
            with open(self.captions) as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        meta = json.loads(line)
                        name = meta.pop("file")
                        yield str(name), meta, None
                    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
                        yield f"{self.captions.name}:{n}", None, f"bad captions line {n}: {exc!r}"
        else:
            for path in sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
                yield str(path.relative_to(self.folder)), {}, None

    def count(self) -> int:
        return sum(1 for _ in self._entries())

    def records(self, start: int = 0) -> Iterator[SourceRecord]:
        for i, (name, meta, error) in enumerate(self._entries()):
            if i < start:
                continue
            if error is not None:
                yield SourceRecord(name, name, error=error)
                continue
            path = self.folder / name
            data = path.read_bytes() if path.is_file() else None
            yield _record(str(path), str(Path(name).with_suffix("")), meta, data, str(path))


class TarShardSource:
    def __init__(self, shards: list[Path]):
        self.shards = [Path(s) for s in shards]
        missing = [str(s) for s in self.shards if not s.is_file()]
        if not self.shards or missing:
            raise InvalidInput("shards", f"no such shard file(s): {missing or 'none given'}")

    def describe(self) -> dict:
        return {"type": "tar_shards", "paths": [str(s.resolve()) for s in self.shards]}

    @staticmethod
    def _groups(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
        key, members = None, {}
        with tarfile.open(shard) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                name = Path(info.name)
                k, _, ext = name.name.partition(".")
                k = str(name.parent / k) if str(name.parent) != "." else k
                if key is not None and k != key:
                    yield key, members
                    members = {}
                key = k
                members[ext.lower()] = tar.extractfile(info).read()
        if key is not None:
            yield key, members

    def records(self, start: int = 0) -> Iterator[SourceRecord]:
        i = 0
        for shard in self.shards:
            try:
                for key, members in self._groups(shard):
                    if i >= start:
                        yield self._to_record(shard, key, members)
                    i += 1
            except (tarfile.TarError, OSError) as exc:
                if i >= start:
                    yield SourceRecord(str(shard), f"{shard.name}#broken", error=f"unreadable shard: {exc}")
                i += 1

    @staticmethod
    def _to_record(shard: Path, key: str, members: dict[str, bytes]) -> SourceRecord:
        meta: dict = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"])
            except json.JSONDecodeError as exc:
                return SourceRecord(f"{shard}:{key}", key, error=f"bad json member: {exc}")
        if "txt" in members and not any(meta.get(k) for k in CAPTION_KEYS):
            meta["caption"] = members["txt"].decode("utf-8", "replace").strip()
        image = next((members[e] for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
        return _record(f"{shard}:{key}", key, meta, image, f"{shard.name}:{key}")


class EmbeddingSource:
    """Precomputed vectors of one signal ('latent' or 'clip'): .npy (+ optional JSONL) or .parquet."""

    def __init__(self, path: Path, signal: str, meta_path: Path | None = None):
        self.path, self.signal = Path(path), signal
        self.meta_path = Path(meta_path) if meta_path else None
        if signal not in ("latent", "clip"):
            raise InvalidInput("embedding_signal", f"must be 'latent' or 'clip', got {signal!r}")
        if not self.path.is_file():
            raise InvalidInput("embeddings", f"{self.path}: no such file")
        if self.path.suffix not in (".npy", ".parquet"):
            raise InvalidInput("embeddings", f"{self.path}: expected a .npy or .parquet file")

    def describe(self) -> dict:
        return {"type": "embeddings", "path": str(self.path.resolve()), "signal": self.signal}

    def _rows(self) -> Iterator[tuple[np.ndarray, dict]]:
        if self.path.suffix == ".npy":
            vectors = np.load(self.path, mmap_mode="r", allow_pickle=False)
            if vectors.ndim != 2:
                raise InvalidInput("embeddings", f"{self.path}: expected [N, D], got shape {vectors.shape}")
            metas = self._jsonl() if self.meta_path else iter(lambda: {}, None)
            for i in range(len(vectors)):
                yield np.asarray(vectors[i], np.float32), next(metas, {})
            return
        yield from self._parquet()

    def _jsonl(self) -> Iterator[dict]:
        with open(self.meta_path) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)

    def _parquet(self) -> Iterator[tuple[np.ndarray, dict]]:
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise MissingResource("reading .parquet embeddings needs the 'pyarrow' package") from exc
        table = pq.ParquetFile(self.path)
        column = next((c for c in EMBEDDING_KEYS if c in table.schema_arrow.names), None)
        if column is None:
            raise InvalidInput("embeddings", f"{self.path}: no embedding column (one of {EMBEDDING_KEYS})")
        for batch in table.iter_batches(batch_size=4096):
            rows = batch.to_pylist()
            for row in rows:
                vec = row.pop(column)
                yield np.asarray(vec, np.float32), row

    def count(self) -> int | None:
        if self.path.suffix == ".npy":
            return int(np.load(self.path, mmap_mode="r", allow_pickle=False).shape[0])
        return None

    def records(self, start: int = 0) -> Iterator[SourceRecord]:
        for i, (vec, meta) in enumerate(self._rows()):
            if i < start:
                continue
            meta = {k: v for k, v in meta.items() if v is not None}
            rec = SourceRecord(f"{self.path.name}:{i}", _pick(meta, ID_KEYS, f"emb-{i:09d}"),
                               _pick(meta, CAPTION_KEYS), _pick(meta, SOURCE_KEYS), meta)
            if vec.ndim != 1 or not np.all(np.isfinite(vec)) or not np.any(vec):
                rec.error = "embedding is not a finite, non-zero vector"
            else:
                rec.vector = vec
            yield rec
