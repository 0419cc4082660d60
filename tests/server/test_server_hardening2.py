"""Issue 29 (Hardening II) on a live server over loopback: what non-audit callers, metrics readers and
hostile clients can learn or cost."""
from __future__ import annotations

import dataclasses
import threading
import time

import grpc
import numpy as np
import pytest

from memguard.types import Decision, GuardReport, Reason
from memguard.proto.memguard.v1 import memguard_pb2 as pb, memguard_pb2_grpc
from memguard.server.convert import encode_png
from server_testlib import channel
from hardening_lib import GuardLikeEngine, bearer, write_keys

PNG = encode_png(np.full((64, 64, 3), 128, np.uint8))
BLOCK_AT = 1     # EarlyBlockEngine stops "copy" prompts after this step (0-based)


class EarlyBlockEngine(GuardLikeEngine):
    """The real tiny pipeline, stopping prompts that contain "copy" the way the guarded pipeline stops a
    flagged sample: it computes only steps 0..BLOCK_AT (really: the batch ends early), the event of
    step BLOCK_AT says "block", and the report says BLOCK_AT + 1 steps computed."""

    def generate(self, requests, *, on_step=None, is_cancelled=None):
        flagged = [i for i, r in enumerate(requests) if "copy" in r.prompt]
        others = [i for i in range(len(requests)) if i not in flagged]
        results: dict[int, list] = {}
        for group, early in ((others, False), (flagged, True)):
            if not group:
                continue
            run = [dataclasses.replace(requests[i], steps=BLOCK_AT + 1) if early else requests[i] for i in group]

            def step(j, event, group=group, early=early):
                if on_step is None:
                    return
                if early:
                    event = dataclasses.replace(event, total_steps=requests[group[j]].steps,
                                                action="block" if event.step == BLOCK_AT else "continue")
                on_step(group[j], event)
            cancelled = (lambda j, group=group: is_cancelled(group[j])) if is_cancelled else None
            for i, rs in zip(group, GuardLikeEngine.generate(self, run, on_step=step, is_cancelled=cancelled)):
                if early:
                    rs = [dataclasses.replace(r, decision=Decision.BLOCKED, reason=Reason.MEMORIZATION, image=None,
                                              report=dataclasses.replace(r.report, steps_computed=BLOCK_AT + 1,
                                                                         first_flagged_step=BLOCK_AT))
                          for r in rs]
                results[i] = rs
        return [results[i] for i in range(len(requests))]

    def batch_key(self, request):
        return (super().batch_key(request), "copy" in request.prompt)


@pytest.fixture(scope="module")
def early(tiny_pipe, tmp_path_factory):
    from memguard.server.app import BackgroundServer
    from server_testlib import make_config

    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys = write_keys(path, {"plain": ["generate", "screen"], "auditor": ["generate", "screen", "audit"]})
    server = BackgroundServer(make_config(auth_file=str(path), batching={"max_batch_images": 4}),
                              EarlyBlockEngine(tiny_pipe))
    server.start()
    yield server, keys
    server.stop()


def stream(ch, request, key):
    events = list(memguard_pb2_grpc.MemGuardStub(ch).GenerateStream(request, metadata=bearer(key), timeout=300))
    progress = [e.progress for e in events if e.HasField("progress")]
    assert events[-1].HasField("result")
    return progress, events[-1].result


def shape(progress) -> list[tuple]:
    """A progress sequence without its request id."""
    return [(p.image_index, p.step, p.total_steps, p.action, dict(p.signals)) for p in progress]


