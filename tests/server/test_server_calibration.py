"""An uncalibrated policy or index is said loudly: log, health service, gauge, index stats."""
from __future__ import annotations

import logging

from grpc_health.v1 import health_pb2, health_pb2_grpc

from memguard.engine import IndexGateway
from memguard.guarded_engine import GuardedEngine
from memguard.policy import Policy
from memguard.server.app import CALIBRATION_SERVICE
from server_testlib import channel, metric


def _calibration_status(server) -> int:
    with channel(server) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=CALIBRATION_SERVICE),
                                                    timeout=10).status


def test_uncalibrated_policy_is_reported_everywhere(tiny_pipe, serve, caplog):
    engine = GuardedEngine(tiny_pipe, IndexGateway(None), Policy.uncalibrated())
    assert engine.uncalibrated["policy"] and not engine.uncalibrated["index"]   # (other components may be listed)
    with caplog.at_level(logging.WARNING):
        server = serve(engine)
    assert any("UNCALIBRATED POLICY" in r.getMessage() for r in caplog.records)
    assert _calibration_status(server) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert metric(server, "memguard_uncalibrated", component="policy") == 1
    assert metric(server, "memguard_uncalibrated", component="index") == 0


def test_calibrated_policy_serves_the_calibration_health(tiny_pipe, serve):
    from memguard.testbed.registry import get_testbed

    engine = GuardedEngine(tiny_pipe, IndexGateway(None), Policy.load(get_testbed().policy_path))
    server = serve(engine)
    assert _calibration_status(server) == health_pb2.HealthCheckResponse.SERVING
    assert metric(server, "memguard_uncalibrated", component="policy") == 0
