"""Issue 29, findings 6, 5, 7 and 10 on live servers: the audit chain is keyed, publishes its head,
has one writer per file, survives short and torn writes; Protect and Unprotect never take effect
without their entry; no name or reason in the log; refusals are aggregated; `matched` lists matches."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys

import grpc
import numpy as np
import pytest

from memguard.audit import (AuditKey, AuditLog, AuditLogBusy, AuditWriteError, canonical, expand_path, verify)
from memguard.cli import main
from memguard.engine import ScreenOutcome
from memguard.errors import MissingResource
from memguard.proto.memguard.v1 import admin_pb2, admin_pb2_grpc, memguard_pb2 as pb, memguard_pb2_grpc
from memguard.server.auth import new_key
from memguard.server.convert import encode_png
from memguard.types import Reason
from hardening_lib import GuardLikeEngine, bearer, write_keys
from server_testlib import channel, make_config, metric

AUDIT_KEY = "11" * 32
NAME = "Jane Q. Public"
REASON = "erasure request from Jane Q. Public, ticket 4411"
PNG = encode_png(np.full((64, 64, 3), 90, np.uint8))


class PeopleEngine(GuardLikeEngine):
    """Screen answers 20 candidates that are not copies, then the real copy, and a matched face of a
    protected person (by name, as the index reports it)."""

    def screen(self, image):
        matches = [{"item_id": f"candidate-{i}", "is_copy": False, "protected": False, "protection_ids": []}
                   for i in range(20)]
        matches.append({"item_id": "the-real-copy", "is_copy": True, "protected": False, "protection_ids": []})
        faces = [{"box": [0, 0, 8, 8], "identity": NAME, "matched": True, "protected": True, "distance": 0.3,
                  "threshold": 0.5, "item_id": None, "protection_id": None}]
        return ScreenOutcome(True, 1, 1, Reason.MEMORIZATION, {"matches": matches, "faces": faces})


@pytest.fixture
def keyed_env(monkeypatch):
    monkeypatch.setenv("MEMGUARD_AUDIT_KEY", AUDIT_KEY)
    monkeypatch.delenv("MEMGUARD_AUDIT_KEY_FILE", raising=False)


@pytest.fixture
def live(tiny_pipe, tmp_path, keyed_env, caplog):
    from memguard.server.app import BackgroundServer

    caplog.set_level(logging.INFO, logger="memguard.audit")      # the published heads

    keys = write_keys(tmp_path / "keys.toml", {"ops": ["generate", "screen", "admin"], "screener": ["screen"]})
    path = tmp_path / "logs" / "audit.jsonl"
    engine = PeopleEngine(tiny_pipe)
    server = BackgroundServer(make_config(auth_file=str(tmp_path / "keys.toml"), audit_log=str(path)), engine)
    server.start()
    stopped = []

    def stop():
        if not stopped:
            stopped.append(1)
            server.stop()
    yield server, keys, path, engine, stop
    stop()


def entries(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rechain(lines: list[dict], key: AuditKey | None = None) -> str:
    """What an editor with write access does: recompute every hash after an edit."""
    prev, out = "0" * 64, []
    for e in lines:
        e = dict(e, prev=prev)
        e.pop("hash", None)
        if key is None:
            e.pop("key", None)
            e["hash"] = hashlib.sha256(canonical(e).encode()).hexdigest()
        else:
            e["key"] = key.key_id
            e["hash"] = key.mac(canonical(e).encode())
        prev = e["hash"]
        out.append(canonical(e))
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- finding 6
def test_an_edited_entry_with_a_recomputed_chain_does_not_verify(live, tmp_path, capsys):
    server, keys, path, _, stop = live
    with channel(server) as ch:
        admin = admin_pb2_grpc.IndexAdminStub(ch)
        pid = admin.Protect(admin_pb2.ProtectRequest(image=admin_pb2.ProtectImage(image=PNG), reason="takedown #1"),
                            metadata=bearer(keys["ops"])).id
        admin.Unprotect(admin_pb2.UnprotectRequest(id=pid, reason="appeal"), metadata=bearer(keys["ops"]))
    stop()
    log = entries(path)
    assert all(e["key"] == AuditKey(bytes.fromhex(AUDIT_KEY)).key_id for e in log)
    assert main(["audit", "verify", str(path)]) == 0 and "keyed (HMAC-SHA256)" in capsys.readouterr().out
    edited = [dict(e) for e in log]
    unprotect = next(e for e in edited if e["rpc"] == "Unprotect" and e["outcome"] == "OK")
    unprotect["who"] = "someone-else"
    for forged_key in (None, AuditKey(os.urandom(32))):        # plain sha256, or a key of the editor's own
        forged = tmp_path / "forged.jsonl"
        forged.write_text(rechain(edited, forged_key))
        result = verify(forged)                                  # the key comes from the environment
        assert not result.ok and "line 1" in result.error, result.error
        assert main(["audit", "verify", str(forged)]) == 1


def test_the_head_is_published_and_a_cut_tail_is_found(live, caplog, capsys):
    server, keys, path, _, stop = live
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        for i in range(4):
            stub.Screen(pb.ScreenRequest(image=PNG, request_id=f"s-{i}"), metadata=bearer(keys["ops"]))
    log = entries(path)
    assert metric(server, "memguard_audit_sequence") == log[-1]["seq"] == 3
    stop()
    logged = "\n".join(r.getMessage() for r in caplog.get_records("setup") + caplog.records)
    published = re.findall(r"head seq (-?\d+) hash ([0-9a-f]{64})", logged)
    assert published[0] == ("-1", "0" * 64)                      # at start (an empty log)
    assert published[-1] == (str(log[-1]["seq"]), log[-1]["hash"])  # at close
    cut = path.read_text().splitlines()[:2]
    path.write_text("\n".join(cut) + "\n")
    assert verify(path).ok                                       # a cut chain is still a chain ...
    result = verify(path, head=(log[-1]["seq"], log[-1]["hash"]))
    assert not result.ok and "cut" in result.error               # ... not against the published head
    assert main(["audit", "verify", str(path), "--head", f"{log[-1]['seq']}:{log[-1]['hash']}"]) == 1


def test_one_writer_per_file(tmp_path, keyed_env):
    path = tmp_path / "audit.jsonl"
    first = AuditLog(path, fsync=False)
    probe = ("import sys\nfrom memguard.audit import AuditLog, AuditLogBusy\ntry:\n    AuditLog(sys.argv[1])\n"
             "except AuditLogBusy as exc:\n    print(exc)\n    sys.exit(3)\n")
    other = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONSAFEPATH="1"))
    assert other.returncode == 3 and "in use by another process" in other.stdout
    with pytest.raises(AuditLogBusy):
        AuditLog(path)
    first.close()
    AuditLog(path).close()                                      # free again once the first closed
    replica = expand_path(tmp_path / "audit-{hostname}-{pid}.jsonl")
    assert "{" not in replica.name and str(os.getpid()) in replica.name


def test_a_short_write_is_rolled_back_and_refused(tmp_path, keyed_env, monkeypatch):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync=False)
    log.record(who="x", rpc="Protect", outcome="OK", id="p1")
    import memguard.audit as audit_module
    real_write = os.write
    monkeypatch.setattr(audit_module.os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))
    with pytest.raises(AuditWriteError, match="short write"):
        log.record(who="x", rpc="Protect", outcome="OK", id="p2")
    monkeypatch.setattr(audit_module.os, "write", real_write)
    log.record(who="x", rpc="Unprotect", outcome="OK", id="p1")
    log.close()
    assert verify(path).ok and [e["details"].get("id") for e in entries(path)] == ["p1", "p1"]


def test_a_torn_last_line_is_quarantined_and_the_chain_continues(tmp_path, keyed_env, caplog):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync=False)
    for i in range(3):
        log.record(who="x", rpc="Screen", outcome="OK", n=i)
    log.close()
    torn = b'{"details":{"n":3},"key":"abc","outcome":"O'
    with path.open("ab") as f:
        f.write(torn)                                            # a crash mid-write
    with caplog.at_level(logging.WARNING, logger="memguard.audit"):
        again = AuditLog(path, fsync=False)
    again.record(who="x", rpc="Screen", outcome="OK", n=4)
    again.close()
    aside = list(tmp_path.glob("audit.jsonl.torn-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == torn and "torn" in caplog.text
    log_entries = entries(path)
    assert [e["outcome"] for e in log_entries] == ["OK"] * 3 + ["QUARANTINED", "OK"]
    assert log_entries[3]["details"]["torn_bytes"] == len(torn)
    assert verify(path).ok and verify(path).entries == 5


def test_a_keyed_log_is_not_continued_without_its_key(tmp_path, keyed_env, monkeypatch):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync=False)
    log.record(who="x", rpc="Screen", outcome="OK")
    log.close()
    monkeypatch.delenv("MEMGUARD_AUDIT_KEY")
    with pytest.raises(MissingResource, match="keyed"):
        AuditLog(path, fsync=False)
    with pytest.raises(MissingResource, match="no audit key"):
        AuditLog(tmp_path / "new.jsonl", require_key=True)       # what a server off loopback asks


def test_protect_and_unprotect_do_not_take_effect_without_their_entry(live):
    server, keys, path, engine, _ = live
    audit_log = server.server.audit.log

    def fail(**kw):
        raise OSError("disk full")
    real = audit_log.record
    audit_log.record = fail
    try:
        with channel(server) as ch:
            admin = admin_pb2_grpc.IndexAdminStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                admin.Protect(admin_pb2.ProtectRequest(image=admin_pb2.ProtectImage(image=PNG), reason="takedown #2"),
                              metadata=bearer(keys["ops"]))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert engine.protected == []                        # nothing was protected
    finally:
        audit_log.record = real


# ----------------------------------------------------------------------------- findings 5 and 10
def test_no_name_or_reason_in_the_log_and_matched_lists_the_real_match(live):
    server, keys, path, _, stop = live
    with channel(server) as ch:
        admin, stub = admin_pb2_grpc.IndexAdminStub(ch), memguard_pb2_grpc.MemGuardStub(ch)
        admin.Protect(admin_pb2.ProtectRequest(face=admin_pb2.ProtectFace(identity=NAME, photos=[PNG]), reason=REASON),
                      metadata=bearer(keys["ops"]))
        admin.Unprotect(admin_pb2.UnprotectRequest(id=NAME, reason=REASON), metadata=bearer(keys["ops"]))
        stub.Screen(pb.ScreenRequest(image=PNG, request_id="people-1"), metadata=bearer(keys["screener"]))
    stop()
    text = path.read_text()
    assert NAME not in text and "Jane" not in text and "4411" not in text
    log = entries(path)
    protect = [e for e in log if e["rpc"] == "Protect"]
    unprotect = [e for e in log if e["rpc"] == "Unprotect"]
    assert protect and unprotect
    tags = {e["details"]["subject_tag"] for e in protect + unprotect}
    assert len(tags) == 1 and next(iter(tags)).startswith("hmac:")   # one person, one tag: linkable, not readable
    assert {e["details"]["reason_tag"] for e in protect + unprotect} == {next(iter(
        {e["details"]["reason_tag"] for e in protect}))}
    screen = next(e for e in log if e["rpc"] == "Screen")
    matched = screen["details"]["matched"]
    assert "the-real-copy" in matched and not any(m.startswith("candidate-") for m in matched)
    assert any(m.startswith("hmac:") for m in matched)           # the protected face, as a tag


# ----------------------------------------------------------------------------- finding 7
def test_refusals_are_aggregated_and_caller_strings_stay_out(live):
    server, keys, path, _, stop = live
    before = path.stat().st_size
    ids = ["r" * 128, "x" * 256, "bad id with spaces", "é" * 40]
    codes = []
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        for i in range(300):
            with pytest.raises(grpc.RpcError) as err:
                stub.Screen(pb.ScreenRequest(image=PNG, request_id=ids[i % 4]), metadata=bearer(new_key()))
            codes.append(err.value.code())
        with pytest.raises(grpc.RpcError):
            stub.Screen(pb.ScreenRequest(image=PNG, request_id="ok-id"), metadata=bearer(keys["screener"][:-1] + "x"))
    assert codes.count(grpc.StatusCode.UNAUTHENTICATED) == 75      # the valid ids
    assert codes.count(grpc.StatusCode.INVALID_ARGUMENT) == 225    # refused before auth
    stop()
    text = path.read_text()
    assert "rrrrrrrr" not in text and "xxxxxxxx" not in text and "ok-id" not in text
    refusals = [e for e in entries(path) if e["outcome"] == "UNAUTHENTICATED"]
    assert len(refusals) == 1 and refusals[0]["details"]["count"] == 76
    assert refusals[0]["details"]["peer"].startswith("ipv") and refusals[0]["request_id"] == ""
    assert path.stat().st_size - before < 2000


def test_a_server_that_fails_to_start_releases_its_audit_log(tmp_path, keyed_env):
    from memguard.server.app import BackgroundServer

    class Broken(GuardLikeEngine):
        def __init__(self):
            pass

        def warmup(self):
            raise RuntimeError("no model")

        name, guarded = "broken", True

    path = tmp_path / "audit.jsonl"
    server = BackgroundServer(make_config(audit_log=str(path)), Broken())
    with pytest.raises(Exception):
        server.start()
    AuditLog(path, fsync=False).close()               # not left locked by the failed start
    assert verify(path).ok