# ----------------------------------------------------------------------------- finding 2
def test_finding2_non_audit_caller_learns_the_decision_not_when(early):
    server, keys = early
    steps = 6
    blocked = pb.GenerateRequest(prompt="a copy of the famous photo", steps=steps, seed=1, num_images=2)
    allowed = pb.GenerateRequest(prompt="a red apple", steps=steps, seed=1, num_images=2)
    with channel(server) as ch:
        # the audit scope still sees the block step (the test has teeth)
        progress, result = stream(ch, blocked, keys["auditor"])
        assert [p.action for p in progress if p.image_index == 0] == ["continue"] * BLOCK_AT + ["block"]
        assert result.images[0].report.steps_computed == BLOCK_AT + 1
        assert result.images[0].report.first_flagged_step == BLOCK_AT
        # without audit: the same progress and report whatever the guard did
        plain_blocked, blocked_result = stream(ch, blocked, keys["plain"])
        plain_allowed, allowed_result = stream(ch, allowed, keys["plain"])
        assert [im.decision for im in blocked_result.images] == [pb.DECISION_BLOCKED] * 2   # the decision: yes
        assert [im.decision for im in allowed_result.images] == [pb.DECISION_ALLOWED] * 2
        assert shape(plain_blocked) == shape(plain_allowed)
        assert shape(plain_blocked) == [(i, s, steps, "", {}) for s in range(steps) for i in range(2)]
        for im in list(blocked_result.images) + list(allowed_result.images):
            assert im.report.steps_computed == steps and not im.report.mitigations
            assert not im.report.HasField("first_flagged_step") and not im.report.scores
        unary = memguard_pb2_grpc.MemGuardStub(ch).Generate(blocked, metadata=bearer(keys["plain"]), timeout=300)
        assert [im.report.steps_computed for im in unary.images] == [steps, steps]
        assert all(not im.report.mitigations for im in unary.images)


def test_finding2_an_early_block_is_padded_to_the_full_latency(early):
    server, keys = early
    steps = 40
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)

        def timed(prompt, key):
            t0 = time.monotonic()
            response = stub.Generate(pb.GenerateRequest(prompt=prompt, steps=steps, seed=2), metadata=bearer(key),
                                     timeout=300)
            return time.monotonic() - t0, response.images[0].decision
        timed("a red apple", keys["plain"])   # warm
        full, decision = timed("a red apple", keys["plain"])
        assert decision == pb.DECISION_ALLOWED
        audit_early, _ = timed("a copy of it", keys["auditor"])
        plain_early, decision = timed("a copy of it", keys["plain"])
        assert decision == pb.DECISION_BLOCKED
    # the audit reply comes after BLOCK_AT + 1 of 40 steps; the plain one about when a full run would
    assert plain_early > 0.5 * full, (plain_early, full, audit_early)
    assert plain_early > 2 * audit_early, (plain_early, full, audit_early)


def test_finding2_coarse_results_keep_decisions_only():
    from memguard.server.service import coarse_results
    from memguard.types import GenerationRequest, ImageResult

    request = GenerationRequest(prompt="x", steps=9)
    results = [ImageResult(0, 1, Decision.REROUTED, Reason.MEMORIZATION, None,
                           GuardReport(scores={"z": 3.0}, first_flagged_step=2, steps_computed=23,
                                       mitigations=["second pass: fresh noise", "reroute (guidance on 43% of steps)"])),
               ImageResult(1, 2, Decision.BLOCKED, Reason.CANCELLED, None, GuardReport(steps_computed=3))]
    coarse = coarse_results(request, results)
    assert [(r.decision, r.reason, r.report) for r in coarse] == [
        (Decision.REROUTED, Reason.MEMORIZATION, GuardReport(steps_computed=9)),
        (Decision.BLOCKED, Reason.CANCELLED, GuardReport(steps_computed=0))]
    assert results[0].report.steps_computed == 23   # the audit log still gets the real report


# ----------------------------------------------------------------------------- finding 3
@pytest.fixture(scope="module")
def real_guard(tiny_pipe, tmp_path_factory):
    """The real GuardedEngine over the tiny pipeline (no index: every image fails closed, but every
    step is scored), behind API keys."""
    from memguard.engine import IndexGateway
    from memguard.guarded_engine import GuardedEngine
    from memguard.policy import Policy
    from memguard.server.app import BackgroundServer
    from server_testlib import make_config

    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys = write_keys(path, {"plain": ["generate", "screen"], "auditor": ["generate", "screen", "audit"]})
    server = BackgroundServer(make_config(auth_file=str(path)),
                              GuardedEngine(tiny_pipe, IndexGateway(None), Policy.uncalibrated()))
    server.start()
    yield server, keys
    server.stop()


