"""The vector-collection interface on both backends: add, search, remove, count, describe; URIs;
approximate structures against exact search; PDQ's Hamming distances in Milvus's ±1 encoding."""
import numpy as np
import pytest

from memguard.errors import InvalidInput
from memguard.index.api import FingerprintIndex
from memguard.index.backends import parse_backend
from memguard.index.config import IndexConfig
from memguard.index.sources import EmbeddingSource
from memguard.index.vectors import hamming, normalize_rows
from tests.index.conftest import on


def _clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = normalize_rows(rng.standard_normal((20, dim)))
    return normalize_rows(centres[rng.integers(0, 20, n)] + 0.3 * rng.standard_normal((n, dim)) / 8)


def _embedding_index(tmp_path, vectors: np.ndarray, cfg: IndexConfig) -> FingerprintIndex:
    np.save(tmp_path / "e.npy", vectors)
    FingerprintIndex.build(tmp_path / "ix", EmbeddingSource(tmp_path / "e.npy", "clip"), cfg=cfg, progress=False)
    return FingerprintIndex.open(tmp_path / "ix")


def test_uris_name_the_backend_and_bad_ones_the_field(tmp_path):
    assert parse_backend("faiss").kind == "faiss"
    assert parse_backend("milvus://db.internal:19530").uri == "http://db.internal:19530"
    assert parse_backend("https://milvus.example:443/").uri == "https://milvus.example:443"
    lite = parse_backend(str(tmp_path / "vectors.db"))
    assert lite.kind == "milvus" and lite.lite_file and lite.uri.endswith("vectors.db")
    for bad in ("", "milvus://nohost", "postgresql://x", "vectors.sqlite"):
        with pytest.raises(InvalidInput) as err:
            parse_backend(bad)
        assert err.value.field == "backend"
    from memguard.index.backends.milvus_store import index_spec
    with pytest.raises(InvalidInput) as err:
        index_spec("latent", 10, 8, IndexConfig(milvus_index="DISKANN"))
    assert err.value.field == "milvus_index"


def test_add_search_remove_count_describe(tmp_path, backend):
    data = _clustered(600, 48, 0)
    with _embedding_index(tmp_path, data[:500], on(backend)) as ix:
        col = ix.signals["clip"].collection
        assert col.count() == 500 and col.describe()["count"] == 500
        assert col.describe()["kind"] == ("faiss" if backend == "faiss" else "milvus")
        col.add(np.arange(500, 600), data[500:], [f"new-{i}" for i in range(100)], [{}] * 100)
        assert col.count() == 600
        rows, scores, vecs = col.search(data[[550, 10]], 3)
        assert rows[:, 0].tolist() == [550, 10] and scores[:, 0] == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(vecs[:, 0], data[[550, 10]], atol=1e-6)
        np.testing.assert_allclose(col.fetch(np.array([599, 3])), data[[599, 3]], atol=1e-6)
        assert col.remove(np.array([550, 10, 10_000])) == 2
        assert col.count() == 598
        rows, _, _ = col.search(data[[550, 10]], 3)
        assert 550 not in rows and 10 not in rows


def test_approximate_structures_return_exact_scores_and_high_recall(tmp_path, backend):
    """Above exact_max_items the default structure is approximate on both backends (faiss IVF-PQ with
    re-rank, Milvus HNSW); scores are exact cosines of the returned rows all the same."""
    data = _clustered(4000, 64, 1)
    cfg = on(backend, IndexConfig(exact_max_items=100, nprobe=32, rerank_factor=30, hnsw_ef=64))
    with _embedding_index(tmp_path, data, cfg) as ix:
        sig = ix.signals["clip"]
        assert not sig.exact and sig.info.factory != "Flat"
        rng = np.random.default_rng(2)
        queries = normalize_rows(data[:50] + 0.05 * rng.standard_normal((50, 64)) / 8)
        rows, scores = sig.search(queries, 10)
        np.testing.assert_allclose(scores, np.einsum("bd,bkd->bk", queries, data[rows]), atol=1e-5)
        truth = np.argsort(-(queries @ data.T), axis=1)[:, :10]
        recall = np.mean([len(set(r) & set(t)) / 10 for r, t in zip(rows, truth)])
        assert recall > 0.9 and np.mean(rows[:, 0] == np.arange(50)) > 0.9


def test_pdq_hamming_distances_are_exact_on_both_backends(index, items):
    """Milvus holds PDQ as ±1 floats under inner product; distances must equal packed-bit Hamming."""
    sig = index.signals["pdq"]
    codes = np.asarray(sig.vectors[:], np.uint8)
    query = codes[5].copy()
    query[:4] ^= 0b1011          # flip 12 bits
    rows, scores = sig.search(query[None], 6)
    expected = hamming(query[None], codes)[0]
    assert rows[0, 0] == 5 and scores[0, 0] == 12
    np.testing.assert_array_equal(scores[0], expected[rows[0]])
    assert np.all(np.diff(scores[0]) >= 0)


def test_a_milvus_lite_file_backs_an_index_in_process(tmp_path):
    """The single-host demo: a milvus-lite .db file instead of a server."""
    data = _clustered(300, 32, 3)
    with _embedding_index(tmp_path, data, on(str(tmp_path / "vectors.db"))) as ix:
        hits = ix.search_signal("clip", data[42], 3)
        assert ix.items.item(hits[0]["row"])["item_id"] == "emb-000000042" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert ix.stats()["signals"]["clip"]["backend"]["uri"].endswith("vectors.db")


def test_an_index_reopens_on_another_address_of_its_milvus(built_index, backend, monkeypatch):
    """$MEMGUARD_MILVUS_URI (deployments) or open(backend=…) redirect Milvus-backed signals only."""
    from memguard.index.backends import ENV_MILVUS_URI
    monkeypatch.setenv(ENV_MILVUS_URI, "not-a-uri")
    if backend == "faiss":
        FingerprintIndex.open(built_index, verify_checksums=False).close()   # faiss files: not consulted
        return
    with pytest.raises(InvalidInput) as err:
        FingerprintIndex.open(built_index, verify_checksums=False)
    assert err.value.field == ENV_MILVUS_URI
    monkeypatch.setenv(ENV_MILVUS_URI, backend.replace("http://", "milvus://"))
    with FingerprintIndex.open(built_index, verify_checksums=False) as ix:
        assert ix.signals["latent"].collection.backend.uri == backend


def test_milvus_lite_builds_with_the_parameters_the_manifest_records(tmp_path):
    """milvus-lite reads build parameters only from the JSON "params" key: the backend sends them there
    too, so the engine's own record of each collection's index matches the manifest."""
    import json

    from memguard.index.backends.lite_server import start_lite_server
    server = start_lite_server(tmp_path / "lite")
    try:
        data = _clustered(2000, 32, 5)
        cfg = on(server.uri, IndexConfig(exact_max_items=100, hnsw_m=24, hnsw_ef_construction=64))
        with _embedding_index(tmp_path, data, cfg) as ix:
            backend = ix.stats()["signals"]["clip"]["backend"]
        assert backend["index_type"] == "HNSW"
        assert backend["build_params"] == {"M": 24, "efConstruction": 64}
        manifest = tmp_path / "lite" / "db" / "collections" / backend["collection"] / "manifest.json"
        specs = json.loads(manifest.read_text())["index_specs"]
        assert [s["build_params"] for s in specs.values()] == [{"M": 24, "efConstruction": 64}], specs
    finally:
        server.stop()
