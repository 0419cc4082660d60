"""Optional TLS: a server with a certificate, the Python client trusting it as its CA."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from memguard.types import Decision, GenerationRequest
from memguard.server.client import Connection, RemoteError, health_status, remote_generate

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed to make a test certificate")


def test_tls_round_trip_and_plaintext_refused(engine, serve, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = serve(engine, tls_cert=str(cert), tls_key=str(key))
    secure = Connection(server.target, tls_ca=str(cert), timeout=120)
    assert health_status(secure) == "SERVING"
    [image] = remote_generate(secure, GenerationRequest(prompt="a secure apple", steps=2, seed=1))
    assert image.decision is Decision.ALLOWED and image.image.shape == (64, 64, 3)
    with pytest.raises(RemoteError) as err:
        remote_generate(Connection(server.target, timeout=10), GenerationRequest(prompt="plain", steps=2))
    assert err.value.code.name == "UNAVAILABLE"
