"""The calibrated decision: per-signal standardization against benign prompts, one combined score.

Every signal's benign distribution drifts with the timestep (the noise divergence shrinks as t
falls, x̂0 sharpens), so each is standardized per timestep against benign generations:

    z_s(t) = direction_s · (x_s(t) − μ_s(t)) / σ_s(t)          (μ, σ: benign mean and std at t)
    combined(t) = mean over enabled signals of z_s(t)           ("mean", the default)

"mean" is Stouffer's combination of z-scores (Σ z / √S, up to the constant √S): consistent
moderate evidence from several signals adds up, and a weak or uninformative signal dilutes the
score instead of adding its own false positives. "max" (any one signal may flag) is the
alternative; on the testbed it flags fewer memorized samples at the same benign FPR (the
quality benchmark's notes give both).

A sample is *flagged* when combined(t) > `threshold` at any step t < `detect_steps`; `threshold`
is the (1 − target FPR) order statistic of the benign per-sample maximum over that window, so
the window as a whole, not each step, meets the false-positive target. After a reroute the
sample is *re-verified*: its similarity z-score (is x̂0 still heading to an indexed item? a fresh
index search) must stay at or below `verify_threshold` at the verification steps (chosen the same
way from benign samples). Every released image (rerouted or not) must lie at least
`final_pdq_distance` bits (PDQ perceptual hash, colour-blind) from every indexed and protected
item: by default the smallest distance any benign calibration image had. The index's own copy
thresholds are calibrated on augmented copies; this one is calibrated on what the model makes
from benign prompts, and catches the tinted, degraded copies a memorizing model produces.

`memguard calibrate` (guard/calibrate.py) measures μ, σ and the thresholds and writes the policy
file, which also records the model, the index, the data used and the rates achieved.
Tables are interpolated linearly in the timestep, so a policy calibrated at 30 steps serves other
step counts of the same scheduler.
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

from guard.errors import CorruptData, InvalidInput, MissingResource
from guard.signals import DIRECTIONS, SIGNALS
from guard.types import Decision, FaceAction, GuardMode, Reason

POLICY_FORMAT = 1
COMBINE_RULES = ("max", "mean")
INF_FIELDS = ("threshold", "verify_threshold")   # +inf (never) is null in JSON


@dataclass
class SignalCalibration:
    """Benign mean and std of one signal on a grid of timesteps (any order; interpolated)."""
    direction: int                   # +1: larger is more suspicious; −1: smaller is
    timesteps: list[float]
    mean: list[float]
    std: list[float]
    enabled: bool = True             # part of the combined score


@dataclass
class Policy:
    signals: dict[str, SignalCalibration]
    threshold: float = math.inf           # combined z over the detection window: flag above it
    detect_steps: int = 2                 # decisions use steps 0 .. detect_steps-1
    verify_threshold: float = math.inf    # similarity z after a reroute: still heading to a copy above it
    final_pdq_distance: float | None = None   # a rerouted image this close (PDQ bits) to an item is blocked
    basin_exit_z: float = 1.0             # divergence z at or below which a rerouted sample left the basin
    combine: str = "mean"
    target_fpr: float = 0.01
    calibrated: bool = False
    provenance: dict = field(default_factory=dict)   # model, index, data, achieved rates

    # ---- construction and files -----------------------------------------------------------------
    @classmethod
    def uncalibrated(cls) -> "Policy":
        """Flags nothing from per-step signals (thresholds +inf); the final screen still applies."""
        sigs = {s: SignalCalibration(DIRECTIONS[s], [0.0, 1000.0], [0.0, 0.0], [1.0, 1.0]) for s in SIGNALS}
        return cls(sigs)

    def validate(self) -> "Policy":
        missing = [s for s in SIGNALS if s not in self.signals]
        if missing:
            raise InvalidInput("policy.signals", f"missing {missing}")
        if self.combine not in COMBINE_RULES:
            raise InvalidInput("policy.combine", f"{self.combine!r} is not one of {COMBINE_RULES}")
        if self.detect_steps < 1:
            raise InvalidInput("policy.detect_steps", f"{self.detect_steps} < 1")
        for name, cal in self.signals.items():
            n = len(cal.timesteps)
            if n == 0 or len(cal.mean) != n or len(cal.std) != n:
                raise InvalidInput(f"policy.signals.{name}", "timesteps, mean and std need one equal, non-zero length")
            if min(cal.std) <= 0:
                raise InvalidInput(f"policy.signals.{name}.std", "must be positive")
            if cal.direction not in (-1, 1):
                raise InvalidInput(f"policy.signals.{name}.direction", f"{cal.direction} is not ±1")
        return self

    def to_json(self) -> dict:
        d = asdict(self)
        d["format"] = POLICY_FORMAT
        for key in INF_FIELDS:
            d[key] = None if math.isinf(d[key]) else d[key]
        return d

    @classmethod
    def from_json(cls, data: dict) -> "Policy":
        if data.get("format") != POLICY_FORMAT:
            raise InvalidInput("policy.format", f"{data.get('format')!r} is not {POLICY_FORMAT}")
        sigs = {k: SignalCalibration(**v) for k, v in data["signals"].items()}
        kw = {k: data[k] for k in ("detect_steps", "basin_exit_z", "combine", "target_fpr", "calibrated",
                                   "final_pdq_distance", "provenance") if k in data}
        for key in INF_FIELDS:
            kw[key] = math.inf if data.get(key) is None else float(data[key])
        return cls(sigs, **kw).validate()

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
    def tables(self, timesteps, device: torch.device | str = "cpu") -> "PolicyTables":
        """Benign mean/std interpolated at a generation's timesteps, as device tensors [steps, S]."""
        ts = np.asarray([float(t) for t in timesteps], dtype=np.float64)
        mean, std = np.zeros((len(ts), len(SIGNALS))), np.ones((len(ts), len(SIGNALS)))
        for j, name in enumerate(SIGNALS):
            cal = self.signals[name]
            order = np.argsort(cal.timesteps)
            grid = np.asarray(cal.timesteps, np.float64)[order]
            mean[:, j] = np.interp(ts, grid, np.asarray(cal.mean, np.float64)[order])
            std[:, j] = np.interp(ts, grid, np.asarray(cal.std, np.float64)[order])
        direction = [float(self.signals[s].direction) for s in SIGNALS]
        enabled = [self.signals[s].enabled for s in SIGNALS]
        f32 = dict(device=device, dtype=torch.float32)
        return PolicyTables(torch.tensor(mean, **f32), torch.tensor(std, **f32), torch.tensor(direction, **f32),
                            torch.tensor(enabled, device=device, dtype=torch.bool), self.combine)