def test_finding3_metrics_diffed_around_one_request_give_back_no_signal_value(real_guard):
    import math

    from server_testlib import scrape

    server, keys = real_guard
    assert server.server.metrics._http.server_address[0] == "127.0.0.1"   # loopback unless configured
    request = pb.GenerateRequest(prompt="a red apple", steps=4, seed=3, num_images=2)
    with channel(server) as ch:
        stream(ch, request, keys["plain"])           # warm the label sets
        before = scrape(server)
        progress, result = stream(ch, request, keys["auditor"])
        after = scrape(server)
    names = {name for p in progress for name in p.signals}
    assert {"divergence", "entropy", "combined"} <= names            # the audit caller saw the signals
    secrets = [sum(p.signals[n] for p in progress if n in p.signals) for n in names]
    secrets += [v for p in progress for v in p.signals.values()]
    secrets += [v for im in result.images for v in im.report.scores.values()]
    secrets = [v for v in secrets if abs(v) > 1e-6]
    changed = {key: value - before.get(key, 0.0) for key, value in after.items() if value != before.get(key, 0.0)}
    assert changed, "the request changed no series at all?"
    for (name, labels), delta in changed.items():
        assert not any(math.isclose(delta, v, rel_tol=1e-5) for v in secrets), (name, labels, delta)
    series = {name for name, _ in after}
    assert not [n for n in series if "signal" in n or "flagged" in n], series


# ----------------------------------------------------------------------------- finding 8
def test_finding8_serve_refuses_another_models_index_and_checks_provenance(tmp_path, caplog):
    """`memguard serve --model X` used the v-testbed's index for any X and skipped the provenance check
    that `memguard generate` runs. Now: the same rule (the model's own index, or refuse), the same
    warnings, on a real server."""
    import json
    import logging
    import shutil

    from memguard.cli import build_parser
    from memguard.errors import InvalidInput
    from memguard.server.app import BackgroundServer
    from memguard.server.cli import build_config
    from memguard.testbed.registry import get_testbed

    testbed = get_testbed()
    if not (testbed.index_dir / "manifest.json").is_file() or not testbed.policy_path.is_file():
        pytest.skip("the testbed's index and policy are not built")
    model = tmp_path / "another-model"        # not a testbed: another model, however similar
    shutil.copytree(testbed.model_dir, model)
    meta = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**meta, "_memguard_note": "fine-tuned elsewhere"}))
    shutil.copy(testbed.policy_path, model / "memguard_policy.json")
    index = shutil.copytree(testbed.index_dir, tmp_path / "index")   # its own copy: Protect writes there

    base = ["serve", "--model", str(model), "--port", "0", "--metrics-port", "-1", "--torch-threads", "1"]
    with pytest.raises(InvalidInput) as err:
        build_config(build_parser().parse_args(base))
    assert err.value.field == "index" and "--index" in str(err.value)
    assert build_config(build_parser().parse_args(base + ["--no-index"])).engine.index is None   # said explicitly

    config = build_config(build_parser().parse_args(base + ["--index", str(index)]))
    assert config.engine.index == str(index)
    with caplog.at_level(logging.WARNING):
        server = BackgroundServer(config)
        server.start()
    try:
        with channel(server) as ch:
            response = memguard_pb2_grpc.MemGuardStub(ch).Screen(pb.ScreenRequest(image=PNG), timeout=120)
        assert response.request_id   # it screens against the index it was given
    finally:
        server.stop()
    assert any("calibrated on another model" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]


