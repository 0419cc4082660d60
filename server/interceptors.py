"""Cross-cutting concerns, one interceptor each: metrics (outermost), auth, error mapping (innermost).

They wrap only MemGuard's own services (`/memguard.v1.*`); health and reflection pass untouched.
The error interceptor is the one place that maps exception types to gRPC status codes; an
unexpected exception becomes INTERNAL with a logged traceback, and the process keeps serving.
A rate-limited call carries trailing metadata `retry-after` (seconds) and a google.rpc.RetryInfo
detail (`grpc-status-details-bin`). Every authentication or scope failure is audited, aggregated
per peer and window (server/audit_trail.py); a malformed request id is refused before auth.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Callable

import grpc

from memguard.errors import CorruptData, InvalidInput, MemGuardError, MissingResource, ScreeningUnavailable
from memguard.server.audit_trail import ServerAudit
from memguard.server.auth import METHOD_SCOPES, KeyRing, Principal, current_principal, key_from_metadata
from memguard.server.batcher import DeadlineExceeded, NotServing, QueueFull
from memguard.server.convert import check_request_id
from memguard.server.metrics import Metrics
from memguard.server.ratelimit import RateLimited

log = logging.getLogger(__name__)

OUR_PREFIX = "/memguard.v1."

# First match wins: subclasses before their bases.
STATUS_CODES: tuple[tuple[type[MemGuardError], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (NotServing, grpc.StatusCode.UNAVAILABLE),
    (ScreeningUnavailable, grpc.StatusCode.UNAVAILABLE),
    (MissingResource, grpc.StatusCode.FAILED_PRECONDITION),
    (CorruptData, grpc.StatusCode.DATA_LOSS),
    (MemGuardError, grpc.StatusCode.FAILED_PRECONDITION),
)

Behavior = Callable  # (request, context) -> Awaitable[response] | AsyncIterator[response]
Around = Callable[[Behavior, bool], Behavior]   # (behavior, streaming) -> wrapped behavior


def retry_metadata(seconds: float, message: str) -> tuple[tuple[str, str | bytes], ...]:
    """`retry-after` (seconds, as HTTP's header) plus google.rpc.RetryInfo when grpcio-status is installed."""
    pairs: list[tuple[str, str | bytes]] = [("retry-after", f"{seconds:.2f}")]
    try:
        from google.protobuf import any_pb2, duration_pb2
        from google.rpc import code_pb2, error_details_pb2, status_pb2
    except ImportError:
        return tuple(pairs)
    delay = duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[detail])
    pairs.append(("grpc-status-details-bin", status.SerializeToString()))
    return tuple(pairs)


def status_for(exc: MemGuardError) -> grpc.StatusCode:
    return next(code for cls, code in STATUS_CODES if isinstance(exc, cls))


class Malformed:
    """What a request that does not parse as its message type deserializes to (→ INVALID_ARGUMENT)."""

    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserializer):
    """grpc answers INTERNAL when a deserializer raises; ours returns Malformed instead."""
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:
            return Malformed(exc)
    return parse


