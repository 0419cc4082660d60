"""The engine interface the server depends on, and the baseline (unguarded) `PipelineEngine`.

The server knows only `GenerationEngine`: it hands over one micro-batch of compatible requests
(same `batch_key`) at a time, from one worker thread, and reads back per-request `ImageResult`
lists, `StepEvent`s as they happen, and plain stats dataclasses that server/metrics.py exports.
Engines are chosen by name (`load_engine("module:attr", config)`); DEFAULT_ENGINE is the guarded
one (guard/guarded_engine.py). `IndexedEngine` holds what every engine shares (index gateway,
stats drain).

`PipelineEngine`, the unguarded baseline the load benchmark compares against, runs a diffusers
StableDiffusionPipeline's components through its own small denoising loop (prompt encoding, CFG,
scheduler steps, per-sample cancellation, decoding). It does not guard: it applies mode OFF to
every request (all images ALLOWED, Reason.NONE) and says so with `guarded = False`. It measures
the noise-divergence signal (free with CFG) for progress events.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Protocol, Sequence, runtime_checkable

import numpy as np

from guard.errors import InvalidInput, MissingResource, ScreeningUnavailable
from guard.types import Decision, GenerationRequest, GuardReport, ImageResult, Reason, StepEvent

log = logging.getLogger(__name__)

DEFAULT_ENGINE = "guard.guarded_engine:GuardedEngine"

OnStep = Callable[[int, StepEvent], None]     # (request position in the batch, event)
IsCancelled = Callable[[int], bool]           # request position in the batch → stop it?


# ----------------------------------------------------------------------------- plain data
@dataclass
class ScreenOutcome:
    """Screening verdict for one image. `audit` (matched items, scores) is for audit scope only."""
    copy_detected: bool
    faces_detected: int = 0
    faces_matched: int = 0
    reason: Reason = Reason.NONE
    audit: dict[str, object] = field(default_factory=dict)


@dataclass
class IndexStats:
    items: int = 0
    protected_items: int = 0
    details: dict[str, float] = field(default_factory=dict)


@dataclass
class BatchStats:
    """What one micro-batch computed and measured."""
    requests: int
    images: int
    steps: int                                   # scheduled steps per sample
    sample_steps: int = 0                        # denoising steps computed, summed over samples
    step_seconds: list[float] = field(default_factory=list)    # wall time of each batch step
    guard_seconds: list[float] = field(default_factory=list)   # of which guard work, per step
    signals: dict[str, list[float]] = field(default_factory=dict)  # signal → values (sample, step)
    first_flagged_steps: list[int] = field(default_factory=list)
    steps_saved: dict[str, int] = field(default_factory=dict)  # cause (blocked|cancelled) → steps
    decode_seconds: float = 0.0


@dataclass
class EngineStats:
    """Everything recorded since the previous `stats()` call (which drains it)."""
    batches: list[BatchStats] = field(default_factory=list)
    screen_seconds: list[float] = field(default_factory=list)  # index searches
    screen_failures: int = 0


# ----------------------------------------------------------------------------- the interface
@runtime_checkable
class GenerationEngine(Protocol):
    name: str
    guarded: bool        # False: requests run with mode OFF whatever they ask
    ready: bool          # set by warmup(); the server reports NOT_SERVING until then

    def batch_key(self, request: GenerationRequest) -> Hashable:
        """Requests with equal keys may share a micro-batch."""

    def warmup(self) -> None: ...

    def generate(self, requests: Sequence[GenerationRequest], *, on_step: OnStep | None = None,
                 is_cancelled: IsCancelled | None = None) -> list[list[ImageResult]]:
        """Run one micro-batch; one result list per request, images in index order.

        `is_cancelled(i)` is polled between steps: request i's samples leave the batch and come
        back as BLOCKED / Reason.CANCELLED with no image. `on_step(i, event)` is called for each
        image of request i after each step it computed, in step order.
        """

    def screen(self, image: np.ndarray) -> ScreenOutcome:
        """uint8 [H, W, 3] → verdict; raises ScreeningUnavailable when it cannot screen."""

    def protect_image(self, image: np.ndarray, reason: str, item_id: str | None = None) -> str: ...

    def protect_face(self, images: list[np.ndarray], identity: str, reason: str) -> str: ...

    def unprotect(self, item_id: str, reason: str) -> bool: ...

    def index_stats(self) -> IndexStats: ...

    def stats(self) -> EngineStats: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None       # diffusers pipeline directory; None: the testbed model
    index: str | None = None       # fingerprint index directory; None: no index (Screen fails closed)
    policy: str | None = None      # guard policy file (guarded engines); None: the engine's default
    tiny_random: bool = False      # random-weight testbed architecture instead of a model dir
    device: str = "cpu"
    dtype: str = "float32"
    torch_threads: int = 0         # 0: torch's default


def load_engine(spec: str, config: EngineConfig) -> GenerationEngine:
    """`"module:attr"` → engine. attr is a class with `from_config(config)` or a factory function."""
    module_name, _, attr = spec.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attr or "build_engine")
    except (ImportError, AttributeError) as exc:
        raise InvalidInput("engine", f"cannot load {spec!r}: {exc}") from exc
    factory = getattr(target, "from_config", target)
    return factory(config)


# ----------------------------------------------------------------------------- the index gateway
class IndexGateway:
    """Duck-typed pass-through to a fingerprint index (guard.index.FingerprintIndex or alike).

    With no index: screening raises ScreeningUnavailable (fail closed); admin calls raise
    MissingResource. The index must be thread-safe (FingerprintIndex is): screens run beside
    generation and registry writes.
    """

    def __init__(self, index: Any | None):
        self.index = index

    @classmethod
    def open(cls, path: str | None, *, model_dir: str | None = None, device: str = "cpu") -> "IndexGateway":
        if path is None:
            return cls(None)
        if not Path(path).exists():
            raise MissingResource(f"index directory {path} does not exist")
        try:
            from guard.index.api import FingerprintIndex
        except ImportError as exc:
            raise MissingResource(f"the index package is unavailable ({exc}); cannot open {path}") from exc
        kwargs = {"model_dir": Path(model_dir)} if model_dir else {}
        return cls(FingerprintIndex.open(path, device=device, **kwargs))

    def _require(self, what: str) -> Any:
        if self.index is None:
            raise MissingResource(f"no fingerprint index is configured: cannot {what}")
        return self.index

    def screen(self, image: np.ndarray) -> ScreenOutcome:
        if self.index is None:
            raise ScreeningUnavailable("no fingerprint index is configured: cannot screen")
        try:
            result = self.index.screen(image)
        except (ScreeningUnavailable, InvalidInput):
            raise
        except Exception as exc:  # any other index failure means "not screened": fail closed, logged
            log.exception("index screen failed")
            raise ScreeningUnavailable(f"index screen failed: {type(exc).__name__}") from exc
        return to_screen_outcome(result)

    def protect_image(self, image: np.ndarray, reason: str, item_id: str | None = None) -> str:
        receipt = self._require("protect an image").protect_image(image, reason, item_id=item_id)
        return str(getattr(receipt, "pid", receipt))

    def protect_face(self, images: list[np.ndarray], identity: str, reason: str) -> str:
        receipt = self._require("protect a face").protect_face(images, identity, reason)
        return str(getattr(receipt, "pid", receipt))

    def unprotect(self, item_id: str, reason: str) -> bool:
        removed = self._require("unprotect").unprotect(item_id, reason)   # FingerprintIndex: removed ids
        return True if removed is None else bool(removed)

    def stats(self) -> IndexStats:
        return to_index_stats(self._require("report index stats").stats())

    def close(self) -> None:
        if self.index is not None and hasattr(self.index, "close"):
            self.index.close()


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return dict(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return dict(vars(obj))


def _first(d: dict[str, Any], names: tuple[str, ...], default: Any) -> Any:
    return next((d[n] for n in names if n in d and d[n] is not None), default)


def _face_matched(face: Any) -> bool:
    f = _as_dict(face)
    return bool(f["matched"]) if "matched" in f else bool(_first(f, ("identity", "match"), None))


def to_screen_outcome(result: Any) -> ScreenOutcome:
    """Adapt an index's screen result (e.g. guard.index.screen.ScreenResult); all of it is audit-only."""
    if isinstance(result, ScreenOutcome):
        return result
    d = _as_dict(result)
    faces = _first(d, ("faces", "face_matches"), []) or []
    matched = sum(_face_matched(f) for f in faces)
    copy = bool(_first(d, ("is_copy", "copy_detected", "copy"), False))
    reason = Reason.MEMORIZATION if copy else Reason.PROTECTED_FACE if matched else Reason.NONE
    return ScreenOutcome(copy_detected=copy, faces_detected=len(faces), faces_matched=matched,
                         reason=reason, audit=d)


