"""`memguard testbed build` end to end (a quick build), and its errors on bad input."""
import dataclasses
import json
import subprocess
import sys

import pytest

from memguard.cli import main


def _memguard(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "memguard.cli", *args], capture_output=True, text=True, cwd=cwd,
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
    # re-measuring rewrites the report and re-hashes it into the manifest
    (out / "REPORT.md").write_text("stale\n")
    r = _memguard("testbed", "report", "--dir", str(out), "--seeds", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "near copy" in (out / "REPORT.md").read_text()
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
    from memguard.testbed import dataset

    broken = (dataclasses.replace(dataset.PHOTOS[0], relpath="data/removed.png"),) + dataset.PHOTOS[1:]
    monkeypatch.setattr(dataset, "PHOTOS", broken)
    assert main(["testbed", "build", "--quick", "--out", str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err
    assert "removed.png" in err and "skimage" in err


def test_an_interrupted_build_resumes_from_its_trained_vae(tmp_path):
    """A VAE left in stage-vae by an interrupted build is reused as is, and the model records no stage path."""
    import json as _json

    import torch
    from safetensors.torch import load_file

    from memguard.models import build_vae
    from memguard.testbed.build import STAGE_WEIGHTS, BuildConfig, build
    from memguard.testbed.train import TrainConfig

    out = tmp_path / "tb"
    torch.manual_seed(int(torch.randint(2**31, ()).item()))
    staged = build_vae(BuildConfig().model)
    staged.save_pretrained(out / "stage-vae")
    quick = TrainConfig(vae_steps=2, unet_steps=2, warmup=1, vae_batch=4, unet_batch=4)
    manifest = build(out, dataclasses.replace(BuildConfig(), train=quick), report=False)
    timings = _json.loads(manifest.read_text())["timings_s"]
    assert "vae_reused" in timings and "vae" not in timings   # a reused VAE is not reported as trained
    shipped = load_file(out / "model" / "vae" / STAGE_WEIGHTS)
    assert all(torch.equal(shipped[k], v) for k, v in staged.state_dict().items())
    assert "_name_or_path" not in _json.loads((out / "model" / "vae" / "config.json").read_text())
    assert not (out / "stage-vae").exists()


def test_resume_runs_only_the_restart_cycle_on_the_built_model(tmp_path):
    """`--resume` continues from the model in the output directory: same VAE, a new UNet, both cycles' times."""
    import json as _json

    import torch
    from safetensors.torch import load_file

    from memguard.testbed.build import STAGE_WEIGHTS, BuildConfig, BuildError, build
    from memguard.testbed.train import TrainConfig

    out = tmp_path / "tb"
    first = TrainConfig(vae_steps=2, unet_steps=2, warmup=1, vae_batch=4, unet_batch=4, restart_steps=0)
    with pytest.raises(BuildError, match="--resume needs a built model"):
        build(out, dataclasses.replace(BuildConfig(), train=first), report=False, resume=True)
    build(out, dataclasses.replace(BuildConfig(), train=first), report=False)
    with pytest.raises(BuildError, match="has had 1 cycle.* has 0 restart"):
        build(out, dataclasses.replace(BuildConfig(), train=first), report=False, resume=True)
    before = {part: load_file(out / "model" / part / STAGE_WEIGHTS) for part in ("vae", "unet")}
    again = dataclasses.replace(first, restart_steps=2, restart_lr=1e-3)
    manifest = build(out, dataclasses.replace(BuildConfig(), train=again), report=False, resume=True)
    doc = _json.loads(manifest.read_text())
    assert {"unet", "unet_restart_1"} <= set(doc["timings_s"])    # the first cycle's time is kept
    assert doc["config"]["train"]["restart_steps"] == 2 and doc["cycles_done"] == 2
    with pytest.raises(BuildError, match="has had 2 cycle"):   # the recipe's one restart is done
        build(out, dataclasses.replace(BuildConfig(), train=again), report=False, resume=True)
    after = {part: load_file(out / "model" / part / STAGE_WEIGHTS) for part in ("vae", "unet")}
    assert all(torch.equal(before["vae"][k], v) for k, v in after["vae"].items())
    assert any(not torch.equal(before["unet"][k], v) for k, v in after["unet"].items())
    for part in ("vae", "unet"):   # a resumed model records no path of the build that made it
        assert "_name_or_path" not in _json.loads((out / "model" / part / "config.json").read_text())