def wrap_handler(handler: grpc.RpcMethodHandler | None, around: Around,
                 deserializer=None) -> grpc.RpcMethodHandler | None:
    """The same handler with its unary-unary or unary-stream behavior wrapped (and its deserializer)."""
    if handler is None:
        return None
    kw = dict(request_deserializer=deserializer or handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(around(handler.unary_unary, False), **kw)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(around(handler.unary_stream, True), **kw)
    return handler   # our API has no client-streaming RPCs


def _status_name(exc: BaseException, context: grpc.aio.ServicerContext) -> str:
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by method and final status code and times it."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if not details.method.startswith(OUR_PREFIX):
            return handler
        rpc = details.method.rsplit("/", 1)[-1]
        record = self.metrics.rpc

        def around(behavior: Behavior, streaming: bool) -> Behavior:
            if streaming:
                async def timed_stream(request, context):
                    t0, code = time.perf_counter(), "OK"
                    try:
                        async for item in behavior(request, context):
                            yield item
                    except BaseException as exc:
                        code = _status_name(exc, context)
                        raise
                    finally:
                        record(rpc, code, time.perf_counter() - t0)
                return timed_stream

            async def timed(request, context):
                t0, code = time.perf_counter(), "OK"
                try:
                    return await behavior(request, context)
                except BaseException as exc:
                    code = _status_name(exc, context)
                    raise
                finally:
                    record(rpc, code, time.perf_counter() - t0)
            return timed

        return wrap_handler(handler, around)


def _abort_with(code: grpc.StatusCode, message: str, on_deny: Callable | None = None) -> Around:
    """Refuse the call; `on_deny(request, context)` runs first (the audit entry)."""
    async def refuse(request, context) -> None:
        if on_deny is not None:
            try:
                await on_deny(request, context)
            except Exception:   # the refusal stands even when it cannot be audited (logged, counted)
                log.warning("could not audit a refused call")
        await context.abort(code, message)

    def around(behavior: Behavior, streaming: bool) -> Behavior:
        if streaming:
            async def deny_stream(request, context):
                await refuse(request, context)
                yield  # pragma: no cover - abort raises; this line makes it an async generator
            return deny_stream

        async def deny(request, context):
            await refuse(request, context)
        return deny
    return around


def _as_principal(principal: Principal) -> Around:
    """Run the behavior with `current_principal` set (the servicer reads the audit scope from it)."""
    def around(behavior: Behavior, streaming: bool) -> Behavior:
        if streaming:
            async def as_stream(request, context):
                token = current_principal.set(principal)
                try:
                    async for item in behavior(request, context):
                        yield item
                finally:
                    current_principal.reset(token)
            return as_stream

        async def as_unary(request, context):
            token = current_principal.set(principal)
            try:
                return await behavior(request, context)
            finally:
                current_principal.reset(token)
        return as_unary
    return around


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """API key → principal → scope check. A KeyRing without a file means auth disabled (local developer)."""

    def __init__(self, keys: KeyRing, audit: ServerAudit | None = None, metrics: Metrics | None = None):
        self.keys, self.audit, self.metrics = keys, audit, metrics

    def _denied(self, rpc: str, who: str, code: grpc.StatusCode):
        async def on_deny(request, context) -> None:
            if self.metrics is not None:
                self.metrics.reject(rpc, code.name.lower())
            if self.audit is not None:    # counted per peer and window: no entry, no caller string per call
                self.audit.refused(peer=context.peer(), who=who, rpc=rpc, outcome=code.name)
        return on_deny

    def _checked(self, rpc: str, behavior_around: Around) -> Around:
        """Validate the request id (length, charset) before anything else sees it, auth included."""
        def around(behavior: Behavior, streaming: bool) -> Behavior:
            inner = behavior_around(behavior, streaming)

            async def bad_id(request, context) -> None:
                request_id = getattr(request, "request_id", "")
                if not isinstance(request_id, str):
                    return
                try:
                    check_request_id(request_id)
                except InvalidInput as exc:
                    if self.metrics is not None:
                        self.metrics.reject(rpc, "request_id")
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

            if streaming:
                async def checked_stream(request, context):
                    await bad_id(request, context)
                    async for item in inner(request, context):
                        yield item
                return checked_stream

            async def checked(request, context):
                await bad_id(request, context)
                return await inner(request, context)
            return checked
        return around

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        scope = METHOD_SCOPES.get(details.method)
        if scope is None:
            return handler
        rpc = details.method.rsplit("/", 1)[-1]
        principal = self.keys.authenticate(key_from_metadata(details.invocation_metadata))
        if principal is None:
            code = grpc.StatusCode.UNAUTHENTICATED
            return wrap_handler(handler, self._checked(rpc, _abort_with(code, "missing or unknown API key "
                                "(send `authorization: Bearer <key>` or `x-api-key: <key>`)",
                                self._denied(rpc, "anonymous", code))))
        if not principal.can(scope):
            code = grpc.StatusCode.PERMISSION_DENIED
            return wrap_handler(handler, self._checked(rpc, _abort_with(
                code, f"key {principal.name!r} lacks the {scope!r} scope", self._denied(rpc, principal.name, code))))
        return wrap_handler(handler, self._checked(rpc, _as_principal(principal)))


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """MemGuardError → its status code with its message; anything else → INTERNAL, logged."""

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if not details.method.startswith(OUR_PREFIX):
            return handler
        method = details.method

        async def fail(context, exc: Exception) -> None:
            if isinstance(exc, RateLimited):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                                    trailing_metadata=retry_metadata(exc.retry_after_s, str(exc)))
            if isinstance(exc, MemGuardError):
                await context.abort(status_for(exc), str(exc))
            incident = uuid.uuid4().hex[:12]
            log.error("unexpected error in %s (incident %s)", method, incident, exc_info=exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident}, see server log)")

        def around(behavior: Behavior, streaming: bool) -> Behavior:
            if streaming:
                async def mapped_stream(request, context):
                    try:
                        if isinstance(request, Malformed):
                            raise InvalidInput("request", f"not a valid message ({type(request.error).__name__})")
                        async for item in behavior(request, context):
                            yield item
                    except grpc.aio.AbortError:
                        raise
                    except Exception as exc:
                        await fail(context, exc)
                return mapped_stream

            async def mapped(request, context):
                try:
                    if isinstance(request, Malformed):
                        raise InvalidInput("request", f"not a valid message ({type(request.error).__name__})")
                    return await behavior(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await fail(context, exc)
            return mapped

        return wrap_handler(handler, around, _tolerant(handler.request_deserializer) if handler else None)
