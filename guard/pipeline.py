"""`GuardedPipeline`: a text-to-image diffusion pipeline whose every denoising step is scored.

    guarded = GuardedPipeline(load_pipeline(), index=FingerprintIndex.open(...), policy=Policy.load(...))
    batch = guarded.generate([GenerationRequest("a red circle on a blue plain background", seed=1)])
    batch.results[0][0].decision        # ALLOWED | REROUTED | FACE_OBFUSCATED | BLOCKED

It uses the diffusers pipeline's components (tokenizer, text encoder, UNet, scheduler, VAE) and
runs its own denoising loop, because each sample of a batch can be acted on alone: rerouted
(mitigated and continued), or blocked (it leaves the batch at once; its remaining steps are never
computed). Works for SD 1.x / 2.x and SDXL (ε- or v-prediction; DDIM, PNDM, DPM-Solver, Euler
schedulers): what differs between model families (prompt encoding, the denoiser call, ε and x̂0,
VAE scaling) is a small adapter (memguard.families) chosen from the pipeline's class; this one loop
calls it. The index must be built with the model's own VAE (x̂0 is compared in its latent space).

The per-step path (`_guarded_step`) keeps everything on the device: CFG, divergence and x̂0 in one
kernel, attention mass from the fused attention kernel, fingerprint tracking against candidates
retrieved from the index in the detection window. The host reads device values only at decision
points: the first `policy.detect_steps` steps (flag → reroute or block), and, for rerouted samples
only, every `verify_every` steps (fresh candidates; re-verification early on). Per-step progress
events are copied to the host without blocking and emitted one step late.

Decisions, per sample: flagged in the detection window → the mitigation ladder (guard/mitigation.py)
or, with `on_flag="block"`, out of the batch at once. After denoising, every guarded image is
screened through the index (copies → BLOCKED, matched faces → FACE_OBFUSCATED or BLOCKED) and must
pass the policy's perceptual-hash re-verification (no closer to an indexed item than any benign
calibration image); any screening failure blocks the image (fail closed). An ENFORCE image blocked
as a copy gets one second pass (`GuardConfig.second_pass`): fresh noise, rerouted from step 0,
screened again; at most twice a plain generation's UNet evaluations. MONITOR computes and reports
all of it and changes nothing.
"""
from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch

from memguard import kernels
from memguard.attention import AttentionControl, install_stats_processors
from memguard.errors import InvalidInput, MissingResource, ScreeningUnavailable
from memguard.families import FamilyAdapter, PromptEncoding, adapter_for
from memguard.fidelity import PromptFidelity
from memguard.mitigation import (MitigationConfig, active_mitigations, attention_rows, fresh_noise, noisy_embedding,
                              obfuscate_faces, push_away)
from memguard.policy import Policy, PolicyTables, final_verdict
from memguard.signals import SIGNALS, Candidates, attention_signals, retrieve, stack_signals, track_similarity
from memguard.types import (Decision, FaceAction, GenerationRequest, GuardMode, GuardReport, ImageResult, Reason,
                         RequestLimits, StepEvent)

log = logging.getLogger(__name__)

OnStep = Callable[[int, StepEvent], None]
IsCancelled = Callable[[int], bool]
S = len(SIGNALS)
SIM = SIGNALS.index("similarity")
# trace columns: raw signals, their z-scores, combined, applied guidance scale
COLUMNS = list(SIGNALS) + [f"z_{s}" for s in SIGNALS] + ["combined", "guidance"]
COMBINED, GUIDANCE = 2 * S, 2 * S + 1


UNFAITHFUL_REROUTE = "reroute no longer answers the prompt"   # the mitigation note of a fidelity block
ALPHA_BAR_FLOOR = 2.0 ** -24   # ᾱ of a zero-terminal-SNR schedule's first step, for ε-space signals


@dataclass(frozen=True)
class GuardConfig:
    candidates: int = 8                     # K candidates per sample from the index
    retrieve_steps: tuple[int, ...] = (0, 1)  # steps whose x̂0 queries the index (the detection window)
    on_flag: str = "reroute"                # "reroute" (the ladder) or "block" at once
    verify_every: int = 2                   # a rerouted sample gets fresh candidates every this many steps
    verify_fraction: float = 0.6            # ...and is re-verified (climb or block) while step < this share
    # an ENFORCE sample blocked as a copy (at the final screen, or with the ladder exhausted) is
    # generated once more from fresh noise, mitigated from step 0: a new image for the prompt, at
    # most twice a plain generation's UNet evaluations; blocked if that one fails too
    second_pass: bool = True
    refresh_fraction: float = 1.0           # ...and keeps getting fresh candidates until this share
    mitigation: MitigationConfig = MitigationConfig()
    limits: RequestLimits = RequestLimits()
    # whose faces the final screen acts on: "any" person in the index (training set and registry; the
    # default: a training-set face is identifiable too) or "protected" registry identities only
    face_match_scope: str = "any"

    def __post_init__(self):
        if self.face_match_scope not in ("any", "protected"):
            raise InvalidInput("face_match_scope", f"{self.face_match_scope!r} is not 'any' or 'protected'")
        if self.on_flag not in ("reroute", "block"):
            raise InvalidInput("on_flag", f"{self.on_flag!r} is not 'reroute' or 'block'")
        if self.candidates < 1:
            raise InvalidInput("candidates", f"{self.candidates} < 1")


