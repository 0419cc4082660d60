"""Vector files of an index: numpy arrays and faiss indexes, written atomically, read with checks.

Every write goes to a temporary file in the same directory, is fsync'ed, renamed over the target
and the directory is fsync'ed, so a crash leaves either the old file or the new one, never half
of one. Reads turn any decoding failure into CorruptData naming the file.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np

from memguard.errors import CorruptData

PRIVATE = 0o600   # index files hold fingerprints and biometric descriptors: owner only (issue 14)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success make it owner-only (0600), fsync it and
    rename it over `target`."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, PRIVATE)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_array(target: Path, array: np.ndarray) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def write_faiss(target: Path, index) -> None:
    with atomic_path(target) as tmp:
        if isinstance(index, faiss.IndexBinary):
            faiss.write_index_binary(index, str(tmp))
        else:
            faiss.write_index(index, str(tmp))


def read_array(path: Path, *, dtype: np.dtype, ndim: int = 2, mmap: bool = True) -> np.ndarray:
    """Load an .npy file (memory-mapped by default); CorruptData names the file on any mismatch."""
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CorruptData(f"{path}: not a readable numpy array ({exc})") from exc
    if array.dtype != np.dtype(dtype) or array.ndim != ndim:
        raise CorruptData(f"{path}: expected {ndim}-d {np.dtype(dtype)}, found {array.ndim}-d {array.dtype}")
    return array


def read_faiss(path: Path, *, binary: bool = False):
    """Load a faiss index; CorruptData names the file when faiss cannot decode it."""
    if not path.is_file():
        raise CorruptData(f"{path}: missing")
    try:
        return faiss.read_index_binary(str(path)) if binary else faiss.read_index(str(path))
    except RuntimeError as exc:
        raise CorruptData(f"{path}: faiss cannot read it ({str(exc).strip().splitlines()[-1]})") from exc


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Float32 copy of `vectors` [N, D] with unit-L2 rows (zero rows stay zero)."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(norms, 1e-12)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """[N, 256] of 0/1 → [N, 32] uint8 (faiss binary layout: bit i of byte j is hash bit 8j+i)."""
    return np.packbits(np.asarray(bits, dtype=np.uint8), axis=1, bitorder="little")


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between packed codes a [N, 32] and b [M, 32] → [N, M] int32."""
    x = np.bitwise_xor(a[:, None, :], b[None, :, :])
    return np.unpackbits(x, axis=2).sum(axis=2, dtype=np.int32)