def to_index_stats(result: Any) -> IndexStats:
    """Adapt an index's stats (FingerprintIndex: a dict with a nested "counts" dict)."""
    if isinstance(result, IndexStats):
        return result
    d = _as_dict(result)
    flat = {**d, **(d.get("counts") or {})}
    numeric = {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    protected = _first(flat, ("protected_items", "protected"), None)
    if protected is None:
        protected = int(flat.get("protected_images", 0)) + int(flat.get("protected_identities", 0))
    return IndexStats(items=int(_first(flat, ("items", "num_items", "count", "total"), 0)),
                      protected_items=int(protected), details=numeric)


# ----------------------------------------------------------------------------- the baseline engine
@dataclass
class _Row:
    """One sample of the batch: which request, which of its images, and its seed."""
    request: int
    image: int
    seed: int
    steps_done: int = 0
    cancelled: bool = False


def load_pipeline(config: EngineConfig):
    """The engine's pipeline: a local directory through guard.loading (never downloads), or the tiny random one."""
    import torch

    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    dtype = getattr(torch, config.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidInput("dtype", f"{config.dtype!r} is not a torch dtype (float32, float16, bfloat16)")
    if not config.tiny_random:
        from guard.loading import load_pipeline as load_local
        return load_local(config.model, device=config.device, dtype=dtype)
    from guard.models import build_tiny_pipeline
    pipe = build_tiny_pipeline()
    pipe = pipe if dtype == torch.float32 else pipe.to(dtype=dtype)   # built in float32
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(config.device)


class IndexedEngine:
    """What every engine shares: the index gateway (screen, protect, stats) and the stats drain."""

    def __init__(self, index: IndexGateway | None = None):
        self.index = index or IndexGateway(None)
        self.ready = False
        self._pending = EngineStats()
        self._stats_lock = threading.Lock()

    def batch_key(self, request: GenerationRequest) -> Hashable:
        return (request.height, request.width, request.steps)

    def screen(self, image: np.ndarray) -> ScreenOutcome:
        t0 = time.perf_counter()
        try:
            outcome = self.index.screen(image)
        except Exception:
            with self._stats_lock:
                self._pending.screen_failures += 1
            raise
        with self._stats_lock:
            self._pending.screen_seconds.append(time.perf_counter() - t0)
        return outcome

    def protect_image(self, image: np.ndarray, reason: str, item_id: str | None = None) -> str:
        return self.index.protect_image(image, reason, item_id)

    def protect_face(self, images: list[np.ndarray], identity: str, reason: str) -> str:
        return self.index.protect_face(images, identity, reason)

    def unprotect(self, item_id: str, reason: str) -> bool:
        return self.index.unprotect(item_id, reason)

    def index_stats(self) -> IndexStats:
        return self.index.stats()

    def stats(self) -> EngineStats:
        with self._stats_lock:
            out, self._pending = self._pending, EngineStats()
        return out

    def close(self) -> None:
        self.ready = False
        self.index.close()


class PipelineEngine(IndexedEngine):
    """Unguarded generation over a StableDiffusionPipeline's components (mode OFF for all)."""

    name = "pipeline"
    guarded = False

    def __init__(self, pipe, index: IndexGateway | None = None):
        super().__init__(index)
        self.pipe = pipe

    @classmethod
    def from_config(cls, config: EngineConfig) -> "PipelineEngine":
        index = IndexGateway.open(config.index, model_dir=config.model, device=config.device)  # fail fast
        return cls(load_pipeline(config), index)

    # -- interface ------------------------------------------------------------------------
    def warmup(self) -> None:
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self.generate([GenerationRequest(prompt="warmup", height=size, width=size, steps=2, seed=0)])
        self.stats()   # warm-up work is not traffic
        self.ready = True

    def generate(self, requests: Sequence[GenerationRequest], *, on_step: OnStep | None = None,
                 is_cancelled: IsCancelled | None = None) -> list[list[ImageResult]]:
        import torch

        # 0. One size and step count per batch (the batcher groups requests by batch_key)
        if len({self.batch_key(r) for r in requests}) != 1:
            raise ValueError("generate() needs a non-empty batch of requests with one batch_key")
        first = requests[0]
        stats = BatchStats(requests=len(requests), images=sum(r.num_images for r in requests), steps=first.steps)
        with torch.inference_mode():
            # 1. One row per image, each with its own seed
            rows = self._expand(requests)
            # 2. Prompt and negative-prompt embeddings for classifier-free guidance
            cond, uncond = self._encode_prompts(requests, rows)
            # 3. Initial noise, one generator per sample so a result does not depend on its batch
            latents = self._prepare_latents(rows, first.height, first.width, cond.dtype)
            guidance = torch.tensor([requests[r.request].guidance_scale for r in rows],
                                    device=latents.device, dtype=latents.dtype)
            # 4. Denoising loop; cancelled samples leave the batch between steps
            alive, latents = self._denoise(requests, rows, latents, cond, uncond, guidance,
                                           on_step, is_cancelled, stats)
            # 5. Decode the survivors
            t0 = time.perf_counter()
            images = self._decode(latents) if alive else []
            stats.decode_seconds = time.perf_counter() - t0
        # 6. Per-request results
        results = self._results(requests, rows, dict(zip(alive, images)))
        with self._stats_lock:
            self._pending.batches.append(stats)
        return results

    # -- the steps ------------------------------------------------------------------------
    @staticmethod
    def _expand(requests: Sequence[GenerationRequest]) -> list[_Row]:
        rows = []
        for i, req in enumerate(requests):
            base = req.seed if req.seed is not None else secrets.randbits(63)
            rows += [_Row(i, k, (base + k) % 2**63) for k in range(req.num_images)]
        return rows

    def _encode_prompts(self, requests, rows):
        prompts = [requests[r.request].prompt for r in rows]
        negatives = [requests[r.request].negative_prompt for r in rows]
        device = self.pipe.unet.device
        cond, uncond = self.pipe.encode_prompt(prompts, device, 1, True, negative_prompt=negatives)
        return cond, uncond

    def _prepare_latents(self, rows, height: int, width: int, dtype):
        import torch

        unet, scale = self.pipe.unet, self.pipe.vae_scale_factor
        shape = (1, unet.config.in_channels, height // scale, width // scale)
        noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(r.seed), dtype=torch.float32)
                 for r in rows]
        return torch.cat(noise).to(device=unet.device, dtype=dtype)

    def _denoise(self, requests, rows, latents, cond, uncond, guidance, on_step, is_cancelled, stats):
        """Run the scheduler; return (indices of rows still alive, their final latents)."""
        import torch

        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)  # per-batch state
        scheduler.set_timesteps(stats.steps, device=latents.device)
        latents = latents * scheduler.init_noise_sigma
        alive = list(range(len(rows)))
        divergence = stats.signals.setdefault("noise_divergence", [])
        for step, t in enumerate(scheduler.timesteps):
            alive, keep = self._drop_cancelled(rows, alive, is_cancelled)
            if keep is not None:
                latents, cond, uncond, guidance = latents[keep], cond[keep], uncond[keep], guidance[keep]
                _slice_scheduler_history(scheduler, keep)
            if not alive:
                break
            t0 = time.perf_counter()
            model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            eps = self.pipe.unet(model_in, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            eps_u, eps_c = eps.chunk(2)
            g0 = time.perf_counter()
            values = (eps_c - eps_u).flatten(1).norm(dim=1).float().tolist()  # Wen et al.: free with CFG
            stats.guard_seconds.append(time.perf_counter() - g0)
            eps = eps_u + guidance.view(-1, 1, 1, 1) * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents).prev_sample
            for pos, row_index in enumerate(alive):
                row = rows[row_index]
                row.steps_done += 1
                if on_step is not None:
                    on_step(row.request, StepEvent(requests[row.request].request_id, row.image, step, stats.steps,
                                                   {"noise_divergence": values[pos]}))
            divergence += values
            stats.sample_steps += len(alive)
            stats.step_seconds.append(time.perf_counter() - t0)
        saved = sum(stats.steps - r.steps_done for r in rows if r.cancelled)
        if saved:
            stats.steps_saved["cancelled"] = saved
        return alive, latents

    @staticmethod
    def _drop_cancelled(rows, alive, is_cancelled):
        """Mark rows of cancelled requests; return (rows still alive, index tensor or None)."""
        import torch

        if is_cancelled is None or not alive:
            return alive, None
        flags = {r: bool(is_cancelled(r)) for r in {rows[i].request for i in alive}}
        if not any(flags.values()):
            return alive, None
        keep = [pos for pos, i in enumerate(alive) if not flags[rows[i].request]]
        for i in alive:
            rows[i].cancelled = flags[rows[i].request]
        return [alive[pos] for pos in keep], torch.tensor(keep, dtype=torch.long)

    def _decode(self, latents) -> list[np.ndarray]:
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        image = vae.decode(latents / vae.config.scaling_factor + shift).sample
        image = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to("cpu").byte()
        return list(image.permute(0, 2, 3, 1).numpy())

    @staticmethod
    def _results(requests, rows, images: dict[int, np.ndarray]) -> list[list[ImageResult]]:
        out: list[list[ImageResult]] = [[] for _ in requests]
        for i, row in enumerate(rows):
            report = GuardReport(steps_computed=row.steps_done)
            if i in images:
                result = ImageResult(row.image, row.seed, Decision.ALLOWED, Reason.NONE, images[i], report)
            else:
                result = ImageResult(row.image, row.seed, Decision.BLOCKED, Reason.CANCELLED, None, report)
            out[row.request].append(result)
        return out


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
