"""The engine interface the server depends on, and the baseline (unguarded) `PipelineEngine`.

The server knows only `GenerationEngine`: it hands over one micro-batch of compatible requests
(same `batch_key`) at a time, from one worker thread, and reads back per-request `ImageResult`
lists, `StepEvent`s as they happen, and plain stats dataclasses that server/metrics.py exports.
Engines are chosen by name (`load_engine("module:attr", config)`); DEFAULT_ENGINE is the guarded
one (guard/guarded_engine.py). `IndexedEngine` holds what every engine shares (index gateway,
stats drain).

`PipelineEngine`, the unguarded baseline the load benchmark compares against, is the guarded
pipeline in mode OFF: the one denoising loop (guard/pipeline.py) with every request's mode set to
OFF (diffusers' own arithmetic, nothing scored or screened, all images ALLOWED, Reason.NONE). It
says so with `guarded = False`.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Protocol, Sequence, runtime_checkable

import numpy as np

from memguard.errors import InvalidInput, MissingResource, ScreeningUnavailable
from memguard.types import GenerationRequest, GuardMode, ImageResult, Reason, StepEvent

log = logging.getLogger(__name__)

DEFAULT_ENGINE = "memguard.guarded_engine:GuardedEngine"

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
    # no per-sample signal values or flagged steps: they would reach /metrics (issue 29, finding 3)
    steps_saved: dict[str, int] = field(default_factory=dict)  # cause (blocked|cancelled) → steps
    decode_seconds: float = 0.0
    second_passes: int = 0                       # images generated again (GuardConfig.second_pass)
    reroutes_unfaithful: int = 0                 # reroutes blocked for no longer answering the prompt


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

    def protect_image(self, image: np.ndarray, reason: str, item_id: str | None = None, *,
                      idempotency_key: str | None = None) -> str: ...

    def protect_face(self, images: list[np.ndarray], identity: str, reason: str, *,
                     idempotency_key: str | None = None) -> str: ...

    def unprotect(self, item_id: str, reason: str) -> bool: ...

    def index_stats(self) -> IndexStats: ...

    def stats(self) -> EngineStats: ...

    def close(self) -> None: ...


def native_size(engine: Any) -> int | None:
    """The engine's native image side in pixels (UNet sample size × VAE scale factor), or None when it
    does not say. An engine may state it as `native_size`; a diffusers pipeline at `.pipe` or
    `.pipeline.pipe` is read otherwise. The server bounds request sizes by it."""
    stated = getattr(engine, "native_size", None)
    if isinstance(stated, int) and stated > 0:
        return stated
    pipe = getattr(engine, "pipe", None) or getattr(getattr(engine, "pipeline", None), "pipe", None)
    try:
        return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    except (AttributeError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None       # diffusers pipeline directory; None: the testbed model
    index: str | None = None       # fingerprint index directory; None: no index (Screen fails closed)
    policy: str | None = None      # guard policy file (guarded engines); None: the engine's default
    tiny_random: bool = False      # random-weight testbed architecture instead of a model dir
    device: str = "cpu"
    dtype: str = "float32"
    torch_threads: int = 0         # 0: torch's default
    face_match_scope: str = "protected"  # guarded generation obfuscates faces of "protected" identities only,
    # or of "any" indexed person (training-set people too); the server sets it from server.face_match_scope


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
    """Duck-typed pass-through to a fingerprint index (memguard.index.FingerprintIndex or alike).

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
            from memguard.index.api import FingerprintIndex
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

    def protect_image(self, image: np.ndarray, reason: str, item_id: str | None = None, *,
                      idempotency_key: str | None = None) -> str:
        receipt = self._require("protect an image").protect_image(image, reason, item_id=item_id,
                                                                  idempotency_key=idempotency_key)
        return str(getattr(receipt, "pid", receipt))

    def protect_face(self, images: list[np.ndarray], identity: str, reason: str, *,
                     idempotency_key: str | None = None) -> str:
        receipt = self._require("protect a face").protect_face(images, identity, reason,
                                                               idempotency_key=idempotency_key)
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
    """Adapt an index's screen result (e.g. memguard.index.screen.ScreenResult); all of it is audit-only."""
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
def load_pipeline(config: EngineConfig):
    """The engine's pipeline: a local directory through memguard.loading (never downloads), or the tiny random one."""
    import torch

    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    dtype = getattr(torch, config.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidInput("dtype", f"{config.dtype!r} is not a torch dtype (float32, float16, bfloat16)")
    if not config.tiny_random:
        from memguard.loading import load_pipeline as load_local
        return load_local(config.model, device=config.device, dtype=dtype)
    from memguard.models import build_tiny_pipeline
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

    @property
    def default_size(self) -> int | None:
        """The image side (pixels) the engine's model was built for; the server's default request size."""
        pipeline = getattr(self, "pipeline", None)    # a GuardedPipeline (guarded and unguarded engines)
        return getattr(pipeline, "default_size", None)

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

    def protect_image(self, image: np.ndarray, reason: str, item_id: str | None = None, *,
                      idempotency_key: str | None = None) -> str:
        return self.index.protect_image(image, reason, item_id, idempotency_key=idempotency_key)

    def protect_face(self, images: list[np.ndarray], identity: str, reason: str, *,
                     idempotency_key: str | None = None) -> str:
        return self.index.protect_face(images, identity, reason, idempotency_key=idempotency_key)

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
    """Unguarded generation: the guarded pipeline with every request in mode OFF."""

    name = "pipeline"
    guarded = False

    def __init__(self, pipe, index: IndexGateway | None = None):
        from memguard.pipeline import GuardedPipeline

        super().__init__(index)
        self.pipe = pipe
        self.pipeline = GuardedPipeline(pipe, index=None)

    @classmethod
    def from_config(cls, config: EngineConfig) -> "PipelineEngine":
        index = IndexGateway.open(config.index, model_dir=config.model, device=config.device)  # fail fast
        return cls(load_pipeline(config), index)

    def warmup(self) -> None:
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self.generate([GenerationRequest(prompt="warmup", height=size, width=size, steps=2, seed=0)])
        self.stats()   # warm-up work is not traffic
        self.ready = True

    def generate(self, requests: Sequence[GenerationRequest], *, on_step: OnStep | None = None,
                 is_cancelled: IsCancelled | None = None) -> list[list[ImageResult]]:
        if len({self.batch_key(r) for r in requests}) != 1:
            raise ValueError("generate() needs a non-empty batch of requests with one batch_key")
        off = [dataclasses.replace(r, mode=GuardMode.OFF) for r in requests]
        batch = self.pipeline.generate(off, on_step=on_step, is_cancelled=is_cancelled)
        with self._stats_lock:
            self._pending.batches.append(to_batch_stats(batch.stats))
        return batch.results


def to_batch_stats(stats, results: list[ImageResult] | None = None) -> BatchStats:
    """A pipeline's PipelineStats in the server's BatchStats shape: aggregates only, nothing per sample
    (`results` is no longer read; the parameter stays for callers that pass it)."""
    return BatchStats(requests=stats.requests, images=stats.samples, steps=stats.steps,
                      sample_steps=stats.sample_steps, step_seconds=list(stats.step_seconds),
                      guard_seconds=list(stats.guard_seconds), steps_saved=dict(stats.steps_saved),
                      decode_seconds=stats.decode_seconds,
                      second_passes=stats.second_passes, reroutes_unfaithful=stats.reroutes_unfaithful)
