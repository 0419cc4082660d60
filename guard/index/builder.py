"""The offline index builder: resumable, with progress bars; bad inputs are skipped and listed.

Work happens in `<out>/.build/`: vectors are appended to raw files and fsync'ed, then the items of
the batch and a checkpoint (records consumed, rows, file sizes) commit in one SQLite transaction.
A restarted build truncates the raw files to the checkpoint and skips the consumed records.
`finalize` turns the staging area into the index files (each written atomically), writes the
manifest last, then removes the staging area: until the manifest exists the index is not loadable.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from memguard.crypto import DataKey
from memguard.errors import InvalidInput, MissingResource
from memguard.index import backends, sealed
from memguard.index.config import IndexConfig, Thresholds
from memguard.index.faces import FACE_DIM, FaceEmbedder
from memguard.index.manifest import MANIFEST, REGISTRY_DB, Manifest, SignalInfo, record_files, write_manifest
from memguard.index.pdq import PDQ_BYTES, check_image, pdq_hash
from memguard.index.sources import SourceRecord
from memguard.index.store import ITEMS_SCHEMA, Registry, connect
from memguard.index.vectors import PRIVATE, fsync_dir, normalize_rows, write_array

log = logging.getLogger(__name__)
STAGING = ".build"
MAPS = "align"              # staging name of the latent maps (memguard.index.align)
MAPS_FILE = "align.npy"
ITEMS_DB = "items.sqlite"


def item_labels(conn, signal: str):
    """labels(start, stop) → (item ids, metadata) of rows start..stop-1 of `signal`, from an items
    database (the staging one during a build, items.sqlite in a migration): what Milvus stores
    beside each vector. Face rows carry their item's id plus identity and box."""
    def labels(start: int, stop: int) -> tuple[list[str], list[dict]]:
        if signal == "face":
            rows = conn.execute("SELECT i.item_id, f.identity, f.box, f.item_row FROM faces f JOIN items i "
                                "ON i.row = f.item_row WHERE f.row >= ? AND f.row < ? ORDER BY f.row",
                                (start, stop)).fetchall()
            meta = [{"identity": ident, "box": json.loads(box), "item_row": r} for _, ident, box, r in rows]
        else:
            rows = conn.execute("SELECT item_id, source, caption FROM items WHERE row >= ? AND row < ? "
                                "ORDER BY row", (start, stop)).fetchall()
            meta = [{"source": src, "caption": cap} for _, src, cap in rows]
        if len(rows) != stop - start:
            raise InvalidInput("items", f"{signal} rows {start}..{stop - 1}: {len(rows)} items recorded")
        return [r[0] for r in rows], meta
    return labels


@dataclass
class BuildReport:
    out: str
    finished: bool
    items: int
    faces: int
    skipped: int
    skipped_examples: list[dict]
    resumed_from: int
    seconds: float
    signals: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


