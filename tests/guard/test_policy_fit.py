"""The policy learns each signal's direction and weight from data (guard/policy_fit.py)."""
import numpy as np
import pytest
import torch

from memguard.errors import InvalidInput
from memguard.policy import Policy
from memguard.policy_fit import FitConfig, SignalSet, fit_policy, window_max
from memguard.signals import SIGNALS

STEPS = 8
TIMESTEPS = list(np.linspace(999, 1, STEPS))


SCALE = np.array([1.0, 0.5, 0.02, 0.05, 0.03])   # per signal, SIGNALS order
CENTRE = np.array([3.0, 2.0, 0.5, 0.6, 0.05])


def _shift(**by: float) -> np.ndarray:
    """A shift in benign std units for the named signals (the rest 0)."""
    out = np.zeros(len(SIGNALS))
    for name, v in by.items():
        out[SIGNALS.index(name)] = v
    return out


def _data(rng, shift: np.ndarray, n_benign=400, clusters=6, per_cluster=6):
    """Benign and memorized-like signals; positives move by `shift` (in benign std units) per signal."""
    benign = rng.normal(size=(n_benign, STEPS, len(SIGNALS))) * SCALE + CENTRE
    pos = rng.normal(size=(clusters * per_cluster, STEPS, len(SIGNALS))) * SCALE + CENTRE + shift * SCALE
    groups = np.repeat([f"item-{c}" for c in range(clusters)], per_cluster)
    return SignalSet(benign, np.arange(n_benign)), SignalSet(pos, groups)


def _tpr(policy: Policy, signals: SignalSet) -> float:
    return float(np.mean(window_max(policy.scores(signals.raw, TIMESTEPS), policy.detect_steps) > policy.threshold))


@pytest.mark.parametrize("flip", [1.0, -1.0])
def test_flipping_a_signal_still_detects(flip):
    """BOS mass falls on one model and rises on another: the fitted rule catches both ways."""
    rng = np.random.default_rng(int(flip > 0))
    shift = _shift(bos=5.0 * flip)
    benign, pos = _data(rng, shift)
    policy = fit_policy(benign, TIMESTEPS, FitConfig(), positives=pos)
    assert policy.combination.rule == "linear"
    w = np.asarray(policy.combination.weights)
    assert np.sign(w[0, SIGNALS.index("bos")]) == flip          # the sign was learned, not assumed
    fresh_benign, fresh_pos = _data(np.random.default_rng(99), shift)
    assert _tpr(policy, fresh_pos) >= 0.95
    assert _tpr(policy, fresh_benign) <= 0.03
    # without any positives the distance rule is two-sided and still catches it
    blind = fit_policy(benign, TIMESTEPS, FitConfig())
    assert blind.combination.rule == "distance"
    assert _tpr(blind, fresh_pos) >= 0.9


def test_linear_weights_combine_two_weak_signals():
    """Two signals that each move by 2 std in opposite directions: together they separate better."""
    rng = np.random.default_rng(3)
    shift = _shift(divergence=2.0, bos=-2.0)
    benign, pos = _data(rng, shift, clusters=8, per_cluster=8)
    policy = fit_policy(benign, TIMESTEPS, FitConfig(), positives=pos)
    fresh_benign, fresh_pos = _data(np.random.default_rng(7), shift)
    single = fit_policy(benign, TIMESTEPS, FitConfig(), positives=pos,
                        enabled=np.array([s == "divergence" for s in SIGNALS]))
    assert _tpr(policy, fresh_pos) > _tpr(single, fresh_pos)
    assert policy.provenance["fit"]["clusters"] == 8
    assert len(policy.folds) == 4 and all(f["held_out"] for f in policy.folds)


def test_benign_threshold_meets_the_target_rate():
    rng = np.random.default_rng(5)
    benign, pos = _data(rng, _shift(divergence=3.0), n_benign=1000)
    policy = fit_policy(benign, TIMESTEPS, FitConfig(target_fpr=0.01), positives=pos)
    assert policy.provenance["rates"]["flag_rate_in_sample"] <= 0.01
    assert policy.provenance["rates"]["flag_rate_cross_validated"] <= 0.03


def test_device_tables_match_the_numpy_scores():
    """The per-step device path (PolicyTables) computes the same scores as Policy.scores."""
    rng = np.random.default_rng(11)
    benign, pos = _data(rng, _shift(divergence=2.0, entropy=-1.0, bos=3.0, similarity=1.0))
    for rule in ("linear", "distance"):
        policy = fit_policy(benign, TIMESTEPS, FitConfig(rule=rule), positives=pos)
        raw = rng.normal(size=(5, STEPS, len(SIGNALS))) + CENTRE
        expected = policy.scores(raw, TIMESTEPS)
        tables = policy.tables(TIMESTEPS)
        for step in range(STEPS):
            values = torch.tensor(raw[:, step], dtype=torch.float32)
            got = tables.combined(tables.zscores(values, step), step)
            np.testing.assert_allclose(got.numpy(), expected[:, step], rtol=1e-4, atol=1e-4)


