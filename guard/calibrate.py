"""`memguard calibrate`: run benign prompts, fit the policy's standardization and thresholds.

Benign data must be disjoint from what the policy is evaluated on. For the testbed the default
calibration set is training-distribution captions (shape/colour/pattern combinations that were
in training) with seeds from a range no benchmark uses; the memorized captions, their paraphrases
and the held-out "novel" combinations are excluded by construction. For any other model, pass a
prompt file (`--prompts`, one benign prompt a line).

Procedure (guard/policy.py has the formulas):
1. generate every (prompt, seed) in MONITOR mode with an uncalibrated policy, retrieving fresh
   candidates from the index at every step (so the similarity table is "nearest indexed item",
   which re-verification uses), and keep the raw signals [N, steps, S];
2. μ_s(t), σ_s(t): per-step benign mean and std of each signal;
3. threshold: the (1 − FPR) order statistic of each benign sample's maximum combined score over
   the detection window; verify_threshold: the same for the similarity z over the re-verification
   steps; achieved rates are reported in-sample and 2-fold cross-validated (fit on one half of the
   prompts, count on the other);
4. write the policy with its provenance: model path and weights hash, index path and manifest
   hash, the data used, the rates achieved.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from guard.digest import sha256_file
from guard.errors import InvalidInput, MissingResource
from guard.policy import Policy, SignalCalibration, combine_z, upper_quantile_threshold
from guard.signals import DIRECTIONS, SIGNALS

log = logging.getLogger(__name__)

TESTBED_DIR = Path(__file__).resolve().parent / "testbed"
TESTBED_MODEL_DIR = TESTBED_DIR / "model"
TESTBED_INDEX_DIR = TESTBED_DIR / "index"
TESTBED_POLICY = TESTBED_DIR / "policy.json"
POLICY_FILE_NAME = "memguard_policy.json"
CALIBRATION_SEED_BASE = 900_000        # no benchmark or test uses seeds in this range


# ---- default resources ---------------------------------------------------------------------------
def is_testbed(model_dir: str | os.PathLike | None) -> bool:
    return model_dir is None or Path(model_dir).resolve() == TESTBED_MODEL_DIR.resolve()


def resolve_model_dir(model_dir: str | os.PathLike | None) -> Path:
    """The model directory in use: the given one, else the testbed's."""
    return Path(model_dir) if model_dir else TESTBED_MODEL_DIR


def default_index_dir(model_dir: str | os.PathLike | None) -> Path | None:
    """The testbed's index for the testbed model; None (must be given) for any other model."""
    return TESTBED_INDEX_DIR if is_testbed(model_dir) else None


def default_policy_path(model_dir: str | os.PathLike | None) -> Path:
    return TESTBED_POLICY if is_testbed(model_dir) else Path(model_dir) / POLICY_FILE_NAME


