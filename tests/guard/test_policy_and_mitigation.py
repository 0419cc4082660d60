"""Policy math and files, mitigation primitives, traces: fresh random inputs, real computations."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from memguard.policy_fit import FitConfig, SignalSet, fit_policy
from memguard.errors import CorruptData, InvalidInput, MissingResource
from memguard.mitigation import MitigationConfig, attention_rows, noisy_embedding, obfuscate_faces, push_away
from memguard.policy import Policy, final_verdict, upper_quantile_threshold
from memguard.signals import SIGNALS
from memguard.types import Decision, FaceAction, GuardMode, Reason
from memguard.kernels.fingerprint import latent_fingerprint


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=400), st.floats(0.0, 0.5))
def test_threshold_lets_at_most_the_target_share_of_benign_scores_above(scores, fpr):
    t = upper_quantile_threshold(np.array(scores), fpr)
    above = np.sum(np.array(scores) > t)
    assert above <= math.floor(fpr * len(scores))
    assert t in scores   # an order statistic, not an extrapolation


def _benign_raw(n: int, steps: int, rng) -> np.ndarray:
    base = np.array([5.0, 2.0, 0.8, 0.6, 0.05])[None, None, :]
    drift = np.linspace(1.0, 0.3, steps)[None, :, None]
    return base * drift + rng.normal(size=(n, steps, len(SIGNALS))) * np.array([0.5, 0.1, 0.05, 0.05, 0.02])


def test_fitted_policy_meets_its_target_and_round_trips(tmp_path):
    """Benign data only: the two-sided distance rule, at the target rate on fresh benign samples.
    At n = 400 the fresh rate's spread (sd 0.010 over 300 fits) crossed 0.05 in 3 % of fits; at
    n = 1500 it is sd 0.005 around 0.021 (max 0.036 over 200), so the bounds below are > 4 sd out."""
    rng = np.random.default_rng()
    steps, n = 12, 1500
    raw = _benign_raw(n, steps, rng)
    timesteps = list(np.linspace(999, 1, steps))
    policy = fit_policy(SignalSet(raw, np.arange(n)), timesteps, FitConfig(target_fpr=0.02, detect_steps=2))
    assert policy.combination.rule == "distance"
    assert policy.provenance["rates"]["flag_rate_in_sample"] <= 0.02
    assert policy.provenance["rates"]["flag_rate_cross_validated"] < 0.05
    # fresh benign samples flag at about the target rate; shifted ("memorized") ones almost always,
    # whichever way the shift goes
    tables = policy.tables(timesteps)
    fresh = torch.tensor(_benign_raw(2000, steps, rng), dtype=torch.float32)
    up, down = fresh.clone(), fresh.clone()
    up[..., 0] += 3.0
    up[..., 3] += 0.2
    down[..., 2] -= 0.3
    def flagged(x):
        comb = torch.stack([tables.combined(tables.zscores(x[:, s], s), s) for s in range(2)], 1).amax(1)
        return float((comb > policy.threshold).float().mean())
    assert flagged(fresh) < 0.045 and flagged(up) > 0.95 and flagged(down) > 0.95
    path = policy.save(tmp_path / "p.json")
    again = Policy.load(path)
    assert again.to_json() == policy.to_json()
    assert json.loads(path.read_text())["format"] == 3


def test_policy_files_fail_with_the_file_named(tmp_path):
    with pytest.raises(MissingResource, match="calibrate"):
        Policy.load(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CorruptData, match="bad.json"):
        Policy.load(bad)
    doc = Policy.uncalibrated().to_json()
    doc["signals"]["entropy"]["std"] = [0.0, 1.0]
    with pytest.raises(InvalidInput, match="entropy"):
        Policy.from_json(doc)


def test_uncalibrated_policy_flags_nothing():
    tables = Policy.uncalibrated().tables([999.0, 500.0])
    z = tables.zscores(torch.randn(7, len(SIGNALS)) * 100, 0)
    assert not bool((tables.combined(z, 0) > Policy.uncalibrated().threshold).any())


def test_final_verdicts():
    v = final_verdict(GuardMode.ENFORCE, rerouted=True, copy=True, faces_matched=0, face_action=FaceAction.BLUR)
    assert (v.decision, v.reason, v.release) == (Decision.BLOCKED, Reason.MEMORIZATION, False)
    v = final_verdict(GuardMode.ENFORCE, rerouted=True, copy=False, faces_matched=0, face_action=FaceAction.BLUR)
    assert (v.decision, v.release) == (Decision.REROUTED, True)
    v = final_verdict(GuardMode.ENFORCE, rerouted=False, copy=False, faces_matched=1, face_action=FaceAction.PIXELATE)
    assert (v.decision, v.obfuscate_faces) == (Decision.FACE_OBFUSCATED, True)
    v = final_verdict(GuardMode.ENFORCE, rerouted=False, copy=False, faces_matched=2, face_action=FaceAction.BLOCK)
    assert (v.decision, v.reason, v.release) == (Decision.BLOCKED, Reason.PROTECTED_FACE, False)
    v = final_verdict(GuardMode.MONITOR, rerouted=True, copy=True, faces_matched=1, face_action=FaceAction.BLOCK)
    assert (v.decision, v.reason, v.release, v.obfuscate_faces) == (Decision.ALLOWED, Reason.MEMORIZATION, True, False)


def test_push_away_lowers_similarity_to_close_candidates_and_spares_other_rows():
    B, K, C, h = 4, 3, 4, 16
    x0 = torch.randn(B, C, h, h)
    close = latent_fingerprint(x0 + 0.3 * torch.randn(B, C, h, h))        # a close "training item"
    far = F.normalize(torch.randn(B, K - 1, C * 64), dim=-1)
    cands = torch.cat([close[:, None], far], dim=1)
    mask = torch.ones(B, K, dtype=torch.bool)
    eps, ab = torch.randn(B, C, h, h), 0.3
    x_t = ab ** 0.5 * x0 + (1 - ab) ** 0.5 * eps
    active = torch.tensor([True, True, False, True])
    shift = push_away(x_t, x0, ab, cands, mask, active, 0.5, MitigationConfig(push_strength=1.0))
    new_x0 = (x_t + shift - (1 - ab) ** 0.5 * eps) / ab ** 0.5             # x_t moved, ε kept
    before = (latent_fingerprint(x0) * close).sum(1)
    after = (latent_fingerprint(new_x0) * close).sum(1)
    assert torch.all(after[active] < before[active] - 0.02)
    assert torch.all(shift[~active] == 0)
    none = push_away(x_t, x0, ab, cands, torch.zeros(B, K, dtype=torch.bool), active, 0.5, MitigationConfig())
    assert torch.all(none == 0)                                           # empty slots push nothing


def test_attention_rows_touch_only_rerouted_cond_rows():
    for mask_eos, kept in ((False, 10), (True, 9)):                   # EOS at position 9
        cfg = MitigationConfig(bos_scale=1.25, mask_eos=mask_eos)
        scale, mask = attention_rows([False, True, False], [5, 9, 3], 77, cfg, torch.device("cpu"))
        assert scale.shape == mask.shape == (6, 77)
        plain = [0, 1, 2, 3, 5]
        assert torch.all(scale[plain] == 1) and torch.all(mask[plain])
        assert scale[4, 0] == 1.25 and torch.all(scale[4, 1:] == 1)
        assert torch.all(mask[4, :kept]) and not mask[4, kept:].any()
    assert attention_rows([False, False], [3, 4], 77, cfg, torch.device("cpu")) == (None, None)


def test_embedding_noise_is_seeded_and_scaled():
    emb = torch.randn(77, 64) * 3
    cfg = MitigationConfig(embed_noise=0.5)
    a, b = noisy_embedding(emb, 11, cfg), noisy_embedding(emb, 11, cfg)
    assert torch.equal(a, b) and not torch.equal(a, noisy_embedding(emb, 12, cfg))
    assert not torch.equal(noisy_embedding(emb, 11, cfg, "a cat"), noisy_embedding(emb, 11, cfg, "a dog"))
    assert abs(float((a - emb).std() / emb.std()) - 0.5) < 0.05


def test_obfuscation_changes_only_the_padded_face_box():
    rng = np.random.default_rng()
    img = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    for action in ("blur", "pixelate"):
        out = obfuscate_faces(img, [(20, 20, 36, 36)], action)
        assert not np.array_equal(out[16:40, 16:40], img[16:40, 16:40])
        outside = np.ones((64, 64), bool)
        outside[16:40, 16:40] = False
        assert np.array_equal(out[outside], img[outside])


def test_face_match_scope_is_checked():
    from memguard.pipeline import GuardConfig

    assert GuardConfig(face_match_scope="protected").face_match_scope == "protected"
    with pytest.raises(InvalidInput, match="face_match_scope"):
        GuardConfig(face_match_scope="everyone")


def test_reseed_noise_comes_from_the_seed_and_the_prompt():
    """Two prompts rerouted at one seed must not restart from one noise (they would come back as one image)."""
    from memguard.mitigation import fresh_noise

    def noise(seed, prompt):
        return fresh_noise((1, 4, 8, 8), seed, torch.device("cpu"), torch.float32, prompt)

    assert torch.equal(noise(5, "a red fox"), noise(5, "a red fox"))          # reproducible
    assert not torch.equal(noise(5, "a red fox"), noise(5, "a blue fox"))
    assert not torch.equal(noise(5, "a red fox"), noise(6, "a red fox"))


def test_conformal_threshold_bounds_the_fresh_rate_where_the_order_statistic_does_not():
    """Uniform benign scores: a fresh score exceeds τ with probability exactly 1 − τ. Over many
    calibrations of n = 250 at α = 1 %, the conformal τ keeps the mean fresh rate under α (exactly
    2/251); the in-sample order statistic, which lets ⌊αn⌋ = 2 of 250 through, gives 3/251 > α."""
    from memguard.policy import conformal_threshold

    rng = np.random.default_rng(11)
    conformal, in_sample = [], []
    for _ in range(3000):
        scores = rng.uniform(size=250)
        tau, guaranteed = conformal_threshold(scores, 0.01)
        assert guaranteed and tau in scores
        conformal.append(1.0 - tau)
        in_sample.append(1.0 - upper_quantile_threshold(scores, 0.01))
    se = 0.012 / math.sqrt(3000)   # the rates' sd is under 0.012 at n = 250
    assert abs(np.mean(conformal) - 2 / 251) < 4 * se and np.mean(conformal) < 0.01
    assert abs(np.mean(in_sample) - 3 / 251) < 4 * se and np.mean(in_sample) > 0.01


def test_conformal_threshold_says_when_it_cannot_bound():
    from memguard.policy import conformal_threshold

    tau, guaranteed = conformal_threshold(np.arange(198.0), 0.005)   # needs n ≥ 199 at 0.5 %
    assert (tau, guaranteed) == (197.0, False)
    assert conformal_threshold(np.arange(199.0), 0.005) == (198.0, True)
    assert conformal_threshold(np.arange(400.0), 0.005) == (398.0, True)   # ⌈401·0.995⌉ = 399th smallest
    with pytest.raises(InvalidInput, match="alpha"):
        conformal_threshold(np.arange(10.0), 0.0)
