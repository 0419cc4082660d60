"""memguard.benchmarks.quality's web-style labels: a tinted copy of a memorized photo is not "clean"."""
import math

import numpy as np

from memguard.benchmarks.quality import Record, relabel_tinted


def _record(label: str, structural_photo: float) -> Record:
    z = np.zeros((1, 4))
    return Record("web", "p", 0, z, z, np.zeros(1), None, label=label, structural_photo=structural_photo)


def test_a_colour_clean_image_closer_to_a_photo_than_any_novel_image_resembles_it():
    rng = np.random.default_rng()
    novel = [_record("clean", float(x)) for x in rng.uniform(0.0, 0.3, 20)] + [_record("clean", math.nan)]
    null = max(r.structural_photo for r in novel if not math.isnan(r.structural_photo))
    web = [_record("clean", null + 0.05), _record("clean", null - 0.01), _record("copy", 0.9), _record("clean", math.nan)]
    assert relabel_tinted(web, novel) == null
    assert [r.label for r in web] == ["resembles", "clean", "copy", "clean"]
    assert [r.colour_label for r in web] == ["clean", "clean", "copy", "clean"]   # the colour judge's label is kept
