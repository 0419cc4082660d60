"""Biometric data at rest in an index directory: face descriptors and identity names, sealed.

With a data key (memguard.crypto) the builder never writes a face descriptor or an identity name in
the clear, not even in its staging area:
- face.npy holds one sealed row per face, uint8 [N, SEALED_ROW] (AES-GCM, associated data
  "index/face/ROW", so rows cannot be swapped or replayed elsewhere);
- face.faiss is the serialized faiss index sealed as one value ("index/face.faiss");
- items.sqlite's faces.identity holds "sealed:" + base64 of the sealed name ("index/face/ROW/identity").
A loaded index decrypts them into memory only. The manifest records the key id in the face
signal's backend entry ({"kind": "faiss", "sealed": KEY_ID}); opening needs that key.

The shipped testbeds' faces are public sample photos; their indexes are sealed with a public demo
key (guard/testbed/demo-data.key) so that they exercise this path without configuration. An index
sealed with it opens without a configured key, with a warning: that key protects nothing. It opens
only the shipped testbeds' indexes (built inside guard/testbed/, or copies of them), and the protected
registry refuses to seal with it.
"""
from __future__ import annotations

import base64
import logging
from pathlib import Path

import faiss
import numpy as np

from memguard.crypto import NONCE_BYTES, DataKey
from memguard.errors import CorruptData, MissingResource
from memguard.index.faces import FACE_DIM

log = logging.getLogger(__name__)
SEALED_ROW = 1 + NONCE_BYTES + FACE_DIM * 4 + 16      # version + nonce + ciphertext + GCM tag
IDENTITY_PREFIX = "sealed:"
DEMO_KEY_FILE = Path(__file__).resolve().parents[1] / "testbed" / "demo-data.key"
_warned: set[str] = set()


def demo_key() -> DataKey:
    return DataKey.from_bytes(bytes.fromhex(DEMO_KEY_FILE.read_text().strip()))


def key_for(sealed_with: str, configured: DataKey | None, where: Path) -> DataKey:
    """The key that opens an index sealed with key id `sealed_with`: the configured one, else the
    public demo key when that is what sealed it and the index is a shipped testbed's (warned once per
    index). The demo key opens nothing else, configured or not: whoever sealed other data with it
    protected nothing, and an index is no testbed's because it says so."""
    demo = demo_key()
    if demo.key_id == sealed_with:
        if not is_shipped_testbed(where):
            raise CorruptData(f"{where}: its faces are sealed with the PUBLIC demo key of the testbeds, and it is "
                              "not a shipped testbed index: rebuild it with a data key of your own "
                              "(`python -m memguard.crypto FILE`)")
        if str(where) not in _warned:
            _warned.add(str(where))
            log.warning("%s: faces are sealed with the testbed's PUBLIC demo key: fine for the shipped "
                        "testbeds' sample photos, no protection for real biometric data", where)
        return demo
    if configured is not None and configured.key_id == sealed_with:
        return configured
    if configured is None:
        raise MissingResource(f"{where}: its face descriptors are sealed (key id {sealed_with}); configure that data "
                              "key (MEMGUARD_DATA_KEY or MEMGUARD_DATA_KEY_FILE) to open it")
    raise CorruptData(f"{where}: its faces are sealed with key id {sealed_with}, the configured key is "
                      f"{configured.key_id}: not the key this index was built with")


