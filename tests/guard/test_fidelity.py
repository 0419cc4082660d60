"""guard/fidelity.py: a prompt's CLIP standing among reference captions, on the testbed CLIP."""
from __future__ import annotations

import numpy as np
import pytest

from memguard.calibrate import CLIP_MODEL, CLIP_WEIGHTS
from memguard.errors import InvalidInput
from memguard.fidelity import PromptFidelity, reference_prompts

pytestmark = pytest.mark.skipif(not CLIP_WEIGHTS.is_file(), reason="the testbed CLIP is not in this checkout")


@pytest.fixture(scope="module")
def encoder():
    from memguard.index.encoders import ClipEncoder
    return ClipEncoder(CLIP_MODEL, CLIP_WEIGHTS)


def test_an_image_answers_its_own_caption_better_than_anothers(encoder):
    from memguard.testbed.dataset import build_training_set
    rng = np.random.default_rng()
    items = build_training_set()
    captions = sorted({it.caption for it in items})
    picked = [items[int(i)] for i in rng.choice(len(items), 40, replace=False)]
    refs = [captions[int(i)] for i in rng.choice(len(captions), 64, replace=False)]
    fid = PromptFidelity(encoder, refs)
    own = fid.zscores([it.image for it in picked], [it.caption for it in picked])
    wrong = [captions[int(i)] for i in rng.choice(len(captions), len(picked))]
    other = fid.zscores([it.image for it in picked], wrong)
    assert np.median(own) > 1.0 and np.mean(own > other) >= 0.8, (own, other)
    # the same z by hand, for one image: its own caption left out of the references
    img = encoder.encode([picked[0].image])[0]
    sims = np.array([img @ encoder.encode_text([r])[0] for r in refs if r != picked[0].caption])
    want = (img @ encoder.encode_text([picked[0].caption])[0] - sims.mean()) / sims.std(ddof=1)
    assert own[0] == pytest.approx(want, abs=1e-3)


def test_bad_input_is_named(encoder):
    with pytest.raises(InvalidInput) as err:
        PromptFidelity(encoder, ["a", "b"])
    assert err.value.field == "reroute_references"
    fid = PromptFidelity(encoder, [f"a shape number {i}" for i in range(8)])
    with pytest.raises(InvalidInput) as err:
        fid.zscores([np.zeros((64, 64, 3), np.uint8)], ["one", "two"])
    assert err.value.field == "prompts"
    assert reference_prompts(["x", "y", "x", "z"], limit=2) == ["x", "y"]