@dataclass
class PipelineStats:
    """What one `generate` call computed and measured (plain data; server/metrics.py exports it)."""
    requests: int
    samples: int
    steps: int                                   # scheduled steps per sample
    sample_steps: int = 0                        # denoising steps computed, summed over samples
    step_seconds: list[float] = field(default_factory=list)    # wall time of each batch step
    guard_seconds: list[float] = field(default_factory=list)   # of which guard work (host time)
    host_syncs: int = 0                          # device → host reads for decisions
    retrieval_seconds: float = 0.0
    retrieval_failures: int = 0
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0
    screen_seconds: list[float] = field(default_factory=list)
    screen_failures: int = 0
    reroutes: int = 0
    escalations: int = 0
    steps_saved: dict[str, int] = field(default_factory=dict)  # blocked | cancelled → steps not computed
    decisions: dict[str, int] = field(default_factory=dict)
    second_passes: int = 0                       # samples generated again (GuardConfig.second_pass)
    reroutes_unfaithful: int = 0                 # reroutes blocked for losing the prompt (guidance, fidelity)

    def absorb(self, other: "PipelineStats") -> None:
        """Add a second pass's work to this call's (requests and samples are the caller's)."""
        for name in ("sample_steps", "host_syncs", "retrieval_seconds", "retrieval_failures", "encode_seconds",
                     "decode_seconds", "screen_failures", "reroutes", "escalations", "reroutes_unfaithful"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("step_seconds", "guard_seconds", "screen_seconds"):
            getattr(self, name).extend(getattr(other, name))
        for key, n in other.steps_saved.items():
            self.steps_saved[key] = self.steps_saved.get(key, 0) + n


@dataclass
class GuardedBatch:
    results: list[list[ImageResult]]    # per request, images in index order
    stats: PipelineStats


@dataclass
class _Sample:
    """Host-side state of one image of the batch."""
    request: int
    image: int
    seed: int
    mode: GuardMode
    request_id: str
    face_action: FaceAction = FaceAction.BLUR
    eos: int = 0
    steps_done: int = 0
    flagged_step: int | None = None
    rung: int = 0
    rung_history: list[tuple[int, int]] = field(default_factory=list)   # (from step, rung)
    mitigations: list[str] = field(default_factory=list)
    stopped: Reason | None = None        # left the batch: MEMORIZATION (blocked) or CANCELLED
    actions: dict[int, str] = field(default_factory=dict)               # step → reroute | block
    audit: dict = field(default_factory=dict)
    forced: bool = False                 # a second pass: flagged at step 0 whatever the score


@dataclass
class _Live:
    """Device state of the samples still denoising; `rows` maps positions to sample indices."""
    rows: list[int]
    latents: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    guidance: torch.Tensor               # [B] requested scale
    candidates: Candidates
    in_basin: torch.Tensor               # [B] bool: guidance held at the basin value
    push: torch.Tensor                   # [B] bool: push x̂0 away from its match
    best_idx: torch.Tensor               # [B] last tracked best candidate
    row_index: torch.Tensor              # [B] sample indices, for the trace buffer
    noise: torch.Tensor                  # [B, C, h, w] each sample's initial noise (DDPM space), for rewinds
    # the family's per-sample added conditioning (SDXL: pooled text embeds, time ids), batch-first
    added_cond: dict[str, torch.Tensor] = field(default_factory=dict)
    added_uncond: dict[str, torch.Tensor] = field(default_factory=dict)

    def keep(self, positions: list[int]) -> None:
        idx = torch.tensor(positions, dtype=torch.long, device=self.latents.device)
        self.rows = [self.rows[p] for p in positions]
        for name in ("latents", "cond", "uncond", "guidance", "in_basin", "push", "best_idx", "row_index", "noise"):
            setattr(self, name, getattr(self, name)[idx])
        self.added_cond = {k: v[idx] for k, v in self.added_cond.items()}
        self.added_uncond = {k: v[idx] for k, v in self.added_uncond.items()}
        self.candidates = self.candidates.keep(idx, positions)

    def context(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The denoiser's conditioning for [uncond rows, cond rows]: per-token context, added kwargs."""
        return (torch.cat([self.uncond, self.cond]),
                {k: torch.cat([self.added_uncond[k], self.added_cond[k]]) for k in self.added_cond})


class GuardedPipeline:
    """Guarded text-to-image generation over a supported diffusers pipeline's components.

    `pipe`: a StableDiffusionPipeline (SD 1.x/2.x) or StableDiffusionXLPipeline (SDXL); any other
    class raises memguard.families.UnsupportedModel naming it and the supported ones.
    """

    def __init__(self, pipe, index=None, policy: Policy | None = None, config: GuardConfig = GuardConfig()):
        self.family: FamilyAdapter = adapter_for(pipe)   # checks the class and the prediction type
        self.pipe, self.index, self.config = pipe, index, config
        self.policy = policy or Policy.uncalibrated()
        self.v_prediction = self.family.v_prediction
        self.control: AttentionControl = install_stats_processors(self.family.denoiser)
        self._fidelity_cache: tuple | None = None   # (policy, encoder, PromptFidelity)
        self._idle()

    def _idle(self) -> None:
        """Outside generate() the UNet behaves like diffusers' own (plain SDPA, nothing recorded)."""
        c = self.control
        c.stats, c.record, c.key_logit_scale, c.key_mask = False, False, None, None
        c.reset()

    @property
    def device(self) -> torch.device:
        return self.family.denoiser.device

    @property
    def default_size(self) -> int:
        """The image side (pixels) the model was built for."""
        return self.family.default_size

    # ------------------------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest], *, on_step: OnStep | None = None,
                 is_cancelled: IsCancelled | None = None) -> GuardedBatch:
        """Generate a batch; one result list per request. Requests must share size and steps."""
        batch = self._generate_pass(requests, on_step, is_cancelled)
        # 10. a second pass for samples blocked as copies (GuardConfig.second_pass)
        retry = [(r, k) for r, rs in enumerate(batch.results) for k, res in enumerate(rs)
                 if self._second_pass_due(requests[r], res)]
        if retry:
            self._second_pass(requests, batch, retry, on_step, is_cancelled)
        return batch

    def _second_pass_due(self, request: GenerationRequest, result: ImageResult) -> bool:
        return (self.config.second_pass and self.config.on_flag == "reroute" and request.mode == GuardMode.ENFORCE
                and result.decision == Decision.BLOCKED and result.reason == Reason.MEMORIZATION)

    def _second_pass(self, requests, batch: GuardedBatch, retry: list[tuple[int, int]],
                     on_step: OnStep | None, is_cancelled: IsCancelled | None) -> None:
        """Generate the `retry` images (request, image) again, each from fresh noise and rerouted from
        step 0; the new result replaces the blocked one (still BLOCKED if the reroute fails too)."""
        again = [replace(requests[r], num_images=1,
                         seed=second_pass_seed(batch.results[r][k].seed, requests[r].prompt)) for r, k in retry]
        fwd = (lambda j, event: on_step(retry[j][0], replace(event, image_index=retry[j][1]))) if on_step else None
        cancelled = (lambda j: is_cancelled(retry[j][0])) if is_cancelled else None
        second = self._generate_pass(again, fwd, cancelled, forced=True)
        batch.stats.absorb(second.stats)
        batch.stats.second_passes += len(retry)
        for (r, k), (new,) in zip(retry, second.results):
            old = batch.results[r][k]
            rep = new.report
            rep.steps_computed += old.report.steps_computed
            rep.mitigations = old.report.mitigations + ["second pass: fresh noise, rerouted from step 0"] + rep.mitigations
            rep.scores, rep.first_flagged_step = old.report.scores, old.report.first_flagged_step
            rep.audit = {**rep.audit, "first_pass": old.report.audit}
            batch.results[r][k] = replace(new, index=old.index, seed=old.seed, report=rep)
            for d, n in ((old.decision, -1), (new.decision, 1)):
                batch.stats.decisions[d.value] = batch.stats.decisions.get(d.value, 0) + n

    def _generate_pass(self, requests: Sequence[GenerationRequest], on_step: OnStep | None,
                       is_cancelled: IsCancelled | None, forced: bool = False) -> GuardedBatch:
        # 1. check inputs
        first = self._check_inputs(requests)
        stats = PipelineStats(len(requests), sum(r.num_images for r in requests), first.steps)
        try:
            with torch.inference_mode():
                # 2. one sample per image, each with its own seed
                samples = self._expand(requests, forced)
                # 3. encode prompts (cond + uncond) and find each prompt's padding
                t0 = time.perf_counter()
                encoding = self._encode_prompts(requests, samples, first.height, first.width)
                stats.encode_seconds = time.perf_counter() - t0
                # 4. timesteps and initial noise
                run = self._prepare_run(requests, samples, first.steps, stats)
                latents = self._prepare_latents(samples, first.height, first.width, encoding.cond.dtype,
                                                run.scheduler)
                # 5. guard state: candidates, mitigation flags, attention switches
                live = self._prepare_live(requests, samples, latents, encoding)
                self.control.stats = self.control.record = run.guarded
                # 6. denoising loop
                self._denoise(run, live, on_step, is_cancelled)
                # 7. decode the survivors
                t0 = time.perf_counter()
                images = self._decode(live.latents) if live.rows else []
                stats.decode_seconds = time.perf_counter() - t0
        finally:
            self._idle()
        # 8. final screen and decisions (fails closed)
        rows = run.trace.cpu().numpy()
        results = {i: self._finish(run, samples[i], image, rows[:, i]) for i, image in zip(live.rows, images)}
        results.update({i: self._stopped_result(run, s, rows[:, i]) for i, s in enumerate(samples)
                        if s.stopped is not None})
        for r in results.values():
            stats.decisions[r.decision.value] = stats.decisions.get(r.decision.value, 0) + 1
        # 9. results, per request in image order
        out: list[list[ImageResult]] = [[] for _ in requests]
        for i in sorted(results):
            out[samples[i].request].append(results[i])
        return GuardedBatch(out, stats)

    # ---- 1-5: setup -----------------------------------------------------------------------------
    def _check_inputs(self, requests: Sequence[GenerationRequest]) -> GenerationRequest:
        if not requests:
            raise InvalidInput("requests", "empty batch")
        for r in requests:
            r.validate(self.config.limits)
        first = requests[0]
        for r in requests[1:]:
            if (r.height, r.width, r.steps) != (first.height, first.width, first.steps):
                raise InvalidInput("requests", "one batch needs one height, width and step count")
        side, px = min(("height", first.height), ("width", first.width), key=lambda f: f[1])
        latent = px // self.family.vae_scale_factor
        if latent < kernels.FINGERPRINT_GRID:
            raise InvalidInput(side, f"{px} px gives {latent}-px latents, below the fingerprint grid")
        return first

    @staticmethod
    def _expand(requests: Sequence[GenerationRequest], forced: bool = False) -> list[_Sample]:
        samples = []
        for i, req in enumerate(requests):
            base = req.seed if req.seed is not None else secrets.randbits(63)
            samples += [_Sample(i, k, (base + k) % 2**63, req.mode, req.request_id, req.face_action, forced=forced)
                        for k in range(req.num_images)]
        return samples

    def _encode_prompts(self, requests, samples: list[_Sample], height: int, width: int) -> PromptEncoding:
        """The family's conditioning (cond + uncond) and each prompt's padding start."""
        prompts = [requests[s.request].prompt for s in samples]
        negatives = [requests[s.request].negative_prompt for s in samples]
        encoding = self.family.encode(prompts, negatives, height=height, width=width, device=self.device)
        for s, eos in zip(samples, encoding.eos):
            s.eos = eos
        return encoding

    def _prepare_run(self, requests, samples, steps: int, stats: PipelineStats) -> "_Run":
        sched = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)   # per-batch state
        sched.set_timesteps(steps, device=self.device)
        timesteps = [float(t) for t in sched.timesteps]
        # the guard's signals live in ε-space, which needs ᾱ > 0: a zero-terminal-SNR schedule's first
        # step (ᾱ = 0, pure noise) gets diffusers' own floor for such schedules (Euler: ᾱ_T = 2⁻²⁴);
        # the v ↔ ε round trip at that floor stays exact to ~1e-3 in fp32
        alpha_bars = [max(float(sched.alphas_cumprod[int(round(t))]), ALPHA_BAR_FLOOR) for t in timesteps]
        host_tables = self.policy.tables(timesteps)
        trace = torch.full((len(timesteps), len(samples), len(COLUMNS)), float("nan"), device=self.device)
        # scheduler-space latents per DDPM-space x_t: 1, or √(1+σ²) = 1/√ᾱ for σ-space (Euler-type) schedulers
        sigma_space = float(sched.init_noise_sigma) > 1.0
        latent_scale = [(1.0 / ab ** 0.5) if sigma_space else 1.0 for ab in alpha_bars]
        return _Run(samples, requests, sched, timesteps, alpha_bars, self.policy.tables(timesteps, self.device),
                    host_tables.mean[:, SIM].numpy(), host_tables.std[:, SIM].numpy(), trace, stats,
                    any(s.mode != GuardMode.OFF for s in samples), latent_scale,
                    float(self.index.thresholds.latent) if self.index is not None else 1.0)

    def _prepare_latents(self, samples, height: int, width: int, dtype, scheduler) -> torch.Tensor:
        """diffusers' own recipe: one CPU generator per sample, randn, × init_noise_sigma."""
        f = self.family.vae_scale_factor
        shape = (1, self.family.latent_channels, height // f, width // f)
        noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s.seed), dtype=dtype)
                 for s in samples]
        return torch.cat(noise).to(self.device) * scheduler.init_noise_sigma

    def _prepare_live(self, requests, samples, latents, encoding: PromptEncoding) -> _Live:
        dev, B = self.device, len(samples)
        guidance = torch.tensor([requests[s.request].guidance_scale for s in samples], device=dev,
                                dtype=torch.float32)
        dim = kernels.fingerprint_dim(latents.shape[1])
        false = torch.zeros(B, dtype=torch.bool, device=dev)
        return _Live(list(range(B)), latents, encoding.cond, encoding.uncond, guidance,
                     Candidates.empty(B, self.config.candidates, dim, dev), false, false.clone(),
                     torch.full((B,), -1, dtype=torch.long, device=dev), torch.arange(B, device=dev),
                     latents / float(self.pipe.scheduler.init_noise_sigma),
                     dict(encoding.added_cond), dict(encoding.added_uncond))

    # ---- 6: the denoising loop ------------------------------------------------------------------
    def _denoise(self, run: "_Run", live: _Live, on_step: OnStep | None, is_cancelled: IsCancelled | None) -> None:
        progress, stats = _Progress(on_step, run.samples, len(run.timesteps)), run.stats
        for step, t in enumerate(run.scheduler.timesteps):
            self._drop(run, live, self._cancelled(live, run.samples, is_cancelled), Reason.CANCELLED)
            if not live.rows:
                break
            t0, rows = time.perf_counter(), list(live.rows)
            if run.guarded:
                values, guard_s = self._guarded_step(run, live, step, t)
            else:
                values, guard_s = self._plain_step(run, live, t), 0.0
            for i in rows:   # a sample blocked at this step's decision still computed the step
                run.samples[i].steps_done += 1
            stats.sample_steps += len(rows)
            progress.push(step, rows, values)
            stats.step_seconds.append(time.perf_counter() - t0)
            stats.guard_seconds.append(guard_s)
        progress.flush()
        for s in run.samples:
            if s.stopped is not None:
                key = "blocked" if s.stopped == Reason.MEMORIZATION else "cancelled"
                stats.steps_saved[key] = stats.steps_saved.get(key, 0) + len(run.timesteps) - s.steps_done

    def _plain_step(self, run: "_Run", live: _Live, t) -> None:
        """Unguarded step: diffusers' arithmetic exactly (float guidance when uniform)."""
        model_in = run.scheduler.scale_model_input(torch.cat([live.latents, live.latents]), t)
        out = self.family.denoise(model_in, t, *live.context())
        out_u, out_c = out.chunk(2)
        g = live.guidance
        w = float(g[0]) if bool((g == g[0]).all()) else g.view(-1, 1, 1, 1).to(out.dtype)
        live.latents = run.scheduler.step(out_u + w * (out_c - out_u), t, live.latents).prev_sample
        return None

    def _guarded_step(self, run: "_Run", live: _Live, step: int, t) -> tuple[torch.Tensor, float]:
        """One step with signals, on the device; the host reads only at decision points."""
        B, ab, ctl, tables = len(live.rows), run.alpha_bars[step], self.control, run.tables
        ctl.reset()
        model_in = run.scheduler.scale_model_input(torch.cat([live.latents, live.latents]), t)
        out = self.family.denoise(model_in, t, *live.context())
        g0 = time.perf_counter()
        x_t = model_in[:B]                                  # DDPM-space sample for every scheduler
        out_u, out_c = self._to_eps(out, model_in, ab).chunk(2)
        rerouted = any(run.samples[i].rung > 0 for i in live.rows)   # host knows: no sync
        w = live.guidance
        if rerouted:
            w = torch.where(live.in_basin, torch.full_like(w, self.config.mitigation.basin_guidance), w)
        eps, divergence, x0_hat = kernels.cfg_with_divergence(out_u, out_c, x_t, w, ab)
        entropy, bos = attention_signals(ctl.mean_mass()[B:])
        if step in self.config.retrieve_steps:
            self._retrieve(run, live, list(range(B)), x0_hat)
        similarity, live.best_idx, stand = track_similarity(x0_hat, live.candidates, run.copy_cosine)
        values = stack_signals(divergence, entropy, bos, similarity, stand)
        z = tables.zscores(values, step)
        score = tables.combined(z, step)
        row = torch.cat([values, z, score[:, None], w[:, None]], dim=1)
        run.trace[step].index_copy_(0, live.row_index, row)
        if rerouted:
            if step < self.config.mitigation.push_until_fraction * len(run.timesteps):
                floor = tables.mean[step, SIM] + self.config.mitigation.push_floor_z * tables.std[step, SIM]
                shift = push_away(x_t, x0_hat, ab, live.candidates.vectors, live.candidates.mask, live.push, floor,
                                  self.config.mitigation)
                live.latents = live.latents + shift * run.latent_scale[step]   # x_t moves, ε stays
            if self.config.mitigation.basin_exit:   # left the basin: normal guidance again
                live.in_basin &= score > self.policy.basin_exit_score
            if step + 1 >= self._basin_limit(len(run.timesteps)):
                live.in_basin.zero_()
        s0 = time.perf_counter()
        live.latents = run.scheduler.step(self._from_eps(eps, x_t, ab), t, live.latents).prev_sample
        s1 = time.perf_counter()
        self._decide(run, live, step, row, x0_hat)
        return row, time.perf_counter() - g0 - (s1 - s0)   # guard work: all but the UNet and the scheduler

    def _to_eps(self, out: torch.Tensor, x_t: torch.Tensor, ab: float) -> torch.Tensor:
        return self.family.to_eps(out, x_t, ab)

    def _from_eps(self, eps: torch.Tensor, x_t: torch.Tensor, ab: float) -> torch.Tensor:
        return self.family.from_eps(eps, x_t, ab)

    def _retrieve(self, run: "_Run", live: _Live, positions: list[int], x0_hat: torch.Tensor):
        """Candidates of `positions` from the index (one host round trip); (ids, scores) or None."""
        if self.index is None or not positions:
            return None
        t0 = time.perf_counter()
        run.stats.host_syncs += 1
        try:
            ids, scores, vectors = retrieve(self.index, x0_hat[positions], self.config.candidates)
        except Exception as exc:   # noqa: BLE001 - no candidates; the final screen still decides (fails closed)
            run.stats.retrieval_failures += 1
            log.warning("candidate retrieval failed (%s: %s); similarity is 0 until the next retrieval",
                        type(exc).__name__, exc)
            return None
        live.candidates.replace(positions, ids, vectors)
        run.stats.retrieval_seconds += time.perf_counter() - t0
        return ids, scores

    # ---- decisions (host side, at decision points only) -------------------------------------------
    def _basin_limit(self, steps: int) -> int:
        return max(1, round(self.config.mitigation.basin_max_fraction * steps))

    def _refresh_due(self, s: _Sample, step: int, steps: int) -> bool:
        """A rerouted sample gets fresh candidates every `verify_every` steps until refresh_fraction."""
        if s.mode != GuardMode.ENFORCE or s.rung == 0:
            return False
        since = step - s.rung_history[-1][0] + 1      # steps computed under the current rung
        return since > 0 and since % self.config.verify_every == 0 and step < self.config.refresh_fraction * steps

    def _decide(self, run: "_Run", live: _Live, step: int, row: torch.Tensor, x0_hat: torch.Tensor) -> None:
        """Flag in the detection window; re-verify rerouted samples; reroute, escalate or block."""
        samples, last = run.samples, step == len(run.timesteps) - 1   # the last step only refreshes nothing
        detect = step < self.policy.detect_steps and any(
            samples[i].mode != GuardMode.OFF and samples[i].flagged_step is None for i in live.rows)
        refresh = [p for p, i in enumerate(live.rows)
                   if not last and self._refresh_due(samples[i], step, len(run.timesteps))]
        verifying = step < self.config.verify_fraction * len(run.timesteps)
        if not detect and not refresh:
            return
        climb, block = [], []
        if detect:
            host = torch.cat([row, live.best_idx[:, None].to(row.dtype)], dim=1).cpu().numpy()   # the one sync
            run.stats.host_syncs += 1
            climb, block = self._flag(live, samples, step, host)
        still = self._reverify(run, live, refresh, step, x0_hat, self.policy.verify_threshold)
        climb += still if verifying else []           # after the verify window: new candidates only
        for p in climb:
            if not self._climb(run, live, p, step):
                block.append(p)
        if climb:
            self._set_attention_rows(live, samples)
        for p in block:
            samples[live.rows[p]].actions[step] = "block"
            samples[live.rows[p]].mitigations.append(f"step {step}: blocked")
        self._drop(run, live, block, Reason.MEMORIZATION)

    def _flag(self, live: _Live, samples, step: int, host: np.ndarray) -> tuple[list[int], list[int]]:
        """Newly flagged positions → (to reroute, to block); MONITOR samples are only recorded."""
        climb, block = [], []
        for p, i in enumerate(live.rows):
            s = samples[i]
            hit = host[p, COMBINED] > self.policy.threshold or (s.forced and step == 0)
            if s.mode == GuardMode.OFF or s.flagged_step is not None or not hit:
                continue
            s.flagged_step = step
            best = int(host[p, -1])
            s.audit.update(flagged_step=step, matched=live.candidates.ids[p][best] if best >= 0 else "",
                           similarity=round(float(host[p, SIM]), 4),
                           candidates=[x for x in live.candidates.ids[p] if x])
            if s.mode == GuardMode.ENFORCE:
                (block if self.config.on_flag == "block" else climb).append(p)
        return climb, block

    def _reverify(self, run: "_Run", live: _Live, positions: list[int], step: int, x0_hat,
                  threshold: float) -> list[int]:
        """Rerouted samples whose x̂0 still heads to an indexed item (fresh retrieval, similarity z)."""
        found = self._retrieve(run, live, positions, x0_hat) if positions else None
        if found is None:
            return []
        ids, scores = found
        direction = self.policy.verify_direction
        still = []
        for j, p in enumerate(positions):
            s = run.samples[live.rows[p]]
            top = float(scores[j, 0]) if scores.shape[1] else 0.0
            z = direction * (top - float(run.sim_mean[step])) / float(run.sim_std[step])
            s.audit.setdefault("verify", []).append({"step": step, "similarity": round(top, 4), "z": round(z, 3),
                                                     "nearest": ids[j][0] if ids[j] else ""})
            if z > threshold:
                still.append(p)
        return still

    def _climb(self, run: "_Run", live: _Live, p: int, step: int) -> bool:
        """Apply the next rung of the ladder to position p; False if none can apply (→ block)."""
        cfg, s = self.config.mitigation, run.samples[live.rows[p]]
        if s.rung >= len(cfg.rungs):
            return False
        new = set(cfg.rungs[s.rung])
        if "reseed" in new and run.alpha_bars[min(step + 1, len(run.alpha_bars) - 1)] > cfg.reseed_max_alpha_bar:
            # too late for fresh noise to be a restart: the rung's other mitigations, if it has any
            new.discard("reseed")
            if not new:
                return False
        s.rung += 1
        s.rung_history.append((step + 1, s.rung))
        s.actions[step] = "reroute"
        s.mitigations.append(f"step {step}: rung {s.rung}: {'+'.join(m for m in cfg.rungs[s.rung - 1] if m in new)}")
        run.stats.reroutes += s.rung == 1
        run.stats.escalations += s.rung > 1
        if "basin" in new and step + 1 < self._basin_limit(len(run.timesteps)):
            live.in_basin[p] = True
            nxt = min(step + 1, len(run.alpha_bars) - 1)
            if cfg.rewind and run.alpha_bars[nxt] <= cfg.reseed_max_alpha_bar:
                # undo the guided steps taken inside the basin: back to the sample's own noise
                live.latents[p] = live.noise[p] * run.latent_scale[nxt]
        if "push" in new:
            live.push[p] = True
        if "embed_noise" in new:
            live.cond[p] = noisy_embedding(live.cond[p], s.seed, cfg, run.requests[s.request].prompt)
        if "reseed" in new:
            noise = fresh_noise((1, *live.latents.shape[1:]), s.seed, self.device, live.latents.dtype,
                                run.requests[s.request].prompt)
            live.latents[p] = noise[0] * run.scheduler.init_noise_sigma
        return True

    def _set_attention_rows(self, live: _Live, samples) -> None:
        on = [samples[i].rung > 0 and "attention" in active_mitigations(self.config.mitigation, samples[i].rung)
              for i in live.rows]
        scale, mask = attention_rows(on, [samples[i].eos for i in live.rows], live.cond.shape[1],
                                     self.config.mitigation, self.device)
        self.control.key_logit_scale, self.control.key_mask = scale, mask

    def _drop(self, run: "_Run", live: _Live, positions: list[int], reason: Reason) -> None:
        """Samples at `positions` leave the batch now: their remaining steps are never computed."""
        if not positions:
            return
        for p in positions:
            run.samples[live.rows[p]].stopped = reason
        gone = set(positions)
        keep = [p for p in range(len(live.rows)) if p not in gone]
        live.keep(keep)
        _slice_scheduler_history(run.scheduler, torch.tensor(keep, dtype=torch.long))
        self._set_attention_rows(live, run.samples)

    @staticmethod
    def _cancelled(live: _Live, samples, is_cancelled: IsCancelled | None) -> list[int]:
        if is_cancelled is None or not live.rows:
            return []
        flags = {r: bool(is_cancelled(r)) for r in {samples[i].request for i in live.rows}}
        return [p for p, i in enumerate(live.rows) if flags[samples[i].request]]

    # ---- 7-9: decode, screen, results -----------------------------------------------------------
    def _decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """diffusers' decode and postprocess ("np" output, then ×255 rounded): uint8 [H, W, 3] each."""
        image = self.family.decode(latents)
        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        return list((np.clip(image, 0, 1) * 255).round().astype(np.uint8))

    def _screen(self, image: np.ndarray):
        if self.index is None:
            raise ScreeningUnavailable("no fingerprint index is configured: cannot screen")
        return self.index.screen(image)

    def _finish(self, run: "_Run", s: _Sample, image: np.ndarray, rows: np.ndarray) -> ImageResult:
        """Final screen of a decoded image, then the decision. Any screening failure fails closed."""
        report = self._report(run, s, rows)
        if s.mode == GuardMode.OFF:
            return ImageResult(s.image, s.seed, Decision.ALLOWED, Reason.NONE, image, report)
        t0 = time.perf_counter()
        try:
            screen = self._screen(image)
        except Exception as exc:   # noqa: BLE001 - whatever broke, the image was not screened
            run.stats.screen_failures += 1
            log.warning("final screen failed (%s: %s): %s", type(exc).__name__, exc,
                        "nothing released" if s.mode == GuardMode.ENFORCE else "monitor mode releases it")
            report.mitigations.append(f"screen failed: {type(exc).__name__}")
            if s.mode == GuardMode.ENFORCE:
                return ImageResult(s.image, s.seed, Decision.BLOCKED, Reason.SCREENING_FAILED, None, report)
            return ImageResult(s.image, s.seed, Decision.ALLOWED, Reason.SCREENING_FAILED, image, report)
        run.stats.screen_seconds.append(time.perf_counter() - t0)
        faces = [f for f in screen.faces if f.matched and (self.config.face_match_scope == "any" or f.protected)]
        report.audit["screen"] = _screen_audit(screen)
        acted = s.rung > 0 or (s.mode == GuardMode.MONITOR and s.flagged_step is not None)
        verdict = final_verdict(s.mode, acted, screen.is_copy, len(faces), s.face_action)
        if verdict.release and s.mode == GuardMode.ENFORCE and not self._reverified(image, report, run):
            return ImageResult(s.image, s.seed, Decision.BLOCKED, Reason.MEMORIZATION, None, report)
        if verdict.decision == Decision.REROUTED and not self._kept_prompt(run, s, image, rows, report):
            return ImageResult(s.image, s.seed, Decision.BLOCKED, Reason.MEMORIZATION, None, report)
        if not verdict.release:
            report.mitigations.append("final screen: " + ("copy" if screen.is_copy else "protected face"))
            return ImageResult(s.image, s.seed, verdict.decision, verdict.reason, None, report)
        if verdict.obfuscate_faces:
            image = obfuscate_faces(image, [tuple(f.box) for f in faces], s.face_action.value)
            report.mitigations.append(f"final screen: {len(faces)} face(s) {s.face_action.value}")
            if not self._clean_after_obfuscation(image, run.stats):
                return ImageResult(s.image, s.seed, Decision.BLOCKED, Reason.PROTECTED_FACE, None, report)
        return ImageResult(s.image, s.seed, verdict.decision, verdict.reason, image, report)

    def _reverified(self, image: np.ndarray, report: GuardReport, run: "_Run") -> bool:
        """A released image must lie at least policy.final_pdq_distance PDQ bits from every indexed item
        (closer than every benign calibration image was: blocked, whether or not it was rerouted)."""
        if self.policy.final_pdq_distance is None:
            return True
        try:
            distance = nearest_pdq_distance(self.index, image)
        except Exception as exc:   # noqa: BLE001 - not verified means not released
            run.stats.screen_failures += 1
            report.mitigations.append(f"final re-verification failed: {type(exc).__name__}")
            return False
        report.audit["final_pdq_distance"] = distance
        if distance < self.policy.final_pdq_distance:
            report.mitigations.append("final re-verification: still close to an indexed item")
            return False
        return True

    def _kept_prompt(self, run: "_Run", s: _Sample, image: np.ndarray, rows: np.ndarray,
                     report: GuardReport) -> bool:
        """REROUTED promises an image for the caller's prompt: guidance must have been on for at least
        min_guided_fraction of the steps (an unguided trajectory is an unconditional sample), and the
        image must answer the prompt (index CLIP) at least as well as policy.reroute_min_fidelity."""
        wanted = run.requests[s.request].guidance_scale
        applied = rows[:s.steps_done, GUIDANCE]
        share = float(np.mean(np.abs(applied - wanted) <= 1e-3 * max(1.0, abs(wanted)))) if len(applied) else 0.0
        report.audit["guided_share"] = round(share, 3)
        if share < self.config.mitigation.min_guided_fraction:
            report.mitigations.append(f"reroute could not keep the prompt (guidance on {share:.0%} of steps): blocked")
            run.stats.reroutes_unfaithful += 1
            return False
        floor = self.policy.reroute_min_fidelity
        if floor is None:
            return True
        try:
            score = float(self._fidelity().zscores([image], [run.requests[s.request].prompt])[0])
        except Exception as exc:   # noqa: BLE001 - a reroute that could not be checked is not released
            run.stats.screen_failures += 1
            log.warning("reroute fidelity check failed (%s: %s): blocked", type(exc).__name__, exc)
            report.mitigations.append(f"reroute fidelity check failed: {type(exc).__name__}: blocked")
            return False
        report.audit["reroute_fidelity"] = round(score, 4)
        if score < floor:
            # a new image that does not answer the prompt either (for a caption that means nothing to
            # the model but the memorized photo, the usual case): blocking says so, REROUTED would not
            report.mitigations.append(UNFAITHFUL_REROUTE + " (CLIP fidelity under the benign floor): blocked")
            run.stats.reroutes_unfaithful += 1
            return False
        return True

    def _fidelity(self) -> PromptFidelity:
        """The policy's fidelity test on the index's CLIP, built once per (policy, encoder)."""
        encoder = self.index.clip_encoder() if self.index is not None else None
        if encoder is None:
            raise MissingResource("the policy checks reroutes with the index's CLIP, and this index has none")
        cached = self._fidelity_cache
        if cached is None or cached[0] is not self.policy or cached[1] is not encoder:
            cached = self._fidelity_cache = (self.policy, encoder, PromptFidelity(encoder, self.policy.reroute_references))
        return cached[2]

    def _clean_after_obfuscation(self, image: np.ndarray, stats: PipelineStats) -> bool:
        try:
            again = self._screen(image)
        except Exception:   # noqa: BLE001 - fail closed
            stats.screen_failures += 1
            return False
        # the faces in scope only: with "protected", a training-set face left as it is was not acted on
        return not again.is_copy and not any(f.matched and (self.config.face_match_scope == "any" or f.protected)
                                             for f in again.faces)

    def _stopped_result(self, run: "_Run", s: _Sample, rows: np.ndarray) -> ImageResult:
        return ImageResult(s.image, s.seed, Decision.BLOCKED, s.stopped, None, self._report(run, s, rows))

    def _report(self, run: "_Run", s: _Sample, rows: np.ndarray) -> GuardReport:
        """Scores, trace and audit of one sample from its trace rows [steps, columns] (NaN: not computed)."""
        trace = []
        for step in range(s.steps_done):
            entry = {"step": float(step), "timestep": run.timesteps[step], "rung": float(_rung_at(s, step))}
            if not np.isnan(rows[step, COMBINED]):
                entry.update({name: float(rows[step, j]) for j, name in enumerate(COLUMNS)})
            trace.append(entry)
        scores = {}
        window = rows[: min(self.policy.detect_steps, s.steps_done)]
        if len(window) and not np.isnan(window[:, COMBINED]).all():
            scores["combined"] = float(np.nanmax(window[:, COMBINED]))
            scores.update({f"z_{name}": float(np.nanmax(window[:, S + j])) for j, name in enumerate(SIGNALS)})
            scores["similarity_last"] = float(rows[s.steps_done - 1, SIM])
        return GuardReport(scores=scores, first_flagged_step=s.flagged_step, steps_computed=s.steps_done,
                           mitigations=list(s.mitigations), trace=trace, audit=dict(s.audit))


