"""Fitting a policy from measured signals: benign generations, and likely-memorized ones if any.

Pure numpy, no model: `memguard calibrate` (guard/calibrate.py) measures, this module fits.
guard/policy.py has the formulas the fitted policy applies; here is how they are chosen:

1. standardization: per step, benign mean and std of every signal (u-scores);
2. per step of the detection window, two candidate combinations of the u-scores:
   - linear: a shrunk Fisher discriminant w = (Σ + λ·tr(Σ)/d·I)⁻¹ (μ_pos − μ_benign), Σ the mean of
     the two classes' covariances, scaled to unit benign variance. Signs and weights are learned;
   - distance: the Mahalanobis distance from the benign distribution (no positives needed; a
     signal moving either way raises it);
3. thresholds: split-conformal quantiles of the benign per-sample maximum over the window, and of
   the re-verification similarity. The two stages share the target: a benign generation is acted
   on if either fires, so the window gets (1 − verify_share)·FPR and re-verification the rest, and
   each bound holds for fresh benign generations in expectation (too few benign generations for
   that: the sample maximum, and the policy says "no guarantee");
4. validation by held-out clusters: positives are grouped by the duplicate cluster they came
   from, clusters are dealt into folds, and each fold is fitted without its clusters and scored on
   them. The rule with the better held-out TPR is kept (ties: linear); the folds' fits are stored,
   so a benchmark can score each memorized prompt with a fit that never saw its cluster;
5. benign rates: in sample and 2-fold cross-validated over benign prompts.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np

from memguard.errors import InvalidInput
from memguard.policy import Combination, Policy, SignalCalibration, conformal_bound_holds, conformal_threshold
from memguard.signals import SIGNALS

log = logging.getLogger(__name__)

S = len(SIGNALS)
SIM = SIGNALS.index("similarity")


@dataclass
class SignalSet:
    """Measured generations: raw signals [N, steps, S], a group per row (prompt id for benign rows,
    cluster key for positives), each image's PDQ distance to the nearest indexed item [N] and its
    prompt fidelity [N] (guard/fidelity.py; None or NaN without an index CLIP)."""
    raw: np.ndarray
    groups: np.ndarray
    pdq_distances: np.ndarray | None = None
    fidelity: np.ndarray | None = None

    def __post_init__(self):
        self.raw = np.asarray(self.raw, np.float64)
        self.groups = np.asarray(self.groups)
        if self.raw.ndim != 3 or self.raw.shape[2] != S or len(self.groups) != len(self.raw):
            raise InvalidInput("signals", f"need raw [N, steps, {S}] and N groups, got {self.raw.shape}, "
                                          f"{len(self.groups)}")

    def subset(self, mask: np.ndarray) -> "SignalSet":
        d = None if self.pdq_distances is None else np.asarray(self.pdq_distances)[mask]
        c = None if self.fidelity is None else np.asarray(self.fidelity)[mask]
        return SignalSet(self.raw[mask], self.groups[mask], d, c)

    def __len__(self) -> int:
        return len(self.raw)


@dataclass(frozen=True)
class FitConfig:
    target_fpr: float = 0.01
    final_fpr: float = 0.0           # released images closer (PDQ) than this share of benign ones are blocked
    detect_steps: int = 2
    verify_fraction: float = 0.6     # re-verification steps: detect_steps .. this share of steps
    shrinkage: float = 0.2           # λ of the covariance shrinkage
    folds: int = 4                   # held-out folds of positive clusters
    rule: str = "auto"               # "auto" (held-out TPR decides), "linear" or "distance"
    basin_exit_quantile: float = 0.5   # benign quantile of the per-step score below which a sample left the basin
    reroute_fidelity_quantile: float = 0.05  # a reroute must answer its prompt as well as this share of benign images
    verify_share: float = 0.5        # share of target_fpr given to re-verification (the window gets the rest)

    def __post_init__(self):
        if not 0.0 < self.target_fpr < 1.0:
            raise InvalidInput("target_fpr", f"must lie in (0, 1), got {self.target_fpr}")
        if not 0.0 < self.verify_share < 1.0:
            raise InvalidInput("verify_share", f"must lie in (0, 1), got {self.verify_share}")

    @property
    def window_fpr(self) -> float:
        return self.target_fpr * (1.0 - self.verify_share)

    @property
    def verify_fpr(self) -> float:
        return self.target_fpr * self.verify_share


def standardization(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-step benign mean and std [steps, S]; std floored so a constant signal cannot divide by 0."""
    mean = raw.mean(axis=0)
    std = raw.std(axis=0, ddof=1) if len(raw) > 1 else np.ones_like(mean)
    return mean, np.maximum(std, 1e-6 + 1e-3 * np.abs(mean))


