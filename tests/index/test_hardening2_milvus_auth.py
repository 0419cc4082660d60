"""Issue 29: the Milvus backend authenticates with a token from the environment only
($MEMGUARD_MILVUS_TOKEN or the file $MEMGUARD_MILVUS_TOKEN_FILE names), never from a command line or a
URI. pymilvus' real MilvusClient is constructed through our connect function (and through
FingerprintIndex.open of a Milvus-built index) against the session's milvus-lite server, which ignores
authentication; a subclass records the arguments it was given."""
from __future__ import annotations

import logging

import pytest
import pymilvus

from memguard.errors import InvalidInput
from memguard.index.api import FingerprintIndex
from memguard.index.backends import parse_backend
from memguard.index.backends import milvus_store
from memguard.index.backends.milvus_store import ENV_TOKEN, ENV_TOKEN_FILE, client, milvus_token


@pytest.fixture
def constructed(monkeypatch):
    """The keyword arguments of every MilvusClient our code constructs (the real client, connected)."""
    calls: list[dict] = []

    class Recording(pymilvus.MilvusClient):
        def __init__(self, *args, **kwargs):
            calls.append(dict(kwargs, args=args))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pymilvus, "MilvusClient", Recording)
    monkeypatch.setattr(milvus_store, "_clients", {})      # connect afresh (the cache is per process)
    monkeypatch.delenv(ENV_TOKEN, raising=False)
    monkeypatch.delenv(ENV_TOKEN_FILE, raising=False)
    return calls


def test_a_token_file_reaches_the_milvus_client(constructed, milvus_uri, tmp_path, monkeypatch):
    token_file = tmp_path / "milvus.token"
    token_file.write_text("memguard:s3cret-1\n")
    token_file.chmod(0o600)
    monkeypatch.setenv(ENV_TOKEN_FILE, str(token_file))
    c = client(parse_backend(milvus_uri))
    assert constructed[-1]["uri"] == milvus_uri and constructed[-1]["token"] == "memguard:s3cret-1"
    assert isinstance(c.list_collections(), list)          # a working client (milvus-lite ignores auth)
    assert client(parse_backend(milvus_uri)) is c           # one client per URI and token


def test_the_token_variable_reaches_the_client_of_an_opened_index(constructed, build_on, milvus_uri, monkeypatch):
    directory = build_on(milvus_uri)                       # the session's index, built on milvus-lite
    constructed.clear()
    monkeypatch.setenv(ENV_TOKEN, "memguard:s3cret-2")
    with FingerprintIndex.open(directory) as ix:
        assert ix.stats()["counts"]["items"] > 0
    assert constructed and all(c.get("token") == "memguard:s3cret-2" for c in constructed)
    assert "s3cret" not in (directory / "manifest.json").read_text()


def test_no_token_no_argument_and_both_sources_refused(constructed, milvus_uri, tmp_path, monkeypatch):
    client(parse_backend(milvus_uri))
    assert "token" not in constructed[-1]
    monkeypatch.setenv(ENV_TOKEN, "a:b")
    monkeypatch.setenv(ENV_TOKEN_FILE, str(tmp_path / "t"))
    with pytest.raises(InvalidInput, match=ENV_TOKEN):
        milvus_token()


def test_a_readable_token_file_is_warned_about(constructed, tmp_path, monkeypatch, caplog):
    token_file = tmp_path / "milvus.token"
    token_file.write_text("memguard:s3cret-3")
    token_file.chmod(0o644)
    monkeypatch.setenv(ENV_TOKEN_FILE, str(token_file))
    with caplog.at_level(logging.WARNING):
        assert milvus_token() == "memguard:s3cret-3"
    assert "readable by others" in caplog.text and "s3cret" not in caplog.text


@pytest.mark.parametrize("uri", ["milvus://root:s3cret@milvus:19530", "http://root:s3cret@milvus:19530",
                                 "https://key@milvus.example:443"])
def test_credentials_in_a_uri_are_refused_without_echoing_them(uri):
    with pytest.raises(InvalidInput) as err:
        parse_backend(uri, "backend")
    assert "s3cret" not in str(err.value) and ENV_TOKEN in str(err.value)


def test_no_command_line_takes_a_milvus_token():
    from memguard.cli import build_parser

    text = build_parser().format_help()
    for sub in ("index", "serve"):
        try:
            build_parser().parse_args([sub, "--milvus-token", "x"])
        except SystemExit:
            continue
        pytest.fail(f"{sub} accepted --milvus-token")
    assert "milvus-token" not in text
    assert milvus_store.ENV_TOKEN == "MEMGUARD_MILVUS_TOKEN"


def test_the_compose_stack_turns_milvus_authentication_on_and_hands_the_token_as_a_secret():
    from pathlib import Path

    import yaml

    deploy = Path(__file__).resolve().parents[2] / "deploy"
    compose = yaml.safe_load((deploy / "docker-compose.yml").read_text())
    milvus = compose["services"]["milvus"]
    [config] = milvus["configs"]
    assert config["target"] == "/milvus/configs/user.yaml"
    user_yaml = yaml.safe_load(compose["configs"][config["source"]]["content"])
    assert user_yaml["common"]["security"]["authorizationEnabled"] is True
    assert user_yaml["common"]["security"]["defaultRootPassword"].startswith("${MILVUS_ROOT_PASSWORD:?")
    for name in ("memguard", "migrate"):
        service = compose["services"][name]
        token_file = service["environment"][ENV_TOKEN_FILE]
        secret = token_file.removeprefix("/run/secrets/")
        assert secret in service["secrets"] and secret in compose["secrets"]
        assert not any("token" in arg.lower() or "@" in arg for arg in service["command"])
        assert ENV_TOKEN not in service["environment"]     # a file, not a value in the compose file
