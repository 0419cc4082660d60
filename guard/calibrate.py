"""`memguard calibrate`: measure benign and likely-memorized prompts, fit the policy (guard/policy_fit.py).

Two kinds of data, both available without labels:
- benign prompts (negatives): a product's own traffic or caption sets (`--prompts FILE`); for the
  testbeds, training-distribution captions with seeds from a range no benchmark uses (their
  memorized captions, paraphrases, novel and web-style prompts are excluded by construction);
- likely-memorized prompts (positives): the captions of the training set's largest duplicate
  clusters, found by the index (`memguard index duplicates`): memorization follows duplication
  (Carlini et al. 2023; Webster 2023). `--positives FILE` adds known memorized prompts.

Procedure:
1. generate every (prompt, seed) in MONITOR mode with an uncalibrated policy, retrieving fresh
   candidates from the index at every step, and keep the raw signals [N, steps, S];
2. fit (guard/policy_fit.py): benign standardization; a learned combination validated on held-out
   clusters (or, without positives, a two-sided distance rule); thresholds for the target FPR;
3. write the policy with its provenance: model and index hashes, the data used, the rule chosen,
   held-out TPRs and the benign rates reached (in sample and cross-validated).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from memguard.digest import sha256_file
from memguard.errors import InvalidInput, MissingResource
from memguard.policy import Policy
from memguard.policy_fit import FitConfig, SignalSet, fit_policy
from memguard.signals import SIGNALS
from memguard.index.encoders import BUNDLED_CLIP_WEIGHTS
from memguard.testbed.registry import TESTBEDS, Testbed, get_testbed

CLIP_MODEL = "memguard-testbed-clip"   # memguard.testbed.clip_judge's model, trained on both testbeds
CLIP_WEIGHTS = BUNDLED_CLIP_WEIGHTS

log = logging.getLogger(__name__)

TESTBED_MODEL_DIR = get_testbed().model_dir   # the default testbed (v-prediction)
TESTBED_INDEX_DIR = get_testbed().index_dir
TESTBED_POLICY = get_testbed().policy_path
POLICY_FILE_NAME = "memguard_policy.json"
CALIBRATION_SEED_BASE = 900_000        # no benchmark or test uses seeds in this range
POSITIVE_SEED_BASE = 950_000


# ---- default resources ---------------------------------------------------------------------------
def testbed_of(model_dir: str | os.PathLike | None) -> Testbed | None:
    """The shipped testbed whose model this is (None: the default testbed), or None for other models."""
    if model_dir is None:
        return get_testbed()
    resolved = Path(model_dir).resolve()
    return next((tb for tb in TESTBEDS.values() if tb.model_dir.resolve() == resolved), None)


def is_testbed(model_dir: str | os.PathLike | None) -> bool:
    return testbed_of(model_dir) is not None


def resolve_model_dir(model_dir: str | os.PathLike | None) -> Path:
    """The model directory in use: the given one, else the default testbed's."""
    return Path(model_dir) if model_dir else TESTBED_MODEL_DIR


def default_index_dir(model_dir: str | os.PathLike | None) -> Path | None:
    """A testbed's own index for a testbed model; None (must be given) for any other model."""
    tb = testbed_of(model_dir)
    return tb.index_dir if tb else None


def default_policy_path(model_dir: str | os.PathLike | None) -> Path:
    tb = testbed_of(model_dir)
    return tb.policy_path if tb else Path(model_dir) / POLICY_FILE_NAME


