"""Encoders, PDQ and faces on their own."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from memguard.errors import InvalidInput, MissingResource
from memguard.index.encoders import ClipEncoder, LatentEncoder, square_resize, vae_location
from memguard.index.faces import FaceEmbedder, model_dir
from memguard.index.pdq import pdq_hash
from memguard.index.vectors import hamming
from memguard.kernels.fingerprint import latent_fingerprint


def test_latent_encoder_is_the_shared_fingerprint_of_the_posterior_mean(vae_dir, items):
    enc = LatentEncoder(vae_dir)
    images = [items[0].image, items[-1].image]
    got = enc.encode(images)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        mean = enc.vae.encode(x).latent_dist.mean
    np.testing.assert_allclose(got, latent_fingerprint(mean).numpy(), atol=1e-5)
    assert got.shape == (2, 256) and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    big = np.asarray(Image.fromarray(items[0].image).resize((128, 128), Image.LANCZOS))
    assert float(enc.encode([big])[0] @ got[0]) > 0.9     # any size in, same fingerprint space


def test_vae_locations_and_missing_models(vae_dir, tmp_path):
    assert vae_location(vae_dir) == (vae_dir, "vae")
    assert vae_location(vae_dir / "vae") == (vae_dir / "vae", None)
    with pytest.raises(MissingResource, match=str(tmp_path)):
        LatentEncoder(tmp_path)


def test_square_resize_crops_the_centre():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 255
    out = square_resize(img, 20)
    assert out.shape == (20, 20, 3) and out.min() > 200


def test_pdq_separates_copies_from_distinct_images(heldout):
    codes = np.stack([pdq_hash(h.image)[0] for h in heldout[:20]])
    buf = io.BytesIO()
    Image.fromarray(heldout[0].image).save(buf, "JPEG", quality=50)
    jpeg = pdq_hash(np.asarray(Image.open(buf)))[0]
    assert hamming(codes[:1], codes[:1])[0, 0] == 0
    assert hamming(jpeg[None], codes[:1])[0, 0] <= 31
    distinct = hamming(codes, codes)[~np.eye(20, dtype=bool)]
    assert distinct.min() > 31
    with pytest.raises(InvalidInput) as err:
        pdq_hash(np.zeros((4, 4, 3), np.uint8))
    assert err.value.field == "image"
    with pytest.raises(InvalidInput):
        pdq_hash(np.zeros((64, 64, 3), np.float32))


def test_faces_are_found_in_64px_testbed_photos_only_where_there_are_faces(items):
    model_dir()   # the .dat files are located without importing face_recognition_models
    emb = FaceEmbedder()
    photos = {i.item_id: i.image for i in items if i.kind == "photo"}
    assert len(emb.detect(photos["photo-astronaut"])) == 1
    assert len(emb.detect(photos["photo-grace_hopper"])) == 1
    assert emb.detect(photos["photo-coffee"]) == [] and emb.detect(items[0].image) == []
    a = emb.detect(photos["photo-astronaut"])[0].descriptor
    b = emb.detect(photos["photo-grace_hopper"])[0].descriptor
    assert a.shape == (128,) and np.linalg.norm(a - b) > 0.6


def test_clip_encoder_loads_local_weights_only(tmp_path, items):
    import open_clip
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                           "head_width": 32},
           "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "MemGuardTinyClip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "MemGuardTinyClip.json")
    torch.manual_seed(3)
    model = open_clip.create_model("MemGuardTinyClip")
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    enc = ClipEncoder("MemGuardTinyClip", tmp_path / "tiny.pt")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(enc.model.state_dict()[name], tensor)
    out = enc.encode([items[0].image, items[1].image])
    assert out.shape == (2, 32) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    with pytest.raises(MissingResource, match="never attempted"):
        ClipEncoder("MemGuardTinyClip", tmp_path / "absent.pt")


def test_an_index_with_clip_embeddings_screens_on_all_signals(tmp_path, items, vae_dir):
    import open_clip

    from memguard.index.api import FingerprintIndex
    from memguard.index.config import IndexConfig
    from memguard.index.sources import ImageFolderSource
    from memguard.testbed.dataset import write_image_folder
    cfg = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 1, "layers": 1}}
    (tmp_path / "MemGuardTinyClip2.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "MemGuardTinyClip2.json")
    torch.save(open_clip.create_model("MemGuardTinyClip2").state_dict(), tmp_path / "w.pt")
    folder = write_image_folder(items[:12], tmp_path / "imgs")
    FingerprintIndex.build(tmp_path / "ix", ImageFolderSource(folder), model_dir=vae_dir, clip_model="MemGuardTinyClip2",
                           clip_weights=tmp_path / "w.pt", cfg=IndexConfig(faces=False), progress=False)
    with FingerprintIndex.open(tmp_path / "ix") as ix:
        assert ix.stats()["signals"]["clip"]["dim"] == 24
        assert ix.manifest.models["clip"]["model"] == "MemGuardTinyClip2"
        result = ix.screen(items[4].image)
        top = result.copies[0]
        assert top.item_id == items[4].item_id and set(top.signals) == {"latent", "pdq", "clip", "aligned"}
        assert top.signals["clip"].score == pytest.approx(1.0, abs=1e-4)


def test_clip_text_side_embeds_captions_and_names_bad_fields():
    from memguard.calibrate import CLIP_MODEL, CLIP_WEIGHTS
    from memguard.errors import InvalidInput
    if not CLIP_WEIGHTS.is_file():
        pytest.skip("the testbed CLIP is not in this checkout")
    enc = ClipEncoder(CLIP_MODEL, CLIP_WEIGHTS)
    rng = np.random.default_rng()
    texts = ["a red circle on a blue striped background", "an orange square on a green plain background", "x"]
    t = enc.encode_text(texts)
    assert t.shape == (3, enc.dim) and np.allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    with pytest.raises(InvalidInput) as err:
        enc.encode_text(["ok", 3])
    assert err.value.field == "texts[1]"


def test_an_index_finds_its_clip_weights_when_moved(tmp_path, monkeypatch):
    """The recorded absolute path is gone (another machine, a copied index): the weights are found
    relative to the index or among the bundled ones, by sha256; other weights are refused by name."""
    import shutil
    from memguard.index.api import FingerprintIndex
    from memguard.index.encoders import BUNDLED_CLIP_WEIGHTS
    from memguard.index.manifest import read_manifest, write_manifest
    src = BUNDLED_CLIP_WEIGHTS.parents[1] / "eps" / "index"
    if not (src / "clip.npy").is_file():
        pytest.skip("the shipped eps index carries no clip signal")
    monkeypatch.delenv("MEMGUARD_CLIP_WEIGHTS", raising=False)
    copy = tmp_path / "moved"
    shutil.copytree(src, copy)
    manifest = read_manifest(copy)
    manifest.models["clip"].update(path=str(tmp_path / "gone.safetensors"), relpath="../nowhere.safetensors")
    write_manifest(copy, manifest)
    with FingerprintIndex.open(copy) as ix:
        assert ix.clip_encoder().weights == BUNDLED_CLIP_WEIGHTS
    other = tmp_path / "other.safetensors"
    other.write_bytes(BUNDLED_CLIP_WEIGHTS.read_bytes()[:-1] + b"\0")
    with FingerprintIndex.open(copy, clip_weights=other) as ix:
        with pytest.raises(InvalidInput) as err:
            ix.clip_encoder()
    assert err.value.field == "clip_weights" and "sha256" in str(err.value)
    with FingerprintIndex.open(copy, clip_weights=tmp_path / "absent") as ix:
        with pytest.raises(InvalidInput) as err:
            ix.clip_encoder()
    assert err.value.field == "clip_weights"
