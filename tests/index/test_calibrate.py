"""Augmentations and threshold calibration on a built index."""
import numpy as np
import pytest

from memguard.errors import InvalidInput
from memguard.index.api import FingerprintIndex
from memguard.index.calibrate import AUGMENT, CalibrationConfig, calibrate
from memguard.index.config import crosses
from memguard.index.sources import ImageFolderSource
from memguard.testbed.dataset import write_image_folder


@pytest.mark.parametrize("name", sorted(AUGMENT))
def test_augmentations_change_the_image_reproducibly(name, items):
    img = items[0].image
    a = AUGMENT[name](img, np.random.default_rng(7))
    b = AUGMENT[name](img, np.random.default_rng(7))
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    np.testing.assert_array_equal(a, b)
    assert a.shape != img.shape or np.abs(a.astype(int) - img).mean() > 0.5


def test_calibration_writes_thresholds_that_meet_the_stated_rate(index_dir, image_folder, heldout, tmp_path):
    held = write_image_folder(heldout[:15], tmp_path / "held")
    cfg = CalibrationConfig(false_match_rate=0.05, samples=25, seed=3)
    with FingerprintIndex.open(index_dir) as ix:
        report = calibrate(ix, ImageFolderSource(image_folder), heldout=ImageFolderSource(held), cfg=cfg,
                           progress=False)
    # three copy signals are measured: the latent fingerprint, PDQ, the aligned re-score; those in use
    # share the budget, and no set without one of them catches more copies
    assert set(report["signals"]) == {"latent", "pdq", "aligned"}
    used = report["signals_used"]
    assert used and report["per_signal_budget"] == pytest.approx(0.05 / len(used))
    caught = report["caught_by_set"]
    rate = caught["+".join(sorted(used))]
    best = max(caught.values())
    margin = max(0.005, (best * (1 - best) / (25 * len(cfg.augmentations))) ** 0.5)
    assert rate >= best - margin
    assert all(len(k.split("+")) <= len(used) for k, v in caught.items() if v >= best - margin)
    for name, sig in report["signals"].items():
        assert sig["negatives"] == 25 * len(cfg.augmentations)
        assert sig["fmr"] <= 0.05 / len(used) and sig["used"] == (name in used)
        assert set(sig["tpr"]) == set(cfg.augmentations)
    # JPEG and colour changes are mild: most copies are still found
    assert report["combined_tpr"]["jpeg"] >= 0.8 and report["combined_tpr"]["color"] >= 0.8
    faces = report["faces"]
    assert faces["items"] == 2 and faces["negatives"] >= 50
    assert faces["fmr"] <= 0.05 and faces["threshold"] < faces["negative_distances"]["max"]
    with FingerprintIndex.open(index_dir) as ix:
        th = ix.thresholds
        assert th.calibrated and th.false_match_rate == 0.05
        assert th.latent == pytest.approx(report["signals"]["latent"]["threshold"])
        assert th.aligned == pytest.approx(report["signals"]["aligned"]["threshold"])
        assert th.pdq == report["signals"]["pdq"]["threshold"] and th.face == pytest.approx(faces["threshold"])
        assert crosses("latent", 1.0, th.latent) and not crosses("pdq", 256, th.pdq)
        assert ix.verify()["ok"]     # the rewritten manifest still checks out


def test_calibration_input_errors(index, image_folder):
    with pytest.raises(InvalidInput) as err:
        calibrate(index, ImageFolderSource(image_folder), cfg=CalibrationConfig(false_match_rate=1.5), write=False)
    assert err.value.field == "false_match_rate"
    with pytest.raises(InvalidInput) as err:
        calibrate(index, ImageFolderSource(image_folder), cfg=CalibrationConfig(augmentations=("blur",)), write=False)
    assert err.value.field == "augmentations"


def test_a_signal_that_catches_nothing_new_gets_no_budget():
    from memguard.index.calibrate import never_crosses, select_signals
    from memguard.index.config import crosses
    rng = np.random.default_rng()
    n, augs = 400, ("jpeg", "crop")
    # latent finds jpeg copies, pdq finds crops: complementary. clip's copies look like its negatives.
    pos = {"latent": {"jpeg": list(rng.normal(0.83, 0.02, n)), "crop": list(rng.normal(0.7, 0.05, n))},
           "pdq": {"jpeg": list(rng.normal(90, 5, n)), "crop": list(rng.normal(76, 3, n))},
           "clip": {a: list(rng.normal(0.9, 0.05, n)) for a in augs}}
    neg = {"latent": list(rng.normal(0.7, 0.05, 4 * n)), "pdq": list(rng.normal(90, 5, 4 * n)),
           "clip": list(rng.normal(0.9, 0.05, 4 * n))}
    used, caught = select_signals(pos, neg, 0.01)
    assert used == ("latent", "pdq"), caught
    assert caught["latent+pdq"] > caught["clip+latent+pdq"] and caught["latent+pdq"] > max(caught["latent"],
                                                                                          caught["pdq"])
    for signal, score in (("clip", 1.0), ("latent", 1.0), ("pdq", 0.0), ("aligned", 1e6)):
        assert not crosses(signal, score, never_crosses(signal))
