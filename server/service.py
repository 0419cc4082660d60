"""The servicers: protobuf in, engine (through the batcher) out, protobuf back.

Errors are raised as MemGuardError subclasses and mapped to status codes by the error
interceptor; auth and metrics live in interceptors too. Blocking work (screening, registry
writes, PNG encoding) runs in threads so the event loop keeps serving.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from functools import partial

import grpc

from guard.engine import GenerationEngine
from guard.errors import InvalidInput
from guard.types import GenerationRequest, GuardMode, ImageResult, Reason, RequestLimits
from proto.memguard.v1 import admin_pb2, admin_pb2_grpc, memguard_pb2 as pb, memguard_pb2_grpc
from server import convert
from server.auth import caller_can
from server.batcher import Batcher, DeadlineExceeded, Job, NotServing
from server.metrics import Metrics


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _check_finished(job: Job, results: list[ImageResult]) -> None:
    if job.deadline_passed() and any(r.reason is Reason.CANCELLED for r in results):
        raise DeadlineExceeded("the deadline passed before the images were done")


def _engine(batcher: Batcher) -> GenerationEngine:
    """The serving engine; NotServing (UNAVAILABLE) while it is still loading or warming up."""
    if batcher.engine is None:
        raise NotServing("the server is warming up")
    return batcher.engine


class MemGuardService(memguard_pb2_grpc.MemGuardServicer):
    def __init__(self, batcher: Batcher, metrics: Metrics, defaults: convert.RequestDefaults, limits: RequestLimits):
        self.batcher, self.metrics = batcher, metrics
        self.defaults, self.limits = defaults, limits

    @property
    def engine(self) -> GenerationEngine:
        return _engine(self.batcher)

    def _effective_mode(self, request: GenerationRequest) -> GuardMode:
        return request.mode if self.engine.guarded else GuardMode.OFF

    async def _respond(self, request: GenerationRequest, results: list[ImageResult]) -> pb.GenerateResponse:
        return await asyncio.to_thread(convert.generate_response, request, results,
                                       self._effective_mode(request), caller_can("audit"))

    async def Generate(self, msg: pb.GenerateRequest, context) -> pb.GenerateResponse:
        request = convert.generation_request(msg, self.defaults, self.limits)
        job = self.batcher.submit(request, deadline=_deadline(context))
        try:
            results = await job.future
        finally:
            if not job.future.done():   # the caller left (cancel or deadline): free the slot
                job.cancel()
        _check_finished(job, results)
        return await self._respond(request, results)

    async def GenerateStream(self, msg: pb.GenerateRequest, context):
        request = convert.generation_request(msg, self.defaults, self.limits)
        job = self.batcher.submit(request, deadline=_deadline(context), stream=True)
        try:
            async for event in job.stream_events():
                yield pb.GenerateEvent(progress=convert.progress_message(event))
            results = await job.future
        finally:
            if not job.future.done():
                job.cancel()
        _check_finished(job, results)
        yield pb.GenerateEvent(result=await self._respond(request, results))

    async def Screen(self, msg: pb.ScreenRequest, context) -> pb.ScreenResponse:
        image = convert.decode_image(msg.image, "image")
        try:
            outcome = await asyncio.to_thread(self.engine.screen, image)
        finally:
            self.metrics.engine_stats(self.engine.stats())
        return convert.screen_response(outcome, msg.request_id or uuid.uuid4().hex, caller_can("audit"))


class IndexAdminService(admin_pb2_grpc.IndexAdminServicer):
    def __init__(self, batcher: Batcher, metrics: Metrics):
        self.batcher, self.metrics = batcher, metrics

    @property
    def engine(self) -> GenerationEngine:
        return _engine(self.batcher)

    async def _registry_op(self, operation: str, fn):
        try:
            result = await asyncio.to_thread(fn)
        except Exception:
            self.metrics.protect_op(operation, "error")
            raise
        self.metrics.protect_op(operation, "ok")
        await self.refresh_stats()
        return result

    async def refresh_stats(self) -> None:
        self.metrics.index_stats(await asyncio.to_thread(self.engine.index_stats))

    async def Protect(self, msg: admin_pb2.ProtectRequest, context) -> admin_pb2.ProtectResponse:
        reason = msg.reason.strip()
        if not reason:
            raise InvalidInput("reason", "say why this item is protected (it goes to the audit log)")
        target = msg.WhichOneof("target")
        if target == "image":
            image = convert.decode_image(msg.image.image, "image.image")
            fn = partial(self.engine.protect_image, image, reason, msg.image.item_id or None)
        elif target == "face":
            if not msg.face.identity.strip():
                raise InvalidInput("face.identity", "name the protected identity")
            if not msg.face.photos:
                raise InvalidInput("face.photos", "at least one photo of the person is needed")
            images = [convert.decode_image(p, f"face.photos[{i}]") for i, p in enumerate(msg.face.photos)]
            fn = partial(self.engine.protect_face, images, msg.face.identity.strip(), reason)
        else:
            raise InvalidInput("target", "set either image or face")
        item_id = await self._registry_op(f"protect_{target}", fn)
        return admin_pb2.ProtectResponse(id=item_id)

    async def Unprotect(self, msg: admin_pb2.UnprotectRequest, context) -> admin_pb2.UnprotectResponse:
        if not msg.id:
            raise InvalidInput("id", "the registry id returned by Protect is required")
        if not msg.reason.strip():
            raise InvalidInput("reason", "say why the protection is lifted (it goes to the audit log)")
        removed = await self._registry_op("unprotect", partial(self.engine.unprotect, msg.id, msg.reason.strip()))
        return admin_pb2.UnprotectResponse(removed=removed)

    async def GetIndexStats(self, msg: admin_pb2.GetIndexStatsRequest, context) -> admin_pb2.IndexStats:
        stats = await asyncio.to_thread(self.engine.index_stats)
        self.metrics.index_stats(stats)
        return convert.index_stats_message(stats)
