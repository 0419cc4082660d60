"""The protected registry on both stores (SQLite in the index directory, a real PostgreSQL server):
a failed reload is retried, protect is idempotent, faces are sealed at rest and erased on unprotect."""
from __future__ import annotations

import stat
import time
import uuid

import numpy as np
import pytest

from memguard.errors import InvalidInput
from tests.index.conftest import assert_opens_only_with_its_key
from memguard.index.api import FingerprintIndex

STORES = ("sqlite", "postgresql")


@pytest.fixture
def index_dir(faiss_index_dir):
    """The registry does not depend on the vector backend: the faiss-built index is enough."""
    return faiss_index_dir


@pytest.fixture(params=STORES)
def registry(request) -> str:
    """A registry URI: "sqlite" (the index's own file) or a fresh database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return "sqlite"
    postgres = request.getfixturevalue("postgres")
    return postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")


def _vec(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(256).astype(np.float32)
    return v / np.linalg.norm(v)


def test_a_failed_reload_is_retried_and_never_leaves_a_protection_unenforced(index_dir, registry):
    """Issue 14 ★: the version used to be recorded before the reload, so after one failed reload the
    reader kept its stale snapshot for good."""
    rng = np.random.default_rng(0)
    with FingerprintIndex.open(index_dir, registry=registry) as reader, \
            FingerprintIndex.open(index_dir, registry=registry) as writer:
        reader.snapshot()
        real_active, failures = reader.registry.active, []

        def active_failing_once():
            if not failures:
                failures.append(1)
                raise OSError("injected: the registry read failed")
            return real_active()

        reader.registry.active = active_failing_once
        receipt = writer.protect_vectors("takedown", item_id="reload-1", latent=_vec(rng))
        deadline = time.monotonic() + 2.0
        while not failures and time.monotonic() < deadline:   # PostgreSQL: until the notification arrives
            try:
                reader.snapshot()
            except Exception:   # noqa: BLE001 - the injected failure, checked below
                break
            time.sleep(0.01)
        assert failures, "the reload was never attempted"
        assert reader.is_protected("reload-1")          # the next call reloads
        assert receipt.pid in reader.snapshot().protections


def test_the_same_idempotency_key_returns_the_original_receipt(index_dir, registry):
    rng = np.random.default_rng(1)
    vec = _vec(rng)
    with FingerprintIndex.open(index_dir, registry=registry) as index:
        first = index.protect_vectors("takedown #3", item_id="idem-1", idempotency_key="req-42", latent=vec)
        again = index.protect_vectors("takedown #3", item_id="idem-1", idempotency_key="req-42", latent=vec)
        assert not first.replayed and again.replayed
        assert (again.pid, again.seq, again.vectors, again.subject) == (first.pid, first.seq, 1, "idem-1")
        with pytest.raises(InvalidInput) as err:
            index.protect_vectors("takedown #3", item_id="idem-1", idempotency_key="req-42", latent=_vec(rng))
        assert err.value.field == "idempotency_key"
        with pytest.raises(InvalidInput) as err:
            index.protect_vectors("x", idempotency_key="has spaces", latent=vec)
        assert err.value.field == "idempotency_key"
        # no key: the same content and subject while protected is the same protection
        assert index.protect_vectors("retry", item_id="idem-1", latent=vec).pid == first.pid
        other = index.protect_vectors("another item", item_id="idem-2", latent=vec)
        assert other.pid != first.pid and not other.replayed
        assert index.registry.counts()["protected_images"] == 2
        assert index.snapshot().count("latent") == 2
        assert [m["op"] for m in index.registry.mutations()] == ["protect", "protect"]


def test_protect_image_twice_without_a_key_stores_one_protection(index_dir, registry, heldout):
    with FingerprintIndex.open(index_dir, registry=registry) as index:
        first = index.protect_image(heldout[5].image, reason="takedown")
        again = index.protect_image(heldout[5].image.copy(), reason="client retry after a timeout")
        assert again.replayed and again.pid == first.pid and again.vectors == first.vectors
        assert index.registry.counts()["protected_images"] == 1


def _protected_face(index, full_photo, identity: str):
    full = full_photo("astronaut")
    receipt = index.protect_face([np.ascontiguousarray(full[0:300, 100:400])], identity=identity, reason="opt-out")
    descriptor = index.snapshot().vectors["face"][0]
    return receipt, descriptor


def _index_files(index_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(index_dir.iterdir()) if p.is_file()}


def test_face_descriptors_and_names_are_sealed_at_rest(index_dir, full_photo, monkeypatch):
    identity = f"person-{uuid.uuid4().hex[:8]}"
    with FingerprintIndex.open(index_dir) as index:
        receipt, descriptor = _protected_face(index, full_photo, identity)
        assert receipt.subject == identity
        for name, data in _index_files(index_dir).items():   # registry.sqlite and its -wal included
            assert descriptor.tobytes() not in data, name
            assert identity.encode() not in data, name
        assert identity not in str(index.registry.mutations())
    for name in ("registry.sqlite", "registry.sqlite-wal"):
        path = index_dir / name
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, name
    assert_opens_only_with_its_key(index_dir, monkeypatch, missing="MEMGUARD_DATA_KEY", wrong="cannot decrypt|not the key")


def test_a_new_registry_is_created_0600(index_dir):
    mode = stat.S_IMODE((index_dir / "registry.sqlite").stat().st_mode)   # copied with its mode
    assert mode & 0o077 == 0, oct(mode)


def test_unprotecting_a_face_erases_it_from_every_file(index_dir, full_photo):
    identity = f"erase-{uuid.uuid4().hex[:8]}"
    with FingerprintIndex.open(index_dir) as index:
        receipt, descriptor = _protected_face(index, full_photo, identity)
        sealed = [bytes(v) for (v,) in index.registry._conn.execute(
            "SELECT vec FROM protected_vectors WHERE pid = ?", (receipt.pid,))]
        sealed += [bytes(v) for (v,) in index.registry._conn.execute(
            "SELECT subject_enc FROM protections WHERE pid = ?", (receipt.pid,))]
        assert len(sealed) == 2 and all(len(s) > 28 for s in sealed)
        files = _index_files(index_dir)
        assert any(s in data for s in sealed for data in files.values())   # the probe can see them
        assert index.unprotect(identity, reason="GDPR Art. 17 erasure") == [receipt.pid]
        assert index.snapshot().count("face") == 0
        files = _index_files(index_dir)
        for name, data in files.items():
            for needle in [descriptor.tobytes(), identity.encode(), *sealed]:
                assert needle not in data, (name, needle[:8])
        log = index.registry.mutations()
        assert [m["op"] for m in log[:2]] == ["unprotect", "protect"]
        assert all(m["subject"].startswith("hmac:") and identity not in str(m) for m in log[:2])
    assert sum(len(d) for n, d in files.items() if n.endswith("-wal")) == 0   # the WAL was truncated


def test_postgres_stores_faces_sealed_and_erases_them(index_dir, full_photo, postgres):
    import psycopg

    uri = postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
    identity = f"pg-person-{uuid.uuid4().hex[:8]}"
    with FingerprintIndex.open(index_dir, registry=uri) as index:
        receipt, descriptor = _protected_face(index, full_photo, identity)
        with psycopg.connect(uri) as conn:
            dump = repr(conn.execute("SELECT * FROM protections").fetchall()
                        + conn.execute("SELECT * FROM protected_vectors").fetchall()
                        + conn.execute("SELECT * FROM mutations").fetchall())
            raw = b"".join(bytes(v) for (v,) in conn.execute("SELECT vec FROM protected_vectors"))
        assert identity not in dump and descriptor.tobytes() not in raw and raw
        index.unprotect(identity, reason="erasure")
        with psycopg.connect(uri) as conn:
            assert conn.execute("SELECT count(*) FROM protected_vectors").fetchone()[0] == 0
            assert conn.execute("SELECT subject_enc FROM protections").fetchall() == [(None,)]


def test_protections_reach_another_instance_within_a_second(index_dir, postgres):
    uri = postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
    rng = np.random.default_rng(2)
    with FingerprintIndex.open(index_dir, registry=uri) as a, FingerprintIndex.open(index_dir, registry=uri) as b:
        for i in range(5):
            receipt = a.protect_vectors("takedown", item_id=f"prop-{i}", latent=_vec(rng))
            t0 = time.monotonic()
            while not b.is_protected(f"prop-{i}"):
                assert time.monotonic() - t0 < 1.0, f"protection {receipt.pid} not seen within 1 s"
                time.sleep(0.005)
        a.unprotect("prop-0", "lifted")
        t0 = time.monotonic()
        while b.is_protected("prop-0"):
            assert time.monotonic() - t0 < 1.0
            time.sleep(0.005)


def test_an_unreachable_postgres_fails_closed_and_recovers(index_dir, heldout, postgres):
    from memguard.errors import RegistryUnavailable

    uri = postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
    rng = np.random.default_rng(3)
    with FingerprintIndex.open(index_dir, registry=uri) as index:
        receipt = index.protect_vectors("takedown", item_id="down-1", latent=_vec(rng))
        assert index.is_protected("down-1") and index.registry_available()
        postgres.kill()   # the session's server: restarted below
        try:
            t0 = time.monotonic()
            while index.registry_available():
                assert time.monotonic() - t0 < 1.5, "still serving from a registry out of contact"
                time.sleep(0.02)
            with pytest.raises(RegistryUnavailable):
                index.screen(heldout[7].image)
            with pytest.raises(RegistryUnavailable):
                index.is_protected("down-1")
            with pytest.raises(RegistryUnavailable):
                index.protect_vectors("while down", item_id="down-2", latent=_vec(rng))
            assert index.registry.errors >= 1
        finally:
            postgres.restart()
        t0 = time.monotonic()
        while not index.registry_available():
            assert time.monotonic() - t0 < 15, "did not reconnect"
            time.sleep(0.05)
        assert index.is_protected("down-1") and receipt.pid in index.snapshot().protections
        assert not index.is_protected("down-2")