def model_hash(model_dir: Path) -> str:
    """sha256 over the pipeline's config and weight files (names and contents)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(model_dir).rglob("*") if p.is_file() and p.suffix in
                   (".json", ".safetensors", ".bin", ".txt"))
    for p in files:
        h.update(str(p.relative_to(model_dir)).encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


# ---- the testbed's index -------------------------------------------------------------------------
def build_testbed_index(testbed: Testbed | None = None, *, out: Path | None = None, progress: bool = True,
                        near_duplicates: int | None = None) -> dict:
    """Index a testbed's training set (every duplicate as its own record, as the model saw them;
    identical images fold into one item) with its own VAE, then calibrate the screen's thresholds."""
    from memguard.crypto import DataKey
    from memguard.index.api import FingerprintIndex
    from memguard.index.calibrate import CalibrationConfig, calibrate
    from memguard.index.sealed import demo_key
    from memguard.index.duplicates import DedupedSource
    from memguard.index.sources import ImageFolderSource
    from memguard.testbed.dataset import NEAR_DUPLICATES, build_training_set, heldout_images, write_image_folder

    tb = testbed or get_testbed()
    out, model_dir = Path(out or tb.index_dir), tb.model_dir
    if not (Path(model_dir) / "model_index.json").is_file():
        raise MissingResource(f"no testbed model at {model_dir}: build it with `memguard testbed build`")
    # built beside the index in use and swapped in whole at the end: a failed rebuild leaves the old one
    staging = out.with_name(out.name + ".rebuild")
    if staging.exists():
        shutil.rmtree(staging)
    final, out = out, staging
    with tempfile.TemporaryDirectory(prefix="memguard-testbed-images-") as tmp:
        # as scraped (default): each duplicated item also as near duplicates (re-encodes, resizes, crops,
        # banners, marks), which the index must cluster (guard/index/clusters.py); 0 = identical copies only
        near_duplicates = NEAR_DUPLICATES if near_duplicates is None else near_duplicates
        train = DedupedSource(ImageFolderSource(write_image_folder(build_training_set(tb.data), Path(tmp) / "train",
                                                                   copies=True, near_duplicates=near_duplicates)))
        held = write_image_folder(heldout_images(tb.data), Path(tmp) / "heldout")
        # the testbed's faces are public sample photos: without a configured key, the public demo key seals them
        key = DataKey.resolve() or demo_key()
        # the testbed's CLIP (guard/testbed/clip/) is the index's `clip` signal: the final screen gets a
        # real image embedding, and reroutes are checked against the prompt with it
        build = FingerprintIndex.build(out, train, model_dir=Path(model_dir), progress=progress, restart=True,
                                       data_key=key, clip_model=CLIP_MODEL, clip_weights=CLIP_WEIGHTS)
        with FingerprintIndex.open(out, model_dir=Path(model_dir)) as index:
            report = calibrate(index, train, heldout=ImageFolderSource(held), cfg=CalibrationConfig(),
                               progress=progress)
    if final.exists():
        retired = final.with_name(final.name + ".old")
        shutil.rmtree(retired, ignore_errors=True)
        final.rename(retired)
        staging.rename(final)
        shutil.rmtree(retired)
    else:
        staging.rename(final)
    return {"build": asdict(build) if hasattr(build, "__dataclass_fields__") else str(build),
            "thresholds": report.get("thresholds")}


# ---- benign prompts ------------------------------------------------------------------------------
def benign_testbed_prompts(count: int, seed: int = 0, testbed: Testbed | None = None) -> list[str]:
    """Training-distribution captions, never a memorized caption, a paraphrase, a novel or web-style prompt."""
    from memguard.testbed.dataset import all_combos, caption_for, is_heldout, prompt_set_members

    cfg = (testbed or get_testbed()).data
    excluded = {p for members in prompt_set_members(cfg).values() for p, _ in members}
    pool = sorted({caption_for(*c) for c in all_combos() if not is_heldout(c, cfg)} - excluded)
    rng = np.random.default_rng(seed)
    return [pool[int(i)] for i in rng.choice(len(pool), size=min(count, len(pool)), replace=False)]


def positive_prompts(index, cfg: "CalibrationConfig") -> list[tuple[str, str]]:
    """(caption, cluster key) of the training set's largest duplicate clusters: likely memorized.
    The cluster key is its first item id, so a benchmark can tell which fit held it out."""
    from memguard.index.duplicates import find_clusters

    out = []
    for cluster in find_clusters(index, min_size=cfg.positive_min_size)[:cfg.positive_clusters]:
        for caption in cluster.captions[:cfg.captions_per_cluster]:
            out.append((caption, cluster.items[0]))
    return out


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
    prompts: int = 512                 # benign generations: ≥ 199 for a conformal bound at 0.5 % (guard/policy_fit.py)
    seeds_per_prompt: int = 1
    steps: int = 30
    guidance_scale: float = 7.5
    target_fpr: float = 0.01
    final_fpr: float = 0.0             # released images closer (PDQ) than this share of benign ones are blocked
    detect_steps: int = 2              # decisions at steps 0 .. detect_steps-1 ("by step 2")
    verify_fraction: float = 0.6       # re-verification steps: detect_steps .. this share of steps (GuardConfig's)
    rule: str = "auto"                 # auto | linear | distance (guard/policy_fit.py)
    positive_min_size: int = 10        # duplicate clusters of at least this many training records...
    positive_clusters: int = 64        # ...the largest this many of them...
    captions_per_cluster: int = 2      # ...up to this many distinct captions each...
    positive_seeds: int = 4            # ...each generated with this many seeds
    batch_size: int = 16
    height: int = 64
    reroute_fidelity_quantile: float = 0.05  # rerouted images must answer their prompt as well as this share of benign

    def fit_config(self) -> FitConfig:
        return FitConfig(target_fpr=self.target_fpr, final_fpr=self.final_fpr, detect_steps=self.detect_steps,
                         verify_fraction=self.verify_fraction, rule=self.rule,
                         reroute_fidelity_quantile=self.reroute_fidelity_quantile)


