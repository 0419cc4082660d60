"""search_latent, screen, protect/unprotect: effect at once, after reopen, across instances, under threads."""
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from memguard.errors import InvalidInput
from memguard.index.api import FingerprintIndex
from memguard.index.calibrate import aug_crop, aug_resize, lfw_faces


def _jpeg(img, quality=60):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def test_search_latent_returns_candidates_and_their_stored_vectors(index, items):
    fps = torch.from_numpy(index.latent_encoder().encode([items[3].image, items[40].image]))
    ids, scores, vectors = index.search_latent(fps, 5)
    assert [row[0] for row in ids] == [items[3].item_id, items[40].item_id]
    assert scores.shape == (2, 5) and vectors.shape == (2, 5, 256)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    torch.testing.assert_close(torch.einsum("bf,bkf->bk", fps, vectors), scores, atol=1e-5, rtol=0)
    stored = index.signals["latent"].vectors[index.items.row_of(ids[1][2])]
    torch.testing.assert_close(vectors[1, 2], torch.from_numpy(np.array(stored)))
    ids, scores, _ = index.search_latent(fps, 10_000)
    assert scores.shape[1] == len(items)


@pytest.mark.parametrize("bad, field", [(torch.zeros(3), "fingerprints"), (torch.zeros(2, 17), "fingerprints"),
                                        (torch.full((1, 256), float("nan")), "fingerprints")])
def test_search_latent_rejects_bad_input_naming_the_field(index, bad, field):
    with pytest.raises(InvalidInput) as err:
        index.search_latent(bad, 3)
    assert err.value.field == field
    with pytest.raises(InvalidInput) as err:
        index.search_latent(torch.zeros(1, 256), 0)
    assert err.value.field == "k"


def test_screen_finds_copies_and_passes_unseen_images(index, items, heldout):
    item = items[11]
    exact = index.screen(item.image)
    assert exact.is_copy and exact.copies[0].item_id == item.item_id
    assert exact.copies[0].signals["latent"].score == pytest.approx(1.0, abs=1e-4)
    assert exact.copies[0].signals["pdq"].score == 0 and not exact.protected
    recompressed = index.screen(_jpeg(aug_resize(item.image, np.random.default_rng(0))))
    assert recompressed.is_copy and recompressed.copies[0].item_id == item.item_id
    assert all(not index.screen(h.image).is_copy for h in heldout[:10])


def test_screen_reports_training_faces(index, items):
    astronaut = next(i for i in items if i.item_id == "photo-astronaut")
    faces = index.screen(astronaut.image).faces
    assert len(faces) == 1 and faces[0].matched and faces[0].item_id == "photo-astronaut"
    assert faces[0].distance < 0.05 and not faces[0].protected
    x0, y0, x1, y1 = faces[0].box
    assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
    assert index.screen(items[0].image).faces == []


def test_protect_image_takes_effect_at_once_and_survives_reopen(index_dir, heldout):
    target = heldout[5].image
    with FingerprintIndex.open(index_dir) as ix:
        assert not ix.screen(target).is_copy
        receipt = ix.protect_image(target, reason="takedown request #1", item_id="user-upload-1")
        result = ix.screen(_jpeg(target))
        assert result.is_copy and result.protected and result.copies[0].item_id == "user-upload-1"
        ids, scores, _ = ix.search_latent(torch.from_numpy(ix.latent_encoder().encode([target])), 3)
        assert ids[0][0] == "user-upload-1" and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
        assert ix.is_protected("user-upload-1")
    with FingerprintIndex.open(index_dir) as ix:
        assert ix.screen(target).protected
        assert ix.unprotect("user-upload-1", reason="request withdrawn") == [receipt.pid]
        assert not ix.screen(target).is_copy
        log = ix.registry.mutations()
        assert [m["op"] for m in log[:2]] == ["unprotect", "protect"] and log[0]["reason"] == "request withdrawn"
    with FingerprintIndex.open(index_dir) as ix:
        assert not ix.screen(target).is_copy and ix.stats()["counts"]["protected_images"] == 0
        with pytest.raises(InvalidInput) as err:
            ix.unprotect(receipt.pid, reason="again")
        assert err.value.field == "id"


def test_protection_needs_a_reason(index, heldout):
    with pytest.raises(InvalidInput) as err:
        index.protect_image(heldout[0].image, reason="  ")
    assert err.value.field == "reason"


def test_a_protected_face_matches_other_photos_of_the_person_and_not_other_people(index, full_photo):
    rng = np.random.default_rng(0)
    full = full_photo("astronaut")                        # 512×512 original
    enrol = [np.ascontiguousarray(full[0:300, 100:400])]  # a crop other than the training crop
    receipt = index.protect_face(enrol, identity="eileen-collins", reason="opt-out")
    assert receipt.kind == "face" and receipt.vectors == 1
    variants = [aug_crop(full, rng), _jpeg(np.asarray(Image.fromarray(full).resize((160, 160))), 40),
                np.asarray(Image.fromarray(full).resize((128, 128)))]
    for image in variants:
        faces = [f for f in index.screen(image).faces if f.protected]
        assert faces and faces[0].identity == "eileen-collins" and faces[0].matched, faces
        assert faces[0].distance <= index.thresholds.face
    strangers = [f for img in lfw_faces()[:30] for f in index.screen(img).faces]
    assert len(strangers) >= 20
    assert all(not (f.matched and f.identity == "eileen-collins") for f in strangers)
    to_her = [f.distance for f in strangers if f.identity == "eileen-collins"]
    assert all(d > index.thresholds.face for d in to_her)


