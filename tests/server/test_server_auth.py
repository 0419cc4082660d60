"""API keys and scopes; the audit scope alone sees which training item matched."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memguard.engine import PipelineEngine
from memguard.errors import CorruptData
from memguard.proto.memguard.v1 import admin_pb2, admin_pb2_grpc, memguard_pb2 as pb, memguard_pb2_grpc
from memguard.server.auth import KeyStore, key_entry, new_key
from server_testlib import channel, metric

AUDIT = {"matched_item": "train-0042", "similarity": 0.91}


class ReportingEngine(PipelineEngine):
    """The real engine with a guard-like report (scores plus audit-only membership info), which is
    what the guarded engine will fill in; the server's job under test is what it releases."""

    def generate(self, requests, **kw):
        results = super().generate(requests, **kw)
        for per_request in results:
            for r in per_request:
                r.report.scores["memorization"] = 0.5
                r.report.audit = dict(AUDIT)
        return results


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    made = {name: new_key() for name in ("gen", "screener", "auditor", "admin")}
    scopes = {"gen": ["generate"], "screener": ["screen"], "auditor": ["generate", "audit"], "admin": ["admin"]}
    lines = []
    for name, key in made.items():
        entry = key_entry(name, key, scopes[name])
        lines.append(f'[[keys]]\nname = "{name}"\nsha256 = "{entry["sha256"]}"\nscopes = {entry["scopes"]!r}\n')
    path = tmp_path_factory.mktemp("auth") / "keys.toml"
    path.write_text("\n".join(lines).replace("'", '"'))
    text = path.read_text()
    assert not any(key in text for key in made.values())   # hashes only
    return path, made


@pytest.fixture(scope="module")
def authed(tiny_pipe, keys):
    from memguard.server.app import BackgroundServer
    from server_testlib import make_config

    server = BackgroundServer(make_config(auth_file=str(keys[0])), ReportingEngine(tiny_pipe))
    server.start()
    yield server, keys[1]
    server.stop()


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def code_of(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_missing_or_unknown_key_is_unauthenticated(authed):
    server, _ = authed
    request = pb.GenerateRequest(prompt="x", steps=2)
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        assert code_of(lambda: stub.Generate(request)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: stub.Generate(request, metadata=bearer(new_key()))) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: list(stub.GenerateStream(request))) == grpc.StatusCode.UNAUTHENTICATED
    assert metric(server, "memguard_requests_total", rpc="Generate", code="UNAUTHENTICATED") == 2


def test_scopes_gate_each_rpc(authed):
    server, key = authed
    image = pb.ScreenRequest(image=b"not an image")
    with channel(server) as ch:
        stub, admin = memguard_pb2_grpc.MemGuardStub(ch), admin_pb2_grpc.IndexAdminStub(ch)
        stats = admin_pb2.GetIndexStatsRequest()
        assert code_of(lambda: stub.Screen(image, metadata=bearer(key["gen"]))) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: admin.GetIndexStats(stats, metadata=bearer(key["gen"]))) \
            == grpc.StatusCode.PERMISSION_DENIED
        generate = pb.GenerateRequest(prompt="x", steps=2)
        assert code_of(lambda: stub.Generate(generate, metadata=bearer(key["screener"]))) \
            == grpc.StatusCode.PERMISSION_DENIED
        # past auth, the RPCs run: a bad upload is named, and no index means fail closed / no registry
        assert code_of(lambda: stub.Screen(image, metadata=[("x-api-key", key["screener"])])) \
            == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: admin.GetIndexStats(stats, metadata=bearer(key["admin"]))) \
            == grpc.StatusCode.FAILED_PRECONDITION
        # health needs no key
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status \
            == health_pb2.HealthCheckResponse.SERVING


def test_audit_details_only_for_the_audit_scope(authed):
    server, key = authed
    request = pb.GenerateRequest(prompt="a red apple", steps=2, seed=1)
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        plain = stub.Generate(request, metadata=bearer(key["gen"])).images[0]
        audited = stub.Generate(request, metadata=bearer(key["auditor"])).images[0]
        streamed = list(stub.GenerateStream(request, metadata=bearer(key["gen"])))[-1].result.images[0]
    for image in (plain, streamed):
        assert not image.report.HasField("audit")
        assert "train-0042" not in image.SerializeToString().decode("latin-1")
        assert not image.report.scores   # continuous scores are membership signals: audit only (issue 14)
    assert audited.report.scores["memorization"] == pytest.approx(0.5)
    assert audited.report.audit["matched_item"] == "train-0042"
    assert audited.report.audit["similarity"] == pytest.approx(0.91)


def test_key_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "keys.toml"
    bad.write_text('[[keys]]\nname = "x"\nsha256 = "abc"\nscopes = ["generate"]\n')
    with pytest.raises(CorruptData, match="keys.toml"):
        KeyStore.load(bad)
    bad.write_text(f'[[keys]]\nname = "x"\nsha256 = "{"0" * 64}"\nscopes = ["root"]\n')
    with pytest.raises(CorruptData, match="root"):
        KeyStore.load(bad)