def _shrunk(cov: np.ndarray, lam: float) -> np.ndarray:
    d = cov.shape[0]
    return (1 - lam) * cov + lam * (np.trace(cov) / d + 1e-9) * np.eye(d)


def _cov(x: np.ndarray) -> np.ndarray:
    return np.atleast_2d(np.cov(x, rowvar=False)) if len(x) > 2 else np.eye(x.shape[1])


def fit_combination(u_benign: np.ndarray, u_pos: np.ndarray | None, rule: str, enabled: np.ndarray,
                    window: int, shrinkage: float) -> Combination:
    """One row per window step, fitted on u-scores [N, steps, S] of the enabled signals."""
    en = np.flatnonzero(enabled)
    rows = []
    for k in range(window):
        ub = u_benign[:, k][:, en]
        cov_b = _cov(ub)
        cb = _shrunk(cov_b, shrinkage)
        if rule == "linear":
            up = u_pos[:, k][:, en]
            sigma = _shrunk((cov_b + _cov(up)) / 2, shrinkage)
            w = np.linalg.solve(sigma, up.mean(axis=0) - ub.mean(axis=0))
            w = w / max(math.sqrt(float(w @ cb @ w)), 1e-12)
            full = np.zeros(S)
            full[en] = w
            rows.append(full.tolist())
        else:
            chol = np.linalg.cholesky(np.linalg.inv(cb))   # ‖u L‖² = uᵀ Σ⁻¹ u
            full = np.zeros((S, S))
            full[np.ix_(en, en)] = chol
            rows.append(full.tolist())
    return Combination(rule, weights=rows if rule == "linear" else [], whiten=rows if rule == "distance" else [])


def window_max(scores: np.ndarray, window: int) -> np.ndarray:
    """Per sample: the maximum score over steps 0..window-1 ([N, steps] → [N])."""
    return scores[:, :window].max(axis=1)


def verify_steps(steps: int, cfg: FitConfig) -> slice:
    return slice(cfg.detect_steps, max(cfg.detect_steps + 1, math.ceil(cfg.verify_fraction * steps)))


def lower_quantile_threshold(benign: np.ndarray, fpr: float) -> float | None:
    """The largest τ with at most ⌊fpr·n⌋ benign values strictly below it (None: no finite values)."""
    values = np.sort(np.asarray(benign, np.float64)[np.isfinite(benign)])
    if values.size == 0:
        return None
    return float(values[int(math.floor(fpr * values.size))])


@dataclass
class _Fit:
    combination: Combination
    threshold: float


def _fit_rule(u_b: np.ndarray, u_p: np.ndarray | None, rule: str, enabled, cfg: FitConfig) -> _Fit:
    comb = fit_combination(u_b, u_p, rule, enabled, cfg.detect_steps, cfg.shrinkage)
    return _Fit(comb, conformal_threshold(window_max(comb.score(u_b), cfg.detect_steps), cfg.window_fpr)[0])


def _deal_folds(clusters: list, k: int) -> list[list]:
    return [clusters[i::k] for i in range(k)]


