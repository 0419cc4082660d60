"""The audit log after a run against a live server: chained, 0600, complete, no allowed prompt."""
from __future__ import annotations

import json
import stat

import grpc
import numpy as np
import pytest

from memguard.audit import AuditLog, verify
from memguard.cli import main
from memguard.proto.memguard.v1 import admin_pb2, admin_pb2_grpc, memguard_pb2 as pb, memguard_pb2_grpc
from memguard.server.auth import new_key
from memguard.server.convert import encode_png
from server_testlib import channel, metric
from hardening_lib import MATCHED, GuardLikeEngine, bearer, write_keys

SECRET = "a private allowed prompt about my neighbour"


@pytest.fixture(scope="module")
def audited_run(tiny_pipe, tmp_path_factory):
    """Run every audited kind of call once against a live server; return the log and the metrics."""
    from memguard.server.app import BackgroundServer
    from server_testlib import make_config

    tmp = tmp_path_factory.mktemp("audit")
    keys = write_keys(tmp / "keys.toml", {"ops": ["generate", "screen", "admin"], "gen": ["generate"]})
    log = tmp / "logs" / "audit.jsonl"
    server = BackgroundServer(make_config(auth_file=str(tmp / "keys.toml"), audit_log=str(log)),
                              GuardLikeEngine(tiny_pipe))
    server.start()
    png = encode_png(np.full((64, 64, 3), 90, np.uint8))
    try:
        with channel(server) as ch:
            stub, admin = memguard_pb2_grpc.MemGuardStub(ch), admin_pb2_grpc.IndexAdminStub(ch)
            ops = bearer(keys["ops"])
            stub.Generate(pb.GenerateRequest(prompt=SECRET, steps=1, request_id="allowed-1"), metadata=ops)
            stub.Generate(pb.GenerateRequest(prompt="a copy of the photo", steps=1, request_id="blocked-1"),
                          metadata=ops)
            list(stub.GenerateStream(pb.GenerateRequest(prompt="copy again", steps=1, request_id="blocked-2"),
                                     metadata=ops))
            stub.Screen(pb.ScreenRequest(image=png, request_id="screen-1"), metadata=ops)
            with pytest.raises(grpc.RpcError):
                stub.Screen(pb.ScreenRequest(image=b"junk", request_id="screen-2"), metadata=ops)
            pid = admin.Protect(admin_pb2.ProtectRequest(image=admin_pb2.ProtectImage(image=png),
                                                         reason="takedown #9"), metadata=ops).id
            admin.Unprotect(admin_pb2.UnprotectRequest(id=pid, reason="appeal #9"), metadata=ops)
            for bad in (new_key(), keys["gen"]):
                with pytest.raises(grpc.RpcError):
                    stub.Screen(pb.ScreenRequest(image=png, request_id="denied"), metadata=bearer(bad))
        server.server.audit.flush_refusals()     # refusals are written per window (issue 29, finding 7)
        entries_metric = metric(server, "memguard_audit_entries_total")
    finally:
        server.stop()
    return log, [json.loads(line) for line in log.read_text().splitlines()], entries_metric


def test_the_run_is_audited_and_the_chain_verifies(audited_run, capsys):
    log, entries, entries_metric = audited_run
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert main(["audit", "verify", str(log)]) == 0
    assert f"{len(entries)} entries" in capsys.readouterr().out
    assert entries_metric == len(entries)
    kinds = [(e["rpc"], e["outcome"], e["request_id"]) for e in entries]
    assert ("Generate", "BLOCKED", "blocked-1") in kinds and ("GenerateStream", "BLOCKED", "blocked-2") in kinds
    assert ("Screen", "OK", "screen-1") in kinds and ("Screen", "InvalidInput", "screen-2") in kinds
    assert [k[:2] for k in kinds if k[0] in ("Protect", "Unprotect")] == [
        ("Protect", "STARTED"), ("Protect", "OK"), ("Unprotect", "STARTED"), ("Unprotect", "OK")]
    refused = {(e["rpc"], e["outcome"], e["details"]["count"]) for e in entries if "count" in e["details"]}
    assert refused == {("Screen", "UNAUTHENTICATED", 1), ("Screen", "PERMISSION_DENIED", 1)}
    blocked = next(e for e in entries if e["request_id"] == "blocked-1")
    assert blocked["who"] == "ops" and blocked["details"]["images"][0]["matched"] == [MATCHED]
    assert "prompt" not in json.dumps(blocked["details"]).replace("prompt_sha256", "")
    protect = next(e for e in entries if e["rpc"] == "Protect" and e["outcome"] == "OK")
    assert protect["details"]["reason_tag"].startswith("hmac:") and protect["details"]["id"]
    text = log.read_text()
    assert SECRET not in text and "allowed-1" not in text       # an allowed request leaves no trace
    assert "takedown #9" not in text and "appeal #9" not in text   # reasons only as keyed tags


def test_a_one_byte_edit_breaks_the_chain(audited_run, tmp_path, capsys):
    log, entries, _ = audited_run
    data = bytearray(log.read_bytes())
    at = data.index(b'"outcome":"BLOCKED"') + len('"outcome":"')
    data[at:at + 1] = b"A"                      # BLOCKED → ALOCKED, still valid JSON
    edited = tmp_path / "edited.jsonl"
    edited.write_bytes(bytes(data))
    assert main(["audit", "verify", str(edited)]) == 1
    assert "hash does not match" in capsys.readouterr().err
    last = bytearray(log.read_bytes())
    last[-3:-2] = b"0" if last[-3:-2] != b"0" else b"1"         # the newest entry's own hash
    edited.write_bytes(bytes(last))
    assert not verify(edited).ok
    dropped = log.read_text().splitlines()
    edited.write_text("\n".join(dropped[:1] + dropped[2:]) + "\n")    # a deleted line
    assert "prev does not match" in verify(edited).error or "seq" in verify(edited).error


def test_export_filters_and_refuses_a_broken_chain(audited_run, tmp_path, capsys):
    log, entries, _ = audited_run
    out = tmp_path / "protect.jsonl"
    assert main(["audit", "export", str(log), "--rpc", "Protect", "--rpc", "Unprotect", "--out", str(out)]) == 0
    assert [json.loads(line)["rpc"] for line in out.read_text().splitlines()] == ["Protect"] * 2 + ["Unprotect"] * 2
    broken = tmp_path / "broken.jsonl"
    broken.write_text(log.read_text().replace('"who":"ops"', '"who":"eve"', 1))
    assert main(["audit", "export", str(broken)]) == 1
    assert "BROKEN" in capsys.readouterr().err


def test_reopening_continues_the_chain(tmp_path):
    path = tmp_path / "a.jsonl"
    first = AuditLog(path, fsync=False)
    first.record(who="x", rpc="Protect", outcome="OK", id="p1")
    first.close()
    second = AuditLog(path, fsync=False)
    entry = second.record(who="x", rpc="Unprotect", outcome="OK", id="p1", odd=object())
    second.close()
    assert entry["seq"] == 1 and verify(path).ok and verify(path).entries == 2