def _face_digests(manifest_path: Path) -> tuple | None:
    import json

    try:
        manifest = json.loads(manifest_path.read_text())
        face = manifest["signals"]["face"]
        return tuple(manifest["files"][name]["sha256"] for name in (face["vectors"], face["index"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_shipped_testbed(where: Path) -> bool:
    """An index inside the testbed package (its builds), or a copy of a shipped testbed index: its
    manifest records the same sealed face files (same sha256: an index of other faces never does)."""
    testbed = DEMO_KEY_FILE.parent
    where = Path(where).resolve()
    if where == testbed or testbed in where.parents:
        return True
    mine = _face_digests(where / "manifest.json")
    if mine is None:
        return False
    shipped = [testbed / "index" / "manifest.json", *sorted(testbed.glob("*/index/manifest.json"))]
    return any(_face_digests(m) == mine for m in shipped)


def seal_rows(key: DataKey, descriptors: np.ndarray, first_row: int) -> np.ndarray:
    """[N, FACE_DIM] float32 → [N, SEALED_ROW] uint8, row i bound to index row first_row + i."""
    d = np.ascontiguousarray(descriptors, dtype=np.float32).reshape(-1, FACE_DIM)
    out = np.empty((len(d), SEALED_ROW), np.uint8)
    for i, row in enumerate(d):
        out[i] = np.frombuffer(key.seal(row.tobytes(), f"index/face/{first_row + i}"), np.uint8)
    return out


def open_rows(key: DataKey, sealed: np.ndarray, first_row: int = 0) -> np.ndarray:
    """Inverse of seal_rows: [N, SEALED_ROW] uint8 → [N, FACE_DIM] float32."""
    sealed = np.asarray(sealed, np.uint8)
    if sealed.ndim != 2 or sealed.shape[1] != SEALED_ROW:
        raise CorruptData(f"sealed face rows: expected [N, {SEALED_ROW}] bytes, found {list(sealed.shape)}")
    out = np.empty((len(sealed), FACE_DIM), np.float32)
    for i, row in enumerate(sealed):
        out[i] = np.frombuffer(key.open(row.tobytes(), f"index/face/{first_row + i}"), np.float32)
    return out


def seal_identity(key: DataKey, face_row: int, name: str) -> str:
    return IDENTITY_PREFIX + base64.b64encode(key.seal(name.encode(), f"index/face/{face_row}/identity")).decode()


def open_identity(key: DataKey | None, face_row: int, stored: str) -> str:
    if not stored.startswith(IDENTITY_PREFIX):
        return stored                      # an index built before sealing (see `memguard index seal`)
    if key is None:
        raise MissingResource("items.sqlite: identity names are sealed; no data key to open them")
    return key.open(base64.b64decode(stored[len(IDENTITY_PREFIX):]), f"index/face/{face_row}/identity").decode()


def seal_faiss(key: DataKey, index) -> bytes:
    return key.seal(faiss.serialize_index(index).tobytes(), "index/face.faiss")


def open_faiss(key: DataKey, path: Path):
    if not path.is_file():
        raise CorruptData(f"{path}: missing")
    return faiss.deserialize_index(np.frombuffer(key.open(path.read_bytes(), "index/face.faiss"), np.uint8))


def seal_index(directory: Path, key: DataKey) -> dict:
    """Seal the faces of an index built before sealing existed, in place (run it while no server
    has the index open; keep a copy until it reports). items.sqlite is rewritten with VACUUM INTO,
    so no page of the old file with a plaintext name survives in the new one."""
    import os
    import sqlite3
    from dataclasses import replace

    from memguard.index.manifest import check_files, read_manifest, record_files, write_manifest
    from memguard.index.vectors import PRIVATE, read_array, read_faiss, write_array, write_bytes

    directory = Path(directory)
    manifest = read_manifest(directory)
    check_files(directory, manifest)
    info = manifest.signals.get("face")
    if info is None:
        return {"sealed": 0, "note": "the index holds no face signal"}
    if info.backend.get("sealed"):
        return {"sealed": 0, "note": f"already sealed (key id {info.backend['sealed']})"}
    vectors = np.array(read_array(directory / info.vectors, dtype=np.float32))
    index = read_faiss(directory / info.index)
    items = directory / "items.sqlite"
    work, fresh = directory / ".items.seal.sqlite", directory / ".items.sealed.sqlite"
    for p in (work, fresh):
        p.unlink(missing_ok=True)
    conn = sqlite3.connect(work)
    try:
        with sqlite3.connect(f"file:{items}?mode=ro", uri=True) as src:
            src.backup(conn)
        conn.execute("PRAGMA secure_delete=ON")
        rows = conn.execute("SELECT row, identity FROM faces").fetchall()
        conn.executemany("UPDATE faces SET identity = ? WHERE row = ?",
                         [(seal_identity(key, r, ident), r) for r, ident in rows if not ident.startswith(IDENTITY_PREFIX)])
        conn.commit()
        conn.execute("VACUUM INTO ?", (str(fresh),))
    finally:
        conn.close()
        work.unlink(missing_ok=True)
    os.chmod(fresh, PRIVATE)
    write_array(directory / info.vectors, seal_rows(key, vectors, 0))
    write_bytes(directory / info.index, seal_faiss(key, index))
    os.replace(fresh, items)
    sealed_info = replace(info, backend={**info.backend, "sealed": key.key_id})
    names = sorted(set(manifest.files) | {"items.sqlite", *info.files})
    write_manifest(directory, replace(manifest, signals={**manifest.signals, "face": sealed_info},
                                      files=record_files(directory, names)))
    return {"sealed": len(vectors), "identities": len(rows), "key_id": key.key_id}
