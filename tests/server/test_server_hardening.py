"""Issue 14 on a live server: no guard bypass, no membership oracle, bounded work per request."""
from __future__ import annotations

import resource
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from google.rpc import error_details_pb2
from memguard.types import RequestLimits
from memguard.proto.memguard.v1 import admin_pb2, admin_pb2_grpc, memguard_pb2 as pb, memguard_pb2_grpc
from memguard.server.auth import METHOD_SCOPES, SCOPES
from memguard.server.convert import encode_png
from server_testlib import channel, metric, wait_for
from hardening_lib import (MATCHED, GuardLikeEngine, bearer, png_header_only, rpc_requests, service_methods,
                           tall_thin_png, write_keys)

PNG = encode_png(np.full((64, 64, 3), 128, np.uint8))
MEMBERSHIP_FIELDS = {"scores", "signals", "first_flagged_step", "audit"}
ALL_BUT_AUDIT = ["generate", "screen", "admin"]


@pytest.fixture(scope="module")
def guarded(tiny_pipe, tmp_path_factory):
    from memguard.server.app import BackgroundServer
    from server_testlib import make_config

    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys = write_keys(path, {"plain": ALL_BUT_AUDIT, "auditor": ALL_BUT_AUDIT + ["audit"],
                             "override": ["generate", "guard_override"], "gen": ["generate"]})
    engine = GuardLikeEngine(tiny_pipe)
    server = BackgroundServer(make_config(auth_file=str(path), batching={"max_batch_images": 4}), engine)
    server.start()
    yield server, keys, engine
    server.stop()


def call(ch, method: str, request, key: str, timeout: float = 120):
    """Any RPC by full name through a generic stub; a stream comes back as a list of events."""
    name = method.rsplit("/", 1)[-1]
    response_cls = {"Generate": pb.GenerateResponse, "GenerateStream": pb.GenerateEvent,
                    "Screen": pb.ScreenResponse, "Protect": admin_pb2.ProtectResponse,
                    "Unprotect": admin_pb2.UnprotectResponse, "GetIndexStats": admin_pb2.IndexStats}[name]
    kind = ch.unary_stream if name == "GenerateStream" else ch.unary_unary
    stub = kind(method, request_serializer=type(request).SerializeToString, response_deserializer=response_cls.FromString)
    result = stub(request, metadata=bearer(key), timeout=timeout)
    return list(result) if name == "GenerateStream" else [result]


def membership_fields_set(message) -> set[str]:
    """Names of membership fields that are set anywhere inside `message`."""
    found = set()
    for field, value in message.ListFields():
        if field.name in MEMBERSHIP_FIELDS:
            found.add(field.name)
        if field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for item in (value if field.is_repeated else [value]):
                found |= membership_fields_set(item)
    return found


def test_every_rpc_of_every_service_is_in_the_scope_table():
    methods = {name for name, _ in service_methods()}
    assert methods == set(METHOD_SCOPES)
    assert set(METHOD_SCOPES.values()) <= set(SCOPES) and "guard_override" in SCOPES


def test_without_audit_no_rpc_releases_a_similarity_value_or_matched_id(guarded):
    server, keys, _ = guarded
    requests = rpc_requests(PNG)
    assert set(requests) == {name for name, _ in service_methods()}, "a new RPC needs its membership check"
    with channel(server) as ch:
        for method, request in requests.items():
            plain = call(ch, method, request, keys["plain"])
            for message in plain:
                assert not membership_fields_set(message), method
                assert MATCHED.encode() not in message.SerializeToString(), method
                assert b"step 1:" not in message.SerializeToString(), method
            audited = call(ch, method, request, keys["auditor"])
            if method.endswith(("Generate", "GenerateStream", "Screen")):   # the test has teeth
                assert any(membership_fields_set(m) for m in audited), method
                assert any(MATCHED.encode() in m.SerializeToString() for m in audited), method
    with channel(server) as ch:
        events = call(ch, "/memguard.v1.MemGuard/GenerateStream", requests["/memguard.v1.MemGuard/GenerateStream"],
                      keys["plain"])
    progress = [e.progress for e in events if e.HasField("progress")]
    assert progress and all(p.total_steps == 2 and not p.action and not p.signals for p in progress)
    assert [p.step for p in progress] == [0, 1]


