"""The calibrated decision: per-signal standardization against benign prompts, one learned score.

Every signal's benign distribution drifts with the timestep (the noise divergence shrinks as t
falls, x̂0 sharpens), so each is standardized per timestep against benign generations:

    u_s(t) = (x_s(t) − μ_s(t)) / σ_s(t)                   (μ, σ: benign mean and std at t)

No signal has a fixed direction: which way a signal moves under memorization depends on the model
(memorized prompts pull attention off the BOS token on one model and onto it on another; the noise
divergence is loud at step 1 of an ε-model and nearly silent at step 1 of a zero-terminal-SNR
v-model). `memguard calibrate` learns the combination for each model (guard/calibrate.py):

* ``linear``: score(t) = w(t) · u(t), w a shrunk Fisher discriminant between benign generations and
  likely-memorized ones (captions of the training set's largest duplicate clusters), scaled so the
  score has unit benign variance. Signs and weights come from the data.
* ``distance``: score(t) = √(u(t)ᵀ Σ(t)⁻¹ u(t)), the Mahalanobis distance from the benign
  distribution (Σ: benign covariance of u). Needs no positives and catches a signal that moves
  either way; the fallback when no duplicate clusters exist.

One weight vector (or whitening matrix) per step of the detection window; later steps use the last.
A sample is *flagged* when score(t) > `threshold` at any step t < `detect_steps`; `threshold` is the
(1 − target FPR) order statistic of the benign per-sample maximum over that window, so the window as
a whole, not each step, meets the false-positive target. After a reroute the sample is
*re-verified*: its similarity u-score, oriented by `verify_direction` (learned from positives where
there are any; +1 otherwise, since similarity is a cosine to the nearest indexed item by
definition), must stay at or below `verify_threshold` (benign order statistic). Every released
image must lie at least `final_pdq_distance` bits (PDQ, colour-blind) from every indexed and
protected item: the smallest distance any benign calibration image had. A rerouted image must
also still answer its prompt: its prompt's CLIP standing among `reroute_references` (the index's
CLIP, guard/fidelity.py) at least `reroute_min_fidelity`, a low quantile of the benign
generations' own; else it is blocked.

The policy file records what it was fitted on, the rule chosen and the rates reached, with the
fits of held-out folds (clusters left out) so that benchmarks can score memorized prompts with a
fit that never saw them. Tables are interpolated linearly in the timestep, so a policy calibrated at
30 steps serves other step counts of the same scheduler.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from memguard.errors import CorruptData, InvalidInput, MissingResource
from memguard.fidelity import MIN_REFERENCES
from memguard.signals import SIGNALS
from memguard.types import Decision, FaceAction, GuardMode, Reason

POLICY_FORMAT = 3   # 3: the standout signal (a format-2 policy has no statistics for it: re-calibrate)
COMBINE_RULES = ("linear", "distance")
INF_FIELDS = ("threshold", "verify_threshold")   # +inf (never) is null in JSON
S = len(SIGNALS)


@dataclass
class SignalCalibration:
    """Benign mean and std of one signal on a grid of timesteps (any order; interpolated)."""
    timesteps: list[float]
    mean: list[float]
    std: list[float]
    enabled: bool = True             # part of the combined score


@dataclass
class Combination:
    """How u-scores [S] combine into one score, per detection step (later steps use the last row).

    linear: weights [W][S]; distance: whiten [W][S][S] (score = ‖u @ whiten‖)."""
    rule: str = "distance"
    weights: list[list[float]] = field(default_factory=list)
    whiten: list[list[list[float]]] = field(default_factory=list)

    def validate(self, where: str = "policy.combination") -> "Combination":
        if self.rule not in COMBINE_RULES:
            raise InvalidInput(f"{where}.rule", f"{self.rule!r} is not one of {COMBINE_RULES}")
        rows = self.weights if self.rule == "linear" else self.whiten
        if not rows:
            raise InvalidInput(where, f"the {self.rule} rule needs at least one row")
        for row in rows:
            shape = np.asarray(row, np.float64).shape
            if shape != ((S,) if self.rule == "linear" else (S, S)) or not np.all(np.isfinite(row)):
                raise InvalidInput(where, f"a row of shape {shape} (finite, {S} signals expected)")
        return self

    def matrices(self, steps: int) -> np.ndarray:
        """[steps, S, 1] (linear) or [steps, S, S] (distance) for step indices 0..steps-1."""
        rows = np.asarray(self.weights, np.float64)[..., None] if self.rule == "linear" else \
            np.asarray(self.whiten, np.float64)
        return rows[np.minimum(np.arange(steps), len(rows) - 1)]

    def score(self, u: np.ndarray) -> np.ndarray:
        """u-scores [..., steps, S] → scores [..., steps] (numpy; the device path is PolicyTables)."""
        m = self.matrices(u.shape[-2])
        out = np.einsum("...ts,tsk->...tk", u, m)
        return out[..., 0] if self.rule == "linear" else np.sqrt((out ** 2).sum(axis=-1))


@dataclass
class Policy:
    signals: dict[str, SignalCalibration]
    combination: Combination = field(default_factory=lambda: Combination("distance", whiten=[np.eye(S).tolist()]))
    threshold: float = math.inf           # score over the detection window: flag above it
    detect_steps: int = 2                 # decisions use steps 0 .. detect_steps-1
    verify_threshold: float = math.inf    # oriented similarity u after a reroute: still heading to a copy
    verify_direction: int = 1
    final_pdq_distance: float | None = None   # a released image this close (PDQ bits) to an item is blocked
    basin_exit_score: float = 0.0         # score at or below which a rerouted sample has left the basin
    # a REROUTED image must answer its prompt at least as well as the worst benign generations did
    # (guard/fidelity.py: the prompt's CLIP standing among reference captions, benign quantile);
    # None: the index has no CLIP, not checked
    reroute_min_fidelity: float | None = None
    reroute_references: list[str] = field(default_factory=list)   # the reference captions of that test
    target_fpr: float = 0.01
    calibrated: bool = False
    folds: list[dict] = field(default_factory=list)  # held-out fits: {"held_out": [...], "combination", "threshold"}
    provenance: dict = field(default_factory=dict)   # model, index, data, achieved rates

    # ---- construction and files -----------------------------------------------------------------
    @classmethod
    def uncalibrated(cls) -> "Policy":
        """Flags nothing from per-step signals (thresholds +inf); the final screen still applies."""
        return cls({s: SignalCalibration([0.0, 1000.0], [0.0, 0.0], [1.0, 1.0]) for s in SIGNALS})

    def validate(self) -> "Policy":
        missing = [s for s in SIGNALS if s not in self.signals]
        if missing:
            raise InvalidInput("policy.signals", f"missing {missing}")
        self.combination.validate()
        if self.detect_steps < 1:
            raise InvalidInput("policy.detect_steps", f"{self.detect_steps} < 1")
        if self.verify_direction not in (-1, 1):
            raise InvalidInput("policy.verify_direction", f"{self.verify_direction} is not ±1")
        for name, cal in self.signals.items():
            n = len(cal.timesteps)
            if n == 0 or len(cal.mean) != n or len(cal.std) != n:
                raise InvalidInput(f"policy.signals.{name}", "timesteps, mean and std need one equal, non-zero length")
            if min(cal.std) <= 0:
                raise InvalidInput(f"policy.signals.{name}.std", "must be positive")
        return self

    def fold_index(self, item_id: str) -> int:
        """Index of the fold whose fit held `item_id`'s cluster out; −1: none (the policy itself)."""
        return next((i for i, f in enumerate(self.folds) if item_id and item_id in f["held_out"]), -1)

    def fold_fit(self, key: int) -> tuple[Combination, float]:
        """Combination and threshold of fold `key` (−1: the policy's own)."""
        if key < 0:
            return self.combination, self.threshold
        return Combination(**self.folds[key]["combination"]), float(self.folds[key]["threshold"])

    def fold_for(self, item_id: str) -> tuple[Combination, float]:
        """The combination and threshold of the fit that held `item_id`'s cluster out (else the policy's)."""
        return self.fold_fit(self.fold_index(item_id))

    def to_json(self) -> dict:
        d = asdict(self)
        d["format"] = POLICY_FORMAT
        for key in INF_FIELDS:
            d[key] = None if math.isinf(d[key]) else d[key]
        return d

    @classmethod
    def from_json(cls, data: dict) -> "Policy":
        if data.get("format") != POLICY_FORMAT:
            raise InvalidInput("policy.format", f"{data.get('format')!r} is not {POLICY_FORMAT}: "
                                                "re-run `memguard calibrate`")
        sigs = {k: SignalCalibration(**v) for k, v in data["signals"].items()}
        kw = {k: data[k] for k in ("detect_steps", "basin_exit_score", "target_fpr", "calibrated", "folds",
                                   "verify_direction", "final_pdq_distance", "reroute_min_fidelity", "reroute_references",
                                   "provenance")
              if k in data}
        for key in INF_FIELDS:
            kw[key] = math.inf if data.get(key) is None else float(data[key])
        policy = cls(sigs, Combination(**data["combination"]), **kw).validate()
        if policy.reroute_min_fidelity is not None and len(policy.reroute_references) < MIN_REFERENCES:
            raise InvalidInput("policy.reroute_references",
                               f"a fidelity floor needs at least {MIN_REFERENCES} reference prompts")
        return policy

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic write (temp file + fsync + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_json(), f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Policy":
        path = Path(path)
        if not path.is_file():
            raise MissingResource(f"no policy file at {path}: run `memguard calibrate` to make one")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CorruptData(f"{path}: not valid JSON ({exc})") from exc
        try:
            return cls.from_json(data)
        except (KeyError, TypeError) as exc:
            raise CorruptData(f"{path}: not a MemGuard policy ({type(exc).__name__}: {exc})") from exc

    # ---- the math -------------------------------------------------------------------------------
    def standardization(self, timesteps) -> tuple[np.ndarray, np.ndarray]:
        """Benign mean and std [steps, S] interpolated at a generation's timesteps."""
        ts = np.asarray([float(t) for t in timesteps], dtype=np.float64)
        mean, std = np.zeros((len(ts), S)), np.ones((len(ts), S))
        for j, name in enumerate(SIGNALS):
            cal = self.signals[name]
            order = np.argsort(cal.timesteps)
            grid = np.asarray(cal.timesteps, np.float64)[order]
            mean[:, j] = np.interp(ts, grid, np.asarray(cal.mean, np.float64)[order])
            std[:, j] = np.interp(ts, grid, np.asarray(cal.std, np.float64)[order])
        return mean, std

    def enabled_mask(self) -> np.ndarray:
        return np.array([self.signals[s].enabled for s in SIGNALS])

    def uscores(self, raw: np.ndarray, timesteps) -> np.ndarray:
        """Raw signals [..., steps, S] → u-scores (disabled signals are 0)."""
        mean, std = self.standardization(timesteps)
        return np.where(self.enabled_mask(), (raw - mean) / std, 0.0)

    def scores(self, raw: np.ndarray, timesteps, combination: Combination | None = None) -> np.ndarray:
        """Raw signals [..., steps, S] → per-step scores [..., steps] (numpy, for calibration and benchmarks)."""
        return (combination or self.combination).score(self.uscores(raw, timesteps))

    def tables(self, timesteps, device: torch.device | str = "cpu") -> "PolicyTables":
        """Standardization and combination at a generation's timesteps, as device tensors."""
        mean, std = self.standardization(timesteps)
        f32 = dict(device=device, dtype=torch.float32)
        return PolicyTables(torch.tensor(mean, **f32), torch.tensor(std, **f32),
                            torch.tensor(self.enabled_mask(), device=device, dtype=torch.bool),
                            torch.tensor(self.combination.matrices(len(mean)), **f32), self.combination.rule)


@dataclass
class PolicyTables:
    """One generation's standardization and combination on the device."""
    mean: torch.Tensor        # [steps, S]
    std: torch.Tensor         # [steps, S]
    enabled: torch.Tensor     # [S] bool
    matrix: torch.Tensor      # [steps, S, 1] (linear) or [steps, S, S] (distance)
    rule: str = "distance"

    def zscores(self, values: torch.Tensor, step: int) -> torch.Tensor:
        """[B, S] raw signals at `step` → [B, S] u-scores (disabled signals 0)."""
        u = (values - self.mean[step]) / self.std[step]
        return torch.where(self.enabled, u, torch.zeros_like(u))

    def combined(self, z: torch.Tensor, step: int) -> torch.Tensor:
        """[B, S] u-scores → [B] score at `step`."""
        out = z @ self.matrix[step]
        return out[:, 0] if self.rule == "linear" else out.norm(dim=1)


def upper_quantile_threshold(benign_scores: np.ndarray, fpr: float) -> float:
    """The smallest threshold τ such that at most a share `fpr` of benign scores exceed τ.

    Order statistic, not an interpolated quantile: with n scores, exactly ⌊fpr·n⌋ lie above τ.
    """
    scores = np.sort(np.asarray(benign_scores, np.float64))
    if scores.size == 0:
        raise InvalidInput("benign_scores", "empty")
    allowed = int(math.floor(fpr * scores.size))
    return float(scores[scores.size - 1 - allowed])


def conformal_threshold(benign_scores: np.ndarray, alpha: float) -> tuple[float, bool]:
    """τ such that a fresh benign score, exchangeable with these n, exceeds τ with probability ≤ alpha.

    Split conformal: τ is the ⌈(n+1)(1−α)⌉-th smallest score (E[rate above τ] ≤ α exactly, where the
    in-sample order statistic of `upper_quantile_threshold` lets (⌊αn⌋+1)/(n+1) > α through). Needs
    n ≥ ⌈(1−α)/α⌉; with fewer scores, returns their maximum and False (no guarantee: the caller says so).
    """
    scores = np.sort(np.asarray(benign_scores, np.float64))
    if scores.size == 0:
        raise InvalidInput("benign_scores", "empty")
    k = _conformal_rank(scores.size, alpha)
    return float(scores[min(k, scores.size) - 1]), k <= scores.size


def conformal_bound_holds(n: int, alpha: float) -> bool:
    """Whether n benign scores are enough for `conformal_threshold` to bound the rate at alpha."""
    return _conformal_rank(n, alpha) <= n


def _conformal_rank(n: int, alpha: float) -> int:
    if not 0.0 < alpha < 1.0:
        raise InvalidInput("alpha", f"must lie in (0, 1), got {alpha}")
    return math.ceil((n + 1) * (1.0 - alpha) - 1e-9)


@dataclass(frozen=True)
class FinalVerdict:
    decision: Decision
    reason: Reason
    release: bool             # an image goes back to the caller
    obfuscate_faces: bool     # blur/pixelate the matched faces before releasing


def final_verdict(mode: GuardMode, rerouted: bool, copy: bool, faces_matched: int,
                  face_action: FaceAction) -> FinalVerdict:
    """The decision for a sample that finished denoising, from the final screen's outcome.

    ENFORCE: a copy is blocked; matched faces are obfuscated (or the image blocked, by face_action);
    otherwise REROUTED if a mitigation ran, else ALLOWED. MONITOR: the image is always released
    untouched, ALLOWED, with the reason it would have been acted on.
    """
    reason = Reason.MEMORIZATION if copy or rerouted else Reason.PROTECTED_FACE if faces_matched else Reason.NONE
    if mode != GuardMode.ENFORCE:
        return FinalVerdict(Decision.ALLOWED, reason if mode == GuardMode.MONITOR else Reason.NONE, True, False)
    if copy:
        return FinalVerdict(Decision.BLOCKED, Reason.MEMORIZATION, False, False)
    if faces_matched:
        if face_action == FaceAction.BLOCK:
            return FinalVerdict(Decision.BLOCKED, Reason.PROTECTED_FACE, False, False)
        return FinalVerdict(Decision.FACE_OBFUSCATED, Reason.PROTECTED_FACE, True, True)
    if rerouted:
        return FinalVerdict(Decision.REROUTED, Reason.MEMORIZATION, True, False)
    return FinalVerdict(Decision.ALLOWED, Reason.NONE, True, False)
