"""Screen and IndexAdmin against a real fingerprint index (memguard.index) built on the fly."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from memguard.engine import IndexGateway, PipelineEngine
from memguard.proto.memguard.v1 import admin_pb2, admin_pb2_grpc, memguard_pb2 as pb, memguard_pb2_grpc
from memguard.server.app import BackgroundServer
from memguard.server.auth import key_entry, new_key
from memguard.server.convert import encode_png
from server_testlib import channel, make_config, metric

pytest.importorskip("memguard.index.api", reason="the fingerprint index package is not installed")


def smooth_image(rng: np.random.Generator) -> np.ndarray:
    """A 64×64 picture with structure (upsampled noise), unlike any other draw."""
    return np.asarray(Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((64, 64), Image.BILINEAR))


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_pipe):
    from memguard.index.api import FingerprintIndex
    from memguard.index.config import IndexConfig
    from memguard.index.sources import ImageFolderSource

    tmp = tmp_path_factory.mktemp("index")
    tiny_pipe.vae.save_pretrained(tmp / "vae")
    rng = np.random.default_rng(0)
    images = [smooth_image(rng) for _ in range(6)]
    (tmp / "images").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp / "images" / f"item{i}.png")
    FingerprintIndex.build(tmp / "index", ImageFolderSource(tmp / "images"), model_dir=tmp / "vae",
                           cfg=IndexConfig(faces=False), progress=False)
    keys = {"screener": new_key(), "auditor": new_key(), "admin": new_key()}
    scopes = {"screener": ["screen"], "auditor": ["screen", "audit"], "admin": ["admin"]}
    lines = [f'[[keys]]\nname = "{n}"\nsha256 = "{key_entry(n, k, scopes[n])["sha256"]}"\n'
             f'scopes = [{", ".join(repr(s).replace(chr(39), chr(34)) for s in scopes[n])}]\n' for n, k in keys.items()]
    (tmp / "keys.toml").write_text("\n".join(lines))
    engine = PipelineEngine(tiny_pipe, IndexGateway.open(str(tmp / "index"), model_dir=str(tmp / "vae")))
    server = BackgroundServer(make_config(auth_file=str(tmp / "keys.toml")), engine)
    server.start()
    yield server, images, keys, rng
    server.stop()
    engine.index.close()


def auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def test_screen_finds_training_copies_and_hides_membership_details(indexed):
    server, images, keys, rng = indexed
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        copy = stub.Screen(pb.ScreenRequest(image=encode_png(images[2])), metadata=auth(keys["screener"]))
        audited = stub.Screen(pb.ScreenRequest(image=encode_png(images[2])), metadata=auth(keys["auditor"]))
        novel = stub.Screen(pb.ScreenRequest(image=encode_png(smooth_image(rng))), metadata=auth(keys["screener"]))
    assert copy.copy_detected and copy.reason == pb.REASON_MEMORIZATION
    assert not copy.HasField("audit") and b"item2" not in copy.SerializeToString()
    assert audited.copy_detected and "item2" in str(audited.audit)
    assert not novel.copy_detected and novel.reason == pb.REASON_NONE
    assert metric(server, "memguard_index_search_duration_seconds_count") >= 3
    assert metric(server, "memguard_index_items", set="training") == 6


def test_protect_takes_effect_at_once_and_unprotect_lifts_it(indexed):
    server, _, keys, rng = indexed
    image = smooth_image(rng)
    png = encode_png(image)
    with channel(server) as ch:
        stub, admin = memguard_pb2_grpc.MemGuardStub(ch), admin_pb2_grpc.IndexAdminStub(ch)
        screen = lambda: stub.Screen(pb.ScreenRequest(image=png), metadata=auth(keys["screener"])).copy_detected
        assert not screen()
        protected = admin.Protect(admin_pb2.ProtectRequest(image=admin_pb2.ProtectImage(image=png),
                                                           reason="takedown #7"), metadata=auth(keys["admin"]))
        assert protected.id
        assert screen()
        assert admin.GetIndexStats(admin_pb2.GetIndexStatsRequest(), metadata=auth(keys["admin"])).protected_items == 1
        assert metric(server, "memguard_index_items", set="protected") == 1
        removed = admin.Unprotect(admin_pb2.UnprotectRequest(id=protected.id, reason="appeal granted"),
                                  metadata=auth(keys["admin"]))
        assert removed.removed and not screen()
    assert metric(server, "memguard_protect_operations_total", operation="protect_image", outcome="ok") == 1
    assert metric(server, "memguard_protect_operations_total", operation="unprotect", outcome="ok") == 1


def test_protect_retried_with_its_idempotency_key_makes_one_protection(indexed):
    """A client retry after a lost reply returns the first receipt instead of a duplicate."""
    server, _, keys, rng = indexed
    png = encode_png(smooth_image(rng))
    request = admin_pb2.ProtectRequest(image=admin_pb2.ProtectImage(image=png), reason="takedown #9",
                                       idempotency_key="client-retry-0001")
    with channel(server) as ch:
        admin = admin_pb2_grpc.IndexAdminStub(ch)
        before = admin.GetIndexStats(admin_pb2.GetIndexStatsRequest(), metadata=auth(keys["admin"])).protected_items
        first = admin.Protect(request, metadata=auth(keys["admin"]))
        again = admin.Protect(request, metadata=auth(keys["admin"]))
        after = admin.GetIndexStats(admin_pb2.GetIndexStatsRequest(), metadata=auth(keys["admin"])).protected_items
    assert first.id and again.id == first.id
    assert after == before + 1
