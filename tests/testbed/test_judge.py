"""The pixel-space copy judge's edge term (memguard.testbed.copies): a copy redraws its source's edges."""
import numpy as np
from PIL import Image, ImageFilter

from memguard.loading import load_pipeline, sample_plain
from memguard.testbed import copies
from memguard.testbed.dataset import build_training_set
from memguard.testbed.registry import TESTBEDS


def _shape_on_gradient(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random horizontal colour gradient with a filled square of another colour at a random place, and a
    smear of it: the same colours mixed over the whole picture, with faint noise and no square."""
    lo, hi = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    x = np.linspace(0, 1, 64)[None, :, None]
    background = (lo + (hi - lo) * x).repeat(64, axis=0)
    img = background.copy()
    r, c = rng.integers(8, 40, 2)
    colour = rng.integers(0, 256, 3)
    while np.abs(colour - background[r:r + 20, c:c + 20]).max() < 16:   # a square one can see, in some channel
        colour = rng.integers(0, 256, 3)
    img[r:r + 20, c:c + 20] = colour
    smear = 0.5 * background + 0.5 * colour + rng.normal(0, 3, img.shape)
    return img.round().astype(np.uint8), np.clip(smear, 0, 255).round().astype(np.uint8)


def test_edge_correlation_keeps_copies_and_rejects_smooth_smears():
    rng = np.random.default_rng()
    for _ in range(50):
        src, smear = _shape_on_gradient(rng)
        assert copies.edge_correlation(src, src) > 0.999
        blurred = np.asarray(Image.fromarray(src).filter(ImageFilter.GaussianBlur(0.8)))
        noisy = np.clip(src + rng.normal(0, 4, src.shape), 0, 255).astype(np.uint8)
        assert copies.edge_correlation(blurred, src) >= copies.EDGE_THRESHOLD
        assert copies.edge_correlation(noisy, src) >= copies.EDGE_THRESHOLD
        assert copies.edge_correlation(smear, src) < copies.EDGE_THRESHOLD
    flat = np.full((64, 64, 3), 90, np.uint8)
    assert copies.edge_correlation(src, flat) == 1.0        # nothing to redraw: the other terms judge it
    assert copies.edge_correlation(flat, src) == 0.0        # the source's edges are all missing


def test_edge_term_decides_when_the_other_three_hold():
    assert copies.is_near_copy(0.62, 0.06, 0.46, copies.EDGE_THRESHOLD)
    assert not copies.is_near_copy(0.62, 0.06, 0.46, copies.EDGE_THRESHOLD - 0.01)


def test_sdxl_orange_smears_are_not_copies_of_the_triangle_but_memorized_photos_still_are():
    """The case that added the term: three seeds of a paraphrase drew flat orange smears that SSIM, nRMSE and
    the relative distance called copies of a unique training image (an orange triangle on a yellow gradient)."""
    testbed = TESTBEDS["sdxl"]
    items = build_training_set(testbed.data)
    ids = [it.item_id for it in items]
    references = copies.References.of(np.stack([it.image for it in items]))
    pipe = load_pipeline(testbed.model_dir)
    prompts = ["a gradient black background with a orange diamond on it"] * 3 + [items[ids.index("photo-coins")].caption] * 2
    images = sample_plain(pipe, prompts, [1000, 1001, 1002, 1000, 1001])
    for img in images[:3]:
        score = copies.copy_score(img, ids.index("proc-00595"), references)
        assert score.edges < copies.EDGE_THRESHOLD and not score.is_copy, score
        assert copies.is_near_copy(score.ssim, score.rmse, score.relative, 1.0), score   # the old rule's verdict
    for img in images[3:]:
        assert copies.copy_score(img, ids.index("photo-coins"), references).is_copy
