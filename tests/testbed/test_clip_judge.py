"""The shipped fidelity judge (guard/testbed/clip/): it loads offline, prefers a training image's own
caption over one with another shape or colour, returns unit embeddings and rejects bad input by name."""
import numpy as np
import pytest

from memguard.errors import InvalidInput
from memguard.testbed.clip_judge import INDEPENDENT_JUDGE_DIR, JUDGE_DIR, MODEL_NAME, WEIGHTS_FILE, load_judge
from memguard.testbed.dataset import COLORS, SHAPES, TestbedDataConfig, build_training_set, caption_for

pytestmark = pytest.mark.skipif(not (JUDGE_DIR / WEIGHTS_FILE).is_file(), reason="the judge checkpoint is not built")


@pytest.fixture(scope="module")
def judge():
    return load_judge()


@pytest.fixture(scope="module")
def items():
    procedural = [it for it in build_training_set(TestbedDataConfig()) if it.kind == "procedural"]
    return procedural[::len(procedural) // 32][:32]


def _other(meta: dict, k: int) -> str:
    """The caption with another shape (even k) or another shape colour (odd k), never equal to the background."""
    shape, color, pattern, bg = meta["shape"], meta["color"], meta["pattern"], meta["bg"]
    if k % 2 == 0:
        shape = [s for s in SHAPES if s != shape][k % (len(SHAPES) - 1)]
    else:
        options = [c for c in COLORS if c not in (color, bg)]
        color = options[k % len(options)]
    return caption_for(shape, color, pattern, bg)


@pytest.mark.parametrize("directory", [JUDGE_DIR, INDEPENDENT_JUDGE_DIR], ids=["guard", "independent"])
def test_own_caption_beats_another_shape_or_colour(directory, items):
    """Both judges: the guard's CLIP (its fidelity floor, the indexes' `clip`) and the benchmark's own,
    trained from another seed."""
    judge = load_judge(directory)
    images = [it.image for it in items]
    own = judge.clip_score(images, [it.caption for it in items])
    other = judge.clip_score(images, [_other(it.meta, k) for k, it in enumerate(items)])
    assert np.mean(own > other) >= 0.8, (own - other).round(3).tolist()


def test_embeddings_are_unit_norm_and_deterministic(judge, items):
    img = judge.image_embeddings([it.image for it in items[:4]])
    txt = judge.text_embeddings([it.caption for it in items[:4]])
    assert img.shape == txt.shape == (4, judge.dim) and img.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(judge.image_embeddings([items[0].image])[0], img[0], atol=1e-5)
    # a generation-sized array batch and any image size are accepted
    assert judge.image_embeddings(np.stack([items[0].image] * 2)).shape == (2, judge.dim)
    big = np.kron(items[0].image, np.ones((2, 2, 1), np.uint8))
    assert float(judge.image_embeddings([big])[0] @ img[0]) > 0.9


@pytest.mark.parametrize("bad, field", [
    ([np.zeros((64, 64, 3), np.float32)], "images[0]"),
    ([np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.uint8)[..., None].repeat(5, 2)], "images[1]"),
    (np.zeros((64, 64, 3), np.uint8).tobytes(), "images"),
])
def test_bad_images_name_the_field(judge, bad, field):
    with pytest.raises(InvalidInput) as err:
        judge.image_embeddings(bad)
    assert err.value.field == field


def test_bad_captions_name_the_field(judge, items):
    with pytest.raises(InvalidInput) as err:
        judge.text_embeddings("a red circle on a blue plain background")
    assert err.value.field == "captions"
    with pytest.raises(InvalidInput) as err:
        judge.text_embeddings(["ok", 3])
    assert err.value.field == "captions[1]"
    with pytest.raises(InvalidInput) as err:
        judge.clip_score([items[0].image], ["one", "two"])
    assert err.value.field == "captions"


def test_index_clip_encoder_loads_the_judge(judge, items):
    from memguard.index.encoders import ClipEncoder
    enc = ClipEncoder(MODEL_NAME, JUDGE_DIR / WEIGHTS_FILE)
    assert enc.dim == judge.dim
    emb = enc.encode([it.image for it in items[:3]])
    np.testing.assert_allclose(emb, judge.image_embeddings([it.image for it in items[:3]]), atol=2e-3)


def test_the_benchmark_judge_is_another_model_than_the_guards():
    """The quality benchmark scores reroutes with the independent judge: other weights than the CLIP
    the testbed indexes (and so the guard's fidelity floor) use, and other embeddings of one image."""
    import hashlib
    import json

    from memguard.testbed.registry import TESTBEDS

    independent = hashlib.sha256((INDEPENDENT_JUDGE_DIR / WEIGHTS_FILE).read_bytes()).hexdigest()
    for tb in TESTBEDS.values():
        manifest = json.loads((tb.index_dir / "manifest.json").read_text())
        assert manifest["models"]["clip"]["weights_sha256"] != independent
    item = build_training_set(TestbedDataConfig())[0]
    a, b = load_judge(JUDGE_DIR), load_judge(INDEPENDENT_JUDGE_DIR)
    assert abs(float(a.image_embeddings([item.image])[0] @ b.image_embeddings([item.image])[0])) < 0.9
