"""Training-set faces at rest: the index's face descriptors and identity names are sealed (issue 14).

Runs on both backends: with Milvus holding the other signals, faces still stay in sealed local files.
"""
from __future__ import annotations

import json
import sqlite3
import stat
from dataclasses import replace

import faiss
import numpy as np
import pytest

from memguard.crypto import DataKey
from memguard.errors import CorruptData, MissingResource
from memguard.index import sealed
from memguard.index.api import FingerprintIndex
from memguard.index.config import IndexConfig
from memguard.index.manifest import read_manifest, record_files, write_manifest
from memguard.index.sources import ImageFolderSource
from memguard.testbed.dataset import write_image_folder
from tests.index.conftest import assert_opens_only_with_its_key


def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _training_faces(index) -> tuple[np.ndarray, list[str]]:
    sig = index.signals["face"]
    descriptors = np.array(sig.vectors[np.arange(sig.count)])
    names = [ident for _, ident in index.items.faces_of_rows(list(range(sig.count))).values()]
    return descriptors, names


def test_training_faces_are_unreadable_without_the_key(index_dir, monkeypatch):
    manifest = read_manifest(index_dir)
    face = manifest.signals["face"]
    assert face.backend == {"kind": "faiss", "sealed": DataKey.resolve().key_id}   # local files on any backend
    with FingerprintIndex.open(index_dir) as index:
        descriptors, names = _training_faces(index)
    assert len(descriptors) == 2 and sorted(names) == ["photo-astronaut#face0", "photo-grace_hopper#face0"]
    files = _files(index_dir)
    for name, data in files.items():
        for d in descriptors:
            assert d.tobytes() not in data and d[:8].tobytes() not in data, name   # not even a fragment
        for n in names:
            assert n.encode() not in data, name
    for name in (face.vectors, face.index, "items.sqlite"):
        assert stat.S_IMODE((index_dir / name).stat().st_mode) & 0o077 == 0, name
    with pytest.raises(RuntimeError):          # the faiss file is not a faiss index without the key
        faiss.read_index(str(index_dir / face.index))
    assert_opens_only_with_its_key(index_dir, monkeypatch, missing="sealed", wrong="not the key")


def test_a_tampered_sealed_row_is_refused(index_dir):
    face = read_manifest(index_dir).signals["face"]
    path = index_dir / face.vectors
    data = bytearray(path.read_bytes())
    data[-5] ^= 1                              # inside the last row's ciphertext
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptData, match="index/face/1"):
        FingerprintIndex.open(index_dir, verify_checksums=False)


def test_sealed_rows_are_bound_to_their_row():
    key = DataKey.from_bytes(bytes(range(32)))
    rng = np.random.default_rng()
    rows = rng.standard_normal((3, 128)).astype(np.float32)
    box = sealed.seal_rows(key, rows, 10)
    assert box.shape == (3, sealed.SEALED_ROW)
    np.testing.assert_array_equal(sealed.open_rows(key, box, 10), rows)
    with pytest.raises(CorruptData):
        sealed.open_rows(key, box[[1, 0, 2]], 10)   # rows swapped


def test_building_faces_without_a_key_is_refused(tmp_path, vae_dir, items, monkeypatch):
    monkeypatch.delenv("MEMGUARD_DATA_KEY")
    folder = write_image_folder([i for i in items if i.item_id == "photo-astronaut"], tmp_path / "images")
    with pytest.raises(MissingResource, match="--no-faces"):
        FingerprintIndex.build(tmp_path / "ix", ImageFolderSource(folder), model_dir=vae_dir, progress=False)
    assert not (tmp_path / "ix" / ".build" / "face.raw").exists()
    report = FingerprintIndex.build(tmp_path / "ix", ImageFolderSource(folder), model_dir=vae_dir,
                                    cfg=IndexConfig(faces=False), progress=False)
    assert report.finished and "face" not in report.signals


def _unseal(directory, key: DataKey) -> None:
    """Rewrite a sealed index as the format before sealing (plaintext face files and names)."""
    manifest = read_manifest(directory)
    face = manifest.signals["face"]
    with FingerprintIndex.open(directory) as index:
        descriptors, names = _training_faces(index)
    np.save(directory / face.vectors, descriptors)
    flat = faiss.IndexFlatL2(128)
    flat.add(descriptors)
    faiss.write_index(flat, str(directory / face.index))
    with sqlite3.connect(directory / "items.sqlite") as conn:
        conn.executemany("UPDATE faces SET identity = ? WHERE row = ?", [(n, i) for i, n in enumerate(names)])
    conn.close()
    plain = replace(face, backend={"kind": "faiss"})
    write_manifest(directory, replace(manifest, signals={**manifest.signals, "face": plain},
                                      files=record_files(directory, sorted(manifest.files))))


def test_memguard_index_seal_encrypts_an_older_index(faiss_index_dir, items):
    key = DataKey.resolve()
    _unseal(faiss_index_dir, key)
    assert b"photo-astronaut#face0" in (faiss_index_dir / "items.sqlite").read_bytes()
    with FingerprintIndex.open(faiss_index_dir) as index:            # still opens (with a warning)
        plain, _ = _training_faces(index)
    report = sealed.seal_index(faiss_index_dir, key)
    assert report == {"sealed": 2, "identities": 2, "key_id": key.key_id}
    for name, data in _files(faiss_index_dir).items():
        assert b"photo-astronaut#face0" not in data and plain[0].tobytes() not in data, name
    assert json.loads((faiss_index_dir / "manifest.json").read_text())["signals"]["face"]["backend"]["sealed"]
    with FingerprintIndex.open(faiss_index_dir) as index:            # checksums hold; faces still match
        np.testing.assert_array_equal(_training_faces(index)[0], plain)
        astronaut = next(i for i in items if i.item_id == "photo-astronaut")
        assert [f.identity for f in index.screen(astronaut.image).faces] == ["photo-astronaut#face0"]
    assert sealed.seal_index(faiss_index_dir, key)["sealed"] == 0      # idempotent