@pytest.mark.parametrize("mode", [pb.GUARD_MODE_OFF, pb.GUARD_MODE_MONITOR])
def test_generate_only_key_asking_for_off_or_monitor_runs_enforce(guarded, mode):
    server, keys, engine = guarded
    request = pb.GenerateRequest(prompt="a copy of the famous photo", steps=2, seed=4, mode=mode)
    before = metric(server, "memguard_rejections_total", rpc="Generate", cause="mode_override")
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        engine.modes.clear()
        plain = stub.Generate(request, metadata=bearer(keys["gen"]), timeout=120)
        assert engine.modes == [engine.modes[0]] and engine.modes[0].value == "enforce"
        assert plain.effective_mode == pb.GUARD_MODE_ENFORCE
        assert plain.images[0].decision == pb.DECISION_BLOCKED and not plain.images[0].png
        engine.modes.clear()
        allowed = stub.Generate(request, metadata=bearer(keys["override"]), timeout=120)
        assert allowed.effective_mode == mode and engine.modes[0].value == {1: "enforce", 2: "monitor", 3: "off"}[mode]
        assert allowed.images[0].png
    assert metric(server, "memguard_rejections_total", rpc="Generate", cause="mode_override") == before + 1


@pytest.mark.parametrize("request_id, ok", [("r" * 128, True), ("r" * 129, False), ("r" * (8 << 20), False),
                                            ("bad id", False), ("tab\there", False), ("ünï", False)])
def test_request_id_is_bounded_and_printable(guarded, request_id, ok):
    server, keys, _ = guarded
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        for fn, request in ((stub.Generate, pb.GenerateRequest(prompt="x", steps=1, request_id=request_id)),
                            (stub.Screen, pb.ScreenRequest(image=PNG, request_id=request_id))):
            if ok:
                assert fn(request, metadata=bearer(keys["plain"]), timeout=120).request_id == request_id
                continue
            with pytest.raises(grpc.RpcError) as err:
                fn(request, metadata=bearer(keys["plain"]), timeout=120)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith("request_id:") and len(err.value.details()) < 300


