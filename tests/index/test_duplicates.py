"""Duplicate clusters: identical images fold at build time, near copies join in the index."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memguard.index.api import FingerprintIndex
from memguard.index.config import IndexConfig
from memguard.index.duplicates import DedupedSource, content_key, find_clusters
from memguard.index.sources import ImageFolderSource
from memguard.testbed.dataset import TestbedDataConfig, build_training_set, memorized_items, write_image_folder
from memguard.testbed.registry import TESTBEDS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dup_index(vae_dir, tmp_path_factory):
    """40 procedural images, 8 photos × 5 copies, and a JPEG re-encoding of one photo under another id."""
    tmp = tmp_path_factory.mktemp("dups")
    items = build_training_set(TestbedDataConfig(num_procedural=40, photo_duplicates=5))
    folder = write_image_folder(items, tmp / "images", copies=True)
    coffee = next(i for i in items if i.item_id == "photo-coffee")
    Image.fromarray(coffee.image).save(folder / "near.jpg", quality=92)
    with open(folder / "captions.jsonl", "a") as f:
        f.write(json.dumps({"file": "near.jpg", "caption": "espresso cup, re-encoded", "item_id": "near-coffee"}) + "\n")
    source = DedupedSource(ImageFolderSource(folder))
    out = tmp / "index"
    FingerprintIndex.build(out, source, model_dir=vae_dir, cfg=IndexConfig(faces=False), progress=False)
    return out, items


def test_identical_images_fold_into_one_item(dup_index, vae_dir):
    out, items = dup_index
    with FingerprintIndex.open(out, model_dir=vae_dir) as index:
        assert index.items.counts()["items"] == 40 + 8 + 1
        row = index.items.row_of("photo-astronaut")
        meta = index.items.item(row)["meta"]
        assert meta["copies"] == 5 and meta["copy_ids"][1] == "photo-astronaut~001"
        assert index.items.row_of("photo-astronaut~001") is None


def test_clusters_are_the_duplicated_photos_and_nothing_else(dup_index, vae_dir):
    out, items = dup_index
    with FingerprintIndex.open(out, model_dir=vae_dir) as index:
        clusters = find_clusters(index)
    photo_ids = {i.item_id for i in items if i.kind == "photo"}
    assert len(clusters) == 8
    assert all(any(m in photo_ids for m in c.items) for c in clusters)
    assert not any(m.startswith("proc-") for c in clusters for m in c.items)   # no cluster of unique images
    coffee = next(c for c in clusters if "photo-coffee" in c.items)
    assert set(coffee.items) == {"photo-coffee", "near-coffee"} and coffee.size == 6 and coffee.near_copies == 1
    assert "espresso cup, re-encoded" in coffee.captions
    assert all(c.size == 5 for c in clusters if c is not coffee)


def test_content_key_ignores_the_encoding(tmp_path):
    img = build_training_set(TestbedDataConfig(num_procedural=1))[0].image
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img).save(tmp_path / "b.png", compress_level=9)
    from memguard.index.sources import decode_image
    keys = {content_key(decode_image(p.read_bytes())) for p in (tmp_path / "a.png", tmp_path / "b.png")}
    assert len(keys) == 1


def test_duplicates_cli_prints_json_and_a_table(dup_index):
    out, _ = dup_index
    run = [sys.executable, "-m", "memguard.cli", "index", "duplicates", str(out)]
    doc = json.loads(subprocess.run(run + ["--json"], cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    assert doc["count"] == 8 and doc["records"] == 8 * 5 + 1
    table = subprocess.run(run + ["--min-size", "6"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "photo-coffee" in table and "photo-astronaut" not in table


@pytest.mark.parametrize("name", sorted(TESTBEDS))
def test_shipped_testbeds_clusters_are_their_memorized_items(name):
    """Each testbed's index holds its training set as scraped: every memorized item is one cluster of
    its identical copies with every re-encode, resize and watermark of it (and, where calibration's
    aligned rule joined them, crops and banners); no cluster holds two memorized items, and no
    unique image joins one."""
    tb = TESTBEDS[name]
    with FingerprintIndex.open(tb.index_dir, verify_checksums=False) as index:
        clusters = find_clusters(index)
        ids = set(index.items.ids_of_rows(list(range(int(index.manifest.counts["items"])))).values())
    expected = {it.item_id: it.duplicates for it in memorized_items(build_training_set(tb.data))}
    by_first = {c.items[0]: c for c in clusters}
    for item_id, duplicates in expected.items():
        cluster = by_first[item_id]
        assert {i.split("~")[0] for i in cluster.items} == {item_id}, cluster.items
        pair_rule_kinds = [i for i in ids if i.startswith(f"{item_id}~nd")
                           and i.rsplit("-", 1)[1] in ("reencode", "resize", "resize_reencode", "watermark")]
        assert pair_rule_kinds and set(pair_rule_kinds) <= set(cluster.items), item_id
        assert cluster.size <= duplicates
    for c in clusters:   # any other cluster is variants of one memorized item (two banners), or holds none
        sources = {i.split("~")[0] for i in c.items}
        assert len(sources) == 1 or not sources & set(expected), c.items


@pytest.fixture(scope="module")
def scraped_index(tmp_path_factory, backend):
    """A training folder as a scraper holds it: 8 photos × 12 files, 6 of them near duplicates
    (re-encodes, resizes, a small crop, a banner, a watermark), beside 60 unique images; indexed
    with the v-testbed's VAE (near duplicates are near in a trained VAE's latents, not in a random
    one's) and calibrated."""
    from memguard.index.calibrate import CalibrationConfig, calibrate
    from memguard.testbed.registry import get_testbed
    from tests.index.conftest import on

    vae = get_testbed("vpred").model_dir
    tmp = tmp_path_factory.mktemp("scraped")
    items = build_training_set(TestbedDataConfig(num_procedural=60, photo_duplicates=12))
    folder = write_image_folder(items, tmp / "images", copies=True, near_duplicates=6)
    source = DedupedSource(ImageFolderSource(folder))
    out = tmp / "index"
    FingerprintIndex.build(out, source, model_dir=vae, cfg=on(backend, IndexConfig(faces=False)), progress=False)
    with FingerprintIndex.open(out, model_dir=vae) as index:
        report = calibrate(index, source, cfg=CalibrationConfig(samples=60), progress=False)
    return out, items, report, vae