@dataclass
class PolicyTables:
    """One generation's standardization tables on the device."""
    mean: torch.Tensor        # [steps, S]
    std: torch.Tensor         # [steps, S]
    direction: torch.Tensor   # [S]
    enabled: torch.Tensor     # [S] bool
    combine: str = "mean"

    def zscores(self, values: torch.Tensor, step: int) -> torch.Tensor:
        """[B, S] raw signals at `step` → [B, S] oriented z-scores (larger = more suspicious)."""
        return self.direction * (values - self.mean[step]) / self.std[step]

    def combined(self, z: torch.Tensor) -> torch.Tensor:
        """[B, S] z-scores → [B] combined score over the enabled signals."""
        return combine_z(z, self.enabled, self.combine)


def combine_z(z: torch.Tensor, enabled: torch.Tensor, rule: str) -> torch.Tensor:
    """Combine oriented z-scores [..., S] over the enabled signals → [...]."""
    if rule == "max":
        return z.masked_fill(~enabled, -math.inf).amax(dim=-1)
    if rule == "mean":
        return (z * enabled).sum(dim=-1) / enabled.sum().clamp_min(1)
    raise InvalidInput("policy.combine", f"{rule!r} is not one of {COMBINE_RULES}")


def upper_quantile_threshold(benign_scores: np.ndarray, fpr: float) -> float:
    """The smallest threshold τ such that at most a share `fpr` of benign scores exceed τ.

    Order statistic, not an interpolated quantile: with n scores, exactly ⌊fpr·n⌋ lie above τ.
    """
    scores = np.sort(np.asarray(benign_scores, np.float64))
    if scores.size == 0:
        raise InvalidInput("benign_scores", "empty")
    allowed = int(math.floor(fpr * scores.size))
    return float(scores[scores.size - 1 - allowed])


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