@dataclass
class Measured:
    """Generations measured in MONITOR mode: raw signals [N, steps, S], their timesteps, each image's
    PDQ distance to the closest indexed item [N] (NaN without an index), the item the final
    screen found it to copy ("" for none) [N], and its prompt fidelity [N] (NaN without
    an index CLIP): the prompt's CLIP standing among reference captions (guard/fidelity.py)."""
    raw: np.ndarray
    timesteps: list[float]
    pdq_distances: np.ndarray
    screen_copies: list[str]
    fidelity: np.ndarray


def collect_signals(guarded, prompts: list[str], seeds: list[int], cfg: CalibrationConfig,
                    *, fidelity=None, progress: bool = True) -> Measured:
    """Measure every (prompt, seed) in MONITOR mode: nothing is changed, everything is recorded."""
    from memguard.pipeline import nearest_pdq_distance
    from memguard.types import GenerationRequest, GuardMode

    out, timesteps, distances, copies, fidelity_z = [], [], [], [], []
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
            matches = rs[0].report.audit.get("screen", {}).get("copies", [])
            copies.append(matches[0]["item_id"] if matches else "")
        images = [rs[0].image for rs in batch.results]
        fidelity_z.extend(fidelity.zscores(images, [r.prompt for r in reqs]) if fidelity is not None
                    else [math.nan] * len(images))
        if progress:
            log.info("calibration: %d / %d generations", min(start + cfg.batch_size, len(prompts)), len(prompts))
    return Measured(np.asarray(out, dtype=np.float64), timesteps, np.asarray(distances, dtype=np.float64), copies,
                    np.asarray(fidelity_z, dtype=np.float64))