@dataclass
class _Run:
    """Per-call context of one generate()."""
    samples: list[_Sample]
    requests: Sequence[GenerationRequest]
    scheduler: object
    timesteps: list[float]
    alpha_bars: list[float]
    tables: PolicyTables                 # on the device
    sim_mean: np.ndarray                 # similarity's benign mean/std per step, on the host
    sim_std: np.ndarray
    trace: torch.Tensor                  # [steps, samples, COLUMNS]
    stats: PipelineStats
    guarded: bool                        # any sample not OFF: signals are computed
    latent_scale: list[float]            # scheduler-space latent per DDPM-space x_t, per step
    copy_cosine: float                   # fingerprint cosine of two copies of one image (the index's), for standout


def second_pass_seed(seed: int, prompt: str) -> int:
    """The fresh noise of a sample's second pass, from its seed and prompt: reproducible, and two
    prompts that the model renders alike from one noise (captions it never learned) do not share it."""
    digest = hashlib.sha256(f"memguard second pass {seed}\n{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def nearest_pdq_distance(index, image: np.ndarray) -> float:
    """PDQ Hamming distance from `image` to the closest indexed or protected item (256: nothing)."""
    from memguard.index.pdq import pdq_hash

    hits = index.search_signal("pdq", pdq_hash(image)[0], 1)
    return float(min((h["score"] for h in hits), default=256.0))


def _rung_at(s: _Sample, step: int) -> int:
    rung = 0
    for start, r in s.rung_history:
        if step >= start:
            rung = r
    return rung


def _screen_audit(screen) -> dict:
    """Membership information from the final screen: audit scope only."""
    return {"is_copy": bool(screen.is_copy), "protected": bool(screen.protected),
            "copies": [{"item_id": m.item_id, "protected": m.protected,
                        "scores": {k: v.score for k, v in m.signals.items()}} for m in screen.matches if m.is_copy],
            "faces": [{"box": list(f.box), "identity": f.identity, "distance": f.distance, "matched": f.matched,
                       "protected": f.protected} for f in screen.faces]}


class _Progress:
    """Per-step StepEvents, emitted one step late so the host never waits on the current step.

    Step t's signals are copied to the host without blocking; they are read (and the events
    emitted) after step t+1 was launched, when step t has long finished on the device.
    """

    def __init__(self, on_step: OnStep | None, samples: list[_Sample], total: int):
        self.on_step, self.samples, self.total = on_step, samples, total
        self.pending = None

    def push(self, step: int, rows: list[int], values: torch.Tensor | None) -> None:
        if self.on_step is None:
            return
        host, event = None, None
        if values is not None:
            host = values.to("cpu", non_blocking=True)
            if values.is_cuda:
                event = torch.cuda.Event()
                event.record()
        previous, self.pending = self.pending, (step, rows, host, event)
        if previous is not None:
            self._emit(*previous)

    def flush(self) -> None:
        if self.pending is not None:
            self._emit(*self.pending)
            self.pending = None

    def _emit(self, step: int, rows: list[int], host, event) -> None:
        if event is not None:
            event.synchronize()
        for pos, i in enumerate(rows):
            s = self.samples[i]
            signals = {}
            if host is not None:
                signals = {name: float(host[pos, j]) for j, name in enumerate(SIGNALS)}
                signals["combined"] = float(host[pos, COMBINED])
            self.on_step(s.request, StepEvent(s.request_id, s.image, step, self.total, signals,
                                              s.actions.get(step, "continue")))


_HISTORY_LISTS = ("model_outputs", "ets")          # multistep schedulers keep past outputs per sample
_HISTORY_TENSORS = ("cur_sample", "sample", "last_sample")


def _slice_scheduler_history(scheduler, keep) -> None:
    """Keep only `keep` rows in a scheduler's per-sample history (no-op for DDIM, Euler)."""
    import torch

    for name in _HISTORY_LISTS:
        history = getattr(scheduler, name, None)
        if isinstance(history, list):
            setattr(scheduler, name, [h[keep] if isinstance(h, torch.Tensor) else h for h in history])
    for name in _HISTORY_TENSORS:
        value = getattr(scheduler, name, None)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            setattr(scheduler, name, value[keep])
