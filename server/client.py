"""Python client over the generated stubs: what `memguard client …` and the load generator use.

    results = remote_generate("127.0.0.1:50051", GenerationRequest(prompt="a red apple", steps=20))

Each function opens a channel, makes one call and closes it; RPC failures become RemoteError
(a MemGuardError whose message starts with the status code name), so the CLI prints them cleanly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memguard.engine import IndexStats, ScreenOutcome
from memguard.errors import InvalidInput, MemGuardError
from memguard.types import GenerationRequest, ImageResult, StepEvent
from memguard.proto.memguard.v1 import admin_pb2, admin_pb2_grpc, memguard_pb2 as pb, memguard_pb2_grpc
from memguard.server import convert

MAX_MESSAGE_BYTES = 64 << 20


class RemoteError(MemGuardError):
    """An RPC failed; `code` is the grpc.StatusCode."""

    def __init__(self, error: grpc.RpcError):
        self.code = error.code()
        super().__init__(f"{self.code.name}: {error.details()}")


@dataclass(frozen=True)
class Connection:
    target: str                      # HOST:PORT
    api_key: str | None = None
    tls_ca: str | None = None        # PEM file: use TLS, trusting this CA
    timeout: float | None = None     # seconds per call
    tls_cert: str | None = None      # mTLS: this client's certificate and key (PEM)
    tls_key: str | None = None

    def __post_init__(self) -> None:
        # a client certificate means the caller expects TLS: never fall back to plaintext with its key
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidInput("tls_cert", "a client certificate and its key go together (--tls-cert, --tls-key)")
        if self.tls_cert is not None and not self.tls_ca:
            raise InvalidInput("tls_ca", "a client certificate without --tls-ca: the connection would be "
                                         "plaintext and the API key readable on the way; give the server's CA")

    def channel(self) -> grpc.Channel:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if self.tls_ca:
            pair = (Path(self.tls_key).read_bytes(), Path(self.tls_cert).read_bytes()) if self.tls_cert else (None, None)
            creds = grpc.ssl_channel_credentials(Path(self.tls_ca).read_bytes(), *pair)
            return grpc.secure_channel(self.target, creds, options=options)
        return grpc.insecure_channel(self.target, options=options)

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.api_key}")] if self.api_key else []


def _progress(msg: pb.StepProgress) -> StepEvent:
    return StepEvent(msg.request_id, msg.image_index, msg.step, msg.total_steps, dict(msg.signals), msg.action)


def remote_generate(conn: Connection | str, request: GenerationRequest, *,
                    on_progress: Callable[[StepEvent], None] | None = None) -> list[ImageResult]:
    """Generate through the server; with `on_progress`, stream and report each step event."""
    conn = Connection(conn) if isinstance(conn, str) else conn
    msg = convert.request_message(request)
    with conn.channel() as channel:
        stub = memguard_pb2_grpc.MemGuardStub(channel)
        try:
            if on_progress is None:
                response = stub.Generate(msg, timeout=conn.timeout, metadata=conn.metadata)
            else:
                response = None
                for event in stub.GenerateStream(msg, timeout=conn.timeout, metadata=conn.metadata):
                    if event.HasField("progress"):
                        on_progress(_progress(event.progress))
                    else:
                        response = event.result
        except grpc.RpcError as exc:
            raise RemoteError(exc) from None
    return [convert.image_result(image) for image in response.images]


def remote_screen(conn: Connection | str, image_bytes: bytes) -> ScreenOutcome:
    conn = Connection(conn) if isinstance(conn, str) else conn
    with conn.channel() as channel:
        try:
            r = memguard_pb2_grpc.MemGuardStub(channel).Screen(pb.ScreenRequest(image=image_bytes),
                                                               timeout=conn.timeout, metadata=conn.metadata)
        except grpc.RpcError as exc:
            raise RemoteError(exc) from None
    return ScreenOutcome(r.copy_detected, r.faces_detected, r.faces_matched, convert.REASON_FROM_PB[r.reason],
                         json_format.MessageToDict(r.audit) if r.HasField("audit") else {})


def _admin(conn: Connection | str, method: str, request):
    conn = Connection(conn) if isinstance(conn, str) else conn
    with conn.channel() as channel:
        try:
            return getattr(admin_pb2_grpc.IndexAdminStub(channel), method)(
                request, timeout=conn.timeout, metadata=conn.metadata)
        except grpc.RpcError as exc:
            raise RemoteError(exc) from None


def remote_protect_image(conn, image_bytes: bytes, reason: str, item_id: str = "") -> str:
    target = admin_pb2.ProtectImage(image=image_bytes, item_id=item_id)
    return _admin(conn, "Protect", admin_pb2.ProtectRequest(image=target, reason=reason)).id


def remote_protect_face(conn, photos: list[bytes], identity: str, reason: str) -> str:
    target = admin_pb2.ProtectFace(photos=photos, identity=identity)
    return _admin(conn, "Protect", admin_pb2.ProtectRequest(face=target, reason=reason)).id


def remote_unprotect(conn, item_id: str, reason: str) -> bool:
    return _admin(conn, "Unprotect", admin_pb2.UnprotectRequest(id=item_id, reason=reason)).removed


def remote_index_stats(conn) -> IndexStats:
    r = _admin(conn, "GetIndexStats", admin_pb2.GetIndexStatsRequest())
    return IndexStats(r.items, r.protected_items, dict(r.details))


def health_status(conn: Connection | str, service: str = "") -> str:
    """SERVING, NOT_SERVING, … or UNREACHABLE."""
    conn = Connection(conn) if isinstance(conn, str) else conn
    with conn.channel() as channel:
        try:
            r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                          timeout=conn.timeout or 5.0)
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def wait_until_serving(conn: Connection | str, timeout: float = 300.0, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while (status := health_status(conn)) != "SERVING":
        if time.monotonic() > deadline:
            raise MemGuardError(f"server not SERVING after {timeout:.0f} s (last status {status})")
        time.sleep(poll)
