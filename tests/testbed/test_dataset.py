import dataclasses

import numpy as np
import open_clip
import pytest

from memguard.testbed.dataset import (PHOTOS, TestbedDataConfig, all_combos, build_training_set, caption_for,
                                   heldout_prompts, is_heldout, load_photo)
from memguard.testbed.tokenizer import load_clip_tokenizer

SMALL = TestbedDataConfig(num_procedural=60)


def test_training_set_is_deterministic_and_shaped():
    a, b = build_training_set(SMALL), build_training_set(SMALL)
    assert [x.caption for x in a] == [x.caption for x in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert all(x.image.shape == (64, 64, 3) and x.image.dtype == np.uint8 for x in a)
    procedural = [x for x in a if x.kind == "procedural"]
    # procedural images are unique pictures, not copies of one another
    flat = np.stack([x.image.reshape(-1) for x in procedural]).astype(np.int32)
    dists = np.abs(flat[:, None, :] - flat[None, :, :]).sum(-1) + np.eye(len(flat), dtype=np.int32) * 10**9
    assert dists.min() > 0


def test_photos_are_duplicated_and_include_faces():
    items = build_training_set(SMALL)
    photos = [x for x in items if x.kind == "photo"]
    assert len(photos) == len(PHOTOS) >= 5
    assert all(p.duplicates == SMALL.photo_duplicates >= 100 for p in photos)
    assert sum(p.meta["has_face"] for p in photos) >= 1
    # each photo has a caption no procedural item shares
    assert not {p.caption for p in photos} & {x.caption for x in items if x.kind == "procedural"}


def test_heldout_combinations_never_appear_in_training():
    cfg = TestbedDataConfig(num_procedural=400)
    train_captions = {x.caption for x in build_training_set(cfg) if x.kind == "procedural"}
    novel = heldout_prompts(cfg)
    assert len(novel) >= 40
    assert not set(novel) & train_captions
    held = [c for c in all_combos() if is_heldout(c, cfg)]
    assert 0.05 < len(held) / len(all_combos()) < 0.15
    assert caption_for(*held[0]) not in train_captions


def test_missing_photo_is_a_clear_error():
    from memguard.testbed.dataset import TestbedDataError

    bogus = dataclasses.replace(PHOTOS[0], relpath="data/not-there.png")
    with pytest.raises(TestbedDataError, match="not-there.png"):
        load_photo(bogus, 64)
    with pytest.raises(TestbedDataError, match="no_such_pkg"):
        load_photo(dataclasses.replace(PHOTOS[0], package="no_such_pkg"), 64)


@pytest.mark.parametrize("text", ["a red circle on a blue striped background", "", "Grace Hopper, 1984!",
                                  "official nasa portrait of astronaut eileen collins smiling"])
def test_tokenizer_matches_open_clip_ids(text):
    tok = load_clip_tokenizer()
    ours = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
    ref = open_clip.tokenize([text])[0].tolist()
    n = ref.index(49407) + 1  # open_clip pads with 0 after EOS, diffusers/SD with EOS
    assert ours[:n] == ref[:n]
    assert len(tok) == 49408
