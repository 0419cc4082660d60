"""Health (NOT_SERVING until warm, and while draining), graceful drain, SIGTERM, internal errors."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memguard.engine import PipelineEngine
from memguard.proto.memguard.v1 import memguard_pb2 as pb, memguard_pb2_grpc
from memguard.server.app import BackgroundServer
from memguard.server.client import health_status, wait_until_serving
from server_testlib import channel, make_config, metric, wait_for

ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GatedWarmupEngine(PipelineEngine):
    """The real engine whose warm-up waits for the test's go-ahead (so "not yet warm" lasts)."""

    def __init__(self, pipe):
        super().__init__(pipe)
        self.go = threading.Event()

    def warmup(self) -> None:
        assert self.go.wait(120), "test never released warm-up"
        super().warmup()


class FailingEngine(PipelineEngine):
    """The real engine, with a bug triggered by one prompt."""

    def generate(self, requests, **kw):
        if any(r.prompt == "trigger a bug" for r in requests):
            raise RuntimeError("simulated engine bug")
        return super().generate(requests, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(ch, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_not_serving_until_warm(tiny_pipe):
    engine = GatedWarmupEngine(tiny_pipe)
    port = free_port()
    server = BackgroundServer(make_config(port=port), engine)
    server.start(wait=False)
    try:
        target = f"127.0.0.1:{port}"
        wait_for(lambda: health_status(target) != "UNREACHABLE")
        with grpc.insecure_channel(target) as ch:
            assert check(ch) == NOT_SERVING
            assert check(ch, "memguard.v1.MemGuard") == NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                memguard_pb2_grpc.MemGuardStub(ch).Generate(pb.GenerateRequest(prompt="too early", steps=2))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            engine.go.set()
            wait_until_serving(target, timeout=120, poll=0.1)
            assert check(ch, "memguard.v1.MemGuard") == SERVING
            assert memguard_pb2_grpc.MemGuardStub(ch).Generate(pb.GenerateRequest(prompt="now", steps=2)).images
    finally:
        engine.go.set()
        server.stop()


def test_drain_reports_not_serving_and_finishes_in_flight_work(engine):
    server = BackgroundServer(make_config(drain_delay_s=2.0, grace_s=60.0), engine)
    server.start()
    outcome = {}
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        events = stub.GenerateStream(pb.GenerateRequest(prompt="a long one", steps=60))
        next(events)   # the request is running

        def finish():
            outcome["events"] = list(events)
        reader = threading.Thread(target=finish)
        reader.start()
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        wait_for(lambda: check(ch) == NOT_SERVING)
        reader.join(120)
        stopper.join(120)
    result = outcome["events"][-1].result
    assert result.images[0].decision == pb.DECISION_ALLOWED
    assert result.images[0].report.steps_computed == 60


def test_unexpected_engine_error_is_internal_and_the_server_lives_on(tiny_pipe, serve):
    server = serve(FailingEngine(tiny_pipe))
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(prompt="trigger a bug", steps=2))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "simulated" not in err.value.details()   # internals stay in the server log
        assert stub.Generate(pb.GenerateRequest(prompt="fine", steps=2)).images[0].decision == pb.DECISION_ALLOWED
    assert metric(server, "memguard_requests_total", rpc="Generate", code="INTERNAL") == 1


def test_sigterm_drains_the_cli_server():
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "memguard.cli", "serve", "--tiny-random", "--port", str(port), "--metrics-port", "-1",
           "--torch-threads", "1", "--no-index", "--grace", "300"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        target = f"127.0.0.1:{port}"
        wait_until_serving(target, timeout=240, poll=0.2)
        with grpc.insecure_channel(target) as ch:
            events = memguard_pb2_grpc.MemGuardStub(ch).GenerateStream(pb.GenerateRequest(prompt="x", steps=20))
            next(events)
            proc.send_signal(signal.SIGTERM)
            try:
                last = list(events)[-1]
            except grpc.RpcError as exc:
                proc.kill()
                pytest.fail(f"in-flight stream failed during drain: {exc}\n{proc.communicate()[0]}")
        assert last.result.images[0].report.steps_computed == 20
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "serving on 127.0.0.1" in proc.communicate()[0]
