"""Keys and transport: the key never on stdout, no plaintext keys off loopback, mTLS, SIGHUP reload."""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from memguard.errors import InvalidInput
from memguard.types import Decision, GenerationRequest
from memguard.proto.memguard.v1 import memguard_pb2 as pb, memguard_pb2_grpc
from memguard.server.cli import _apikey, api_key
from memguard.server.client import Connection, RemoteError, health_status, remote_generate, wait_until_serving
from memguard.server.config import ServerConfig
from server_testlib import wait_for
from hardening_lib import bearer, write_keys

ROOT = Path(__file__).resolve().parents[2]
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed for certificates")


def test_apikey_prints_the_key_on_stderr_only(capsys):
    assert _apikey(argparse.Namespace(name="frontend", scopes="generate,guard_override")) == 0
    out, err = capsys.readouterr()
    key = err.strip().rsplit(" ", 1)[-1]
    assert key.startswith("mg_") and key not in out
    assert 'name = "frontend"' in out and '"guard_override"' in out and "sha256" in out


def test_plaintext_keys_off_loopback_need_insecure(tmp_path):
    keys = tmp_path / "keys.toml"
    write_keys(keys, {"a": ["generate"]})
    with pytest.raises(InvalidInput, match="--insecure"):
        ServerConfig(host="0.0.0.0", auth_file=str(keys)).validate()
    ServerConfig(host="0.0.0.0", auth_file=str(keys), insecure=True).validate()
    ServerConfig(host="127.0.0.1", auth_file=str(keys)).validate()
    with pytest.raises(InvalidInput, match="tls_client_ca"):
        ServerConfig(tls_client_ca=str(keys)).validate()


def test_api_key_from_flag_file_or_environment(tmp_path, monkeypatch):
    path = tmp_path / "key"
    path.write_text("mg_from_file\n")
    monkeypatch.setenv("MEMGUARD_API_KEY", "mg_from_env")
    ns = lambda **kw: argparse.Namespace(**{"api_key": None, "api_key_file": None, **kw})
    assert api_key(ns(api_key="mg_flag")) == "mg_flag"
    assert api_key(ns(api_key_file=path)) == "mg_from_file"
    assert api_key(ns()) == "mg_from_env"
    with pytest.raises(InvalidInput, match="api_key_file"):
        api_key(ns(api_key_file=tmp_path / "missing"))


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}-ca.key", d / f"{name}-ca.pem"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name} CA",
            "-keyout", str(key), "-out", str(cert))
    return key, cert


def issue(d: Path, ca: tuple[Path, Path], name: str, server: bool) -> tuple[Path, Path]:
    key, csr, cert, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n" if server else "extendedKeyUsage=clientAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr))
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]), "-CAcreateserial",
            "-days", "1", "-extfile", str(ext), "-out", str(cert))
    return cert, key


@needs_openssl
def test_mtls_requires_a_client_certificate_and_reload_swaps_the_server_certificate(engine, serve, tmp_path):
    ca1, ca2 = make_ca(tmp_path, "one"), make_ca(tmp_path, "two")
    cert, key = issue(tmp_path, ca1, "server", True)
    client_cert, client_key = issue(tmp_path, ca1, "client", False)
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(cert, live_cert), shutil.copy(key, live_key)
    server = serve(engine, tls_cert=str(live_cert), tls_key=str(live_key), tls_client_ca=str(ca1[1]))
    request = GenerationRequest(prompt="a mutual apple", steps=1, seed=1)
    with_cert = Connection(server.target, tls_ca=str(ca1[1]), timeout=60, tls_cert=str(client_cert),
                           tls_key=str(client_key))
    [image] = remote_generate(with_cert, request)
    assert image.decision is Decision.ALLOWED
    with pytest.raises(RemoteError) as err:
        remote_generate(Connection(server.target, tls_ca=str(ca1[1]), timeout=20), request)
    assert err.value.code.name == "UNAVAILABLE"
    # SIGHUP's reload: a certificate from another CA is served to new connections, no restart
    cert2, key2 = issue(tmp_path, ca2, "server2", True)
    shutil.copy(cert2, live_cert), shutil.copy(key2, live_key)
    assert server.server.reload()
    wait_for(lambda: health_status(Connection(server.target, tls_ca=str(ca2[1]), timeout=5,
                                              tls_cert=str(client_cert), tls_key=str(client_key))) == "SERVING",
             timeout=30)
    live_key.write_text("not a key")                    # a bad file keeps the current identity
    assert not server.server.reload()
    assert health_status(Connection(server.target, tls_ca=str(ca2[1]), timeout=5, tls_cert=str(client_cert),
                                    tls_key=str(client_key))) == "SERVING"


def test_sighup_reloads_the_key_file_of_the_cli_server(tmp_path):
    keys_file = tmp_path / "keys.toml"
    old = write_keys(keys_file, {"old": ["generate"]})
    port = __import__("memguard.benchmarks.load", fromlist=["free_port"]).free_port()
    cmd = [sys.executable, "-m", "memguard.cli", "serve", "--engine", "memguard.engine:PipelineEngine", "--tiny-random",
           "--no-index", "--port", str(port), "--metrics-port", "-1", "--torch-threads", "1",
           "--auth-file", str(keys_file)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    target = f"127.0.0.1:{port}"
    try:
        wait_until_serving(target, timeout=240, poll=0.3)

        def code(key: str) -> grpc.StatusCode:
            with grpc.insecure_channel(target) as ch:
                try:
                    memguard_pb2_grpc.MemGuardStub(ch).Generate(pb.GenerateRequest(prompt="x", steps=1),
                                                                metadata=bearer(key), timeout=60)
                except grpc.RpcError as exc:
                    return exc.code()
            return grpc.StatusCode.OK

        assert code(old["old"]) == grpc.StatusCode.OK
        new = write_keys(keys_file, {"new": ["generate"]})
        assert code(new["new"]) == grpc.StatusCode.UNAUTHENTICATED
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: code(new["new"]) == grpc.StatusCode.OK, timeout=30, poll=0.3)
        assert code(old["old"]) == grpc.StatusCode.UNAUTHENTICATED      # a revoked key is out at once
        keys_file.write_text("[[keys]]\nname = broken")                 # a broken file keeps the keys
        proc.send_signal(signal.SIGHUP)
        assert code(new["new"]) == grpc.StatusCode.OK
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.communicate()[0]
    assert "reload of keys failed" in log
