"""Deadlines, client cancellation, a full admission queue, message size limits, fail-closed Screen."""
from __future__ import annotations

import grpc
import pytest

from memguard.proto.memguard.v1 import admin_pb2, admin_pb2_grpc, memguard_pb2 as pb, memguard_pb2_grpc
from memguard.server.convert import encode_png
from server_testlib import channel, metric, wait_for

LONG = 150   # steps: long enough to be interrupted


def cancelled_images(server) -> float:
    return metric(server, "memguard_images_total", decision="BLOCKED", reason="CANCELLED")


def test_deadline_stops_denoising_and_frees_the_slot(engine, serve):
    server = serve(engine, batching={"max_batch_images": 1})
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(prompt="slow", steps=LONG), timeout=1.0)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: cancelled_images(server) == 1)
        saved = metric(server, "memguard_steps_saved_total", cause="cancelled")
        assert 0 < saved <= LONG
        # the worker is free again: the next request runs to completion
        done = stub.Generate(pb.GenerateRequest(prompt="next", steps=2), timeout=120)
        assert done.images[0].decision == pb.DECISION_ALLOWED
    assert metric(server, "memguard_denoise_steps_total") < LONG


def test_client_cancel_stops_the_stream_between_steps(engine, serve):
    server = serve(engine, batching={"max_batch_images": 2})
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        call = stub.GenerateStream(pb.GenerateRequest(prompt="cancel me", steps=LONG, num_images=2))
        first = next(call)
        assert first.progress.step == 0
        call.cancel()
        wait_for(lambda: cancelled_images(server) == 2)
        wait_for(lambda: metric(server, "memguard_requests_total", rpc="GenerateStream", code="CANCELLED") == 1)
        assert 0 < metric(server, "memguard_steps_saved_total", cause="cancelled") <= 2 * LONG
        assert stub.Generate(pb.GenerateRequest(prompt="after", steps=2), timeout=120).images


def test_full_queue_is_resource_exhausted(engine, serve):
    server = serve(engine, batching={"max_batch_images": 1, "max_queue": 1, "max_queue_delay_ms": 0})
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        # one runs, one waits, the rest find the queue full (a run lasts seconds; rejection is immediate)
        calls = [stub.Generate.future(pb.GenerateRequest(prompt=f"p{i}", steps=LONG)) for i in range(4)]
        wait_for(lambda: sum(c.done() for c in calls) >= 2)
        rejected = [c for c in calls if c.done() and c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(rejected) >= 2
        assert all("queue full" in c.details() for c in rejected)
        for call in calls:
            call.cancel()   # the admitted ones: no need to finish them
        wait_for(lambda: metric(server, "memguard_queue_depth") == 0)
    assert metric(server, "memguard_requests_total", rpc="Generate", code="RESOURCE_EXHAUSTED") == len(rejected)
    assert metric(server, "memguard_queue_capacity") == 1


def test_message_size_limit(engine, serve):
    server = serve(engine, max_receive_bytes=64 << 10)
    with channel(server) as ch, pytest.raises(grpc.RpcError) as err:
        memguard_pb2_grpc.MemGuardStub(ch).Screen(pb.ScreenRequest(image=b"\0" * (128 << 10)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_without_index_screen_fails_closed_and_admin_is_precondition(server):
    png = encode_png(__import__("numpy").zeros((64, 64, 3), "uint8"))
    before = metric(server, "memguard_screening_failures_total")
    with channel(server) as ch:
        with pytest.raises(grpc.RpcError) as err:
            memguard_pb2_grpc.MemGuardStub(ch).Screen(pb.ScreenRequest(image=png))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        admin = admin_pb2_grpc.IndexAdminStub(ch)
        protect = admin_pb2.ProtectRequest(image=admin_pb2.ProtectImage(image=png), reason="takedown #1")
        with pytest.raises(grpc.RpcError) as err:
            admin.Protect(protect)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as err:
            admin.Protect(admin_pb2.ProtectRequest(image=admin_pb2.ProtectImage(image=png)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("reason:")
    assert metric(server, "memguard_screening_failures_total") == before + 1
    assert metric(server, "memguard_protect_operations_total", operation="protect_image", outcome="error") == 1
