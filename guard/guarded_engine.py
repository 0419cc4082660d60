"""`GuardedEngine`: the server's `GenerationEngine` on top of `GuardedPipeline`.

Select it by config, no code change: `engine = "memguard.guarded_engine:GuardedEngine"` in the
[engine] section (or `--engine`). It honours each request's mode (enforce / monitor / off) and
face action, fails closed when screening fails, and reports per-step signals, guard time,
first flagged steps and the steps saved by blocking in the same `BatchStats` the baseline engine
emits. Resources: `EngineConfig.model` (default: the testbed), `EngineConfig.index` (default: the
testbed's index when the model is the testbed), and the policy file: `EngineConfig.policy` when
that field exists, else the testbed's policy for the testbed, else `<model>/memguard_policy.json`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from memguard.calibrate import check_provenance, default_index_dir, default_policy_path, resolve_model_dir
from memguard.engine import EngineConfig, IndexedEngine, IndexGateway, IsCancelled, OnStep, load_pipeline, to_batch_stats
from memguard.pipeline import GuardConfig, GuardedPipeline
from memguard.policy import Policy
from memguard.types import GenerationRequest, GuardMode, ImageResult

log = logging.getLogger(__name__)


class GuardedEngine(IndexedEngine):
    name = "guarded"
    guarded = True

    def __init__(self, pipe, index: IndexGateway, policy: Policy, config: GuardConfig = GuardConfig()):
        from memguard.calibrate import calibration_warnings

        super().__init__(index)
        self.pipeline = GuardedPipeline(pipe, index=index.index, policy=policy, config=config)
        # what is left uncalibrated: the server logs it, puts it in the health detail and exports a gauge
        self.calibration_warnings = calibration_warnings(policy, index.index)
        self.uncalibrated = {"policy": not policy.calibrated,
                             "index": index.index is not None and not index.index.thresholds.calibrated,
                             # calibrated, but blind to JPEG copies or VAE round trips (memguard.index.calibrate.MIN_COPY_TPR)
                             "index_screen": index.index is not None and bool(index.index.thresholds.details.get("blind"))}

    @classmethod
    def from_config(cls, config: EngineConfig) -> "GuardedEngine":
        model_dir = None if config.tiny_random else resolve_model_dir(config.model)
        index_path = config.index or (None if config.tiny_random else default_index_dir(model_dir))
        index = IndexGateway.open(str(index_path) if index_path else None,
                                  model_dir=str(model_dir) if model_dir else None, device=config.device)
        if index.index is None:
            log.warning("guarded engine without a fingerprint index: every guarded image fails closed (BLOCKED)")
        policy_path = getattr(config, "policy", None) or default_policy_path(model_dir)
        if config.tiny_random and not Path(policy_path).is_file():
            log.warning("tiny random model: no calibrated policy; per-step signals flag nothing")
            policy = Policy.uncalibrated()
        else:
            policy = Policy.load(policy_path)
        engine = cls(load_pipeline(config), index, policy,
                     GuardConfig(face_match_scope=getattr(config, "face_match_scope", "protected")))
        if model_dir is not None:   # the provenance check `memguard generate` runs (the server logs these)
            engine.calibration_warnings += check_provenance(policy, model_dir, Path(index_path) if index_path else None)
        return engine

    def index_stats(self):
        stats = super().index_stats()
        stats.details.update({f"uncalibrated_{k}": float(v) for k, v in self.uncalibrated.items()})
        return stats

    # ---- the GenerationEngine interface ---------------------------------------------------------
    def warmup(self) -> None:
        """One short monitored generation: loads kernels, the index's encoders and the face detector."""
        pipe = self.pipeline.pipe
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.pipeline.generate([GenerationRequest(prompt="warmup", height=size, width=size, steps=2, seed=0,
                                                  mode=GuardMode.MONITOR)])
        self.ready = True

    def generate(self, requests: Sequence[GenerationRequest], *, on_step: OnStep | None = None,
                 is_cancelled: IsCancelled | None = None) -> list[list[ImageResult]]:
        batch = self.pipeline.generate(requests, on_step=on_step, is_cancelled=is_cancelled)
        flat = [r for rs in batch.results for r in rs]
        with self._stats_lock:
            self._pending.batches.append(to_batch_stats(batch.stats, flat))
            self._pending.screen_seconds += batch.stats.screen_seconds
            self._pending.screen_failures += batch.stats.screen_failures
        return batch.results
