"""Configuration of a fingerprint index: structure (faiss factory strings), search and thresholds.

The structure of every vector index is a faiss factory string (`"Flat"`, `"IVF1024,PQ64x4fs"`,
`"HNSW32,Flat"`). `factory.py` is the one place that chooses and parses them; the strings chosen
are stored in the manifest so that an index is always reopened with the structure it was built with.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

FORMAT_VERSION = 1

# the signals an index can hold; each has its own vector file, faiss index and threshold
SIGNALS = ("latent", "pdq", "clip", "face")


@dataclass(frozen=True)
class IndexConfig:
    """How an index is built and searched.

    factory: overrides the automatic choice for the float indexes (latent, clip); None = automatic:
        exact ("Flat") up to `exact_max_items` items, IVF-PQ with 4-bit fast-scan codes above it.
    nprobe / hnsw_ef: search-time breadth of IVF / HNSW indexes.
    rerank_factor: an approximate index returns k·rerank_factor candidates, which are re-scored
        exactly against the stored vectors, so returned scores are always exact cosines.
    backend: where the vectors live (memguard.index.backends): "faiss" (files in the index directory,
        the embedded default), "milvus://HOST:PORT" / "http(s)://…" (a Milvus server) or a
        milvus-lite "….db" path. Items metadata, the registry and the manifest stay in the directory.
    milvus_index: Milvus index type (FLAT, HNSW, HNSW_SQ, IVF_FLAT, IVF_SQ8, IVF_PQ); None = FLAT up
        to exact_max_items, HNSW above. Build parameters: hnsw_m, hnsw_ef_construction (HNSW),
        nlist from the size as for faiss (IVF); search: hnsw_ef, nprobe. Recorded in the manifest.
    """
    factory: str | None = None
    face_factory: str | None = None
    exact_max_items: int = 50_000
    nprobe: int = 64
    hnsw_ef: int = 64
    rerank_factor: int = 4
    train_sample: int = 200_000         # vectors used to train IVF/PQ quantizers
    batch_size: int = 32                # images encoded per VAE forward pass during a build
    embedding_batch_size: int = 8192    # precomputed vectors committed per checkpoint
    faces: bool = True                  # detect and index faces in training images
    align_maps: bool = True             # store latent maps (2 KB/item) for the crop-tolerant aligned re-score
    face_upscale_to: int = 400          # small images are upscaled so their short side reaches this
    max_face_upscale: int = 8
    seed: int = 0
    backend: str = "faiss"
    milvus_index: str | None = None
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    milvus_batch_size: int = 4096       # rows per insert when streaming into Milvus
    milvus_prefix: str | None = None    # collection names {prefix}_{signal}; None = mg_<random>


@dataclass(frozen=True)
class Thresholds:
    """Score thresholds per signal. A copy signal crosses when its score is at least as close as
    the threshold: cosine ≥ latent / clip; Hamming distance ≤ pdq; Euclidean distance ≤ face.

    aligned is not a similarity but a standout statistic (z ≥ aligned crosses).
    Defaults are the conventional starting points (PDQ's 31 bits, dlib's 0.6) until `calibrate`
    replaces them with measured ones; `calibrated` says which.
    """
    latent: float = 0.95
    aligned: float = 8.0      # z of the best aligned score over the next ones (memguard.index.align)
    pdq: float = 31.0
    clip: float = 0.9
    face: float = 0.6
    calibrated: bool = False
    false_match_rate: float | None = None
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Thresholds":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def higher_is_closer(signal: str) -> bool:
    """Cosine similarities grow with closeness; distances shrink."""
    return signal in ("latent", "clip", "aligned")


def crosses(signal: str, score: float, threshold: float) -> bool:
    return score >= threshold if higher_is_closer(signal) else score <= threshold