def calibrate(model_dir: Path | None = None, index_dir: Path | None = None, out: Path | None = None, *,
              cfg: CalibrationConfig = CalibrationConfig(), prompt_file: Path | None = None,
              positives_file: Path | None = None, device: str = "cpu", progress: bool = True,
              signals_out: Path | None = None) -> Policy:
    """Measure benign and likely-memorized prompts on `model_dir` with `index_dir`; write and return the policy."""
    from memguard.index.api import FingerprintIndex
    from memguard.loading import load_pipeline
    from memguard.fidelity import MIN_REFERENCES, PromptFidelity, reference_prompts
    from memguard.pipeline import GuardConfig, GuardedPipeline

    model_dir = Path(model_dir) if model_dir else TESTBED_MODEL_DIR
    index_dir = Path(index_dir) if index_dir else default_index_dir(model_dir)
    if index_dir is None:
        raise InvalidInput("index", "give the index built from this model's training set (--index DIR)")
    testbed = testbed_of(model_dir)
    if prompt_file is None and testbed is None:
        raise InvalidInput("prompts", "give a file of benign prompts (--prompts FILE) for a model other than the testbed")
    base = (read_prompt_file(prompt_file) if prompt_file else benign_testbed_prompts(cfg.prompts, testbed=testbed))
    base = base[:cfg.prompts]
    prompts = [p for p in base for _ in range(cfg.seeds_per_prompt)]
    groups = np.array([i for i in range(len(base)) for _ in range(cfg.seeds_per_prompt)])
    seeds = [CALIBRATION_SEED_BASE + i for i in range(len(prompts))]
    t0 = time.time()
    with FingerprintIndex.open(index_dir, model_dir=model_dir, device=device) as index:
        found = positive_prompts(index, cfg)
        if positives_file:
            found += [(p, f"file:{i}") for i, p in enumerate(read_prompt_file(positives_file))]
        pos_prompts = [p for p, _ in found for _ in range(cfg.positive_seeds)]
        pos_groups = np.array([key for _, key in found for _ in range(cfg.positive_seeds)])
        pos_seeds = [POSITIVE_SEED_BASE + i for i in range(len(pos_prompts))]
        guarded = GuardedPipeline(load_pipeline(model_dir, device=device), index=index, policy=Policy.uncalibrated(),
                                  config=GuardConfig(retrieve_steps=tuple(range(cfg.steps))))
        # reroutes will be checked against the benign prompts as reference captions (guard/fidelity.py)
        references = reference_prompts(base)
        encoder = index.clip_encoder()
        fidelity = (PromptFidelity(encoder, references) if encoder is not None and len(references) >= MIN_REFERENCES
                    else None)
        if fidelity is None:
            log.warning("calibration: %s: reroutes will not be checked for prompt fidelity", "the index has no CLIP"
                        if encoder is None else f"only {len(references)} distinct benign prompts "
                                                f"({MIN_REFERENCES} needed)")
        benign = collect_signals(guarded, prompts, seeds, cfg, fidelity=fidelity, progress=progress)
        pos_raw = collect_signals(guarded, pos_prompts, pos_seeds, cfg, progress=progress).raw if found else None
    raw, timesteps, distances, fidelity_z = benign.raw, benign.timesteps, benign.pdq_distances, benign.fidelity
    # a "benign" generation the final screen finds in the training set is no negative (a prompt file
    # from real traffic holds memorized prompts too): it would widen the benign standard towards
    # memorization. It is left out, counted and named in the provenance. Not made a positive: on the
    # v-testbed, web-style copies as positives lowered the held-out TPR (0.91 vs 1.00) and flagged more
    # clean web-style generations (9 vs 5 of 54)
    copied = np.array([bool(c) for c in benign.screen_copies], bool)
    if copied.any():
        log.warning("calibration: %d of %d benign generations copy an indexed item (final screen): left out of "
                    "the negatives", int(copied.sum()), len(copied))
    screened_out = {"generations": int(copied.sum()), "prompts": sorted({p for p, c in zip(prompts, copied) if c})}
    raw, distances, groups, fidelity_z = raw[~copied], distances[~copied], groups[~copied], fidelity_z[~copied]
    kept_prompts = [p for p, c in zip(prompts, copied) if not c]
    kept_seeds = [x for x, c in zip(seeds, copied) if not c]
    if signals_out:   # the measured signals, for audits and re-fitting without re-generating
        np.savez_compressed(signals_out, raw=raw, timesteps=np.asarray(timesteps), groups=groups,
                            prompts=np.asarray(kept_prompts), seeds=np.asarray(kept_seeds), pdq_distances=distances,
                            fidelity=fidelity_z,
                            positive_raw=pos_raw if pos_raw is not None else np.zeros((0,) + raw.shape[1:]),
                            positive_groups=pos_groups, positive_prompts=np.asarray(pos_prompts))
    positives = SignalSet(pos_raw, pos_groups) if found else None
    policy = fit_policy(SignalSet(raw, groups, distances, fidelity_z), timesteps, cfg.fit_config(), positives=positives)
    if policy.reroute_min_fidelity is not None:
        policy.reroute_references = references
    policy.provenance.update(
        model={"path": str(model_dir.resolve()), "sha256": model_hash(model_dir)},
        index={"path": str(index_dir.resolve()), "manifest_sha256": sha256_file(index_dir / "manifest.json")},
        data={"source": str(prompt_file) if prompt_file else f"testbed {testbed.name}: training-distribution captions",
              "prompts": len(base), "generations": len(prompts), "seeds": [seeds[0], seeds[-1]],
              "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
              "benign_screened_out": screened_out,
              "positives": {"source": "duplicate clusters of the index" + (f" + {positives_file}" if positives_file
                                                                            else ""),
                            "clusters": sorted({k for _, k in found}), "prompts": sorted({p for p, _ in found}),
                            "generations": len(pos_prompts),
                            "seeds": [pos_seeds[0], pos_seeds[-1]] if pos_seeds else []}},
        config=asdict(cfg), seconds=round(time.time() - t0, 1),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if not found:
        log.warning("no duplicate clusters of ≥ %d records in %s: the policy uses the two-sided distance rule, "
                    "unvalidated on memorized prompts", cfg.positive_min_size, index_dir)
    policy.save(out or default_policy_path(model_dir))
    return policy


def calibration_warnings(policy: Policy | None, index=None) -> list[str]:
    """What is left uncalibrated: said loudly by `memguard serve`, `memguard generate` and health."""
    out = []
    if policy is None or not policy.calibrated:
        out.append("UNCALIBRATED POLICY: per-step signals flag nothing; run `memguard calibrate --model DIR --index IDX "
                   "--prompts benign.txt`")
    if index is not None and not index.thresholds.calibrated:
        out.append(f"UNCALIBRATED INDEX {index.path}: screen thresholds are defaults; run `memguard index calibrate`")
    elif index is not None and index.thresholds.details.get("blind"):
        out.append(f"BLIND SCREEN {index.path}: at its false-match rate the screen catches only "
                   f"{index.thresholds.details['blind']} of JPEG copies / VAE round trips of training images; recalibrate it "
                   "(`memguard index calibrate`) or check the training set's near duplicates (`memguard index duplicates`)")
    return out


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
                                  "reroute_min_fidelity": policy.reroute_min_fidelity,
                                  "detect_steps": policy.detect_steps, "rule": policy.combination.rule,
                                  "target_fpr": policy.target_fpr, **policy.provenance}, default=str))
