"""Builds: counts, skipped inputs, resumption, the three kinds of source, stats and verify."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from memguard.errors import InvalidInput
from memguard.index.api import FingerprintIndex
from memguard.index.config import IndexConfig
from memguard.index.sources import EmbeddingSource, ImageFolderSource, TarShardSource
from memguard.testbed.dataset import write_image_folder

from tests.index.conftest import on


def test_stats_and_verify_of_a_fresh_build(index, items, backend):
    stats = index.stats()
    assert stats["counts"]["items"] == len(items)
    assert stats["counts"]["faces"] >= 2          # astronaut and grace hopper
    assert stats["signals"]["latent"]["dim"] == 256 and stats["signals"]["latent"]["count"] == len(items)
    assert stats["signals"]["latent"]["factory"] == ("Flat" if backend == "faiss" else "milvus:FLAT")
    assert stats["signals"]["latent"]["backend"]["kind"] == ("faiss" if backend == "faiss" else "milvus")
    assert stats["signals"]["pdq"]["dim"] == 256 and stats["signals"]["face"]["dim"] == 128
    assert stats["thresholds"]["calibrated"] is False
    assert index.verify()["ok"]
    json.dumps(stats)   # CLI --json needs it serialisable


def test_stored_fingerprints_are_the_encoder_output(index, items):
    enc = index.latent_encoder()
    rows = [index.items.row_of(items[i].item_id) for i in (0, 7, len(items) - 1)]
    expected = enc.encode([items[i].image for i in (0, 7, len(items) - 1)])
    # batch composition changes float summation order in the VAE: agreement to 1e-4, not bitwise
    np.testing.assert_allclose(index.signals["latent"].vectors[rows], expected, atol=1e-4)
    meta = index.items.item(rows[-1])
    assert meta["caption"] == items[-1].caption and meta["meta"]["kind"] == "photo"


def test_unreadable_inputs_are_skipped_counted_and_listed(tmp_path, items, vae_dir, backend):
    folder = write_image_folder(items[:12], tmp_path / "imgs")
    (folder / items[3].item_id).with_suffix(".png").write_bytes(b"\x89PNG broken")
    (folder / items[5].item_id).with_suffix(".png").unlink()
    with open(folder / "captions.jsonl", "a") as f:
        f.write("{this is not json\n")
        f.write(json.dumps({"file": f"{items[0].item_id}.png", "item_id": items[0].item_id}) + "\n")
    report = FingerprintIndex.build(tmp_path / "ix", ImageFolderSource(folder), model_dir=vae_dir,
                                    cfg=on(backend, IndexConfig(faces=False)), progress=False)
    assert report.finished and report.items == 10 and report.skipped == 4
    errors = " | ".join(s["error"] for s in report.skipped_examples)
    for expected in ("not a recognised image", "image missing", "bad captions line", "duplicate item_id"):
        assert expected in errors
    with FingerprintIndex.open(tmp_path / "ix") as ix:
        assert ix.stats()["counts"]["skipped"] == 4 and ix.items.skipped()[0]["ref"].endswith(".png")


def test_a_resumed_build_equals_a_one_shot_build(tmp_path, image_folder, built_index, vae_dir, backend):
    out = tmp_path / "resumed"
    cfg = on(backend, IndexConfig(batch_size=16))
    first = FingerprintIndex.build(out, ImageFolderSource(image_folder), model_dir=vae_dir, cfg=cfg,
                                   progress=False, stop_after=21)
    assert not first.finished and first.items == 21
    # a crash after appending vectors but before the checkpoint leaves extra bytes: they are dropped
    with open(out / ".build" / "latent.raw", "ab") as f:
        f.write(b"\0" * 1024)
    second = FingerprintIndex.build(out, ImageFolderSource(image_folder), model_dir=vae_dir, cfg=cfg, progress=False)
    assert second.finished and second.resumed_from == 21
    with FingerprintIndex.open(out) as a, FingerprintIndex.open(built_index) as b:
        for name in ("pdq", "face"):
            np.testing.assert_array_equal(a.signals[name].vectors[:], b.signals[name].vectors[:])
        np.testing.assert_allclose(a.signals["latent"].vectors[:], b.signals["latent"].vectors[:], atol=1e-4)
        assert a.items.ids_of_rows(list(range(70))) == b.items.ids_of_rows(list(range(70)))
        assert a.verify()["ok"]


def test_a_built_directory_is_not_overwritten(built_index, image_folder, vae_dir):
    with pytest.raises(InvalidInput, match="already holds a built index"):
        FingerprintIndex.build(built_index, ImageFolderSource(image_folder), model_dir=vae_dir, progress=False)


def test_image_builds_need_the_vae(tmp_path, image_folder):
    with pytest.raises(InvalidInput) as err:
        FingerprintIndex.build(tmp_path / "x", ImageFolderSource(image_folder), progress=False)
    assert err.value.field == "model"


def _tar(path, items, broken=False):
    with tarfile.open(path, "w") as tar:
        for item in items:
            buf = io.BytesIO()
            Image.fromarray(item.image).save(buf, "PNG")
            members = {"png": buf.getvalue(), "txt": item.caption.encode(),
                       "json": json.dumps({"licence": "cc-by", "consent": True}).encode()}
            if broken and item is items[1]:
                members["png"] = b"not an image"
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{item.item_id}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_shards_give_the_same_fingerprints(tmp_path, items, built_index, vae_dir, backend):
    shards = [_tar(tmp_path / "a.tar", items[:5]), _tar(tmp_path / "b.tar", items[5:9], broken=True)]
    report = FingerprintIndex.build(tmp_path / "ix", TarShardSource(shards), model_dir=vae_dir,
                                    cfg=on(backend, IndexConfig(faces=False)), progress=False)
    assert report.items == 8 and report.skipped == 1 and "b.tar" in report.skipped_examples[0]["ref"]
    with FingerprintIndex.open(tmp_path / "ix") as ix, FingerprintIndex.open(built_index) as ref:
        for item in items[:5]:
            a = ix.signals["latent"].vectors[ix.items.row_of(item.item_id)]
            b = ref.signals["latent"].vectors[ref.items.row_of(item.item_id)]
            np.testing.assert_allclose(a, b, atol=1e-4)
        meta = ix.items.item(ix.items.row_of(items[0].item_id))
        assert meta["caption"] == items[0].caption and meta["meta"] == {"licence": "cc-by", "consent": True}


def test_precomputed_embeddings_npy_and_parquet(tmp_path, backend):
    rng = np.random.default_rng(5)
    vecs = rng.standard_normal((300, 48)).astype(np.float32)
    vecs[7] = 0.0                                   # an unusable row: skipped and listed
    np.save(tmp_path / "e.npy", vecs)
    with open(tmp_path / "e.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"key": f"laion-{i}", "caption": f"cap {i}", "url": f"http://x/{i}.jpg"}) + "\n")
    report = FingerprintIndex.build(tmp_path / "npy", EmbeddingSource(tmp_path / "e.npy", "clip", tmp_path / "e.jsonl"),
                                    cfg=on(backend), progress=False)
    assert report.items == 299 and report.skipped == 1
    with FingerprintIndex.open(tmp_path / "npy") as ix:
        assert set(ix.signals) == {"clip"}
        hits = ix.search_signal("clip", vecs[42] / np.linalg.norm(vecs[42]), 3)
        assert ix.items.item(hits[0]["row"])["item_id"] == "laion-42"
        assert ix.items.item(hits[0]["row"])["source"] == "http://x/42.jpg"
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)

    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"key": [f"p-{i}" for i in range(300)], "caption": ["c"] * 300,
                      "embedding": [v.tolist() for v in vecs]})
    pq.write_table(table, tmp_path / "e.parquet")
    report = FingerprintIndex.build(tmp_path / "pq", EmbeddingSource(tmp_path / "e.parquet", "clip"), cfg=on(backend),
                                    progress=False)
    assert report.items == 299
    with FingerprintIndex.open(tmp_path / "pq") as ix, FingerprintIndex.open(tmp_path / "npy") as ref:
        np.testing.assert_allclose(ref.signals["clip"].vectors[:], ix.signals["clip"].vectors[:], atol=1e-6)