def test_protect_face_without_a_face_names_the_image(index, items):
    with pytest.raises(InvalidInput) as err:
        index.protect_face([items[0].image], identity="nobody", reason="test")
    assert err.value.field == "images[0]"


def test_a_second_instance_sees_protections_without_reopening(index_dir, heldout):
    with FingerprintIndex.open(index_dir) as reader, FingerprintIndex.open(index_dir) as writer:
        assert not reader.screen(heldout[2].image).is_copy
        writer.protect_image(heldout[2].image, reason="cli protect while a server runs")
        assert reader.screen(heldout[2].image).protected
        writer.unprotect(writer.registry.mutations()[0]["pid"], reason="undo")
        assert not reader.screen(heldout[2].image).is_copy


def test_concurrent_searches_while_protecting(index):
    rng = np.random.default_rng(1)
    queries = torch.from_numpy(rng.standard_normal((4, 256)).astype(np.float32))
    queries = queries / queries.norm(dim=1, keepdim=True)
    protect_vecs = rng.standard_normal((30, 256)).astype(np.float32)
    errors, sizes = [], []
    stop = threading.Event()

    def reader():
        try:
            while not stop.is_set():
                ids, scores, vectors = index.search_latent(queries, 100)
                assert len(ids[0]) == scores.shape[1] == vectors.shape[1]
                torch.testing.assert_close(torch.einsum("bf,bkf->bk", queries, vectors), scores, atol=1e-4, rtol=0)
                sizes.append(scores.shape[1])
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    receipts = [index.protect_vectors("concurrency test", item_id=f"c-{i}", latent=v) for i, v in enumerate(protect_vecs)]
    for r in receipts[::2]:
        index.unprotect(r.pid, "concurrency test")
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
    assert len(sizes) > 0
    assert index.snapshot().count("latent") == 15
    ids, _, _ = index.search_latent(torch.from_numpy(protect_vecs[1:2] / np.linalg.norm(protect_vecs[1])), 1)
    assert ids[0][0] == "c-1"


def test_a_cropped_copy_stands_out_in_the_aligned_rescore(index_dir, items, heldout):
    """A crop moves every cell of the plain fingerprint; the aligned re-score undoes it, for a
    training photo and for a protected image alike, and unseen images stand out far less.
    (This index's VAE has random weights and its thresholds are not calibrated, so the test
    compares standout statistics; tests/guard/test_testbed_guard.py checks calibrated decisions.)"""
    import skimage.data

    from memguard.index.calibrate import aug_crop as crop

    def standout_of(ix, image):
        result = ix.screen(image)
        assert "aligned" in result.signals
        best = [m for m in result.matches if "aligned" in m.signals]
        assert len(best) == 1   # exactly one candidate carries the statistic
        sig = best[0].signals["aligned"]
        assert sig.crossed == (sig.score >= ix.thresholds.aligned)
        return best[0], sig.score

    coffee = next(i for i in items if i.item_id == "photo-coffee").image
    with FingerprintIndex.open(index_dir) as ix:
        assert ix.maps is not None and ix.maps.shape == (len(items), ix.manifest.maps["dim"])
        unseen = max(standout_of(ix, h.image)[1] for h in heldout[:10])
        match, z = standout_of(ix, crop(coffee, np.random.default_rng(4)))
        assert match.item_id == "photo-coffee" and z > unseen + 1
        plain = match.signals["latent"].score
        assert plain < 0.95   # the plain fingerprint alone would not call it a copy
        upload = np.asarray(Image.fromarray(skimage.data.immunohistochemistry()).resize((64, 64)))   # not indexed
        receipt = ix.protect_image(upload, reason="takedown request #7", item_id="user-upload-7")
        assert receipt.vectors == 3   # latent fingerprint, PDQ hash and the latent map
        match, z = standout_of(ix, crop(upload, np.random.default_rng(5)))
        assert match.item_id == "user-upload-7" and match.protected and z > unseen + 1


def test_a_large_registry_is_shortlisted_for_the_aligned_rescore(index_dir, heldout):
    """More protected images than the shortlist holds: the closest ones are re-scored, and a crop
    of one of them still finds it."""
    from memguard.index.align import ALIGN_SHORTLIST
    from memguard.index.calibrate import aug_crop as crop

    with FingerprintIndex.open(index_dir) as ix:
        uploads = [h.image for h in heldout] + [h.image[::-1].copy() for h in heldout]   # 80 images
        for k, image in enumerate(uploads):
            ix.protect_image(image, reason="bulk opt-out", item_id=f"upload-{k}")
        assert ix.snapshot().count("align") == len(uploads) > ALIGN_SHORTLIST
        result = ix.screen(crop(uploads[9], np.random.default_rng(6)))
        best = [m for m in result.matches if "aligned" in m.signals]
        assert len(best) == 1 and best[0].item_id == "upload-9" and best[0].protected
