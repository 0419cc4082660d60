"""The servicers: protobuf in, engine (through the batcher) out, protobuf back.

Errors are raised as MemGuardError subclasses and mapped to status codes by the error
interceptor; auth and metrics live in interceptors too. Generation goes through the batcher;
uploads (Screen, Protect) are decoded and processed in the bounded UploadPool, never on the loop.

Hardening (issue 14): the guard mode is ENFORCE unless the key holds `guard_override` (or the
config allows overrides); continuous scores and signals go only to the `audit` scope; Generate and
Screen are rate-limited per key; request ids are bounded; a cancelled unary Generate leaves its
batch at the next step; Screen, Protect, Unprotect and every flagged generation are audited.

Hardening II (issue 29): a caller without `audit` learns each image's decision and nothing about
when or how close: its progress is every step of every image exactly once, in order, with no action
(`CoarseProgress`), its reports say the requested step count and no mitigations (`coarse_results`),
and a reply the guard stopped early is padded (progress and latency) to about the full step count.
"""
from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
import uuid
from dataclasses import dataclass
from functools import partial

import grpc

from memguard.engine import GenerationEngine, native_size
from memguard.errors import InvalidInput, MemGuardError
from memguard.types import GenerationRequest, GuardMode, GuardReport, ImageResult, Reason, RequestLimits
from memguard.proto.memguard.v1 import admin_pb2, admin_pb2_grpc, memguard_pb2 as pb, memguard_pb2_grpc
from memguard.server import convert
from memguard.server.audit_trail import ServerAudit, matched_ids
from memguard.server.auth import ANONYMOUS_DEV, Principal, current_principal
from memguard.server.batcher import Batcher, DeadlineExceeded, Job, KeyQueueShare, NotServing, QueueFull
from memguard.server.config import ServerConfig
from memguard.server.metrics import Metrics
from memguard.server.ratelimit import RateLimited, RateLimiter
from memguard.server.uploads import UploadPool, UploadQueueFull

log = logging.getLogger(__name__)


@dataclass
class Shared:
    """What both servicers use."""
    batcher: Batcher
    metrics: Metrics
    config: ServerConfig
    uploads: UploadPool
    limiter: RateLimiter
    audit: ServerAudit


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _check_finished(job: Job, results: list[ImageResult]) -> None:
    if job.deadline_passed() and any(r.reason is Reason.CANCELLED for r in results):
        raise DeadlineExceeded("the deadline passed before the images were done")


MAX_PADDING_S = 300.0     # never hold a reply longer than this to hide an early stop
PADDING_MARGIN_S = 0.25   # and never pad a reply past its caller's deadline


def coarse_results(request: GenerationRequest, results: list[ImageResult]) -> list[ImageResult]:
    """What a caller without `audit` sees of each image: decision, reason, image and a report that does
    not depend on when or how the guard acted (the requested step count, no mitigations)."""
    return [dataclasses.replace(r, report=GuardReport(steps_computed=0 if r.reason is Reason.CANCELLED
                                                      else request.steps)) for r in results]


def padding_seconds(job: Job, context: grpc.aio.ServicerContext) -> float:
    """How long a non-audit reply waits so that a batch the guard stopped early takes about as long as
    one that ran every step: the batch's seconds per computed step × the steps it did not compute.
    Zero when some sample of the batch ran every step (the reply was not early), when the engine
    reports no steps, or on a second pass (more steps than requested: it is late, not early)."""
    steps = job.request.steps
    if job.started_at is None or job.finished_at is None or not 0 < job.batch_steps < steps:
        return 0.0
    pad = (job.finished_at - job.started_at) / job.batch_steps * (steps - job.batch_steps)
    remaining = context.time_remaining()
    if remaining is not None:
        pad = min(pad, remaining - PADDING_MARGIN_S)
    return max(0.0, min(pad, MAX_PADDING_S))


class CoarseProgress:
    """Progress for a caller without `audit`: step s of every image once the engine reached step s
    for any image of the request, each (image, step) exactly once and in order, no action, no
    signals. Blocked samples (their events stop), second passes and batch retries (their steps
    restart at 0) therefore look like a request that ran straight through; `rest()` is what is left
    when the engine finished early."""

    def __init__(self, request: GenerationRequest):
        self.request_id, self.total = request.request_id, request.steps
        self.next = [0] * request.num_images

    def _message(self, image: int, step: int) -> pb.StepProgress:
        return pb.StepProgress(request_id=self.request_id, image_index=image, step=step, total_steps=self.total)

    def upto(self, step: int) -> list[pb.StepProgress]:
        out = []
        for step_ in range(min(self.next, default=self.total), min(step, self.total - 1) + 1):
            for image, due in enumerate(self.next):
                if due == step_:
                    out.append(self._message(image, step_))
                    self.next[image] = step_ + 1
        return out

    def rest(self) -> list[list[pb.StepProgress]]:
        """The steps not yet sent, one group per step."""
        groups = []
        while min(self.next, default=self.total) < self.total:
            groups.append(self.upto(min(self.next)))
        return groups


