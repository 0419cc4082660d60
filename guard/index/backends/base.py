"""The vector-collection interface every index backend implements, and backend URIs.

A collection holds one signal's vectors (latent, pdq, clip or face), addressed by row: the item's
(or face's) position in items.sqlite, which is the id everywhere. Searches return exact scores on
the signal's own scale (memguard.index.scores), whatever the engine's structure, so thresholds
calibrated on one backend hold on the other.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memguard.errors import InvalidInput

KINDS = ("faiss", "milvus")


@dataclass(frozen=True)
class BackendURI:
    """kind "faiss" (files in the index directory) or "milvus" with the URI MilvusClient takes:
    http(s)://HOST:PORT for a server, or a local milvus-lite .db path (an in-process engine)."""
    kind: str
    uri: str = ""

    @property
    def lite_file(self) -> bool:
        return self.kind == "milvus" and not self.uri.startswith(("http://", "https://"))


def parse_backend(text: str, field_name: str = "backend") -> BackendURI:
    """"faiss" | "milvus://HOST:PORT" | "http(s)://HOST:PORT" | PATH.db (milvus-lite) → BackendURI."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput(field_name, "must be 'faiss', milvus://HOST:PORT, http(s)://HOST:PORT or a milvus-lite .db path")
    text = text.strip()
    if text == "faiss":
        return BackendURI("faiss")
    if text.startswith(("milvus://", "http://", "https://")) and "@" in text.split("://", 1)[1].split("/", 1)[0]:
        # not echoed: it holds a password. URIs reach command lines and the index manifest
        raise InvalidInput(field_name, "credentials do not go in the URI: set MEMGUARD_MILVUS_TOKEN or "
                                       "MEMGUARD_MILVUS_TOKEN_FILE (USER:PASSWORD or an API key)")
    if text.startswith("milvus://"):
        hostport = text[len("milvus://"):].rstrip("/")
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidInput(field_name, f"{text!r}: expected milvus://HOST:PORT")
        return BackendURI("milvus", f"http://{hostport}")
    if text.startswith(("http://", "https://")):
        return BackendURI("milvus", text.rstrip("/"))
    if text.endswith(".db"):
        return BackendURI("milvus", str(Path(text).expanduser().resolve()))
    raise InvalidInput(field_name, f"{text!r}: expected 'faiss', milvus://HOST:PORT, http(s)://HOST:PORT "
                                   "or a milvus-lite file ending in .db")


class VectorCollection(ABC):
    """One signal's vectors. `width` is the stored row width: dim floats, or 32 bytes for pdq."""
    signal: str
    dim: int
    width: int
    dtype: np.dtype

    @abstractmethod
    def count(self) -> int:
        """Rows that searches can return (added minus removed)."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact-scored nearest rows of each query: rows [B, k] int64 (−1 pads a slot nothing
        filled), scores [B, k] float32, stored vectors [B, k, width], closest first."""

    @abstractmethod
    def fetch(self, rows: np.ndarray) -> np.ndarray:
        """Stored vectors [len(rows), width] of the given rows, in that order."""

    @abstractmethod
    def add(self, rows: np.ndarray, vectors: np.ndarray, item_ids: list[str], meta: list[dict],
            protected: bool = False) -> None:
        """Add rows (ids) with their vectors and scalar fields."""

    @abstractmethod
    def remove(self, rows: np.ndarray) -> int:
        """Remove rows from searches; returns how many were present."""

    @abstractmethod
    def describe(self) -> dict:
        """kind, structure and parameters, counts, resident bytes where known."""

    def close(self) -> None:
        return None