def heldout_tpr(u_b: np.ndarray, u_p: np.ndarray, groups: np.ndarray, rule: str, enabled,
                cfg: FitConfig) -> tuple[float, list[dict]]:
    """Mean TPR on held-out clusters, fitting each fold without them; and the folds' fits."""
    clusters = sorted(set(groups.tolist()))
    folds = _deal_folds(clusters, min(cfg.folds, len(clusters)))
    hits, total, out = 0, 0, []
    for held in folds:
        out_mask = np.isin(groups, held)
        fit = _fit_rule(u_b, u_p[~out_mask], rule, enabled, cfg)
        flagged = window_max(fit.combination.score(u_p[out_mask]), cfg.detect_steps) > fit.threshold
        hits, total = hits + int(flagged.sum()), total + int(out_mask.sum())
        out.append({"held_out": list(held), "combination": asdict(fit.combination), "threshold": fit.threshold,
                    "heldout_tpr": float(flagged.mean())})
    return hits / max(total, 1), out


def _standardized(benign: SignalSet, timesteps, cfg: FitConfig, enabled: np.ndarray) -> Policy:
    mean, std = standardization(benign.raw)
    sigs = {s: SignalCalibration(list(map(float, timesteps)), mean[:, j].tolist(), std[:, j].tolist(),
                                 bool(enabled[j])) for j, s in enumerate(SIGNALS)}
    return Policy(sigs, detect_steps=cfg.detect_steps, target_fpr=cfg.target_fpr, calibrated=True)


def _fit_all(benign: SignalSet, positives: SignalSet | None, timesteps, cfg: FitConfig, rule: str,
             enabled: np.ndarray) -> Policy:
    """Standardization, combination and thresholds from these measurements, for one rule."""
    policy = _standardized(benign, timesteps, cfg, enabled)
    u_b = policy.uscores(benign.raw, timesteps)
    u_p = policy.uscores(positives.raw, timesteps) if positives is not None else None
    fit = _fit_rule(u_b, u_p, rule, enabled, cfg)
    policy.combination, policy.threshold = fit.combination, fit.threshold
    if u_p is not None:   # which way similarity moves towards a copy, learned like the rest
        policy.verify_direction = 1 if float(u_p[:, verify_steps(u_p.shape[1], cfg), SIM].mean()) >= 0 else -1
    vs = verify_steps(u_b.shape[1], cfg)
    policy.verify_threshold = conformal_threshold((policy.verify_direction * u_b[:, vs, SIM]).max(axis=1),
                                                  cfg.verify_fpr)[0]
    return policy


def _benign_halves(groups: np.ndarray) -> np.ndarray:
    """A deterministic split of benign rows in two by prompt group (alternate over sorted groups)."""
    order = {g: i for i, g in enumerate(sorted(set(groups.tolist())))}
    return np.array([order[g] % 2 for g in groups.tolist()], bool)


