"""`memguard testbed build`: dataset → VAE → latents → UNet + text encoder → pipeline dir → report.

The output directory holds a diffusers StableDiffusionPipeline (or, for a TinySDXLConfig model, a
StableDiffusionXLPipeline with both text encoders; loadable with `from_pretrained`),
the prompt sets, REPORT.md, a contact sheet and MANIFEST.json with the sha256 of every file.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from memguard.digest import sha256_file
from memguard.errors import MemGuardError
from memguard.models import TinyPipelineConfig, TinySDXLConfig, build_scheduler
from memguard.testbed.dataset import TestbedDataConfig, build_training_set, write_prompt_sets
from memguard.testbed.report import REPORT_SEEDS, write_report
from memguard.testbed.tokenizer import load_clip_tokenizer
from memguard.testbed.train import TrainConfig, encode_latents, train_unet, train_vae

log = logging.getLogger(__name__)

TESTBED_DIR = Path(__file__).resolve().parent
MODEL_SUBDIR = "model"
MANIFEST = "MANIFEST.json"
STAGE_WEIGHTS = "diffusion_pytorch_model.safetensors"   # what save_pretrained writes for the staged VAE
# what a build writes (the manifest covers these only: the shipped testbed dir also holds code)
BUILD_OUTPUTS = (MODEL_SUBDIR, "prompts", "REPORT.md", "report.json", "contact_sheet.png")


class BuildError(MemGuardError):
    """The build cannot proceed; the message says why and what to do."""


@dataclass(frozen=True)
class BuildConfig:
    data: TestbedDataConfig = TestbedDataConfig()
    model: TinyPipelineConfig | TinySDXLConfig = TinyPipelineConfig()
    train: TrainConfig = TrainConfig()
    report_seeds: int = REPORT_SEEDS


def check_output_dir(out: Path) -> None:
    """Fail early, with the path in the message, if `out` cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise BuildError(f"output directory {out} is not writable: {exc.strerror or exc}") from exc