# ----------------------------------------------------------------------------- finding 1
def test_finding1_sizes_and_cost_are_bounded_by_the_model(early):
    """The tiny model's native side is 64 px (UNet sample size 16 × VAE factor 4): at most 128 px a
    side, at most 400 native image-steps a request; refused with INVALID_ARGUMENT naming the field."""
    server, keys = early
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        for request, field, why in (
                (pb.GenerateRequest(prompt="x", steps=1, height=1024, width=1024), "height:", "exceeds 128 px"),
                (pb.GenerateRequest(prompt="x", steps=1, height=64, width=256), "width:", "exceeds 128 px"),
                (pb.GenerateRequest(prompt="x", steps=150, height=128, width=128), "steps:", "budget is 400"),
                (pb.GenerateRequest(prompt="x", steps=120, num_images=4), "num_images:", "costs 480")):
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(request, metadata=bearer(keys["plain"]), timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert err.value.details().startswith(field) and why in err.value.details(), err.value.details()
            assert time.monotonic() - t0 < 5
        ok = stub.Generate(pb.GenerateRequest(prompt="x", steps=1, height=128, width=128), metadata=bearer(keys["plain"]),
                           timeout=120)
        assert ok.images[0].decision == pb.DECISION_ALLOWED
    from server_testlib import metric
    assert metric(server, "memguard_rejections_total", rpc="Generate", cause="cost") == 4


def test_finding1_one_key_holds_only_its_share_of_the_queue(tiny_pipe, serve, tmp_path):
    from server_testlib import metric, wait_for

    class HeldEngine(GuardLikeEngine):
        """Holds the worker on the test's requests until the test is done: a 150-step tiny generation
        can end before the next request is queued, and the queue depth this test reads would never be
        reached. The server's start-up warm-up passes."""
        holding, release = threading.Event(), threading.Event()

        def generate(self, requests, **kw):
            if any(r.prompt == "slow" for r in requests):
                self.holding.set()
                self.release.wait(120)
            return super().generate(requests, **kw)

    keys = write_keys(tmp_path / "keys.toml", {"a": ["generate"], "b": ["generate"]})
    engine = HeldEngine(tiny_pipe)
    # max_queue 4 × share 0.25: one waiting request a key
    server = serve(engine, auth_file=str(tmp_path / "keys.toml"),
                   batching={"max_batch_images": 1, "max_queue": 4, "max_queue_delay_ms": 0})
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        long = pb.GenerateRequest(prompt="slow", steps=150)
        running = stub.Generate.future(long, metadata=bearer(keys["a"]), timeout=300)
        # taken by the worker (queue depth 0 also holds before the request has arrived: then the next
        # request could find this one still queued and be refused for the key's share)
        wait_for(lambda: engine.holding.is_set() and server.server.batcher.depth == 0)
        waiting = stub.Generate.future(long, metadata=bearer(keys["a"]), timeout=300)
        wait_for(lambda: server.server.batcher.depth == 1)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(long, metadata=bearer(keys["a"]), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "share" in err.value.details()
        other = stub.Generate.future(long, metadata=bearer(keys["b"]), timeout=300)   # b still gets in
        wait_for(lambda: server.server.batcher.depth == 2)
        assert not other.done()
        for call in (running, waiting, other):
            call.cancel()
        engine.release.set()
    assert metric(server, "memguard_rejections_total", rpc="Generate", cause="key_queue_share") == 1


def test_finding1_rate_limits_are_on_by_default(tiny_pipe, serve, tmp_path):
    from memguard.server.config import RateLimitConfig

    defaults = RateLimitConfig()
    assert defaults.generate_per_s > 0 and defaults.screen_per_s > 0
    keys = write_keys(tmp_path / "keys.toml", {"a": ["generate"]})
    server = serve(GuardLikeEngine(tiny_pipe), auth_file=str(tmp_path / "keys.toml"),
                   rate_limits=dataclasses.asdict(defaults), batching={"max_batch_images": 4})
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        request = pb.GenerateRequest(prompt="x", steps=1, num_images=4)
        codes = []
        for _ in range(defaults.generate_burst // 4 + 2):
            try:
                stub.Generate(request, metadata=bearer(keys["a"]), timeout=120)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
    assert codes[0] == "OK" and "RESOURCE_EXHAUSTED" in codes, codes


# ----------------------------------------------------------------------------- finding 10
def test_finding10_loopback_is_parsed_not_prefix_matched(tiny_pipe, serve):
    from memguard.errors import InvalidInput
    from memguard.server.config import ServerConfig, is_loopback

    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("127.attacker.example", "127.0.0.1.nip.io", "0.0.0.0", "::", "10.0.0.1", "localhost.evil", ""):
        assert not is_loopback(host), host
        with pytest.raises(InvalidInput, match="auth_file"):   # auth off only on loopback
            ServerConfig(host=host or "x").validate()
    server = serve(GuardLikeEngine(tiny_pipe), host="127.0.0.2")   # a real loopback address still serves
    with channel(server) as ch:
        assert memguard_pb2_grpc.MemGuardStub(ch).Generate(pb.GenerateRequest(prompt="x", steps=1), timeout=60).images


class GatedEngine(GuardLikeEngine):
    """Generation waits for the test's go-ahead, so RPCs stay in flight."""

    def __init__(self, pipe):
        import threading

        super().__init__(pipe)
        self.go = threading.Event()

    def generate(self, requests, **kw):
        if requests[0].prompt != "warmup":
            assert self.go.wait(120)
        return super().generate(requests, **kw)


def test_finding10_concurrent_rpcs_and_connection_age_are_capped(tiny_pipe, serve):
    engine = GatedEngine(tiny_pipe)
    server = serve(engine, max_concurrent_rpcs=2, max_connection_age_s=1.0, max_connection_age_grace_s=1.0)
    try:
        with channel(server) as ch:
            stub = memguard_pb2_grpc.MemGuardStub(ch)
            held = [stub.Generate.future(pb.GenerateRequest(prompt=f"p{i}", steps=1), timeout=120) for i in range(2)]
            time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(pb.GenerateRequest(prompt="third", steps=1), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            # connection age 1 s + grace 1 s: the held calls' connection is closed under them
            t0 = time.monotonic()
            codes = {f.exception(timeout=60).code() for f in held}
            assert codes == {grpc.StatusCode.UNAVAILABLE}, codes
            assert time.monotonic() - t0 < 30
    finally:
        engine.go.set()
    with channel(server) as ch:   # a fresh connection is served
        assert memguard_pb2_grpc.MemGuardStub(ch).Generate(pb.GenerateRequest(prompt="x", steps=1), timeout=60).images


@pytest.mark.skipif(__import__("shutil").which("openssl") is None, reason="openssl CLI needed for a certificate")
def test_finding10_client_refuses_a_certificate_without_a_ca(early, tmp_path):
    """Before: Connection(tls_cert, tls_key) with no CA fell back to a plaintext channel and sent the
    API key in the clear to this (plaintext) server, which answered."""
    import subprocess

    from memguard.errors import InvalidInput
    from memguard.server.client import Connection, remote_generate
    from memguard.types import GenerationRequest

    server, keys = early
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=client",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    with pytest.raises(InvalidInput) as err:
        remote_generate(Connection(server.target, keys["plain"], tls_cert=str(cert), tls_key=str(key), timeout=60),
                        GenerationRequest(prompt="x", steps=1))
    assert err.value.field == "tls_ca"
    with pytest.raises(InvalidInput):
        Connection(server.target, keys["plain"], tls_ca=str(cert), tls_cert=str(cert))   # half a pair
    # plaintext stays possible when the caller asks for nothing else (loopback)
    assert remote_generate(Connection(server.target, keys["plain"], timeout=60), GenerationRequest(prompt="x", steps=1))


def test_finding10_no_registry_password_on_the_command_line(tmp_path, capsys):
    from memguard.cli import build_parser
    from memguard.errors import InvalidInput
    from memguard.server.cli import has_password, registry_uri

    secret = "s3cr3t-pw"
    parse = build_parser().parse_args
    for uri in (f"postgresql://memguard:{secret}@db:5432/memguard", f"host=db user=memguard password={secret}",
                f"postgresql://memguard@db/memguard?password={secret}"):
        assert has_password(uri)
        with pytest.raises(InvalidInput) as err:
            registry_uri(parse(["serve", "--registry", uri]))
        assert err.value.field == "registry" and secret not in str(err.value)
    plain = "postgresql://memguard@127.0.0.1:5432/memguard"      # the password from PGPASSWORD / ~/.pgpass
    assert registry_uri(parse(["serve", "--registry", plain])) == plain
    path = tmp_path / "registry.uri"
    path.write_text(f"postgresql://memguard:{secret}@db/memguard\n")
    assert registry_uri(parse(["serve", "--registry-file", str(path)])).endswith("@db/memguard")
    # the CLI refuses before starting anything, and says why without echoing the secret
    from memguard.cli import main

    assert main(["serve", "--tiny-random", "--no-index", "--port", "0", "--metrics-port", "-1",
                 "--registry", f"postgresql://memguard:{secret}@db/memguard"]) == 2
    err = capsys.readouterr().err
    assert "password" in err and secret not in err