class _Staging:
    """Raw append-only vector files + staging.sqlite with the checkpoint."""

    def __init__(self, directory: Path, widths: dict[str, tuple[int, np.dtype]], spec: dict, restart: bool,
                 key: DataKey | None = None):
        self.key = key   # seals face descriptors and identity names before they touch the disk
        if restart and directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.dir, self.widths = directory, widths
        os.close(os.open(directory / "staging.sqlite", os.O_CREAT | os.O_WRONLY, PRIVATE))   # before its WAL exists
        self.db = connect(directory / "staging.sqlite", wal=True)
        self.db.executescript(ITEMS_SCHEMA)
        state = dict(self.db.execute("SELECT key, value FROM build_state").fetchall())
        if state and json.loads(state["spec"]) != spec:
            raise InvalidInput("out", f"{directory.parent} holds an unfinished build of another source or "
                                      "configuration; pass restart=True (--restart) to discard it")
        if not state:
            state = {"spec": json.dumps(spec), "consumed": "0", "rows": "0", "face_rows": "0", "skipped": "0"}
            self._save_state(state)
        self.state = {k: (v if k == "spec" else int(v)) for k, v in state.items()}
        for signal in widths:   # drop anything appended after the last checkpoint
            path = self._raw(signal)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, PRIVATE))
            rows = self.state["face_rows" if signal == "face" else "rows"]
            with open(path, "ab") as f:
                f.truncate(rows * self._row_bytes(signal))

    def _raw(self, signal: str) -> Path:
        return self.dir / f"{signal}.raw"

    def _row_bytes(self, signal: str) -> int:
        dim, dtype = self.widths[signal]
        return dim * np.dtype(dtype).itemsize

    def _save_state(self, state: dict) -> None:
        self.db.executemany("INSERT OR REPLACE INTO build_state (key, value) VALUES (?, ?)",
                            [(k, str(v)) for k, v in state.items()])

    def has_item(self, item_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM items WHERE item_id = ?", (item_id,)).fetchone() is not None

    def commit(self, consumed: int, items: list[SourceRecord], vectors: dict[str, np.ndarray],
               faces: list[tuple[int, str, list[int]]], skipped: list[tuple[str, str]]) -> None:
        """Append vectors (fsync'ed), then record items, faces, skips and the checkpoint atomically."""
        rows, face_rows = self.state["rows"], self.state["face_rows"]
        if self.key is not None and "face" in vectors:
            vectors = vectors | {"face": sealed.seal_rows(self.key, vectors["face"], face_rows)}
            faces = [(i, sealed.seal_identity(self.key, face_rows + j, ident), box)
                     for j, (i, ident, box) in enumerate(faces)]
        for signal, array in vectors.items():
            dim, dtype = self.widths[signal]
            with open(self._raw(signal), "ab") as f:
                f.write(np.ascontiguousarray(array, dtype=dtype).reshape(-1, dim).tobytes())
                f.flush()
                os.fsync(f.fileno())
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany("INSERT INTO items (row, item_id, source, caption, meta) VALUES (?,?,?,?,?)",
                            [(rows + i, r.item_id, r.source, r.caption, json.dumps(self._meta(r.meta), default=str))
                             for i, r in enumerate(items)])
        self.db.executemany("INSERT INTO faces (row, item_row, identity, box) VALUES (?,?,?,?)",
                            [(face_rows + j, rows + i, ident, json.dumps(box))
                             for j, (i, ident, box) in enumerate(faces)])
        self.db.executemany("INSERT INTO skipped (ref, error) VALUES (?,?)", skipped)
        self.state.update(consumed=consumed, rows=rows + len(items), face_rows=face_rows + len(faces),
                          skipped=self.state["skipped"] + len(skipped))
        self._save_state(self.state)
        self.db.execute("COMMIT")

    def _meta(self, meta: dict) -> dict:
        """An item's metadata as stored: a named identity lives only sealed, in the faces table."""
        return {k: v for k, v in meta.items() if k != "identity"} if self.key is not None else meta

    def array(self, signal: str) -> np.ndarray:
        dim, dtype = self.widths[signal]
        rows = self.state["face_rows" if signal == "face" else "rows"]
        if rows == 0:
            return np.zeros((0, dim), dtype)
        return np.memmap(self._raw(signal), dtype=dtype, mode="r", shape=(rows, dim))


class IndexBuilder:
    """Builds one index directory from a source. Encoders are optional per signal:
    latent (LatentEncoder), clip (ClipEncoder), faces (FaceEmbedder); PDQ is always computed for images.
    Faces need a data key (default: the configured one, see memguard.crypto): descriptors and identity
    names are written only sealed (memguard.index.sealed), and stay in local files on any backend."""

    def __init__(self, out: Path, source, *, latent=None, clip=None, faces: FaceEmbedder | None = None,
                 cfg: IndexConfig = IndexConfig(), progress: bool = True, key: DataKey | None = None):
        self.out, self.source, self.cfg, self.progress = Path(out), source, cfg, progress
        self.latent, self.clip, self.faces = latent, clip, faces
        self.key = DataKey.resolve(key) if faces is not None else None
        if faces is not None and self.key is None:
            raise MissingResource("MEMGUARD_DATA_KEY: indexing faces needs a data key, because face descriptors and "
                                  "identity names are stored only encrypted (set MEMGUARD_DATA_KEY or "
                                  "MEMGUARD_DATA_KEY_FILE; `python -m memguard.crypto FILE` makes one), or build "
                                  "with --no-faces")
        self.embedding_signal = getattr(source, "signal", None)
        if (self.out / MANIFEST).exists():
            raise InvalidInput("out", f"{self.out} already holds a built index; build into a new directory")
        if self.embedding_signal is None and latent is None:
            raise InvalidInput("model", "an image build needs the pipeline's VAE (model directory) for latent fingerprints")
        self.widths: dict[str, tuple[int, np.dtype]] = {}
        if self.embedding_signal is None:
            self.widths["latent"] = (latent.dim, np.float32)
            if cfg.align_maps:
                self.widths[MAPS] = (latent.map_dim, np.float16)
            self.widths["pdq"] = (PDQ_BYTES, np.uint8)
            if clip is not None:
                self.widths["clip"] = (clip.dim, np.float32)
            if faces is not None:
                self.widths["face"] = (sealed.SEALED_ROW, np.uint8)

    def _spec(self) -> dict:
        cfg = asdict(self.cfg)
        return {"source": self.source.describe(), "signals": sorted(self.widths),
                "models": {k: getattr(self, k).describe() for k in ("latent", "clip") if getattr(self, k)},
                "config": {k: cfg[k] for k in ("faces", "face_upscale_to", "max_face_upscale")},
                "sealed_with": self.key.key_id if self.key else None}

    def _models(self) -> dict:
        """The encoders, for the manifest. CLIP weights are also found relative to the index, so an index
        moved (or cloned) together with its weights still opens; the sha256 says they are the same."""
        models = {k: getattr(self, k).describe() for k in ("latent", "clip") if getattr(self, k)}
        if "clip" in models:
            models["clip"]["relpath"] = os.path.relpath(models["clip"]["path"], self.out.resolve())
        return models

    def run(self, *, restart: bool = False, stop_after: int | None = None) -> BuildReport:
        """Build (or resume) and finalize. `stop_after`: stop once that many records are consumed
        in total, without finalizing (a deliberate interruption, for tests and staged builds)."""
        t0 = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        if self.embedding_signal:
            self._first_embedding()
        stage = _Staging(self.out / STAGING, self.widths, self._spec(), restart, self.key)
        resumed = stage.state["consumed"]
        done = self._ingest(stage, stop_after)
        finished = done and self._finalize(stage, t0)
        report = BuildReport(str(self.out), finished, stage.state["rows"], stage.state["face_rows"],
                             stage.state["skipped"], self._skipped(stage), resumed, round(time.time() - t0, 3),
                             {s: {"dim": w[0]} for s, w in self.widths.items()})
        stage.db.close()
        if finished:
            shutil.rmtree(self.out / STAGING)
            fsync_dir(self.out)
        return report

    def _first_embedding(self) -> None:
        """Embedding builds learn the width from the first valid vector."""
        for rec in self.source.records():
            if rec.vector is not None:
                if self.embedding_signal == "latent" and self.latent is not None and rec.vector.size != self.latent.dim:
                    raise InvalidInput("embeddings", f"latent vectors have {rec.vector.size} values; the model's "
                                                     f"fingerprint has {self.latent.dim}")
                self.widths[self.embedding_signal] = (int(rec.vector.size), np.float32)
                return None
        raise InvalidInput("embeddings", "no valid vector in the file")

    def _ingest(self, stage: _Staging, stop_after: int | None) -> bool:
        """Consume the source batch by batch; True once it is exhausted, False if stopped early."""
        from tqdm import tqdm

        consumed = stage.state["consumed"]
        total = self.source.count() if hasattr(self.source, "count") else None
        stream = self.source.records(start=consumed)
        with tqdm(total=total, initial=consumed, unit="item", desc="index build", disable=not self.progress) as bar:
            size = self.cfg.embedding_batch_size if self.embedding_signal else self.cfg.batch_size
            while stop_after is None or consumed < stop_after:
                room = size if stop_after is None else min(size, stop_after - consumed)
                batch = [rec for _, rec in zip(range(room), stream)]
                if not batch:
                    return True
                consumed += len(batch)
                self._process(stage, batch, consumed)
                bar.update(len(batch))
        return False

    def _process(self, stage: _Staging, batch: list[SourceRecord], consumed: int) -> None:
        """Compute every signal of a batch, skipping (and listing) records that fail."""
        good, skipped, seen = [], [], set()
        for rec in batch:
            error = rec.error
            if error is None and (rec.item_id in seen or stage.has_item(rec.item_id)):
                error = f"duplicate item_id {rec.item_id!r}"
            if error is None and rec.image is not None:
                try:
                    rec.image = check_image(rec.image, rec.ref)
                except InvalidInput as exc:
                    error = str(exc)
            if error is None and rec.image is None and rec.vector is None:
                error = "record has neither an image nor a vector"
            if error is None and rec.vector is not None and rec.vector.size != self.widths[self.embedding_signal][0]:
                error = f"vector has {rec.vector.size} values, expected {self.widths[self.embedding_signal][0]}"
            if error is not None:
                log.warning("skipping %s: %s", rec.ref, error)
                skipped.append((rec.ref, error))
                continue
            seen.add(rec.item_id)
            good.append(rec)
        vectors, faces = self._signals(good)
        stage.commit(consumed, good, vectors, faces, skipped)

    def _signals(self, good: list[SourceRecord]) -> tuple[dict[str, np.ndarray], list]:
        if self.embedding_signal:
            vecs = np.stack([r.vector for r in good]) if good else np.zeros((0, 1), np.float32)
            return {self.embedding_signal: normalize_rows(vecs)}, []
        images = [r.image for r in good]
        fingerprints, maps = self.latent.encode_with_maps(images)
        vectors = {"latent": fingerprints,
                   "pdq": np.stack([pdq_hash(im)[0] for im in images]) if images else np.zeros((0, PDQ_BYTES), np.uint8)}
        if MAPS in self.widths:
            vectors[MAPS] = maps
        if self.clip is not None:
            vectors["clip"] = self.clip.encode(images)
        faces, descriptors = [], []
        if self.faces is not None:
            for i, rec in enumerate(good):
                for j, face in enumerate(self.faces.detect(rec.image, rec.ref, max_faces=None)):   # crowds too
                    identity = str(rec.meta.get("identity") or f"{rec.item_id}#face{j}")
                    faces.append((i, identity, list(face.box)))
                    descriptors.append(face.descriptor)
            vectors["face"] = np.stack(descriptors) if descriptors else np.zeros((0, FACE_DIM), np.float32)
        return vectors, faces

    @staticmethod
    def _skipped(stage: _Staging) -> list[dict]:
        return [{"ref": r, "error": e} for r, e in
                stage.db.execute("SELECT ref, error FROM skipped ORDER BY seq LIMIT 100").fetchall()]

    def _finalize(self, stage: _Staging, t0: float) -> bool:
        """Write vector files, faiss indexes, items.sqlite, the registry, then the manifest."""
        if stage.state["rows"] == 0:
            raise InvalidInput("source", "no readable item: nothing to index "
                                         f"({stage.state['skipped']} skipped; see the build report)")
        signals: dict[str, SignalInfo] = {}
        milvus = backends.parse_backend(self.cfg.backend).kind == "milvus"
        prefix = _new_prefix(self.cfg) if milvus else None   # one prefix names all of this index's collections
        for signal in self.widths:
            if signal == "face":   # decrypted in memory only, written sealed, never sent to Milvus
                from memguard.index.backends.faiss_store import write_faiss_signal
                signals[signal] = write_faiss_signal(self.out, signal, sealed.open_rows(self.key, stage.array(signal)),
                                                     self.cfg, key=self.key)
            elif signal != MAPS:
                signals[signal] = backends.write_signal(self.out, signal, stage.array(signal), self.cfg, prefix,
                                                        item_labels(stage.db, signal), self.progress)
        maps = None
        if MAPS in self.widths:   # stored for the aligned re-score only: no faiss index
            write_array(self.out / MAPS_FILE, stage.array(MAPS))
            maps = {"file": MAPS_FILE, "dim": self.latent.map_dim, "grid": self.latent.map_grid,
                    "channels": self.latent.channels, "count": stage.state["rows"], "dtype": "float16"}
        items_path = self.out / ITEMS_DB
        tmp = self.out / f".{ITEMS_DB}.tmp"
        tmp.unlink(missing_ok=True)
        stage.db.execute("VACUUM INTO ?", (str(tmp),))
        os.chmod(tmp, PRIVATE)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, items_path)
        Registry(self.out / REGISTRY_DB, create=True).close()
        os.chmod(self.out / REGISTRY_DB, PRIVATE)   # SQLite gives its -wal and -shm files the same mode
        names = sorted({ITEMS_DB} | {f for s in signals.values() for f in s.files} | ({MAPS_FILE} if maps else set()))
        manifest = Manifest(
            signals=signals,
            models=self._models()
            | ({"face": {"kind": "dlib_resnet_v1", "dim": FACE_DIM, "upscale_to": self.cfg.face_upscale_to}}
               if "face" in self.widths else {}),
            counts={"items": stage.state["rows"], "faces": stage.state["face_rows"],
                    "skipped": stage.state["skipped"]},
            config=asdict(self.cfg), thresholds=Thresholds(), files=record_files(self.out, names),
            build={"source": self.source.describe(), "seconds": round(time.time() - t0, 3)}, maps=maps)
        write_manifest(self.out, manifest)
        return True


def _new_prefix(cfg: IndexConfig) -> str:
    from memguard.index.backends.milvus_store import new_prefix
    return new_prefix(cfg)
