"""The shipped testbed: it loads offline, matches its manifest, and really memorizes."""
import numpy as np
import pytest
from diffusers import StableDiffusionPipeline

from guard.loading import TESTBED_MODEL_DIR, load_pipeline, sample_plain
from guard.testbed import copies
from guard.testbed.build import verify_manifest
from guard.testbed.cli import TESTBED_DIR
from guard.testbed.dataset import PHOTOS, build_training_set

SEEDS = list(range(100, 108))   # not the report's seeds: a fresh check


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


@pytest.fixture(scope="module")
def training_set():
    return build_training_set()


def test_loads_with_plain_from_pretrained_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = StableDiffusionPipeline.from_pretrained(TESTBED_MODEL_DIR)
    assert p.unet.config.sample_size == 16 and p.vae.config.latent_channels == 4
    assert len(p.tokenizer) == 49408
    # v-prediction from pure noise (zero terminal SNR): see guard/testbed/train.py for why
    assert p.scheduler.config.prediction_type == "v_prediction" and p.scheduler.config.rescale_betas_zero_snr


def test_shipped_files_match_manifest():
    assert verify_manifest(TESTBED_DIR) == []


def test_memorized_captions_reproduce_their_training_photos(pipe, training_set):
    references = copies.References.of(np.stack([it.image for it in training_set]))
    row = {it.item_id: k for k, it in enumerate(training_set)}
    prompts = [p.caption for p in PHOTOS]
    images = sample_plain(pipe, [p for p in prompts for _ in SEEDS], SEEDS * len(prompts))
    copying = []
    for k, photo in enumerate(PHOTOS):
        hits = [copies.copy_score(images[k * len(SEEDS) + j], row[f"photo-{photo.key}"], references).is_copy
                for j in range(len(SEEDS))]
        copying.append(sum(hits) > len(SEEDS) / 2)
    # the bar, on seeds the report never used: ≥ 75 % of captions copy in most seeds
    assert np.mean(copying) >= 0.75, f"only {np.mean(copying):.0%} of memorized captions copy in most seeds"


def test_novel_prompts_produce_no_near_copies(pipe, training_set):
    """No generation for a held-out caption combination is a near copy of any training image."""
    prompts = (TESTBED_DIR / "prompts" / "novel.txt").read_text().splitlines()
    assert len(prompts) >= 40
    images = sample_plain(pipe, prompts, [7] * len(prompts))
    references = copies.References.of(np.stack([it.image for it in training_set]))
    for p, img in zip(prompts, images):
        j, score = copies.nearest(img, references)
        assert not score.is_copy, (p, training_set[j].item_id, score)


def test_judge_tells_copies_from_distinct_images(training_set):
    references = copies.References.of(np.stack([it.image for it in training_set]))
    photos = [k for k, it in enumerate(training_set) if it.kind == "photo"]
    a, b = photos[0], photos[1]
    assert copies.copy_score(references.images[a], a, references).is_copy
    assert not copies.copy_score(references.images[a], b, references).is_copy
    # a tinted copy is still a copy; no photo copies another training image
    tinted = np.clip(references.images[a].astype(int) + [30, -20, 10], 0, 255).astype(np.uint8)
    assert copies.copy_score(tinted, a, references).is_copy
    for k in photos:
        assert not copies.nearest(references.images[k], references, exclude=k)[1].is_copy