def model_hash(model_dir: Path) -> str:
    """sha256 over the pipeline's config and weight files (names and contents)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(model_dir).rglob("*") if p.is_file() and p.suffix in
                   (".json", ".safetensors", ".bin", ".txt"))
    for p in files:
        h.update(str(p.relative_to(model_dir)).encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


# ---- the testbed's index -------------------------------------------------------------------------
def build_testbed_index(out: Path = TESTBED_INDEX_DIR, model_dir: Path = TESTBED_MODEL_DIR, *,
                        progress: bool = True) -> dict:
    """Index the testbed's training set with its own VAE, then calibrate the screen's thresholds."""
    from guard.index.api import FingerprintIndex
    from guard.index.calibrate import CalibrationConfig, calibrate
    from guard.index.sources import ImageFolderSource
    from guard.testbed.dataset import build_training_set, heldout_images, write_image_folder

    if not (Path(model_dir) / "model_index.json").is_file():
        raise MissingResource(f"no testbed model at {model_dir}: build it with `memguard testbed build`")
    with tempfile.TemporaryDirectory(prefix="memguard-testbed-images-") as tmp:
        train = write_image_folder(build_training_set(), Path(tmp) / "train")
        held = write_image_folder(heldout_images(), Path(tmp) / "heldout")
        build = FingerprintIndex.build(out, ImageFolderSource(train), model_dir=Path(model_dir), progress=progress,
                                       restart=True)
        with FingerprintIndex.open(out, model_dir=Path(model_dir)) as index:
            report = calibrate(index, ImageFolderSource(train), heldout=ImageFolderSource(held),
                               cfg=CalibrationConfig(), progress=progress)
    return {"build": asdict(build) if hasattr(build, "__dataclass_fields__") else str(build),
            "thresholds": report.get("thresholds")}


# ---- benign prompts ------------------------------------------------------------------------------
def benign_testbed_prompts(count: int, seed: int = 0) -> list[str]:
    """Training-distribution captions, never a memorized caption, a paraphrase or a novel prompt."""
    from guard.testbed.dataset import PHOTOS, TestbedDataConfig, all_combos, caption_for, heldout_prompts, is_heldout

    cfg = TestbedDataConfig()
    excluded = set(heldout_prompts(cfg, count=10_000)) | {p.caption for p in PHOTOS} | \
        {q for p in PHOTOS for q in p.paraphrases}
    pool = sorted({caption_for(*c) for c in all_combos() if not is_heldout(c, cfg)} - excluded)
    rng = np.random.default_rng(seed)
    return [pool[int(i)] for i in rng.choice(len(pool), size=min(count, len(pool)), replace=False)]


def read_prompt_file(path: Path) -> list[str]:
    if not Path(path).is_file():
        raise MissingResource(f"prompt file {path} does not exist")
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise InvalidInput("prompts", f"{path} holds no prompts")
    return prompts


# ---- measuring and fitting -----------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationConfig:
    prompts: int = 192                 # benign prompts (testbed default set)
    seeds_per_prompt: int = 1
    steps: int = 30
    guidance_scale: float = 7.5
    target_fpr: float = 0.01
    final_fpr: float = 0.0             # rerouted images closer (PDQ) than this share of benign ones are blocked
    detect_steps: int = 2              # decisions at steps 0 .. detect_steps-1 ("by step 2")
    verify_fraction: float = 0.2       # re-verification steps: detect_steps .. this share of steps
    basin_exit_z: float = 1.0
    combine: str = "mean"
    batch_size: int = 16
    height: int = 64


def collect_signals(guarded, prompts: list[str], seeds: list[int], cfg: CalibrationConfig,
                    *, progress: bool = True) -> tuple[np.ndarray, list[float], np.ndarray]:
    """Raw signals [N, steps, S] of benign generations (MONITOR mode, nothing is changed), their
    timesteps, and each image's PDQ distance to the closest indexed item [N] (NaN without an index)."""
    from guard.pipeline import nearest_pdq_distance
    from guard.types import GenerationRequest, GuardMode

    out, timesteps, distances = [], [], []
    for start in range(0, len(prompts), cfg.batch_size):
        reqs = [GenerationRequest(p, seed=s, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                                  height=cfg.height, width=cfg.height, mode=GuardMode.MONITOR)
                for p, s in zip(prompts[start:start + cfg.batch_size], seeds[start:start + cfg.batch_size])]
        batch = guarded.generate(reqs)
        for rs in batch.results:
            rows = rs[0].report.trace
            out.append([[row[name] for name in SIGNALS] for row in rows])
            timesteps = [row["timestep"] for row in rows]
            distances.append(nearest_pdq_distance(guarded.index, rs[0].image) if guarded.index is not None
                             else math.nan)
        if progress:
            log.info("calibration: %d / %d generations", min(start + cfg.batch_size, len(prompts)), len(prompts))
    return np.asarray(out, dtype=np.float64), timesteps, np.asarray(distances, dtype=np.float64)