def fit_policy(benign: SignalSet, timesteps: list[float], cfg: FitConfig = FitConfig(),
               positives: SignalSet | None = None, enabled: np.ndarray | None = None) -> Policy:
    """The policy for benign (and, if given, likely-memorized) measurements; rates in provenance."""
    enabled = np.ones(S, bool) if enabled is None else np.asarray(enabled, bool)
    has_pos = positives is not None and len(positives) >= 2
    positives = positives if has_pos else None
    clusters = sorted(set(positives.groups.tolist())) if has_pos else []
    rules = [cfg.rule] if cfg.rule != "auto" else (["linear", "distance"] if has_pos else ["distance"])
    if "linear" in rules and not has_pos:
        raise InvalidInput("rule", "the linear rule needs likely-memorized positives (none were found)")
    fit_report: dict = {"positives": len(positives) if has_pos else 0, "clusters": len(clusters)}
    folds: dict[str, list[dict]] = {}
    if len(clusters) >= 2:
        base = _standardized(benign, timesteps, cfg, enabled)
        u_b, u_p = base.uscores(benign.raw, timesteps), base.uscores(positives.raw, timesteps)
        tprs = {}
        for rule in rules:
            tprs[rule], folds[rule] = heldout_tpr(u_b, u_p, positives.groups, rule, enabled, cfg)
        fit_report["heldout_tpr"] = tprs
        rule = max(rules, key=lambda r: (tprs[r], r == "linear"))
    else:
        rule = rules[0]
        fit_report["heldout_tpr"] = "not validated: fewer than 2 clusters of positives"
    fit_report["rule"] = rule
    policy = _fit_all(benign, positives, timesteps, cfg, rule, enabled)
    policy.folds = folds.get(rule, [])
    u_b = policy.uscores(benign.raw, timesteps)
    scores = policy.combination.score(u_b)
    guaranteed = all(conformal_bound_holds(len(benign), a) for a in (cfg.window_fpr, cfg.verify_fpr))
    if not guaranteed:
        need = max(math.ceil((1 - a) / a) for a in (cfg.window_fpr, cfg.verify_fpr))
        log.warning("%d benign generations are too few to bound the false-positive rate at %.3g: the thresholds "
                    "are the benign maxima, with no guarantee (calibrate with at least %d)",
                    len(benign), cfg.target_fpr, need)
    policy.basin_exit_score = float(np.quantile(scores[:, :cfg.detect_steps], cfg.basin_exit_quantile))
    distances = (np.full(len(benign), np.nan) if benign.pdq_distances is None
                 else np.asarray(benign.pdq_distances, np.float64))
    policy.final_pdq_distance = lower_quantile_threshold(distances, cfg.final_fpr)
    fidelity = (np.full(len(benign), np.nan) if benign.fidelity is None
                else np.asarray(benign.fidelity, np.float64))
    policy.reroute_min_fidelity = lower_quantile_threshold(fidelity, cfg.reroute_fidelity_quantile)
    vs = verify_steps(u_b.shape[1], cfg)
    rates = {"window_fpr_bound": cfg.window_fpr, "verify_fpr_bound": cfg.verify_fpr,
             "fpr_bound_guaranteed": bool(guaranteed),
             "flag_rate_in_sample": float(np.mean(window_max(scores, cfg.detect_steps) > policy.threshold)),
             "verify_fail_rate_in_sample": float(np.mean(
                 (policy.verify_direction * u_b[:, vs, SIM]).max(axis=1) > policy.verify_threshold))}
    half = _benign_halves(benign.groups)
    if half.any() and not half.all():
        rows = []
        for fit_mask in (half, ~half):
            inner = _fit_all(benign.subset(fit_mask), positives, timesteps, cfg, rule, enabled)
            outer = inner.uscores(benign.raw[~fit_mask], timesteps)
            rows.append((np.mean(window_max(inner.combination.score(outer), cfg.detect_steps) > inner.threshold),
                         np.mean((inner.verify_direction * outer[:, vs, SIM]).max(axis=1) > inner.verify_threshold)))
        rates["flag_rate_cross_validated"], rates["verify_fail_rate_cross_validated"] = map(float, np.mean(rows, 0))
    if has_pos:
        rates["positive_flag_rate_in_sample"] = float(np.mean(window_max(
            policy.scores(positives.raw, timesteps), cfg.detect_steps) > policy.threshold))
    if policy.final_pdq_distance is not None:
        rates["final_reverify_fail_rate_in_sample"] = float(np.mean(distances < policy.final_pdq_distance))
    if policy.reroute_min_fidelity is not None:
        finite = fidelity[np.isfinite(fidelity)]
        rates["benign_fidelity_median"] = float(np.median(finite))
        rates["benign_below_reroute_min_fidelity"] = float(np.mean(finite < policy.reroute_min_fidelity))
    policy.provenance["fit"] = fit_report
    policy.provenance["rates"] = rates
    return policy.validate()
