"""Issue 29, findings 5 and 9 on the real registry stores: a protection's free-text reason is sealed
with the data key and erased with the protection (SQLite files, PostgreSQL rows); the testbeds'
public demo key opens only their indexes, the registry refuses to seal with it, and key files that
others can read are warned about."""
from __future__ import annotations

import base64
import json
import logging
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

from memguard.crypto import DEMO_KEY_FILE, DataKey
from memguard.errors import CorruptData, InvalidInput
from memguard.index.api import FingerprintIndex
from memguard.index.registry import open_registry
from memguard.index.sealed import demo_key, is_shipped_testbed, key_for

REASON_WORD = "Quixotebury"        # a word no index file holds by chance


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _protect_face(index, full_photo, identity: str, reason: str):
    full = full_photo("astronaut")
    return index.protect_face([np.ascontiguousarray(full[0:300, 100:400])], identity=identity, reason=reason)


def test_a_reason_is_sealed_at_rest_and_erased_with_its_protection(faiss_index_dir, full_photo, heldout):
    identity = f"person-{uuid.uuid4().hex[:8]}"
    face_reason = f"erasure request by {REASON_WORD} (ticket 12)"
    image_reason = f"takedown for {REASON_WORD}'s photo"
    with FingerprintIndex.open(faiss_index_dir) as index:
        face = _protect_face(index, full_photo, identity, face_reason)
        image = index.protect_image(heldout[3].image, reason=image_reason)
        stored = [r for (r,) in index.registry._conn.execute("SELECT reason FROM protections")]
        assert all(r.startswith("sealed:") for r in stored)
        for name, data in _files(faiss_index_dir).items():
            assert REASON_WORD.encode() not in data, name
        assert {m["reason"] for m in index.registry.mutations()} == {face_reason, image_reason}   # with the key
        sealed = [base64.b64decode(r[len("sealed:"):]) for r in stored]
        index.unprotect(identity, reason="done")
        index.unprotect(image.pid, reason="done")
        files = _files(faiss_index_dir)
        for name, data in files.items():
            assert REASON_WORD.encode() not in data, name
            assert not any(s in data for s in sealed), name           # no old page keeps the sealed reason
        log = index.registry.mutations()
        assert {m["reason"] for m in log if m["op"] == "protect" and m["pid"] in (face.pid, image.pid)} == {""}
        assert {m["reason"] for m in log if m["op"] == "unprotect"} == {"done"}


def test_postgres_seals_and_erases_the_reason(faiss_index_dir, full_photo, postgres):
    import psycopg

    uri = postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
    identity = f"pg-person-{uuid.uuid4().hex[:8]}"
    with FingerprintIndex.open(faiss_index_dir, registry=uri) as index:
        _protect_face(index, full_photo, identity, f"opt-out of {REASON_WORD}")
        with psycopg.connect(uri) as conn:
            dump = repr(conn.execute("SELECT * FROM protections").fetchall()
                        + conn.execute("SELECT * FROM mutations").fetchall())
        assert REASON_WORD not in dump and "sealed:" in dump
        index.unprotect(identity, reason="erasure")
        with psycopg.connect(uri) as conn:
            assert conn.execute("SELECT reason FROM protections").fetchall() == [("",)]
            assert conn.execute("SELECT reason FROM mutations WHERE op = 'protect'").fetchall() == [("",)]


def test_the_demo_key_seals_nothing_in_the_registry(tmp_path):
    registry = open_registry(f"sqlite://{tmp_path / 'registry.sqlite'}", tmp_path, key=demo_key())
    try:
        with pytest.raises(InvalidInput, match="PUBLIC demo key"):
            registry.add("image", None, "takedown", [("pdq", np.zeros(32, np.uint8), None)])
    finally:
        registry.close()


def test_the_demo_key_opens_only_the_shipped_testbeds(tmp_path):
    demo = demo_key()
    shipped = DEMO_KEY_FILE.parent / "index"
    if not (shipped / "manifest.json").is_file():
        pytest.skip("the shipped testbed index is not built here")
    assert is_shipped_testbed(shipped) and key_for(demo.key_id, None, shipped).key_id == demo.key_id
    copy = Path(shutil.copytree(shipped, tmp_path / "copy", ignore=shutil.ignore_patterns("*.faiss", "*.npy")))
    assert is_shipped_testbed(copy)                                  # a copy of the testbed (tests, demos)
    other = tmp_path / "production"
    other.mkdir()
    manifest = json.loads((shipped / "manifest.json").read_text())
    manifest["files"][manifest["signals"]["face"]["vectors"]]["sha256"] = "0" * 64   # other faces
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert not is_shipped_testbed(other)
    for configured in (None, demo, DataKey.from_bytes(b"\x01" * 32)):
        with pytest.raises(CorruptData, match="PUBLIC demo key"):
            key_for(demo.key_id, configured, other)


def test_the_demo_key_and_readable_key_files_are_warned_about(tmp_path, monkeypatch, caplog):
    demo_copy = tmp_path / "demo.key"
    demo_copy.write_text(DEMO_KEY_FILE.read_text())
    demo_copy.chmod(0o600)
    mine = tmp_path / "mine.key"
    mine.write_text("ab" * 32 + "\n")
    mine.chmod(0o644)
    monkeypatch.delenv("MEMGUARD_DATA_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="memguard.crypto"):
        monkeypatch.setenv("MEMGUARD_DATA_KEY_FILE", str(demo_copy))
        assert DataKey.resolve().is_demo
        monkeypatch.setenv("MEMGUARD_DATA_KEY_FILE", str(mine))
        assert not DataKey.resolve().is_demo
    assert "PUBLIC demo data key" in caplog.text
    assert f"{mine} is readable by others" in caplog.text
    assert f"{demo_copy} is readable" not in caplog.text