def _zscores(raw: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    direction = np.array([DIRECTIONS[s] for s in SIGNALS], np.float64)
    return direction * (raw - mean) / std


def standardization(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-step benign mean and std [steps, S]; std floored so a constant signal cannot divide by 0."""
    mean = raw.mean(axis=0)
    std = raw.std(axis=0, ddof=1) if len(raw) > 1 else np.ones_like(mean)
    return mean, np.maximum(std, 1e-6 + 1e-3 * np.abs(mean))


def window_scores(raw: np.ndarray, mean, std, cfg: CalibrationConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: max combined z over the detection window, max similarity z over the verify steps."""
    import torch

    z = _zscores(raw, mean, std)
    combined = combine_z(torch.from_numpy(z), torch.ones(len(SIGNALS), dtype=torch.bool), cfg.combine).numpy()
    detect = combined[:, :cfg.detect_steps].max(axis=1)
    sim = SIGNALS.index("similarity")
    last = max(cfg.detect_steps + 1, math.ceil(cfg.verify_fraction * raw.shape[1]))
    return detect, z[:, cfg.detect_steps:last, sim].max(axis=1)


def lower_quantile_threshold(benign: np.ndarray, fpr: float) -> float | None:
    """The largest τ with at most ⌊fpr·n⌋ benign values strictly below it (None: no finite values)."""
    values = np.sort(np.asarray(benign, np.float64)[np.isfinite(benign)])
    if values.size == 0:
        return None
    return float(values[int(math.floor(fpr * values.size))])


def fit_policy(raw: np.ndarray, timesteps: list[float], cfg: CalibrationConfig, groups: np.ndarray,
               pdq_distances: np.ndarray | None = None) -> Policy:
    """Policy from benign raw signals [N, steps, S] and the benign images' PDQ distances to the
    index [N]; `groups` [N] (prompt ids) for the cross-check."""
    mean, std = standardization(raw)
    detect, verify = window_scores(raw, mean, std, cfg)
    distances = np.full(len(raw), np.nan) if pdq_distances is None else np.asarray(pdq_distances, np.float64)
    policy = Policy(
        {s: SignalCalibration(DIRECTIONS[s], list(map(float, timesteps)), mean[:, j].tolist(), std[:, j].tolist())
         for j, s in enumerate(SIGNALS)},
        threshold=upper_quantile_threshold(detect, cfg.target_fpr), detect_steps=cfg.detect_steps,
        verify_threshold=upper_quantile_threshold(verify, cfg.target_fpr), basin_exit_z=cfg.basin_exit_z,
        final_pdq_distance=lower_quantile_threshold(distances, cfg.final_fpr),
        combine=cfg.combine, target_fpr=cfg.target_fpr, calibrated=True)
    rates = {"flag_rate_in_sample": float(np.mean(detect > policy.threshold)),
             "verify_fail_rate_in_sample": float(np.mean(verify > policy.verify_threshold)),
             **cross_validated_rates(raw, cfg, groups, distances)}
    if policy.final_pdq_distance is not None:
        rates["final_reverify_fail_rate_in_sample"] = float(np.mean(distances < policy.final_pdq_distance))
    policy.provenance["rates"] = rates
    return policy.validate()


def cross_validated_rates(raw: np.ndarray, cfg: CalibrationConfig, groups: np.ndarray,
                          distances: np.ndarray) -> dict:
    """Fit on half of the prompts, count benign flags on the other half, and the reverse."""
    half = (groups % 2).astype(bool)
    if half.all() or not half.any():
        return {}
    rates = []
    for fit in (half, ~half):
        mean, std = standardization(raw[fit])
        inside, outside = window_scores(raw[fit], mean, std, cfg), window_scores(raw[~fit], mean, std, cfg)
        row = [np.mean(o > upper_quantile_threshold(i, cfg.target_fpr)) for i, o in zip(inside, outside)]
        tau = lower_quantile_threshold(distances[fit], cfg.final_fpr)
        row.append(np.nan if tau is None else np.mean(distances[~fit] < tau))
        rates.append(row)
    flag, verify, final = np.mean(rates, axis=0)
    out = {"flag_rate_cross_validated": float(flag), "verify_fail_rate_cross_validated": float(verify)}
    if np.isfinite(final):
        out["final_reverify_fail_rate_cross_validated"] = float(final)
    return out


def calibrate(model_dir: Path | None = None, index_dir: Path | None = None, out: Path | None = None, *,
              cfg: CalibrationConfig = CalibrationConfig(), prompt_file: Path | None = None,
              device: str = "cpu", progress: bool = True, signals_out: Path | None = None) -> Policy:
    """Measure benign prompts on `model_dir` with `index_dir`; write and return the policy."""
    from guard.index.api import FingerprintIndex
    from guard.loading import load_pipeline
    from guard.pipeline import GuardConfig, GuardedPipeline

    model_dir = Path(model_dir) if model_dir else TESTBED_MODEL_DIR
    index_dir = Path(index_dir) if index_dir else default_index_dir(model_dir)
    if index_dir is None:
        raise InvalidInput("index", "give the index built from this model's training set (--index DIR)")
    if prompt_file is None and not is_testbed(model_dir):
        raise InvalidInput("prompts", "give a file of benign prompts (--prompts FILE) for a model other than the testbed")
    base = read_prompt_file(prompt_file) if prompt_file else benign_testbed_prompts(cfg.prompts)
    prompts = [p for p in base[:cfg.prompts] for _ in range(cfg.seeds_per_prompt)]
    groups = np.array([i for i in range(len(base[:cfg.prompts])) for _ in range(cfg.seeds_per_prompt)])
    seeds = [CALIBRATION_SEED_BASE + i for i in range(len(prompts))]
    t0 = time.time()
    with FingerprintIndex.open(index_dir, model_dir=model_dir, device=device) as index:
        guarded = GuardedPipeline(load_pipeline(model_dir, device=device), index=index, policy=Policy.uncalibrated(),
                                  config=GuardConfig(retrieve_steps=tuple(range(cfg.steps))))
        raw, timesteps, distances = collect_signals(guarded, prompts, seeds, cfg, progress=progress)
    if signals_out:   # the measured benign signals, for audits and re-fitting without re-generating
        np.savez_compressed(signals_out, raw=raw, timesteps=np.asarray(timesteps), groups=groups,
                            prompts=np.asarray(prompts), seeds=np.asarray(seeds), pdq_distances=distances)
    policy = fit_policy(raw, timesteps, cfg, groups, distances)
    policy.provenance.update(
        model={"path": str(model_dir.resolve()), "sha256": model_hash(model_dir)},
        index={"path": str(index_dir.resolve()), "manifest_sha256": sha256_file(index_dir / "manifest.json")},
        data={"source": str(prompt_file) if prompt_file else "testbed training-distribution captions",
              "prompts": len(base[:cfg.prompts]), "generations": len(prompts), "seeds": [seeds[0], seeds[-1]],
              "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()},
        config=asdict(cfg), seconds=round(time.time() - t0, 1),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    policy.save(out or default_policy_path(model_dir))
    return policy


def check_provenance(policy: Policy, model_dir: Path | None, index_dir: Path | None) -> list[str]:
    """Warnings when the policy was calibrated on another model or index than the ones in use."""
    warnings = []
    prov = policy.provenance
    if model_dir and prov.get("model", {}).get("sha256") not in (None, model_hash(Path(model_dir))):
        warnings.append(f"the policy was calibrated on another model ({prov['model'].get('path')})")
    manifest = Path(index_dir) / "manifest.json" if index_dir else None
    if manifest and manifest.is_file() and prov.get("index", {}).get("manifest_sha256") not in (None, sha256_file(manifest)):
        warnings.append(f"the policy was calibrated with another index ({prov['index'].get('path')})")
    return warnings


def with_overrides(cfg: CalibrationConfig, **kw) -> CalibrationConfig:
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})


def policy_summary(policy: Policy) -> dict:
    return json.loads(json.dumps({"threshold": policy.threshold, "verify_threshold": policy.verify_threshold,
                                  "final_pdq_distance": policy.final_pdq_distance,
                                  "detect_steps": policy.detect_steps, "combine": policy.combine,
                                  "target_fpr": policy.target_fpr, **policy.provenance}, default=str))