def test_policy_round_trips_through_json(tmp_path):
    rng = np.random.default_rng(2)
    benign, pos = _data(rng, _shift(entropy=3.0))
    policy = fit_policy(benign, TIMESTEPS, FitConfig(), positives=pos)
    again = Policy.load(policy.save(tmp_path / "p.json"))
    np.testing.assert_allclose(again.scores(pos.raw, TIMESTEPS), policy.scores(pos.raw, TIMESTEPS))
    comb, threshold = again.fold_for("item-0")
    assert threshold == next(f["threshold"] for f in policy.folds if "item-0" in f["held_out"])


@pytest.mark.parametrize("quantile", [0.0, 0.05, 0.2])
def test_reroute_fidelity_floor_is_the_benign_quantile_and_round_trips(tmp_path, quantile):
    rng = np.random.default_rng()
    benign, pos = _data(rng, _shift(entropy=3.0))
    clip = rng.normal(0.6, 0.1, len(benign))
    clip[rng.integers(len(clip))] = np.nan          # an image the CLIP could not score is left out
    benign = SignalSet(benign.raw, benign.groups, fidelity=clip)
    policy = fit_policy(benign, TIMESTEPS, FitConfig(reroute_fidelity_quantile=quantile), positives=pos)
    finite = clip[np.isfinite(clip)]
    # at most ⌊q·n⌋ benign images score under the floor, and the floor is one of their scores
    assert np.sum(finite < policy.reroute_min_fidelity) <= int(np.floor(quantile * finite.size))
    assert policy.reroute_min_fidelity in finite
    with pytest.raises(InvalidInput) as err:      # a floor without its reference captions is no test
        Policy.load(policy.save(tmp_path / "p.json"))
    assert err.value.field == "policy.reroute_references"
    policy.reroute_references = [f"caption {i}" for i in range(8)]
    again = Policy.load(policy.save(tmp_path / "p.json"))
    assert (again.reroute_min_fidelity, again.reroute_references) == (policy.reroute_min_fidelity,
                                                                       policy.reroute_references)
    # without CLIP scores there is no floor (reroutes are then checked for guidance only)
    plain = fit_policy(SignalSet(benign.raw, benign.groups), TIMESTEPS, FitConfig(), positives=pos)
    assert plain.reroute_min_fidelity is None and Policy.load(plain.save(tmp_path / "q.json")).reroute_min_fidelity is None


def test_window_and_reverification_share_the_target():
    """A benign generation is acted on when the window flags it or re-verification fails it: on fresh
    benign data the union stays under the target, and each stage gets its share."""
    rng = np.random.default_rng(21)
    benign, pos = _data(rng, _shift(divergence=3.0), n_benign=1200)
    cfg = FitConfig(target_fpr=0.02, verify_share=0.5)
    policy = fit_policy(benign, TIMESTEPS, cfg, positives=pos)
    rates = policy.provenance["rates"]
    assert rates["window_fpr_bound"] == rates["verify_fpr_bound"] == 0.01 and rates["fpr_bound_guaranteed"]
    fresh, _ = _data(np.random.default_rng(22), _shift(), n_benign=20000)
    flagged = window_max(policy.scores(fresh.raw, TIMESTEPS), policy.detect_steps) > policy.threshold
    u = policy.uscores(fresh.raw, TIMESTEPS)
    vs = slice(policy.detect_steps, int(np.ceil(cfg.verify_fraction * STEPS)))
    failed = (policy.verify_direction * u[:, vs, SIGNALS.index("similarity")]).max(axis=1) > policy.verify_threshold
    # one calibration's realized rate has sd ≈ √(α/n) ≈ 0.003 about its bound: 2.5 sd of room
    assert 0.002 < flagged.mean() < 0.018 and 0.002 < failed.mean() < 0.018   # each near its 1 % share
    assert np.mean(flagged | failed) <= 0.02 + 0.008                          # the union: near the target, not 2×


def test_too_few_benign_generations_are_said_to_give_no_bound(caplog):
    rng = np.random.default_rng(23)
    benign, pos = _data(rng, _shift(divergence=3.0), n_benign=120)
    with caplog.at_level("WARNING", logger="memguard.policy_fit"):
        policy = fit_policy(benign, TIMESTEPS, FitConfig(target_fpr=0.01), positives=pos)
    assert policy.provenance["rates"]["fpr_bound_guaranteed"] is False
    assert "too few" in caplog.text and "at least 199" in caplog.text
    assert policy.threshold == window_max(policy.scores(benign.raw, TIMESTEPS), policy.detect_steps).max()
    with pytest.raises(InvalidInput, match="verify_share"):
        FitConfig(verify_share=1.0)
