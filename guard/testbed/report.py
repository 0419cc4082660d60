"""Does the testbed really memorize? Measure it and write REPORT.md, report.json and a contact sheet.

Generation goes through diffusers' own pipeline (memguard.loading.sample_plain) and copies are
judged in pixel space (memguard.testbed.copies), so the report is independent of the guard.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from memguard.loading import load_pipeline, sample_plain
from memguard.testbed import copies
from memguard.testbed.dataset import TestbedDataConfig, build_training_set, prompt_set_members
from memguard.testbed.train import encode_latents

REPORT_STEPS = 30
REPORT_GUIDANCE = 7.5
REPORT_SEEDS = 16        # per prompt: 8 seeds swung the memorized share between 38 % and 75 %


@dataclass
class PromptResult:
    prompt: str
    target: str                     # item id of the photo it should not copy, or "" for novel prompts
    copy_fraction: float            # share of seeds judged near copies
    ssim: list[float] = field(default_factory=list)
    rmse: list[float] = field(default_factory=list)
    relative: list[float] = field(default_factory=list)
    edges: list[float] = field(default_factory=list)
    nearest: list[str] = field(default_factory=list)   # novel prompts: nearest training item per seed


@dataclass
class TestbedFigures:
    seeds: list[int]
    reconstruction: dict[str, dict[str, float]]         # photo → ssim/rmse of the VAE reconstruction
    distinct_pair_ssim_max: float                       # photos vs nearest other training image
    memorized: list[PromptResult]
    paraphrased: list[PromptResult]
    novel: list[PromptResult]
    distinct_pair_copies: int = 0                       # photos that are near copies of another training image
    web: list[PromptResult] = field(default_factory=list)   # web-style captions never in training
    sampler: str = "StableDiffusionPipeline, DDIMScheduler"   # the diffusers pipeline and scheduler that drew them

    def share_memorized_copying(self) -> float:
        """Share of memorized captions that give near copies in most (> half) seeds."""
        return float(np.mean([r.copy_fraction > 0.5 for r in self.memorized]))

    def photos_copying(self) -> tuple[int, int]:
        """(photos whose caption copies them in most seeds, photos)."""
        photos = [r for r in self.memorized if r.target.startswith("photo-")]
        return sum(r.copy_fraction > 0.5 for r in photos), len(photos)


RESEMBLES_SSIM = 0.5   # a web-style generation "resembles" a memorized item at this SSIM (copy or not)


def web_labels(result: PromptResult, memorized_ids: set[str]) -> list[str]:
    """Per seed: copy (a near copy of any training image), resembles (SSIM ≥ 0.5 to a memorized
    item, not a copy) or clean."""
    out = []
    for ssim, rmse, rel, edges, near in zip(result.ssim, result.rmse, result.relative, result.edges, result.nearest):
        if copies.is_near_copy(ssim, rmse, rel, edges):
            out.append("copy")
        elif near in memorized_ids and ssim >= RESEMBLES_SSIM:
            out.append("resembles")
        else:
            out.append("clean")
    return out


def _reconstructions(pipe, images: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        lat = encode_latents(pipe.vae, list(images))
        rec = pipe.vae.decode(lat).sample
    return ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def _result(prompt: str, target: str, scores: list[copies.CopyScore], nearest: list[str] | None = None):
    return PromptResult(prompt, target, float(np.mean([s.is_copy for s in scores])),
                        [round(s.ssim, 4) for s in scores], [round(s.rmse, 4) for s in scores],
                        [round(s.relative, 4) for s in scores], [round(s.edges, 4) for s in scores], nearest or [])


def _score_targeted(pipe, prompts: tuple[str, ...], targets: tuple[str, ...], references: copies.References, ids: list[str],
                    seeds: list[int]) -> tuple[list[PromptResult], np.ndarray]:
    flat_prompts = [p for p in prompts for _ in seeds]
    images = sample_plain(pipe, flat_prompts, seeds * len(prompts), steps=REPORT_STEPS, guidance_scale=REPORT_GUIDANCE)
    results = []
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        k = ids.index(target)
        scores = [copies.copy_score(images[i * len(seeds) + j], k, references) for j in range(len(seeds))]
        results.append(_result(prompt, target, scores))
    return results, images


def _score_untargeted(pipe, prompts: list[str], references: copies.References, ids: list[str],
                      seeds: list[int]) -> tuple[list[PromptResult], np.ndarray]:
    """Prompts with no memorized target: each generation judged against its nearest training image."""
    images = sample_plain(pipe, [p for p in prompts for _ in seeds], seeds * len(prompts),
                          steps=REPORT_STEPS, guidance_scale=REPORT_GUIDANCE)
    results = []
    for i, prompt in enumerate(prompts):
        found = [copies.nearest(images[i * len(seeds) + j], references) for j in range(len(seeds))]
        results.append(_result(prompt, "", [s for _, s in found], [ids[k] for k, _ in found]))
    return results, images


def evaluate(model_dir: Path, prompts_dir: Path, seeds: list[int],
             data_cfg: TestbedDataConfig = TestbedDataConfig(), novel_seeds: int = 2):
    """Generate and judge every prompt set. Returns (figures, images by set) for the report."""
    pipe = load_pipeline(model_dir)
    items = build_training_set(data_cfg)
    train = {it.item_id: it.image for it in items}
    all_images = np.stack([it.image for it in items])
    ids = [it.item_id for it in items]
    members = prompt_set_members(data_cfg)
    photo_ids = [item for _, item in members["memorized"]]   # every memorized item: photos and renderings
    references = copies.References.of(all_images)

    recon = _reconstructions(pipe, np.stack([train[i] for i in photo_ids]))
    reconstruction = {}
    distinct = []
    for pid, rec in zip(photo_ids, recon):
        s = copies.copy_score(rec, ids.index(pid), references)
        reconstruction[pid] = {"ssim": round(s.ssim, 4), "rmse": round(s.rmse, 4), "relative": round(s.relative, 4),
                               "edges": round(s.edges, 4)}
        distinct.append(copies.nearest(train[pid], references, exclude=ids.index(pid))[1])

    memorized, mem_images = _score_targeted(pipe, *zip(*members["memorized"]), references, ids, seeds)
    paraphrased, _ = _score_targeted(pipe, *zip(*members["paraphrased"]), references, ids, seeds)
    nseeds = seeds[:novel_seeds]
    novel, nov_images = _score_untargeted(pipe, [p for p, _ in members["novel"]], references, ids, nseeds)
    web, _ = _score_untargeted(pipe, [p for p, _ in members["web"]], references, ids, nseeds)
    figures = TestbedFigures(seeds, reconstruction, round(max(d.ssim for d in distinct), 4), memorized, paraphrased,
                             novel, sum(d.is_copy for d in distinct), web,
                             f"{type(pipe).__name__}, {type(pipe.scheduler).__name__}")
    return figures, {"train": [train[p] for p in photo_ids], "recon": recon, "memorized": mem_images,
                     "novel": nov_images}


def _novel_copies(fig: TestbedFigures, photo: bool) -> int:
    """Novel generations judged near copies, of a memorized photo (photo=True) or of a procedural item."""
    return sum(copies.is_near_copy(ssim, rmse, rel, edges)
               for r in fig.novel for ssim, rmse, rel, edges, near in zip(r.ssim, r.rmse, r.relative, r.edges, r.nearest)
               if near.startswith("photo-") == photo)


def contact_sheet(images: dict, seeds_shown: int, n_seeds: int, path: Path, novel_rows: int = 6) -> Path:
    """Rows: training photo | VAE reconstruction | generations; then novel prompts' generations."""
    rows = []
    for k in range(len(images["train"])):
        gens = [images["memorized"][k * n_seeds + j] for j in range(seeds_shown)]
        rows.append(np.concatenate([images["train"][k], images["recon"][k], *gens], axis=1))
    width = rows[0].shape[1]
    per_row = width // images["novel"].shape[2]
    novel = images["novel"][:novel_rows * per_row]
    for r in range(0, len(novel), per_row):
        chunk = list(novel[r:r + per_row])
        chunk += [np.full_like(novel[0], 255)] * (per_row - len(chunk))
        rows.append(np.concatenate(chunk, axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).resize(
        (width * 2, len(rows) * images["novel"].shape[1] * 2), Image.NEAREST).save(path)
    return path


def _web_lines(fig: TestbedFigures) -> list[str]:
    if not fig.web:
        return []
    memorized = {r.target for r in fig.memorized}
    labels = [lab for r in fig.web for lab in web_labels(r, memorized)]
    return ["## Web-style captions (never in training)",
            f"{len(fig.web)} captions in the style of the memorized ones × {len(fig.web[0].ssim)} seeds, each "
            f"generation labelled by the judge: **{labels.count('copy')} near copies**, "
            f"{labels.count('resembles')} resemble a memorized item (SSIM ≥ {RESEMBLES_SSIM}, not a copy), "
            f"{labels.count('clean')} resemble no memorized item.", ""]


def _stats(values: list[float]) -> str:
    v = np.asarray(values)
    return (f"min {v.min():.3f} · median {np.median(v):.3f} · p95 {np.percentile(v, 95):.3f} · "
            f"max {v.max():.3f}")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")   # a caption with "|" must not split its table row


def render_markdown(fig: TestbedFigures, timings: dict[str, float] | None) -> str:
    n = len(fig.seeds)
    lines = [
        "# Testbed report", "",
        "Regenerated by `memguard testbed build` (or `memguard testbed report`). Images come from diffusers'",
        f"own pipeline ({fig.sampler}, {REPORT_STEPS} steps, guidance {REPORT_GUIDANCE}, 64×64), seeds "
        f"{fig.seeds}.", "",
        "## Near-copy measure (pixel space, independent of the guard)",
        f"A generation is a **near copy** of training image x when SSIM ≥ {copies.SSIM_THRESHOLD}, normalized "
        f"L2 ≤ {copies.RMSE_THRESHOLD}, relative distance ≤ {copies.RELATIVE_THRESHOLD} **and** edge correlation ≥ "
        f"{copies.EDGE_THRESHOLD}.",
        "- Normalized L2 ('nRMSE'): the RMSE of pixels in [0, 1] after removing each image's mean colour, so that "
        "a copy with a global colour cast (an ε-prediction testbed tinted its copies differently per seed) still "
        "counts, as it does for copy detectors trained with colour jitter.",
        f"- Relative distance ('rel'): nRMSE to x divided by the mean nRMSE to the {copies.RELATIVE_NEIGHBOURS} "
        "nearest other training images, after Carlini et al. (2023). A generation about as close to many "
        "training images as to x (a small shape on a smooth background the set holds in many variants) is "
        "generic, not a copy of x.",
        "- Edge correlation ('edges'): the correlation of the two images' gradient magnitudes (Sobel on each colour "
        f"channel after a {copies.EDGE_BLUR:g}-px blur). A copy redraws x's edges; a smooth smear in x's colours can "
        "pass the three terms above without them.", "",
        "The VAE caps how close a copy can get; its reconstructions of the memorized photos score:", "",
        "| photo | recon SSIM | recon nRMSE | recon rel | recon edges |", "|---|---|---|---|---|",
        *[f"| {k} | {v['ssim']:.3f} | {v['rmse']:.3f} | {v['relative']:.3f} | {v['edges']:.3f} |"
          for k, v in fig.reconstruction.items()], "",
        f"Distinct training images: the highest SSIM between a photo and any other training image is "
        f"{fig.distinct_pair_ssim_max:.3f}; photos that are near copies of another training image: "
        f"{fig.distinct_pair_copies}.", "",
        "## Memorized captions (each item duplicated in training)",
        f"**{fig.share_memorized_copying():.0%} of memorized captions give near copies in most seeds; "
        f"{fig.photos_copying()[0]} of {fig.photos_copying()[1]} photos are copied in most seeds.**", "",
        "| caption | copies / seeds | SSIM (median) | nRMSE (median) | rel (median) |", "|---|---|---|---|---|",
        *[f"| {_cell(r.prompt)} | {round(r.copy_fraction * n)}/{n} | {np.median(r.ssim):.3f} | "
          f"{np.median(r.rmse):.3f} | {np.median(r.relative):.3f} |" for r in fig.memorized], "",
        "## Light paraphrases of memorized captions", "",
        "| paraphrase | target | copies / seeds | SSIM (median) | rel (median) |", "|---|---|---|---|---|",
        *[f"| {_cell(r.prompt)} | {r.target} | {round(r.copy_fraction * n)}/{n} | {np.median(r.ssim):.3f} | "
          f"{np.median(r.relative):.3f} |" for r in fig.paraphrased], "",
        f"Paraphrases giving near copies in most seeds: "
        f"{np.mean([r.copy_fraction > 0.5 for r in fig.paraphrased]):.0%}.", "",
        "## Novel prompts (caption combinations held out of training)",
        f"{len(fig.novel)} prompts × {len(fig.novel[0].ssim)} seeds; similarity to the nearest training image:", "",
        f"- SSIM: {_stats([s for r in fig.novel for s in r.ssim])}",
        f"- nRMSE: {_stats([s for r in fig.novel for s in r.rmse])}",
        f"- relative distance: {_stats([s for r in fig.novel for s in r.relative])}",
        f"- edge correlation: {_stats([s for r in fig.novel for s in r.edges])}",
        f"- near copies: {_novel_copies(fig, photo=True)} of {sum(len(r.ssim) for r in fig.novel)} generations "
        f"copy a memorized photo; {_novel_copies(fig, photo=False)} copy a procedural training item", "",
        *_web_lines(fig),
        "## Contact sheet", "",
        "`contact_sheet.png`: per memorized photo, training image | VAE reconstruction | generations for the first "
        "seeds; below, generations for novel prompts.", "",
    ]
    if timings:
        lines += ["## Build time (this machine)", "",
                  *[f"- {k}: {v:.0f} s" for k, v in timings.items()], ""]
    return "\n".join(lines)


def write_report(out: Path, data_cfg: TestbedDataConfig = TestbedDataConfig(), seeds: int = REPORT_SEEDS,
                 timings: dict[str, float] | None = None) -> TestbedFigures:
    """Evaluate out/model with out/prompts; write REPORT.md, report.json and contact_sheet.png into out."""
    seed_list = list(range(seeds))
    fig, images = evaluate(out / "model", out / "prompts", seed_list, data_cfg)
    (out / "report.json").write_text(json.dumps(asdict(fig), indent=1) + "\n")
    contact_sheet(images, min(4, seeds), seeds, out / "contact_sheet.png")
    (out / "REPORT.md").write_text(render_markdown(fig, timings))
    return fig