def test_near_duplicates_form_one_cluster_and_a_copy_is_reported_once(scraped_index):
    from memguard.index.calibrate import aug_jpeg50

    out, items, report, vae = scraped_index
    photos = [i for i in items if i.kind == "photo"]
    with FingerprintIndex.open(out, model_dir=vae) as index:
        labels = index.cluster_labels
        ids = index.items.ids_of_rows(list(range(len(labels))))
        row = {i: r for r, i in ids.items()}
        for photo in photos:   # every re-encode, resize and watermark joins its photo's cluster
            home = labels[row[photo.item_id]]
            variants = [i for i in ids.values() if i.startswith(f"{photo.item_id}~nd")
                        and i.rsplit("-", 1)[1] in ("reencode", "resize", "resize_reencode", "watermark")]
            assert len(variants) == 4 and all(labels[row[v]] == home for v in variants), photo.item_id
        for r, i in ids.items():   # no unique image joins a photo's cluster
            if i.startswith("proc-"):
                assert not any(ids[m].startswith("photo-") for m in index.cluster_members(r)), i
        rng = np.random.default_rng()
        for photo in photos:
            result = index.screen(aug_jpeg50(photo.image, rng))
            mine = [m for m in result.copies if m.item_id.split("~")[0] == photo.item_id]
            assert result.is_copy and len(mine) >= 1, (photo.item_id, [(m.item_id, m.is_copy) for m in result.matches])
            home = [m for m in mine if labels[row[m.item_id]] == labels[row[photo.item_id]]]
            assert len(home) == 1 and home[0].near_duplicates >= 4, [(m.item_id, m.near_duplicates) for m in mine]
    # calibration took the other clusters as negatives: a JPEG copy is not blind
    assert report["checks"]["jpeg50"] >= 0.95 and "blind" not in report, report["checks"]


def test_a_screen_blind_to_copies_is_warned_about(vae_dir, tmp_path):
    """A random-weight VAE's fingerprint moves under its own decoder: calibrated at 1 %, the screen
    misses the VAE round trips of training images (what a perfect copy looks like once generated),
    and the calibration report, the CLI's warning list and the engine's health flags say so."""
    from memguard.calibrate import calibration_warnings
    from memguard.index.calibrate import BLIND_KINDS, MIN_COPY_TPR, CalibrationConfig, calibrate
    from memguard.index.cli import _blind_warning

    items = build_training_set(TestbedDataConfig(num_procedural=60, photo_duplicates=4))
    folder = write_image_folder(items, tmp_path / "images", copies=True, near_duplicates=3)
    source = DedupedSource(ImageFolderSource(folder))
    FingerprintIndex.build(tmp_path / "index", source, model_dir=vae_dir, cfg=IndexConfig(faces=False), progress=False)
    with FingerprintIndex.open(tmp_path / "index", model_dir=vae_dir) as index:
        report = calibrate(index, source, cfg=CalibrationConfig(samples=60), progress=False)
        tpr = {k: v for k, v in {**report["combined_tpr"], **report["checks"]}.items() if k in BLIND_KINDS}
        assert min(tpr.values()) < MIN_COPY_TPR, tpr   # the premise: this screen is blind
        assert report["blind"] == {k: v for k, v in tpr.items() if v < MIN_COPY_TPR}
        assert index.thresholds.details["blind"] == report["blind"]   # stored: health reads it
        assert any(w.startswith("BLIND SCREEN") for w in calibration_warnings(None, index))
        assert _blind_warning(report) and "VAE round trips" in _blind_warning(report)[0]
