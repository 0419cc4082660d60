"""`FingerprintIndex`: the object the guard, the server and the CLI use.

    index = FingerprintIndex.open("runs/index")           # verifies the manifest and checksums
    ids, scores, vectors = index.search_latent(fp, k=8)   # fp: Tensor[B, F] latent fingerprints
    result = index.screen(image)                          # copies and faces in one image
    index.protect_image(image, reason="takedown #12")     # durable when it returns

Reads never block on writes: protect/unprotect commit to the registry, then swap in a new immutable
snapshot of the protected registry. Changes committed by another process (the CLI while a server
runs, another replica) are picked up on the next call: SQLite's data_version costs one PRAGMA;
PostgreSQL's watcher thread keeps the version in memory (memguard.index.registry_pg). A registry that
cannot be read raises RegistryUnavailable (fail closed), and the next call tries again.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from memguard.crypto import DataKey
from memguard.index.sealed import key_for
from memguard.errors import CorruptData, InvalidInput, MissingResource, RegistryUnavailable
from memguard.digest import sha256_file
from memguard.index.encoders import BUNDLED_CLIP_WEIGHTS
from memguard.index.builder import ITEMS_DB, MAPS, BuildReport, IndexBuilder
from memguard.index import clusters
from memguard.index.config import IndexConfig, Thresholds
from memguard.index.faces import FaceEmbedder
from memguard.index.manifest import Manifest, check_files, read_manifest, write_manifest
from memguard.index.pdq import check_image, pdq_hash
from memguard.index.protected import ProtectedSnapshot
from memguard.index.signals import SignalIndex, best_first, exact_scores
from memguard.index.registry import open_registry
from memguard.index.registry_sql import content_digest
from memguard.index.store import ItemStore
from memguard.index.vectors import read_array

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProtectionReceipt:
    """What protect_* returns once the protection is durable and in effect."""
    pid: str
    kind: str
    subject: str
    reason: str
    vectors: int
    seq: int
    replayed: bool = False   # the protection an earlier identical request (or idempotency key) made


class FingerprintIndex:
    def __init__(self, path: Path, manifest: Manifest, *, model_dir: Path | None = None, device: str = "cpu",
                 latent_encoder=None, clip_encoder=None, overrides: dict | None = None, backend: str | None = None,
                 registry: str | None = None, data_key: bytes | str | None = None,
                 clip_weights: str | Path | None = None):
        self.path, self.manifest, self.device = Path(path), manifest, device
        self._clip_given = clip_weights
        self.cfg = replace(IndexConfig(**manifest.config), **(overrides or {}))
        key = DataKey.resolve(data_key)
        face = manifest.signals.get("face")
        face_key = key_for(face.backend["sealed"], key, self.path) if face and face.backend.get("sealed") else key
        if face and face.count and not face.backend.get("sealed"):
            log.warning("%s: %d face descriptors and their identity names are stored UNENCRYPTED (an index built "
                        "before sealing); `memguard index seal %s` encrypts them", self.path, face.count, self.path)
        self.signals = {name: SignalIndex(name, info, self.path, self.cfg, backend, face_key if name == "face" else None)
                        for name, info in manifest.signals.items()}
        self.maps = self._read_maps()
        self._cluster_labels = clusters.read(self.path, manifest)
        self._cluster_sizes = None if self._cluster_labels is None else np.bincount(self._cluster_labels)
        if self._cluster_labels is None:
            log.info("%s: built before near-duplicate clusters; every item is its own cluster "
                     "(`memguard index calibrate` clusters it)", self.path)
        self.items = ItemStore(self.path / ITEMS_DB, face_key)
        self.registry = open_registry(registry, self.path, key=key)   # never the demo key: real people's faces
        self._model_dir = Path(model_dir) if model_dir else None
        self._latent, self._clip, self._faces = latent_encoder, clip_encoder, None
        self._write_lock = threading.RLock()
        self._load_lock = threading.Lock()
        self._seen_version = self.registry.version()
        self.protected = ProtectedSnapshot.from_protections(*self.registry.active())

    # ---- opening and building -------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, verify_checksums: bool = True, **kwargs) -> "FingerprintIndex":
        """Open an index directory. Sizes of all files are always checked, sha256 unless told not to;
        CorruptData names the first bad file (or Milvus collection). kwargs: model_dir, device,
        latent_encoder, clip_encoder, clip_weights (where the CLIP weights are, if not where they were at
        build), overrides (IndexConfig fields for search, e.g. {"nprobe": 64}), registry (a URI, see memguard.index.registry; default
        $MEMGUARD_REGISTRY, else registry.sqlite here), data_key (default $MEMGUARD_DATA_KEY, see memguard.crypto),
        backend (another URI of the Milvus that holds the vectors; default: the one recorded at build)."""
        manifest = read_manifest(Path(path))
        check_files(Path(path), manifest, checksums=verify_checksums)
        return cls(Path(path), manifest, **kwargs)

    @staticmethod
    def build(out: str | Path, source, *, model_dir: Path | None = None, clip_model: str | None = None,
              clip_weights: Path | None = None, cfg: IndexConfig = IndexConfig(), device: str = "cpu",
              progress: bool = True, restart: bool = False, stop_after: int | None = None,
              data_key: bytes | str | DataKey | None = None) -> BuildReport:
        """Build (or resume building) an index at `out` from a source (see memguard.index.sources).
        Faces are sealed with data_key (default: the configured one; required when faces are indexed)."""
        from memguard.index.encoders import ClipEncoder, LatentEncoder
        latent = LatentEncoder(model_dir, device) if model_dir else None
        clip = ClipEncoder(clip_model, clip_weights, device) if clip_weights else None
        if clip_weights and not clip_model:
            raise InvalidInput("clip_model", "give the open_clip model name that matches the weights")
        faces = FaceEmbedder(cfg.face_upscale_to, cfg.max_face_upscale) if cfg.faces and model_dir else None
        builder = IndexBuilder(out, source, latent=latent, clip=clip, faces=faces, cfg=cfg, progress=progress,
                               key=DataKey.resolve(data_key))
        report = builder.run(restart=restart, stop_after=stop_after)
        if report.finished:   # near duplicates form clusters at once (at the default thresholds)
            with FingerprintIndex.open(out, verify_checksums=False, data_key=data_key) as index:
                labels = clusters.compute(index)
                info = clusters.write(index, labels, index.thresholds)
            report.signals["clusters"] = {k: info[k] for k in ("clusters", "largest", "joined_items")}
        return report

    def close(self) -> None:
        for sig in self.signals.values():
            sig.close()
        self.items.close()
        self.registry.close()

    def __enter__(self) -> "FingerprintIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read_maps(self) -> np.ndarray | None:
        """The latent maps of the aligned re-score [items, map_dim] float16 (memory-mapped), if built."""
        info = self.manifest.maps
        if not info:
            return None
        path = self.path / info["file"]
        maps = read_array(path, dtype=np.float16)
        if maps.shape != (info["count"], info["dim"]):
            raise CorruptData(f"{path}: shape {maps.shape}, manifest says {(info['count'], info['dim'])}")
        return maps

    # ---- near-duplicate clusters ------------------------------------------------------------------
    @property
    def cluster_labels(self) -> np.ndarray | None:
        """Each training row's cluster label (its smallest row), or None for an index without clusters."""
        return self._cluster_labels

    def cluster_of(self, row: int) -> int:
        return int(self._cluster_labels[row]) if self._cluster_labels is not None else int(row)

    def cluster_size(self, row: int) -> int:
        """Training rows in `row`'s cluster (itself included)."""
        return int(self._cluster_sizes[self._cluster_labels[row]]) if self._cluster_labels is not None else 1

    def cluster_members(self, row: int) -> list[int]:
        """Every training row of `row`'s cluster (itself included), ascending."""
        if self._cluster_labels is None:
            return [int(row)]
        return np.flatnonzero(self._cluster_labels == self._cluster_labels[row]).tolist()

    # ---- encoders, loaded on first use ------------------------------------------------------------
    @property
    def thresholds(self) -> Thresholds:
        return self.manifest.thresholds

    def latent_encoder(self):
        with self._load_lock:
            if self._latent is None:
                from memguard.index.encoders import LatentEncoder
                info = self.manifest.models.get("latent")
                if info is None and self._model_dir is None:
                    raise MissingResource(f"{self.path}: the index records no VAE; pass model_dir")
                enc = LatentEncoder(self._model_dir or Path(info["path"]), self.device)
                if info and enc.describe()["weights_sha256"] != info["weights_sha256"]:
                    raise InvalidInput("model_dir", f"{enc.model_dir}: VAE weights differ from those the index "
                                                    "was built with; its fingerprints would not be comparable")
                self._latent = enc
            return self._latent

    def clip_encoder(self):
        with self._load_lock:
            if self._clip is None and "clip" in self.manifest.models:
                from memguard.index.encoders import ClipEncoder
                info = self.manifest.models["clip"]
                self._clip = ClipEncoder(info["model"], self._clip_weights(info), self.device)
            return self._clip

    def _clip_weights(self, info: dict) -> Path:
        """The index's CLIP weights: those given (clip_weights=, $MEMGUARD_CLIP_WEIGHTS), else the first
        file with the recorded sha256 at the path recorded at build, relative to the index (moved
        together), or among the weights shipped with MemGuard (the testbed CLIP)."""
        want = info.get("weights_sha256")
        given = self._clip_given or os.environ.get("MEMGUARD_CLIP_WEIGHTS")
        if given:
            if not Path(given).is_file():
                raise InvalidInput("clip_weights", f"{given}: no such file")
            if want and sha256_file(given) != want:
                raise InvalidInput("clip_weights", f"{given}: not the CLIP weights the index was built with "
                                                   "(sha256 differs); its clip vectors would not be comparable")
            return Path(given)
        where = list(dict.fromkeys([Path(info["path"])] + ([self.path / info["relpath"]] if info.get("relpath")
                                                           else []) + [BUNDLED_CLIP_WEIGHTS]))
        for path in where:
            if path.is_file() and (not want or sha256_file(path) == want):
                return path
        raise MissingResource(f"{self.path}: the index's CLIP weights ({info.get('model')}, sha256 {want}) are in "
                              f"none of {', '.join(map(str, where))}; pass clip_weights or set MEMGUARD_CLIP_WEIGHTS")

    def face_embedder(self) -> FaceEmbedder:
        with self._load_lock:
            if self._faces is None:
                self._faces = FaceEmbedder(self.cfg.face_upscale_to, self.cfg.max_face_upscale)
            return self._faces

    # ---- the protected registry -------------------------------------------------------------------
    def snapshot(self) -> ProtectedSnapshot:
        """The current protected registry, after picking up changes committed by other processes.
        Raises RegistryUnavailable when the registry cannot be read: never a stale answer."""
        version = self.registry.version()
        if version != self._seen_version:
            with self._write_lock:
                if version != self._seen_version:
                    self._reload()
                    self._seen_version = version   # only after the swap: a failed reload is retried
        return self.protected

    def _reload(self) -> None:
        if self.registry.last_seq() == self.protected.seq:
            return
        try:
            self.protected = ProtectedSnapshot.from_protections(*self.registry.active())
        except (RegistryUnavailable, CorruptData, MissingResource):
            raise
        except Exception as exc:   # noqa: BLE001 - whatever broke, the snapshot is not current: fail closed
            self.registry.errors += 1
            log.exception("registry %s: reload failed", self.registry.label)
            raise RegistryUnavailable(f"registry {self.registry.label}: reload failed ({type(exc).__name__})") from exc

    def registry_available(self) -> bool:
        """False while the registry cannot be read (health reports NOT_SERVING then)."""
        try:
            self.snapshot()
        except RegistryUnavailable:
            return False
        return True

    def _apply(self, make, seq_first: int) -> None:
        """Swap in the snapshot after a local commit; reload everything if another writer got in between."""
        current = self.protected
        self.protected = make(current) if seq_first == current.seq + 1 else \
            ProtectedSnapshot.from_protections(*self.registry.active())

    def protect_image(self, image: np.ndarray, reason: str, item_id: str | None = None,
                      idempotency_key: str | None = None) -> ProtectionReceipt:
        """Protect an image: its latent fingerprint, PDQ hash (and CLIP embedding) join the registry.
        A repeated idempotency_key, or the same image and item_id again while it is protected,
        returns the original receipt (replayed=True) and stores nothing."""
        image = check_image(image, "image")
        if item_id is not None and (not isinstance(item_id, str) or not item_id.strip()):
            raise InvalidInput("item_id", "must be a non-empty string or None")
        fingerprint, latent_map = self.latent_encoder().encode_with_maps([image])
        vectors = [("latent", fingerprint[0], None), ("pdq", pdq_hash(image)[0], None)]
        if self.maps is not None:
            vectors.append((MAPS, latent_map[0].astype(np.float32), None))
        if "clip" in self.signals:
            vectors.append(("clip", self.clip_encoder().encode([image])[0], None))
        return self._protect("image", item_id, reason, vectors, idempotency_key, _image_digest(image))

    def protect_vectors(self, reason: str, item_id: str | None = None, idempotency_key: str | None = None,
                        **vectors: np.ndarray) -> ProtectionReceipt:
        """Protect precomputed vectors (latent=[F] float32, pdq=[32] uint8, clip=[D] float32)."""
        out = []
        for signal, vec in vectors.items():
            if signal not in ("latent", "pdq", "clip"):
                raise InvalidInput(signal, "unknown signal; expected latent, pdq or clip")
            out.append((signal, self._check_vector(signal, vec), None))
        if not out:
            raise InvalidInput("vectors", "give at least one of latent, pdq, clip")
        digest = content_digest(*(part for signal, vec, _ in sorted(out, key=lambda e: e[0])
                                  for part in (signal, np.ascontiguousarray(vec).tobytes())))
        return self._protect("image", item_id, reason, out, idempotency_key, digest)

    def protect_face(self, images: list[np.ndarray], identity: str, reason: str,
                     idempotency_key: str | None = None) -> ProtectionReceipt:
        """Protect a person: the largest face of each photo becomes a descriptor of `identity`.
        Descriptors and the name are stored sealed with the data key (memguard.crypto); unprotect
        erases them."""
        if not isinstance(identity, str) or not identity.strip():
            raise InvalidInput("identity", "must be a non-empty string")
        if not isinstance(images, (list, tuple)) or not images:
            raise InvalidInput("images", "give a non-empty list of photos of the person")
        vectors = []
        for i, image in enumerate(images):
            found = self.face_embedder().detect(image, f"images[{i}]")
            if not found:
                raise InvalidInput(f"images[{i}]", "no face detected (frontal faces of about 20 px and up are found)")
            vectors.append(("face", found[0].descriptor, list(found[0].box)))
        digest = content_digest(*(_image_digest(np.asarray(image)) for image in images))
        return self._protect("face", identity, reason, vectors, idempotency_key, digest)

    def _protect(self, kind: str, subject: str | None, reason: str, vectors: list,
                 idempotency_key: str | None, content_hash: str) -> ProtectionReceipt:
        with self._write_lock:
            self.snapshot()   # apply other writers' changes first, so seq stays contiguous
            prot = self.registry.add(kind, subject, reason, vectors, idempotency_key=idempotency_key,
                                     content_hash=content_hash)
            if not prot.replayed:
                self._apply(lambda snap: snap.with_added(prot), prot.seq)
        return ProtectionReceipt(prot.pid, prot.kind, prot.subject, prot.reason, prot.n_vectors, prot.seq,
                                 prot.replayed)

    def unprotect(self, ident: str, reason: str) -> list[str]:
        """Remove the protection `ident` (a protection id, item id or identity); returns removed ids."""
        if not isinstance(ident, str) or not ident.strip():
            raise InvalidInput("id", "must be a non-empty string")
        with self._write_lock:
            self.snapshot()
            done = self.registry.remove(ident, reason)
            pids = [p for p, _ in done]
            self._apply(lambda snap: snap.with_removed(pids, done[-1][1]), done[0][1])
        return pids

    def is_protected(self, item_id: str) -> bool:
        return item_id in self.snapshot().protected_subjects

    # ---- search -----------------------------------------------------------------------------------
    def _check_vector(self, signal: str, vec) -> np.ndarray:
        if signal == "pdq":
            v = np.asarray(vec)
            if v.dtype != np.uint8 or v.shape != (32,):
                raise InvalidInput("pdq", f"must be 32 packed uint8 bytes, got {v.dtype} {v.shape}")
            return v
        v = np.asarray(vec, dtype=np.float32).reshape(-1)
        dim = self.signals[signal].info.dim if signal in self.signals else None
        if dim is not None and v.shape != (dim,):
            raise InvalidInput(signal, f"must have {dim} values, got {v.size}")
        if not np.all(np.isfinite(v)):
            raise InvalidInput(signal, "contains NaN or infinity")
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def search_latent(self, fingerprints, k: int):
        """Nearest training and protected items of each latent fingerprint.

        fingerprints: Tensor[B, F] (any float dtype/device), rows as made by latent_fingerprint.
        returns: item_ids list[B][K], scores Tensor[B, K] float32 (cosine, best first),
                 vectors Tensor[B, K, F] float32 (the stored fingerprints), on the input's device.
                 K = min(k, training items + protected images). A protected copy of a training item
                 can appear twice: once as the training item, once as the protection. An empty id
                 (score 0, zero vector) marks a slot an approximate index could not fill.
        """
        import torch

        if not isinstance(fingerprints, torch.Tensor) or fingerprints.ndim != 2:
            raise InvalidInput("fingerprints", "must be a Tensor[B, F]")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInput("k", f"must be a positive integer, got {k!r}")
        if "latent" not in self.signals:
            raise MissingResource(f"{self.path}: this index holds no latent fingerprints")
        sig = self.signals["latent"]
        q = fingerprints.detach().float().cpu().numpy()
        if q.shape[1] != sig.info.dim or not np.all(np.isfinite(q)):
            raise InvalidInput("fingerprints", f"must be finite with F={sig.info.dim}, got shape {tuple(q.shape)}")
        snap = self.snapshot()
        rows, scores, train_vecs = self._distinct_clusters(*sig.search_vectors(q, self._overfetch(k)), k)
        pvec = snap.vectors.get("latent", np.zeros((0, sig.info.dim), np.float32))
        psubjects = [row.subject for row in snap.rows.get("latent", [])]
        names = self.items.ids_of_rows(rows.ravel().tolist())
        # candidates: training rows then protected rows; one gather, one sort for the whole batch
        found = rows >= 0
        all_scores = np.concatenate([np.where(found, scores, -np.inf), q @ pvec.T], axis=1)
        kk = min(k, rows.shape[1] + len(pvec))
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, :kk]
        out_scores = np.take_along_axis(all_scores, order, axis=1).astype(np.float32)
        out_vecs = np.zeros((len(q), kk, sig.info.dim), np.float32)
        out_ids = []
        for b in range(len(q)):
            ids_b = []
            for j, c in enumerate(order[b]):
                if c < rows.shape[1] and not found[b, c]:
                    ids_b.append("")   # an approximate index returned fewer than k rows
                elif c < rows.shape[1]:
                    ids_b.append(names[int(rows[b, c])])
                    out_vecs[b, j] = train_vecs[b, c]
                else:
                    ids_b.append(psubjects[c - rows.shape[1]])
                    out_vecs[b, j] = pvec[c - rows.shape[1]]
            out_ids.append(ids_b)
        out_scores[~np.isfinite(out_scores)] = 0.0
        dev = fingerprints.device
        return out_ids, torch.from_numpy(out_scores).to(dev), torch.from_numpy(out_vecs).to(dev)

    def _overfetch(self, k: int) -> int:
        """Rows to search so that k distinct clusters are likely among them (near duplicates of one
        image crowd a plain top-k)."""
        return k if self._cluster_labels is None else k + int(self.manifest.clusters.get("largest", 1)) - 1

    def _distinct_clusters(self, rows: np.ndarray, scores: np.ndarray, vecs: np.ndarray, k: int):
        """Per query, the best row of each cluster (ranked as searched), up to k; empty slots -1."""
        if self._cluster_labels is None:
            return rows[:, :k], scores[:, :k], vecs[:, :k]
        kk = min(k, rows.shape[1])
        out_rows = np.full((len(rows), kk), -1, rows.dtype)
        out_scores = np.zeros((len(rows), kk), scores.dtype)
        out_vecs = np.zeros((len(rows), kk, vecs.shape[2]), vecs.dtype)
        for b in range(len(rows)):
            seen, j = set(), 0
            for c in range(rows.shape[1]):
                r = int(rows[b, c])
                if r < 0 or int(self._cluster_labels[r]) in seen:
                    continue
                seen.add(int(self._cluster_labels[r]))
                out_rows[b, j], out_scores[b, j], out_vecs[b, j] = r, scores[b, c], vecs[b, c]
                j += 1
                if j == kk:
                    break
        return out_rows, out_scores, out_vecs

    def search_signal(self, signal: str, query: np.ndarray, k: int,
                      snap: ProtectedSnapshot | None = None) -> list[dict]:
        """The k closest training rows and the k closest protected rows of one query vector for one
        signal, merged closest first (up to 2k): dicts with score, protected, and row (training)
        or pid, subject, box (protected). Protected rows are never crowded out by training rows."""
        snap = snap or self.snapshot()
        out = []
        if signal in self.signals:
            rows, scores = self.signals[signal].search(query[None], k)
            for r, s in zip(rows[0], scores[0]):
                if r >= 0:
                    out.append({"row": int(r), "score": float(s), "protected": False})
        pvec = snap.vectors.get(signal)
        if pvec is not None:
            pscores = exact_scores(signal, pvec, query)
            for j in best_first(signal, pscores)[:k]:
                row = snap.rows[signal][int(j)]
                out.append({"pid": row.pid, "subject": row.subject, "score": float(pscores[j]),
                            "protected": True, "box": row.box})
        order = best_first(signal, np.array([o["score"] for o in out], np.float32))
        return [out[int(i)] for i in order]

    def screen(self, image: np.ndarray):
        """Is `image` a copy of an indexed or protected item, and whose faces does it show? → ScreenResult."""
        from memguard.index.screen import screen_image
        return screen_image(self, image)

    # ---- reporting --------------------------------------------------------------------------------
    def stats(self) -> dict:
        from memguard.index.report import index_stats
        return index_stats(self)

    def verify(self) -> dict:
        from memguard.index.report import verify_index
        return verify_index(self)

    def set_thresholds(self, thresholds: Thresholds) -> None:
        """Store calibrated thresholds in the manifest (atomic rewrite) and use them at once."""
        with self._write_lock:
            self.manifest.thresholds = thresholds
            write_manifest(self.path, self.manifest)


def _image_digest(image: np.ndarray) -> str:
    """What dedupes a repeated protect of the same picture: its shape and pixels."""
    return content_digest(str(image.shape), str(image.dtype), np.ascontiguousarray(image).tobytes())