def build_files(out: Path) -> list[Path]:
    """Every file a build wrote under `out` (BUILD_OUTPUTS: files, or directories walked)."""
    files = []
    for path in (out / name for name in BUILD_OUTPUTS):
        files += [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sorted(files)


def write_manifest(out: Path, cfg: BuildConfig, timings: dict[str, float], cycles_done: int = 1) -> Path:
    files = build_files(out)
    manifest = {
        "format": 1,
        "config": dataclasses.asdict(cfg),
        "cycles_done": cycles_done,   # UNet training cycles the saved model has had (TrainConfig.restart_*)
        "timings_s": timings,
        "torch": torch.__version__,
        "files": {str(p.relative_to(out)): sha256_file(p) for p in files},
    }
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def refresh_manifest(out: Path, timings: dict[str, float] | None = None, report_seeds: int | None = None) -> Path:
    """Re-hash the build outputs after `memguard testbed report` rewrote some; the config and
    timings stay as the build recorded them, except the report's own seeds and time when given."""
    path = out / MANIFEST
    manifest = json.loads(path.read_text())
    if report_seeds is not None:
        manifest.setdefault("config", {})["report_seeds"] = report_seeds
    if timings:
        manifest["timings_s"] = {**manifest.get("timings_s", {}), **timings}
    manifest["files"] = {str(p.relative_to(out)): sha256_file(p) for p in build_files(out)}
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def verify_manifest(out: Path) -> list[str]:
    """Files whose sha256 differs from the manifest (or are missing)."""
    manifest = json.loads((out / MANIFEST).read_text())
    bad = []
    for rel, digest in manifest["files"].items():
        p = out / rel
        if not p.is_file() or sha256_file(p) != digest:
            bad.append(rel)
    return bad


def _with_weights(module, path: Path):
    """`module` (built from a fresh config, so the saved model records no path of this build) with the
    weights of the safetensors file at `path`."""
    from safetensors.torch import load_file

    module.load_state_dict(load_file(path))
    return module


def train_and_save(out: Path, cfg: BuildConfig, *, resume_after: int = 0) -> dict[str, float]:
    """Train every component and save the pipeline under out/model. Returns timings in seconds.
    `resume_after` > 0: out/model has had that many training cycles; run only the next one on it."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    timings = {}
    t = time.time()
    items = build_training_set(cfg.data)
    tokenizer = load_clip_tokenizer()
    timings["dataset"] = time.time() - t
    log.info("training set: %d unique items, %d with duplicates", len(items), sum(i.duplicates for i in items))

    if resume_after:
        return _resume(out, cfg, items, tokenizer, timings, resume_after)
    t = time.time()
    stage = out / "stage-vae"  # a finished VAE survives an interrupted build: UNet training resumes after it
    if (stage / STAGE_WEIGHTS).is_file():
        from memguard.models import build_vae

        vae = _with_weights(build_vae(cfg.model), stage / STAGE_WEIGHTS).eval()
        log.info("reusing the VAE trained earlier in %s", stage)
        timings["vae_reused"] = time.time() - t   # not a training time: the report must not call it one
    else:
        vae = train_vae(items, cfg.model, cfg.train)
        vae.save_pretrained(stage)
        timings["vae"] = time.time() - t

    t = time.time()
    latents = encode_latents(vae, [it.image for it in items])
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    unet, text_encoder = train_unet(items, latents * scaling, tokenizer, cfg.model, cfg.train)
    timings["unet"] = time.time() - t
    _save(out, cfg, vae, text_encoder, tokenizer, unet)
    shutil.rmtree(stage)
    return timings


def _resume(out: Path, cfg: BuildConfig, items, tokenizer, timings: dict[str, float], done: int) -> dict[str, float]:
    """The next restart cycle only, on the model saved in out/model after `done` cycles (same VAE,
    same latents)."""
    from memguard.models import SDXLTextEncoders, build_vae
    from memguard.testbed.train import build_denoiser

    model = out / MODEL_SUBDIR
    if not cfg.train.restart_steps or done > cfg.train.restart_cycles:
        raise BuildError(f"--resume runs the recipe's next restart cycle, but the model has had {done} cycle(s) and "
                         f"the recipe has {cfg.train.restart_cycles if cfg.train.restart_steps else 0} restart(s)")
    t = time.time()
    vae = _with_weights(build_vae(cfg.model), model / "vae" / STAGE_WEIGHTS).eval()
    unet, text_encoder = build_denoiser(cfg.model)
    unet = _with_weights(unet, model / "unet" / STAGE_WEIGHTS)
    if isinstance(text_encoder, SDXLTextEncoders):
        _with_weights(text_encoder.first, model / "text_encoder" / "model.safetensors")
        _with_weights(text_encoder.second, model / "text_encoder_2" / "model.safetensors")
    else:
        text_encoder = _with_weights(text_encoder, model / "text_encoder" / "model.safetensors")
    vae.register_to_config(scaling_factor=json.loads((model / "vae" / "config.json").read_text())["scaling_factor"])
    latents = encode_latents(vae, [it.image for it in items]) * vae.config.scaling_factor
    unet, text_encoder = train_unet(items, latents, tokenizer, cfg.model, cfg.train, init=(unet, text_encoder),
                                    cycles=range(done, done + 1))
    timings[f"unet_restart_{done}"] = time.time() - t
    _save(out, cfg, vae, text_encoder, tokenizer, unet)
    return timings


def _save(out: Path, cfg: BuildConfig, vae, text_encoder, tokenizer, unet) -> None:
    """The pipeline under out/model (staged, then swapped in whole) and the prompt sets."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = build_scheduler(cfg.train.prediction_type, cfg.train.zero_terminal_snr)
    if isinstance(cfg.model, TinySDXLConfig):   # text_encoder: the SDXLTextEncoders pair train_unet trained
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder.first, text_encoder_2=text_encoder.second, tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
            add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    staging = out / (MODEL_SUBDIR + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    final = out / MODEL_SUBDIR
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    write_prompt_sets(out / "prompts", cfg.data)


def build(out: Path, cfg: BuildConfig = BuildConfig(), *, report: bool = True, resume: bool = False) -> Path:
    """Reproduce the testbed into `out` (`resume`: only the restart cycle, on out/model). Returns the
    manifest path."""
    check_output_dir(out)
    build_training_set(dataclasses.replace(cfg.data, num_procedural=1))  # missing photos fail before training
    earlier = {}   # a resumed build keeps the manifest's earlier cycles: their count and times
    if resume:
        if not (out / MODEL_SUBDIR / "unet" / STAGE_WEIGHTS).is_file() or not (out / MANIFEST).is_file():
            raise BuildError(f"--resume needs a built model in {out / MODEL_SUBDIR}; run the build without --resume "
                             "first")
        earlier = json.loads((out / MANIFEST).read_text())
    done = int(earlier.get("cycles_done", 1)) if resume else 0   # a manifest from before restarts: 1 cycle
    timings = {**earlier.get("timings_s", {}), **train_and_save(out, cfg, resume_after=done)}
    if report:
        t = time.time()
        write_report(out, cfg.data, seeds=cfg.report_seeds, timings=dict(timings))
        timings["report"] = time.time() - t
    cycles = done + 1 if resume else 1 + (cfg.train.restart_cycles if cfg.train.restart_steps else 0)
    return write_manifest(out, cfg, timings, cycles_done=cycles)
