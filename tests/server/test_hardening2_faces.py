"""Issue 29: Screen's and generation's face scope. By default a matched face counts only when it is a
protected identity: a face of a training-set person is neither counted in `faces_matched` nor called
PROTECTED_FACE, so no caller learns who is in the training set (`face_match_scope = "any"` opts in).
One setting, `server.face_match_scope`, decides for Screen and for guarded generation. Live servers on
loopback over a real fingerprint index whose training set holds a portrait."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memguard.engine import EngineConfig, IndexGateway, PipelineEngine
from memguard.errors import InvalidInput
from memguard.proto.memguard.v1 import admin_pb2, admin_pb2_grpc, memguard_pb2 as pb, memguard_pb2_grpc
from memguard.server.app import BackgroundServer
from memguard.server.config import ServerConfig, load_config
from memguard.server.convert import encode_png
from fuzz_server import _many_faces
from hardening_lib import bearer, write_keys
from server_testlib import channel, make_config

pytest.importorskip("memguard.index.api", reason="the fingerprint index package is not installed")
skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def face_index(tmp_path_factory, tiny_pipe):
    """An index whose training set holds the astronaut portrait (faces on) and three faceless items."""
    from memguard.index.api import FingerprintIndex
    from memguard.index.sources import ImageFolderSource

    tmp = tmp_path_factory.mktemp("faces")
    tiny_pipe.vae.save_pretrained(tmp / "vae")
    (tmp / "images").mkdir()
    Image.fromarray(skimage_data.astronaut()).resize((128, 128)).save(tmp / "images" / "astronaut.png")
    rng = np.random.default_rng(0)
    for i in range(3):
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((64, 64), Image.BILINEAR).save(tmp / "images" / f"item{i}.png")
    FingerprintIndex.build(tmp / "index", ImageFolderSource(tmp / "images"), model_dir=tmp / "vae", progress=False)
    keys = write_keys(tmp / "keys.toml", {"screener": ["screen"], "auditor": ["screen", "audit"], "admin": ["admin"]})
    return tmp, keys


def _server(face_index, tiny_pipe, index_dir=None, **overrides):
    tmp, _ = face_index
    index_dir = index_dir or tmp / "index"
    engine = PipelineEngine(tiny_pipe, IndexGateway.open(str(index_dir), model_dir=str(tmp / "vae")))
    server = BackgroundServer(make_config(auth_file=str(tmp / "keys.toml"), **overrides), engine)
    server.start()
    return server, engine


def _screen(server, key: str, image: np.ndarray) -> pb.ScreenResponse:
    with channel(server) as ch:
        return memguard_pb2_grpc.MemGuardStub(ch).Screen(pb.ScreenRequest(image=encode_png(image)),
                                                         metadata=bearer(key))


def test_a_training_set_face_is_not_reported_to_a_screen_key_by_default(face_index, tiny_pipe, tmp_path):
    import shutil

    tmp, keys = face_index
    tiled = _many_faces(2)       # four copies of the training portrait's face; not a copy of the portrait
    index_dir = Path(shutil.copytree(tmp / "index", tmp_path / "index"))    # this test protects a face
    server, engine = _server(face_index, tiny_pipe, index_dir)
    try:
        assert server.server.config.face_match_scope == ServerConfig().face_match_scope == "protected"
        plain = _screen(server, keys["screener"], tiled)
        assert (plain.copy_detected, plain.faces_detected, plain.faces_matched) == (False, 4, 0)
        assert plain.reason == pb.REASON_NONE
        # the audit key sees the index's own verdict in the detail: training-set matches, none protected
        audited = _screen(server, keys["auditor"], tiled)
        faces = audited.audit["faces"]
        assert audited.faces_matched == 0 and audited.reason == pb.REASON_NONE
        assert len(faces) == 4 and all(f["matched"] and not f["protected"] for f in faces)
        # once the person is protected, the same picture is a protected face for every screen key
        face = Image.fromarray(skimage_data.astronaut()).crop((150, 20, 290, 190))
        buf = io.BytesIO()
        face.save(buf, format="PNG")
        with channel(server) as ch:
            admin_pb2_grpc.IndexAdminStub(ch).Protect(
                admin_pb2.ProtectRequest(face=admin_pb2.ProtectFace(identity="eileen", photos=[buf.getvalue()]),
                                         reason="takedown #7"), metadata=bearer(keys["admin"]))
        protected = _screen(server, keys["screener"], tiled)
        assert protected.faces_matched == 4 and protected.reason == pb.REASON_PROTECTED_FACE
    finally:
        server.stop()
        engine.index.close()


def test_scope_any_is_an_explicit_choice(face_index, tiny_pipe, tmp_path):
    _, keys = face_index
    path = tmp_path / "server.toml"
    path.write_text('[server]\nface_match_scope = "any"\n')
    assert load_config(path).face_match_scope == "any"
    server, engine = _server(face_index, tiny_pipe, face_match_scope="any")
    try:
        any_face = _screen(server, keys["screener"], _many_faces(2))
        assert any_face.faces_matched == 4 and any_face.reason == pb.REASON_PROTECTED_FACE
    finally:
        server.stop()
        engine.index.close()


def test_one_setting_decides_for_screen_and_generation(tmp_path):
    """The engine a server loads takes the server's face scope (guarded generation obfuscates the same
    faces Screen counts); the engine section cannot set a second one."""
    for scope in ("protected", "any"):
        server = BackgroundServer(make_config(face_match_scope=scope, engine_spec="memguard.guarded_engine:GuardedEngine",
                                              engine=EngineConfig(tiny_random=True)))
        server.start()
        try:
            assert server.server.engine.pipeline.config.face_match_scope == scope
        finally:
            server.stop()
    path = tmp_path / "server.toml"
    path.write_text('[engine]\nface_match_scope = "any"\n')
    with pytest.raises(InvalidInput, match="server.face_match_scope"):
        load_config(path)


def test_generation_checks_its_obfuscation_against_the_faces_in_scope(face_index):
    """After blurring the faces in scope, the re-screen must not count a training-set face the scope left
    alone (it used to: a picture with a protected and a training-set face was BLOCKED). A real index;
    its own tiny pipeline (the guard installs attention processors)."""
    import torch

    from memguard.index.api import FingerprintIndex
    from memguard.models import build_tiny_pipeline
    from memguard.pipeline import GuardConfig, GuardedPipeline, PipelineStats

    tmp, _ = face_index
    torch.manual_seed(0)
    pipe = build_tiny_pipeline()
    with FingerprintIndex.open(tmp / "index", model_dir=tmp / "vae") as index:
        training_faces = _many_faces(2)
        assert any(f.matched and not f.protected for f in index.screen(training_faces).faces)
        clean = {scope: GuardedPipeline(pipe, index=index, config=GuardConfig(face_match_scope=scope))
                 ._clean_after_obfuscation(training_faces, PipelineStats(1, 1, 1)) for scope in ("protected", "any")}
    assert clean == {"protected": True, "any": False}