def _engine(batcher: Batcher) -> GenerationEngine:
    """The serving engine; NotServing (UNAVAILABLE) while it is still loading or warming up."""
    if batcher.engine is None:
        raise NotServing("the server is warming up")
    return batcher.engine


def _caller() -> Principal:
    return current_principal.get() or ANONYMOUS_DEV


def _key_name() -> str | None:
    """The API key's name; None with auth off (rate limits and queue shares are per key)."""
    caller = _caller()
    return None if caller is ANONYMOUS_DEV else caller.name


class _Base:
    def __init__(self, shared: Shared):
        self.s = shared

    @property
    def engine(self) -> GenerationEngine:
        return _engine(self.s.batcher)

    def _limit(self, rpc: str, family: str, cost: float = 1.0) -> None:
        """The key's token bucket (none with auth off: one local developer on loopback, every scope)."""
        key = _key_name()
        if key is None:
            return
        try:
            self.s.limiter.take(key, family, cost)
        except RateLimited:
            self.s.metrics.reject(rpc, "rate_limited")
            raise

    async def _upload(self, rpc: str, fn):
        try:
            return await self.s.uploads.run(fn)
        except UploadQueueFull:
            self.s.metrics.reject(rpc, "upload_queue_full")
            raise
        except InvalidInput as exc:
            if exc.field.startswith(("image", "face.photos")):
                self.s.metrics.reject(rpc, "invalid_image")
            raise


