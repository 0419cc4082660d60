"""The `memguard index` commands, end to end, with --json."""

import pytest
from PIL import Image

from memguard.testbed.dataset import write_image_folder
from tests.index.conftest import run


def test_build_stats_verify_screen_protect_unprotect(tmp_path, capsys, items, heldout, vae_dir):
    folder = write_image_folder(items[:20] + items[-8:], tmp_path / "imgs")
    held = write_image_folder(heldout[:10], tmp_path / "held")
    out = tmp_path / "ix"
    code, report, _ = run(capsys, "index", "build", str(out), "--images", str(folder), "--model", str(vae_dir), "--json")
    assert code == 0 and report["finished"] and report["items"] == 28 and report["faces"] >= 2
    code, stats, _ = run(capsys, "index", "stats", str(out), "--json")
    assert code == 0 and stats["counts"]["items"] == 28 and stats["signals"]["latent"]["factory"] == "Flat"
    code, verify, _ = run(capsys, "index", "verify", str(out), "--json")
    assert code == 0 and verify["ok"]

    code, screened, _ = run(capsys, "index", "screen", str(out), str(folder / "proc-00002.png"),
                            str(held / "heldout-00001.png"), "--json")
    first, second = screened["results"]
    assert first["is_copy"] and first["matches"][0]["item_id"] == "proc-00002" and not second["is_copy"]

    code, receipt, _ = run(capsys, "index", "protect", str(out), "--image", str(held / "heldout-00001.png"),
                           "--item-id", "upload-9", "--reason", "takedown", "--json")
    assert code == 0 and receipt["subject"] == "upload-9"
    code, screened, _ = run(capsys, "index", "screen", str(out), str(held / "heldout-00001.png"), "--json")
    assert screened["results"][0]["protected"]
    code, removed, _ = run(capsys, "index", "unprotect", str(out), "upload-9", "--reason", "withdrawn", "--json")
    assert code == 0 and removed["removed"] == [receipt["pid"]]
    code, text, _ = run(capsys, "index", "stats", str(out))
    assert code == 0 and "0 protected images" in text

    face = tmp_path / "face.png"
    Image.fromarray(next(i for i in items if i.item_id == "photo-grace_hopper").image).save(face)
    code, receipt, _ = run(capsys, "index", "protect", str(out), "--face", str(face), "--identity", "grace",
                           "--reason", "opt-out", "--json")
    assert code == 0 and receipt["kind"] == "face"
    code, screened, _ = run(capsys, "index", "screen", str(out), str(face), "--json")
    faces = screened["results"][0]["faces"]
    assert faces[0]["protected"] and faces[0]["identity"] == "grace" and faces[0]["matched"]

    code, cal, _ = run(capsys, "index", "calibrate", str(out), "--images", str(folder), "--heldout", str(held),
                       "--samples", "12", "--fmr", "0.05", "--json")
    assert code == 0 and cal["thresholds"]["latent"] > 0 and cal["heldout"]["images"] == 10
    code, stats, _ = run(capsys, "index", "stats", str(out), "--json")
    assert stats["thresholds"]["calibrated"] and stats["thresholds"]["false_match_rate"] == 0.05
    assert stats["thresholds"]["latent"] == pytest.approx(cal["thresholds"]["latent"])


def test_errors_are_one_line_and_name_the_file_or_field(tmp_path, capsys, built_index, faiss_index_dir):
    ix = faiss_index_dir
    data = (ix / "pdq.faiss").read_bytes()
    (ix / "pdq.faiss").write_bytes(data[:-10])
    code, _, err = run(capsys, "index", "verify", str(ix), "--json")
    assert code == 2 and "pdq.faiss" in err and "Traceback" not in err
    code, _, err = run(capsys, "index", "protect", str(built_index), "--reason", "x")
    assert code == 2 and "image" in err
    code, _, err = run(capsys, "index", "screen", str(built_index), str(tmp_path / "nope.png"))
    assert code == 2 and "images[0]" in err and "nope.png" in err
    code, _, err = run(capsys, "index", "build", str(tmp_path / "new"), "--json")
    assert code == 2 and "source" in err


def test_build_on_milvus_and_migrate_a_faiss_index_give_the_same_answers(tmp_path, capsys, items, vae_dir,
                                                                           milvus_uri, faiss_index_dir):
    import numpy as np

    from memguard.index.api import FingerprintIndex

    folder = write_image_folder(items[:12] + items[-8:], tmp_path / "imgs")
    out = tmp_path / "mx"
    host_port = milvus_uri.removeprefix("http://")
    code, report, _ = run(capsys, "index", "build", str(out), "--images", str(folder), "--model", str(vae_dir),
                          "--backend", f"milvus://{host_port}", "--no-faces", "--json")
    assert code == 0 and report["finished"] and report["items"] == 20
    code, stats, _ = run(capsys, "index", "stats", str(out), "--json")
    latent = stats["signals"]["latent"]
    assert latent["factory"] == "milvus:FLAT" and latent["backend"]["count"] == 20 and latent["bytes"] == 0
    code, screened, _ = run(capsys, "index", "screen", str(out), str(folder / "proc-00002.png"), "--json")
    assert screened["results"][0]["is_copy"] and screened["results"][0]["matches"][0]["item_id"] == "proc-00002"

    migrated = tmp_path / "migrated"
    code, mig, _ = run(capsys, "index", "migrate", str(faiss_index_dir), "--backend", milvus_uri,
                       "--out", str(migrated), "--milvus-index", "HNSW", "--json")
    assert code == 0 and set(mig["signals"]) == {"latent", "pdq", "face"}
    assert mig["signals"]["latent"]["index_type"] == "HNSW" and mig["signals"]["pdq"]["index_type"] == "FLAT"
    code, verify, _ = run(capsys, "index", "verify", str(migrated), "--json")
    assert code == 0 and verify["ok"]
    with FingerprintIndex.open(faiss_index_dir) as a, FingerprintIndex.open(migrated) as b:
        assert b.manifest.signals["latent"].backend["build_params"]["M"] == 32
        for item in items[::9]:   # HNSW is approximate: the same copies and best match, not every candidate
            ra, rb = a.screen(item.image), b.screen(item.image)
            assert [m.item_id for m in ra.copies] == [m.item_id for m in rb.copies]
            assert ra.matches[0].item_id == rb.matches[0].item_id and ra.is_copy == rb.is_copy
            assert [f.identity for f in ra.faces] == [f.identity for f in rb.faces]
        for signal, q in (("latent", a.signals["latent"].vectors[4]), ("pdq", a.signals["pdq"].vectors[4]),
                          ("face", a.signals["face"].vectors[0])):
            ha, hb = a.search_signal(signal, np.asarray(q), 5), b.search_signal(signal, np.asarray(q), 5)
            assert ha[0]["row"] == hb[0]["row"] == (4 if signal != "face" else 0)
            # ties (equal Hamming distances) may come in another order: compare the scores
            np.testing.assert_allclose([h["score"] for h in ha], [h["score"] for h in hb], atol=1e-5)
    code, _, err = run(capsys, "index", "migrate", str(migrated), "--backend", milvus_uri, "--out", str(tmp_path / "x"))
    assert code == 2 and "not faiss files" in err
