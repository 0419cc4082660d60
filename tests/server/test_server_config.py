"""Configuration file, flags, and the stub-currency check."""
from __future__ import annotations

import pytest

from memguard.cli import build_parser
from memguard.errors import InvalidInput
from memguard.types import GuardMode
from memguard.server.cli import build_config
from memguard.server.config import ServerConfig, load_config
from memguard.server.protogen import stale_files


def test_committed_stubs_match_a_fresh_protoc_run():
    assert stale_files() == []


def test_toml_sections_and_flag_overrides(tmp_path):
    path = tmp_path / "memguard.toml"
    path.write_text('[server]\nport = 6000\ndefault_mode = "monitor"\n'
                    '[engine]\nengine = "memguard.engine:PipelineEngine"\nmodel = "/models/sd"\n'
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


def test_hardening_settings_load_and_bad_values_are_named(tmp_path):
    path = tmp_path / "memguard.toml"
    path.write_text('[server]\nallow_mode_override = true\nface_match_scope = "protected"\naudit_log = "a.jsonl"\n'
                    '[rate_limits]\ngenerate_per_s = 2.0\ngenerate_burst = 4\n'
                    '[uploads]\nmax_queue = 3\nformats = ["PNG"]\nmax_aspect_ratio = 4.0\n')
    config = load_config(path)
    assert config.allow_mode_override and config.face_match_scope == "protected" and config.audit_log == "a.jsonl"
    assert config.rate_limits.generate_per_s == 2.0 and config.rate_limits.generate_burst == 4
    assert config.uploads.max_queue == 3 and config.uploads.formats == ("PNG",)
    config.validate()
    for text, name in (('[server]\nface_match_scope = "some"\n', "face_match_scope"),
                       ("[rate_limits]\nscreen_per_s = -1\n", "rate_limits.screen_per_s"),
                       ('[uploads]\nformats = ["GIF"]\n', "uploads.formats")):
        path.write_text(text)
        with pytest.raises(InvalidInput, match=name):
            load_config(path).validate()
