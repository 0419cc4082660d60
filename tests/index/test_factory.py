import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memguard.errors import InvalidInput
from memguard.index import factory as fx
from memguard.index.calibrate import pick_threshold
from memguard.index.config import IndexConfig, crosses
from memguard.index.manifest import SignalInfo
from memguard.index.signals import SignalIndex
from memguard.index.vectors import normalize_rows, write_array, write_faiss


def test_small_collections_are_exact_large_ones_a_graph():
    cfg = IndexConfig(exact_max_items=1000)
    assert fx.choose_factory(1000, 256, cfg) == "Flat"
    assert fx.choose_factory(1_000_000, 256, cfg) == "HNSW32,Flat"
    assert fx.ivf_pq_factory(1_000_000, 256) == "IVF4096,PQ128x4fs"
    nlist = int(fx.ivf_pq_factory(5000, 256).split(",")[0][3:])
    assert nlist * fx.MIN_TRAIN_PER_LIST <= 5000 and nlist & (nlist - 1) == 0


def test_override_wins_and_bad_strings_name_the_field():
    cfg = IndexConfig(factory="HNSW16,Flat")
    assert fx.choose_factory(10, 64, cfg) == "HNSW16,Flat"
    assert fx.choose_factory(10, 64, cfg, override="IVF4,Flat") == "IVF4,Flat"
    with pytest.raises(InvalidInput) as err:
        fx.make_index("IVF,Nonsense99", 64, "factory")
    assert err.value.field == "factory"
    with pytest.raises(InvalidInput):
        fx.make_index("IDMap2,IVF16,PQ8", 64)


def test_approximate_index_returns_exact_reranked_cosines(tmp_path):
    rng = np.random.default_rng(1)
    centres = normalize_rows(rng.standard_normal((20, 64)))
    data = normalize_rows(centres[rng.integers(0, 20, 4000)] + 0.3 * rng.standard_normal((4000, 64)) / 8)
    cfg = IndexConfig(exact_max_items=100, nprobe=8, rerank_factor=10)
    factory = fx.ivf_pq_factory(len(data), 64)
    assert not fx.is_exact(factory)
    index = fx.build_float_index(data, factory, cfg)
    write_array(tmp_path / "v.npy", data)
    write_faiss(tmp_path / "v.faiss", index)
    sig = SignalIndex("latent", SignalInfo(64, len(data), factory, "v.npy", "v.faiss"), tmp_path, cfg)
    queries = normalize_rows(data[:50] + 0.05 * rng.standard_normal((50, 64)) / 8)
    rows, scores = sig.search(queries, 5)
    assert rows.shape == (50, 5)
    np.testing.assert_allclose(scores, np.einsum("bd,bkd->bk", queries, data[rows]), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    assert np.mean(rows[:, 0] == np.arange(50)) > 0.9      # near-copies find their source
    # scanning every list and re-ranking enough candidates gives exactly the exact top-k
    truth = faiss.IndexFlatIP(64)
    truth.add(data)
    exact_scores = truth.search(queries, 5)[0]
    full = SignalIndex("latent", sig.info, tmp_path, IndexConfig(nprobe=10_000, rerank_factor=400))
    np.testing.assert_allclose(full.search(queries, 5)[1], exact_scores, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=1, max_size=300),
       st.floats(0.001, 0.5), st.sampled_from(["latent", "face"]))
def test_picked_threshold_meets_the_false_match_rate_and_is_tight(values, fmr, signal):
    neg = np.asarray(values, np.float32)
    t, limited = pick_threshold(signal, neg, fmr)
    crossing = sum(crosses(signal, float(v), t) for v in neg)
    allowed = int(np.floor(fmr * len(neg) + 1e-9))
    assert crossing <= allowed
    assert limited == (fmr * len(neg) < 1)
    # one step less strict would let the next negative through
    ranked = np.sort(neg)[::-1] if signal == "latent" else np.sort(neg)
    assert crosses(signal, float(ranked[allowed]), float(ranked[allowed]))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 256), min_size=1, max_size=200), st.floats(0.001, 0.5))
def test_pdq_threshold_is_an_integer_bound(values, fmr):
    t, _ = pick_threshold("pdq", np.asarray(values, np.float32), fmr)
    assert t == int(t)
    assert sum(v <= t for v in values) <= int(np.floor(fmr * len(values) + 1e-9))