class MemGuardService(_Base, memguard_pb2_grpc.MemGuardServicer):
    def __init__(self, shared: Shared, defaults: convert.RequestDefaults, limits: RequestLimits):
        super().__init__(shared)
        self.defaults, self.limits = defaults, limits

    def _effective_mode(self, request: GenerationRequest) -> GuardMode:
        return request.mode if self.engine.guarded else GuardMode.OFF

    def _request(self, msg: pb.GenerateRequest, rpc: str) -> GenerationRequest:
        try:
            request = convert.generation_request(msg, self.defaults, self.limits)
        except InvalidInput as exc:
            if exc.field == "request_id":
                self.s.metrics.reject(rpc, "request_id")
            raise
        cap = self.s.config.batching.max_batch_images
        if request.num_images > cap:
            raise InvalidInput("num_images", f"{request.num_images} exceeds this server's batch size {cap}")
        try:
            self._check_cost(request)
        except InvalidInput:
            self.s.metrics.reject(rpc, "cost")
            raise
        if request.mode is not GuardMode.ENFORCE and not self._may_override():
            log.info("key %r asked for mode %s without guard_override: running ENFORCE",
                     _caller().name, request.mode.value)
            self.s.metrics.reject(rpc, "mode_override")
            request.mode = GuardMode.ENFORCE
        self._limit(rpc, "generate", request.num_images)
        return request

    def _check_cost(self, request: GenerationRequest) -> None:
        """Bound one request's work by the model: each side ≤ max_latent_factor × the native side, and
        height × width × steps × num_images ≤ max_request_cost native images × steps."""
        native = native_size(self.engine)
        if native is None:
            return
        admission = self.s.config.admission
        side = admission.max_side(native)
        for name in ("height", "width"):
            if getattr(request, name) > side:
                raise InvalidInput(name, f"{getattr(request, name)} exceeds {side} px for this model "
                                         f"({admission.max_latent_factor:g} × its native {native} px)")
        cost = request.height * request.width * request.steps * request.num_images / native ** 2
        if cost > admission.max_request_cost:
            field = "num_images" if request.num_images > 1 else "steps"
            raise InvalidInput(field, f"{request.width}x{request.height} px × {request.steps} steps × "
                                      f"{request.num_images} images costs {cost:g} native image-steps "
                                      f"({native}² px each); this server's per-request budget is "
                                      f"{admission.max_request_cost:g} (admission.max_request_cost)")

    def _submit(self, rpc: str, request: GenerationRequest, context, stream: bool = False) -> Job:
        """Admit into the batcher; an API key may hold only its share of the queue."""
        key = _key_name()
        slots = (self.s.config.admission.key_queue_slots(self.s.config.batching.max_queue)
                 if key is not None else None)
        try:
            return self.s.batcher.submit(request, deadline=_deadline(context), stream=stream, owner=key,
                                         owner_slots=slots)
        except KeyQueueShare:
            self.s.metrics.reject(rpc, "key_queue_share")
            raise
        except QueueFull:
            self.s.metrics.reject(rpc, "queue_full")
            raise

    def _may_override(self) -> bool:
        return self.s.config.allow_mode_override or _caller().can("guard_override")

    async def _audit_results(self, rpc: str, request: GenerationRequest, results: list[ImageResult]) -> None:
        await self.s.audit.generation(who=_caller().name, rpc=rpc, request_id=request.request_id,
                                      prompt=request.prompt, mode=self._effective_mode(request).value,
                                      results=results)

    async def _response(self, request: GenerationRequest, results: list[ImageResult]) -> pb.GenerateResponse:
        audit = _caller().can("audit")
        shown = results if audit else coarse_results(request, results)
        return await asyncio.to_thread(convert.generate_response, request, shown, self._effective_mode(request),
                                       audit)

    async def Generate(self, msg: pb.GenerateRequest, context) -> pb.GenerateResponse:
        request = self._request(msg, "Generate")
        job = self._submit("Generate", request, context)
        finished = False
        try:
            results = await job.future
            finished = True
        finally:
            # awaiting the future cancels it with the caller, so test our own flag, not future.done()
            if not finished:
                job.cancel()   # the caller left (cancel or deadline): leave the queue or the batch
        _check_finished(job, results)
        await self._audit_results("Generate", request, results)
        if not _caller().can("audit"):
            await asyncio.sleep(padding_seconds(job, context))   # an early stop answers no sooner
        return await self._response(request, results)

    async def GenerateStream(self, msg: pb.GenerateRequest, context):
        request = self._request(msg, "GenerateStream")
        audit = _caller().can("audit")
        coarse = None if audit else CoarseProgress(request)
        job = self._submit("GenerateStream", request, context, stream=True)
        finished = False
        try:
            async for event in job.stream_events():
                if coarse is None:
                    yield pb.GenerateEvent(progress=convert.progress_message(event, True))
                    continue
                for message in coarse.upto(event.step):
                    yield pb.GenerateEvent(progress=message)
            results = await job.future
            finished = True
        finally:
            if not finished:
                job.cancel()
        _check_finished(job, results)
        await self._audit_results("GenerateStream", request, results)
        if coarse is not None:   # the steps an early stop skipped, spread over the time they would have taken
            rest, pad = coarse.rest(), padding_seconds(job, context)
            for group in rest:
                await asyncio.sleep(pad / len(rest))
                for message in group:
                    yield pb.GenerateEvent(progress=message)
        yield pb.GenerateEvent(result=await self._response(request, results))

    async def Screen(self, msg: pb.ScreenRequest, context) -> pb.ScreenResponse:
        request_id = convert.check_request_id(msg.request_id) or uuid.uuid4().hex
        engine, limits = self.engine, self.s.config.uploads
        who = _caller().name
        try:
            self._limit("Screen", "screen")     # a refused Screen is audited too
            outcome = await self._upload("Screen", lambda: convert.screen_upload(engine, msg.image, "image", limits))
        except MemGuardError as exc:
            await self.s.audit.record(who=who, rpc="Screen", outcome=type(exc).__name__, request_id=request_id)
            raise
        finally:
            self.s.metrics.engine_stats(engine.stats())
        response = convert.screen_response(outcome, request_id, _caller().can("audit"), self.s.config.face_match_scope)
        await self.s.audit.record(who=who, rpc="Screen", outcome="OK", request_id=request_id,
                                  copy_detected=response.copy_detected, faces_matched=response.faces_matched,
                                  reason=pb.Reason.Name(response.reason),
                                  matched=matched_ids(outcome.audit, lambda name: self.s.audit.tag("subject", name)))
        return response


