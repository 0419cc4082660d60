"""Configuration file, flags, and the stub-currency check."""
from __future__ import annotations

import pytest

from guard.cli import build_parser
from guard.errors import InvalidInput
from guard.types import GuardMode
from server.cli import build_config
from server.config import ServerConfig, load_config
from server.protogen import stale_files


def test_committed_stubs_match_a_fresh_protoc_run():
    assert stale_files() == []


def test_toml_sections_and_flag_overrides(tmp_path):
    path = tmp_path / "memguard.toml"
    path.write_text('[server]\nport = 6000\ndefault_mode = "monitor"\n'
                    '[engine]\nengine = "guard.engine:PipelineEngine"\nmodel = "/models/sd"\n'
                    '[batching]\nmax_batch_images = 4\n[limits]\nsizes = [64, 128]\n')
    config = load_config(path)
    assert config.port == 6000 and config.default_mode is GuardMode.MONITOR
    assert config.engine.model == "/models/sd" and config.batching.max_batch_images == 4
    assert config.limits.sizes == (64, 128)
    args = build_parser().parse_args(["serve", "--config", str(path), "--port", "7000", "--max-queue", "5",
                                      "--tiny-random", "--no-index"])
    merged = build_config(args)
    assert merged.port == 7000 and merged.batching.max_queue == 5 and merged.batching.max_batch_images == 4
    assert merged.engine.tiny_random and merged.engine.index is None and merged.engine.model == "/models/sd"


def test_unknown_setting_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[batching]\nmax_batch = 4\n")
    with pytest.raises(InvalidInput, match="batching.max_batch"):
        load_config(path)


def test_no_auth_is_loopback_only():
    ServerConfig(host="127.0.0.1").validate()
    with pytest.raises(InvalidInput, match="auth_file"):
        ServerConfig(host="0.0.0.0").validate()