def test_num_images_over_the_batch_size_is_invalid(guarded):
    server, keys, _ = guarded
    with channel(server) as ch, pytest.raises(grpc.RpcError) as err:
        memguard_pb2_grpc.MemGuardStub(ch).Generate(pb.GenerateRequest(prompt="x", steps=1, num_images=5),
                                                    metadata=bearer(keys["plain"]), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("num_images:")


@pytest.mark.parametrize("data, why", [
    (tall_thin_png(), "short side"),                       # the 8×2,097,152 probe (≈ 50 KB)
    (tall_thin_png(16, 1_000_000), "aspect ratio"),
    (png_header_only(20_000, 20_000), "decompression bomb"),
    (png_header_only(5000, 5000), "exceeds"),
    (b"GIF89a" + b"\0" * 64, "not a decodable"),
])
def test_hostile_uploads_are_refused_quickly_without_memory(guarded, data, why):
    server, keys, _ = guarded
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with channel(server) as ch:
        stub, admin = memguard_pb2_grpc.MemGuardStub(ch), admin_pb2_grpc.IndexAdminStub(ch)
        for fn, request, field in (
                (stub.Screen, pb.ScreenRequest(image=data), "image:"),
                (admin.Protect, admin_pb2.ProtectRequest(image=admin_pb2.ProtectImage(image=data), reason="r"),
                 "image.image:"),
                (admin.Protect, admin_pb2.ProtectRequest(face=admin_pb2.ProtectFace(photos=[PNG, data], identity="x"),
                                                         reason="r"), "face.photos[1]:")):
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                fn(request, metadata=bearer(keys["plain"]), timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert err.value.details().startswith(field) and why in err.value.details()
            assert time.monotonic() - t0 < 5.0
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mb < 300, f"peak RSS grew {grown_mb:.0f} MB"
    assert metric(server, "memguard_rejections_total", rpc="Screen", cause="invalid_image") >= 1


def test_malformed_message_bytes_are_invalid_argument_not_internal(guarded):
    server, keys, _ = guarded
    with channel(server) as ch:
        raw = ch.unary_unary("/memguard.v1.MemGuard/Generate", request_serializer=lambda b: b,
                             response_deserializer=pb.GenerateResponse.FromString)
        for data in (b"\x0a\x02\xff\xfe", b"\xff" * 7, b"\x0a\x80\x80\x80\x80\x10"):   # bad UTF-8, junk, bad length
            with pytest.raises(grpc.RpcError) as err:
                raw(data, metadata=bearer(keys["plain"]), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert err.value.details().startswith("request:")


def test_cancelled_unary_generate_leaves_the_batch(engine, serve):
    """Before the fix the cancelled call ran all 150 steps; now its sample leaves at the next step."""
    server = serve(engine, batching={"max_batch_images": 1})
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        future = stub.Generate.future(pb.GenerateRequest(prompt="cancel me", steps=150))
        wait_for(lambda: server.server.batcher.depth == 0 and not future.done())   # taken by the worker
        time.sleep(0.3)
        future.cancel()
        wait_for(lambda: metric(server, "memguard_images_total", decision="BLOCKED", reason="CANCELLED") == 1)
        assert 0 < metric(server, "memguard_steps_saved_total", cause="cancelled") <= 150
        assert stub.Generate(pb.GenerateRequest(prompt="next", steps=2), timeout=120).images


class OneBadRequestEngine(GuardLikeEngine):
    """The real engine with a bug triggered by one prompt, however it is batched."""

    def generate(self, requests, **kw):
        if any(r.prompt == "trigger a bug" for r in requests):
            raise RuntimeError("simulated engine bug")
        return super().generate(requests, **kw)


def test_one_engine_exception_fails_only_its_request(tiny_pipe, serve):
    # the batch runs once all three are in (it is full), or after 10 s whatever arrived
    server = serve(OneBadRequestEngine(tiny_pipe), batching={"max_batch_images": 3, "max_queue_delay_ms": 10_000},
                   limits=RequestLimits(max_images=3))
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        good = stub.Generate.future(pb.GenerateRequest(prompt="fine", steps=2, seed=1), timeout=120)
        bad = stub.Generate.future(pb.GenerateRequest(prompt="trigger a bug", steps=2), timeout=120)
        other = stub.Generate.future(pb.GenerateRequest(prompt="also fine", steps=2, seed=2), timeout=120)
        assert good.result().images[0].png and other.result().images[0].png
        assert bad.exception().code() == grpc.StatusCode.INTERNAL
    assert metric(server, "memguard_batch_size_requests_count") == 4   # the batch of 3, then each alone
    assert metric(server, "memguard_batch_retries_total", outcome="ok") == 2
    assert metric(server, "memguard_batch_retries_total", outcome="error") == 1


def test_rate_limits_answer_resource_exhausted_with_retry_info(tiny_pipe, serve, tmp_path):
    keys = write_keys(tmp_path / "keys.toml", {"a": ["generate", "screen"], "b": ["generate", "screen"]})
    server = serve(GuardLikeEngine(tiny_pipe), auth_file=str(tmp_path / "keys.toml"),
                   rate_limits={"generate_per_s": 0.01, "generate_burst": 2, "screen_per_s": 0.01, "screen_burst": 1})
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        stub.Generate(pb.GenerateRequest(prompt="x", steps=1, num_images=2), metadata=bearer(keys["a"]), timeout=60)
        stub.Screen(pb.ScreenRequest(image=PNG), metadata=bearer(keys["a"]), timeout=60)
        for fn, request in ((stub.Generate, pb.GenerateRequest(prompt="x", steps=1)),
                            (stub.Screen, pb.ScreenRequest(image=PNG))):
            with pytest.raises(grpc.RpcError) as err:
                fn(request, metadata=bearer(keys["a"]), timeout=60)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in err.value.details()
            trailers = dict(err.value.trailing_metadata())
            assert 0 < float(trailers["retry-after"]) <= 100
            status = rpc_status.from_call(err.value)
            info = error_details_pb2.RetryInfo()
            assert status.details[0].Unpack(info) and info.retry_delay.seconds > 0
            fn(request, metadata=bearer(keys["b"]), timeout=60)    # another key has its own bucket
    assert metric(server, "memguard_rejections_total", rpc="Screen", cause="rate_limited") == 1


class GatedScreenEngine(GuardLikeEngine):
    """Screening waits for the test's go-ahead, so uploads pile up."""

    def __init__(self, pipe):
        super().__init__(pipe)
        self.go = threading.Event()

    def screen(self, image):
        assert self.go.wait(60)
        return super().screen(image)


def test_upload_queue_is_bounded_and_the_loop_stays_free(tiny_pipe, serve):
    engine = GatedScreenEngine(tiny_pipe)
    server = serve(engine, uploads={"max_queue": 2, "workers": 1})
    try:
        with channel(server) as ch:
            stub = memguard_pb2_grpc.MemGuardStub(ch)
            waiting = [stub.Screen.future(pb.ScreenRequest(image=PNG), timeout=60) for _ in range(2)]
            wait_for(lambda: metric(server, "memguard_upload_queue_depth") == 2)
            with pytest.raises(grpc.RpcError) as err:
                stub.Screen(pb.ScreenRequest(image=PNG), timeout=60)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "upload queue" in err.value.details()
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            engine.go.set()
            assert all(f.result().copy_detected for f in waiting)
    finally:
        engine.go.set()
    assert metric(server, "memguard_rejections_total", rpc="Screen", cause="upload_queue_full") == 1


def test_face_match_scope_protected_counts_only_protected_faces():
    from memguard.engine import ScreenOutcome
    from memguard.types import Reason
    from memguard.server.convert import screen_response

    outcome = ScreenOutcome(False, 2, 1, Reason.PROTECTED_FACE,
                            {"faces": [{"matched": True, "protected": False}, {"matched": False, "protected": True}]})
    assert screen_response(outcome, "r", False, "any").faces_matched == 1
    strict = screen_response(outcome, "r", False, "protected")
    assert strict.faces_matched == 0 and strict.reason == pb.REASON_NONE
    outcome.audit["faces"][0]["protected"] = True
    assert screen_response(outcome, "r", False, "protected").faces_matched == 1