def _accepts(fn, name: str) -> bool:
    """Does `fn` take keyword `name` (explicitly or through **kwargs)?"""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class IndexAdminService(_Base, admin_pb2_grpc.IndexAdminServicer):
    async def _registry_op(self, operation: str, fn, *, upload: bool = False):
        try:
            result = await (self._upload("Protect", fn) if upload else asyncio.to_thread(fn))
        except Exception:
            self.s.metrics.protect_op(operation, "error")
            raise
        self.s.metrics.protect_op(operation, "ok")
        await self.refresh_stats()
        return result

    async def refresh_stats(self) -> None:
        self.s.metrics.index_stats(await asyncio.to_thread(self.engine.index_stats))

    def _protect_fn(self, msg: admin_pb2.ProtectRequest, reason: str):
        """(target, detail for the audit log, a function that decodes and protects in a worker)."""
        engine, limits, target = self.engine, self.s.config.uploads, msg.WhichOneof("target")
        extra = {}
        key = msg.idempotency_key
        if key:
            if len(key) > convert.MAX_REQUEST_ID_CHARS:
                raise InvalidInput("idempotency_key", f"{len(key)} characters; at most {convert.MAX_REQUEST_ID_CHARS}")
            if _accepts(engine.protect_image if target == "image" else engine.protect_face, "idempotency_key"):
                extra["idempotency_key"] = key
            else:
                log.warning("engine %r does not take idempotency_key yet: Protect is not deduplicated",
                            engine.name)
        if target == "image":
            image_msg = msg.image
            item_id = image_msg.item_id or None
            if item_id is not None and len(item_id) > 256:
                raise InvalidInput("image.item_id", f"{len(item_id)} characters; at most 256")
            return target, {"item_id": item_id}, lambda: engine.protect_image(
                convert.decode_image(image_msg.image, "image.image", limits), reason, item_id, **extra)
        if target == "face":
            identity = msg.face.identity.strip()
            if not identity:
                raise InvalidInput("face.identity", "name the protected identity")
            if not msg.face.photos:
                raise InvalidInput("face.photos", "at least one photo of the person is needed")
            if len(msg.face.photos) > 16:
                raise InvalidInput("face.photos", f"{len(msg.face.photos)} photos; at most 16")
            photos = list(msg.face.photos)
            return target, {"identity": identity, "photos": len(photos)}, lambda: engine.protect_face(
                [convert.decode_image(p, f"face.photos[{i}]", limits) for i, p in enumerate(photos)],
                identity, reason, **extra)
        raise InvalidInput("target", "set either image or face")

    async def Protect(self, msg: admin_pb2.ProtectRequest, context) -> admin_pb2.ProtectResponse:
        reason = msg.reason.strip()
        if not reason:
            raise InvalidInput("reason", "say why this item is protected (it goes to the audit log)")
        if len(reason) > 1000:
            raise InvalidInput("reason", f"{len(reason)} characters; at most 1000")
        target, detail, fn = self._protect_fn(msg, reason)
        who = _caller().name
        # the log keeps keyed tags of the name and the reason, never the text (issue 29, finding 5)
        detail = {**{k: v for k, v in detail.items() if k != "identity"},
                  **self.s.audit.private(reason=reason, identity=detail.get("identity"),
                                         idempotency_key=msg.idempotency_key or None)}
        # no protection without its entry: STARTED is written first (a failed write answers UNAVAILABLE)
        await self.s.audit.record(who=who, rpc="Protect", outcome="STARTED", target=target, **detail)
        try:
            item_id = await self._registry_op(f"protect_{target}", fn, upload=True)
        except MemGuardError as exc:
            await self.s.audit.record(who=who, rpc="Protect", outcome=type(exc).__name__, target=target, **detail)
            raise
        await self.s.audit.record(who=who, rpc="Protect", outcome="OK", target=target, id=item_id, **detail)
        return admin_pb2.ProtectResponse(id=item_id)

    async def Unprotect(self, msg: admin_pb2.UnprotectRequest, context) -> admin_pb2.UnprotectResponse:
        if not msg.id:
            raise InvalidInput("id", "the registry id returned by Protect is required")
        if len(msg.id) > 256:
            raise InvalidInput("id", f"{len(msg.id)} characters; at most 256")
        reason = msg.reason.strip()
        if not reason:
            raise InvalidInput("reason", "say why the protection is lifted (it goes to the audit log)")
        if len(reason) > 1000:
            raise InvalidInput("reason", f"{len(reason)} characters; at most 1000")
        who = _caller().name
        detail = self.s.audit.private(reason=reason, subject=msg.id)    # a name only as a keyed tag
        await self.s.audit.record(who=who, rpc="Unprotect", outcome="STARTED", **detail)
        try:
            removed = await self._registry_op("unprotect", partial(self.engine.unprotect, msg.id, reason))
        except MemGuardError as exc:
            await self.s.audit.record(who=who, rpc="Unprotect", outcome=type(exc).__name__, **detail)
            raise
        await self.s.audit.record(who=who, rpc="Unprotect", outcome="OK" if removed else "NOT_FOUND",
                                  removed=removed, **detail)
        return admin_pb2.UnprotectResponse(removed=removed)

    async def GetIndexStats(self, msg: admin_pb2.GetIndexStatsRequest, context) -> admin_pb2.IndexStats:
        stats = await asyncio.to_thread(self.engine.index_stats)
        self.s.metrics.index_stats(stats)
        return convert.index_stats_message(stats)
