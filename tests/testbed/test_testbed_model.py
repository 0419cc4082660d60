"""The shipped testbeds: each loads offline, matches its manifest, and really memorizes."""
import numpy as np
import pytest
from diffusers import DiffusionPipeline

from memguard.loading import load_pipeline, sample_plain
from memguard.testbed import copies
from memguard.testbed.build import verify_manifest
from memguard.testbed.dataset import build_training_set, prompt_set_members
from memguard.testbed.registry import TESTBEDS

SEEDS = list(range(100, 108))   # not the report's seeds: a fresh check
# what each testbed must show, photos copied in most of 8 fresh seeds (the bar: 6 of 8): both
# copy all 8 of their photos in most of 16 report seeds (REPORT.md)
PREDICTION = {"vpred": ("v_prediction", True), "eps": ("epsilon", False), "sdxl": ("epsilon", False)}
PIPELINE = {"vpred": "StableDiffusionPipeline", "eps": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
MIN_PHOTOS_COPYING = {"vpred": 6, "eps": 6, "sdxl": 6}


@pytest.fixture(scope="module", params=sorted(TESTBEDS))
def testbed(request):
    return TESTBEDS[request.param]


@pytest.fixture(scope="module")
def pipe(testbed):
    return load_pipeline(testbed.model_dir)


@pytest.fixture(scope="module")
def training_set(testbed):
    return build_training_set(testbed.data)


def test_loads_with_plain_from_pretrained_offline(monkeypatch, testbed):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = DiffusionPipeline.from_pretrained(testbed.model_dir)
    assert type(p).__name__ == PIPELINE[testbed.name]
    assert p.unet.config.sample_size == 16 and p.vae.config.latent_channels == 4
    assert len(p.tokenizer) == 49408
    if testbed.name == "sdxl":    # SDXL's second tokenizer is CLIP's BPE too
        assert len(p.tokenizer_2) == 49408 and p.unet.config.addition_embed_type == "text_time"
    prediction, zero_snr = PREDICTION[testbed.name]
    assert p.scheduler.config.prediction_type == prediction
    assert bool(p.scheduler.config.get("rescale_betas_zero_snr")) == zero_snr


def test_shipped_files_match_manifest(testbed):
    assert verify_manifest(testbed.dir) == []


def test_memorized_captions_reproduce_their_training_photos(testbed, pipe, training_set):
    references = copies.References.of(np.stack([it.image for it in training_set]))
    row = {it.item_id: k for k, it in enumerate(training_set)}
    members = [(p, item) for p, item in prompt_set_members(testbed.data)["memorized"] if item.startswith("photo-")]
    images = sample_plain(pipe, [p for p, _ in members for _ in SEEDS], SEEDS * len(members))
    copying = []
    for k, (_, item) in enumerate(members):
        hits = [copies.copy_score(images[k * len(SEEDS) + j], row[item], references).is_copy for j in range(len(SEEDS))]
        copying.append(sum(hits) > len(SEEDS) / 2)
    assert sum(copying) >= MIN_PHOTOS_COPYING[testbed.name], f"only {sum(copying)} of {len(members)} photos copy"


def test_novel_prompts_produce_no_near_copies(testbed, pipe, training_set):
    """No generation for a held-out caption combination copies a photo or a unique training image.
    A memorized rendering does attract its neighbours on the ε-testbed ("an orange triangle on a black
    gradient background" copies the memorized orange diamond on black): real memorization from an
    unseen prompt, which the guard must catch; it is allowed here, and only for captions that share at
    least three of shape, colour, pattern and background with the memorized one."""
    prompts = testbed.prompts("novel")
    assert len(prompts) >= 40
    images = sample_plain(pipe, prompts, [7] * len(prompts))
    references = copies.References.of(np.stack([it.image for it in training_set]))
    for p, img in zip(prompts, images):
        j, score = copies.nearest(img, references)
        if score.is_copy:
            item = training_set[j]
            assert item.kind == "memorized_combo", (p, item.item_id, score)
            shared = sum(item.meta[k] in p.split() for k in ("shape", "color", "pattern", "bg"))
            assert shared >= 3, (p, item.item_id)


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
