"""The `memguard index` commands, end to end, with --json."""
import json

import pytest
from PIL import Image

from guard.cli import main
from guard.testbed.dataset import write_image_folder


def run(capsys, *argv) -> tuple[int, dict | str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    try:
        return code, json.loads(out), err
    except json.JSONDecodeError:
        return code, out, err


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


def test_errors_are_one_line_and_name_the_file_or_field(tmp_path, capsys, built_index):
    import shutil
    ix = shutil.copytree(built_index, tmp_path / "ix")
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
