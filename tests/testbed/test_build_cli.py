"""`memguard testbed build` end to end (a quick build), and its errors on bad input."""
import dataclasses
import json
import subprocess
import sys

import pytest

from guard.cli import main


def _memguard(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "guard.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900)


def test_quick_build_writes_a_loadable_verified_testbed(tmp_path):
    out = tmp_path / "tb"
    r = _memguard("testbed", "build", "--quick", "--seeds", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    for rel in ("model/model_index.json", "model/unet/diffusion_pytorch_model.safetensors",
                "prompts/memorized.txt", "prompts/novel.txt", "REPORT.md", "report.json", "contact_sheet.png"):
        assert (out / rel).is_file(), rel
    assert "near copy" in (out / "REPORT.md").read_text()
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert "model/unet/diffusion_pytorch_model.safetensors" in manifest["files"]
    assert _memguard("testbed", "verify", "--dir", str(out)).returncode == 0

    # tamper with one file: verify names it and fails cleanly
    with open(out / "prompts" / "novel.txt", "a") as f:
        f.write("tampered\n")
    r = _memguard("testbed", "verify", "--dir", str(out))
    assert r.returncode == 2 and "prompts/novel.txt" in r.stderr and "Traceback" not in r.stderr


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = _memguard("testbed", "build", "--quick", "--out", str(blocker / "sub"))
    assert r.returncode == 2
    assert "not writable" in r.stderr and str(blocker) in r.stderr and "Traceback" not in r.stderr


def test_missing_package_data_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from guard.testbed import dataset

    broken = (dataclasses.replace(dataset.PHOTOS[0], relpath="data/removed.png"),) + dataset.PHOTOS[1:]
    monkeypatch.setattr(dataset, "PHOTOS", broken)
    assert main(["testbed", "build", "--quick", "--out", str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err
    assert "removed.png" in err and "skimage" in err
