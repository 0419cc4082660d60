"""What guarding costs per denoising step, beside what the published detectors cost.

    python -m memguard.benchmarks.overhead [--rounds 7] [--threads 2] [--json runs/overhead.json]
    python -m memguard.benchmarks.overhead --sdxl [--sdxl-latent 128] [--no-sd15 --no-testbed]
    python -m memguard.benchmarks.overhead --no-sd15 --testbed eps     # part 2 on another testbed

Part 1, Stable Diffusion 1.5's UNet (its architecture, random weights; CPU, float32, 64×64
latents = 512×512 images, CFG batch 2, 77 text tokens). One step of each variant, interleaved
round by round (the order rotates), medians and ratios to the unguarded step from the same run:

* unguarded: diffusers' AttnProcessor2_0 (SDPA), CFG, DDIM step — what the guard wraps;
* guarded: the guard's per-step work as GuardedPipeline runs it — cross-attention through
  `kernels.cross_attention_with_stats` (token mass), `kernels.cfg_with_divergence` (CFG +
  divergence + x̂0), attention entropy/BOS share, `kernels.fingerprint_match` against the sample's
  8 candidates, benign standardization, combined score, trace row;
* Ren-style: cross-attention maps by an explicit softmax (diffusers' classic AttnProcessor, the
  probabilities materialised and summed per token), as Ren et al.'s detector reads them;
* AMG-style: every step decodes x̂0 with SD 1.5's VAE (512×512) and embeds it with a ResNet-50
  (SSCD's backbone) to compare with training images, as Anti-Memorization Guidance does (forward
  passes only: AMG's guidance gradients would cost more).

On CPU the Triton kernels are not used (their PyTorch references run); GPU figures need a GPU host.

Part 3 (`--sdxl`), SDXL base's UNet (its architecture, random weights: 320/640/1280 channels,
transformer depths 1/2/10, 64-dim heads, a 2048-wide context of 77 tokens, `text_time` added
conditioning), float32, CFG batch 2, `--sdxl-latent` latents (128 = 1024×1024 images): unguarded
(SDPA) against guarded (the stats processor, the same per-step guard work as part 1, SDXL's added
conditioning in the UNet call), and the guard's own work outside the UNet timed alone (what
GuardedPipeline reports as guard_seconds: CFG + divergence + x̂0, attention signals, fingerprint
match, standardization, score, trace row). Steps use DDIM over SDXL's betas (same as SD's), so the
scheduler costs the same in every variant.

Part 2, a shipped testbed (`--testbed`, default vpred; skipped when absent): the cost of a blocked sample against a full
generation, from real requests: memorized prompts under `on_flag="block"` leave the batch at the
first flagged step; novel prompts run all steps, decode and the final screen.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

K_CANDIDATES = 8
COPY_COSINE = 0.98   # a typical calibrated latent copy threshold (the testbeds: 0.978): standout excludes copies of the best


# ---- part 1: SD 1.5 UNet -------------------------------------------------------------------------
class RenStyleProcessor:
    """diffusers' classic attention (explicit softmax) that also sums the maps per token."""

    def __init__(self, sink: list):
        self.sink = sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        batch = hidden_states.shape[0]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)            # [B·H, N, T] materialised
        self.sink.append(probs.sum(dim=1).view(batch, -1, probs.shape[-1]).sum(dim=1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def _set_attn2(unet, make: Callable[[str], object]) -> None:
    procs = {name: (make(name) if name.endswith("attn2.processor") else proc)
             for name, proc in unet.attn_processors.items()}
    unet.set_attn_processor(procs)


def amg_models():
    """SD 1.5's VAE architecture and a ResNet-50 (SSCD's backbone), random weights, plus 1000 references."""
    import torchvision
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=512).eval()
    return vae, torchvision.models.resnet50(weights=None).eval(), F.normalize(torch.randn(1000, 1000), dim=-1)


def sd15_variants(args) -> dict[str, Callable[[int], None]]:
    """One callable per variant; each runs one full denoising step (UNet + CFG + scheduler)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from memguard import kernels
    from memguard.attention import AttentionControl, StatsCrossAttnProcessor
    from memguard.models import build_scheduler, build_sd15_unet
    from memguard.pipeline import COLUMNS
    from memguard.policy import Policy
    from memguard.signals import Candidates, attention_signals, stack_signals, track_similarity

    torch.manual_seed(0)
    unet = build_sd15_unet().eval()
    sched = build_scheduler()
    sched.set_timesteps(30)
    ts = sched.timesteps
    text = torch.randn(2, 77, 768)
    state = {"x": torch.randn(1, 4, 64, 64)}
    w = 7.5
    control, ren_sink = AttentionControl(), []
    cands = Candidates(F.normalize(torch.randn(1, K_CANDIDATES, 256), dim=-1),
                       torch.ones(1, K_CANDIDATES, dtype=torch.bool), [["x"] * K_CANDIDATES])
    tables = Policy.uncalibrated().tables([float(t) for t in ts])
    trace = torch.zeros(len(ts), 1, len(COLUMNS))

    def unet_step(k: int):
        t = ts[k % len(ts)]
        out = unet(torch.cat([state["x"]] * 2), t, encoder_hidden_states=text).sample
        return t, *out.chunk(2)

    def unguarded(k: int) -> None:
        t, u, c = unet_step(k)
        sched.step(u + w * (c - u), t, state["x"])

    def guarded(k: int) -> None:
        control.reset()
        t, u, c = unet_step(k)
        ab = float(sched.alphas_cumprod[int(t)])
        eps, div, x0 = kernels.cfg_with_divergence(u, c, state["x"], w, ab)
        ent, bos = attention_signals(control.mean_mass()[1:])
        sim, _, stand = track_similarity(x0, cands, COPY_COSINE)
        values = stack_signals(div, ent, bos, sim, stand)
        z = tables.zscores(values, k % len(ts))
        row = torch.cat([values, z, tables.combined(z, k % len(ts))[:, None], torch.full((1, 1), w)], dim=1)
        trace[k % len(ts)].index_copy_(0, torch.zeros(1, dtype=torch.long), row)
        sched.step(eps, t, state["x"])

    def ren(k: int) -> None:
        ren_sink.clear()
        t, u, c = unet_step(k)
        mass = torch.stack(ren_sink).mean(0)[1:]
        attention_signals(mass / mass.sum(-1, keepdim=True))
        sched.step(u + w * (c - u), t, state["x"])

    vae, resnet, bank = (None, None, None) if args.no_amg else amg_models()

    def amg(k: int) -> None:
        t, u, c = unet_step(k)
        eps = u + w * (c - u)
        ab = float(sched.alphas_cumprod[int(t)])
        x0 = (state["x"] - (1 - ab) ** 0.5 * eps) / ab ** 0.5
        image = vae.decode(x0 / 0.18215).sample
        emb = F.normalize(resnet(F.interpolate(image, size=224, mode="bilinear", antialias=True)), dim=-1)
        (emb @ bank.T).amax()
        sched.step(eps, t, state["x"])

    procs = {"plain": lambda name: AttnProcessor2_0(), "stats": lambda name: StatsCrossAttnProcessor(control),
             "ren": lambda name: RenStyleProcessor(ren_sink)}
    variants = {"unguarded": ("plain", unguarded), "guarded": ("stats", guarded), "ren_style": ("ren", ren)}
    if not args.no_amg:
        variants["amg_style"] = ("plain", amg)

    def bind(kind: str, fn):
        def run(k: int) -> float:
            _set_attn2(unet, procs[kind])       # outside the timed region
            t0 = time.perf_counter()
            fn(k)
            return time.perf_counter() - t0
        return run
    return {name: bind(kind, fn) for name, (kind, fn) in variants.items()}


def interleave(variants: dict[str, Callable[[int], float]], rounds: int) -> dict[str, list[float]]:
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:                     # warm-up round, not counted
            variants[n](0)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                times[n].append(variants[n](r + 1))
            print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)
    return times


def ratio_table(times: dict[str, list[float]]) -> dict:
    base = statistics.median(times["unguarded"])
    return {n: {"median_s": statistics.median(v), "ratio": statistics.median(v) / base,
                "overhead_pct": 100 * (statistics.median(v) / base - 1), "runs": v} for n, v in times.items()}


# ---- part 3: SDXL UNet ---------------------------------------------------------------------------
def sdxl_variants(args, guard_times: list[float]) -> dict[str, Callable[[int], float]]:
    """unguarded / guarded full steps of SDXL's UNet; the guarded one appends its guard work to guard_times."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from memguard import kernels
    from memguard.attention import AttentionControl, StatsCrossAttnProcessor
    from memguard.models import build_scheduler, build_sdxl_unet
    from memguard.pipeline import COLUMNS
    from memguard.policy import Policy
    from memguard.signals import Candidates, attention_signals, stack_signals, track_similarity

    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = build_sdxl_unet().eval()
    print(f"  SDXL UNet built in {time.perf_counter() - t0:.0f} s "
          f"({sum(p.numel() for p in unet.parameters()) / 1e9:.2f}B parameters)", flush=True)
    sched = build_scheduler()
    sched.set_timesteps(30)
    ts = sched.timesteps
    n = args.sdxl_latent
    size = 8 * n
    text = torch.randn(2, 77, 2048)
    added = {"text_embeds": torch.randn(2, 1280),
             "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)}
    state = {"x": torch.randn(1, 4, n, n)}
    w = 7.5
    control = AttentionControl()
    dim = kernels.fingerprint_dim(4)
    cands = Candidates(F.normalize(torch.randn(1, K_CANDIDATES, dim), dim=-1),
                       torch.ones(1, K_CANDIDATES, dtype=torch.bool), [["x"] * K_CANDIDATES])
    tables = Policy.uncalibrated().tables([float(t) for t in ts])
    trace = torch.zeros(len(ts), 1, len(COLUMNS))

    def unet_step(k: int):
        t = ts[k % len(ts)]
        out = unet(torch.cat([state["x"]] * 2), t, encoder_hidden_states=text, added_cond_kwargs=added).sample
        return t, *out.chunk(2)

    def unguarded(k: int) -> None:
        t, u, c = unet_step(k)
        sched.step(u + w * (c - u), t, state["x"])

    def guarded(k: int) -> None:
        control.reset()
        t, u, c = unet_step(k)
        g0 = time.perf_counter()
        ab = float(sched.alphas_cumprod[int(t)])
        eps, div, x0 = kernels.cfg_with_divergence(u, c, state["x"], w, ab)
        ent, bos = attention_signals(control.mean_mass()[1:])
        sim, _, stand = track_similarity(x0, cands, COPY_COSINE)
        values = stack_signals(div, ent, bos, sim, stand)
        z = tables.zscores(values, k % len(ts))
        row = torch.cat([values, z, tables.combined(z, k % len(ts))[:, None], torch.full((1, 1), w)], dim=1)
        trace[k % len(ts)].index_copy_(0, torch.zeros(1, dtype=torch.long), row)
        guard_times.append(time.perf_counter() - g0)
        sched.step(eps, t, state["x"])

    procs = {"plain": lambda name: AttnProcessor2_0(), "stats": lambda name: StatsCrossAttnProcessor(control)}

    def bind(kind: str, fn):
        def run(k: int) -> float:
            _set_attn2(unet, procs[kind])       # outside the timed region
            t0 = time.perf_counter()
            fn(k)
            return time.perf_counter() - t0
        return run
    return {"unguarded": bind("plain", unguarded), "guarded": bind("stats", guarded)}


def sdxl_table(args) -> dict:
    guard_times: list[float] = []
    times = interleave(sdxl_variants(args, guard_times), args.sdxl_rounds)
    table = ratio_table(times)
    base = table["unguarded"]["median_s"]
    work = statistics.median(guard_times[1:])              # without the warm-up round
    table["guard_work_alone"] = {"median_s": work, "ratio": work / base, "overhead_pct": 100 * work / base,
                                 "runs": guard_times[1:]}
    return table


# ---- part 2: testbed blocked-sample cost ---------------------------------------------------------
def blocked_cost(args) -> dict | None:
    from memguard.index.api import FingerprintIndex
    from memguard.loading import load_pipeline
    from memguard.pipeline import GuardConfig, GuardedPipeline
    from memguard.policy import Policy
    from memguard.testbed.dataset import PHOTOS, heldout_prompts
    from memguard.testbed.registry import get_testbed
    from memguard.types import GenerationRequest, GuardMode

    tb = get_testbed(args.testbed)
    model = Path(args.testbed_model or tb.model_dir)
    index_dir = Path(args.testbed_index or tb.index_dir)
    policy_path = Path(args.testbed_policy or tb.policy_path)
    if not ((model / "model_index.json").is_file() and index_dir.is_dir() and policy_path.is_file()):
        return None
    pipe = load_pipeline(model)
    index = FingerprintIndex.open(index_dir, model_dir=model)
    policy = Policy.load(policy_path)
    guard = GuardedPipeline(pipe, index=index, policy=policy, config=GuardConfig(on_flag="block"))
    memorized = [p.caption for p in PHOTOS]
    novel = heldout_prompts(tb.data)[:len(memorized)]
    out = {"full_s": [], "blocked_s": [], "blocked_steps": [], "off_step_s": [], "guarded_step_s": []}
    for r in range(args.testbed_rounds):
        seeds = list(range(7000 + 100 * r, 7000 + 100 * r + len(memorized)))
        t0 = time.perf_counter()
        full = guard.generate([GenerationRequest(p, seed=s) for p, s in zip(novel, seeds)])
        out["full_s"].append((time.perf_counter() - t0) / len(novel))
        out["guarded_step_s"] += full.stats.step_seconds[2:]          # past the decision steps
        t0 = time.perf_counter()
        blocked = guard.generate([GenerationRequest(p, seed=s) for p, s in zip(memorized, seeds)])
        out["blocked_s"].append((time.perf_counter() - t0) / len(memorized))
        out["blocked_steps"] += [rs[0].report.steps_computed for rs in blocked.results
                                 if rs[0].report.first_flagged_step is not None]
        off = guard.generate([GenerationRequest(p, seed=s, mode=GuardMode.OFF) for p, s in zip(novel, seeds)])
        out["off_step_s"] += off.stats.step_seconds
    index.close()
    med = statistics.median
    return {"testbed": tb.name, "samples_per_batch": len(memorized), "full_generation_s_per_sample": med(out["full_s"]),
            "blocked_generation_s_per_sample": med(out["blocked_s"]),
            "blocked_cost_ratio": med(out["blocked_s"]) / med(out["full_s"]),
            "blocked_steps_computed": out["blocked_steps"], "steps": 30,
            "pipeline_step_s": {"off": med(out["off_step_s"]), "enforce": med(out["guarded_step_s"]),
                                "ratio": med(out["guarded_step_s"]) / med(out["off_step_s"])}}


def markdown(doc: dict) -> str:
    lines = []
    if doc.get("sd15"):
        lines += ["## Per-step cost, SD 1.5 UNet architecture (CPU, float32, 64×64 latents, CFG batch 2)", "",
                  f"{doc['rounds']} interleaved rounds, {doc['threads']} threads; medians.", "",
                  "| variant | median step (s) | ratio to unguarded | overhead |", "|---|---|---|---|"]
        for name, row in doc["sd15"].items():
            lines.append(f"| {name} | {row['median_s']:.3f} | {row['ratio']:.3f} | {row['overhead_pct']:+.1f} % |")
    if doc.get("sdxl"):
        n = doc["sdxl_latent"]
        lines += ["", f"## Per-step cost, SDXL UNet architecture ({doc['device']}, float32, {n}×{n} latents = "
                      f"{8 * n}×{8 * n} images, CFG batch 2, 2048-wide context)", "",
                  f"{doc['sdxl_rounds']} interleaved rounds, {doc['threads']} threads; medians. guard_work_alone: "
                  "the guard's work outside the UNet (its share of an unguarded step in the last column).", "",
                  "| variant | median step (s) | ratio to unguarded | overhead |", "|---|---|---|---|"]
        for name, row in doc["sdxl"].items():
            lines.append(f"| {name} | {row['median_s']:.4f} | {row['ratio']:.4f} | {row['overhead_pct']:+.2f} % |")
    tb = doc.get("testbed")
    if tb:
        lines += ["", f"## Blocked-sample cost, testbed {tb.get('testbed', '')} (real requests)", "",
                  f"- full guarded generation: {tb['full_generation_s_per_sample']:.3f} s per sample "
                  f"(30 steps, decode, final screen)",
                  f"- memorized prompt blocked at its flagged step: {tb['blocked_generation_s_per_sample']:.3f} s per "
                  f"sample; steps computed {sorted(set(tb['blocked_steps_computed']))}",
                  f"- blocked / full: **{tb['blocked_cost_ratio']:.3f}**",
                  f"- testbed pipeline step, enforce vs off: {tb['pipeline_step_s']['enforce']:.4f} s vs "
                  f"{tb['pipeline_step_s']['off']:.4f} s (ratio {tb['pipeline_step_s']['ratio']:.3f}; tiny UNet, so "
                  f"the fixed per-step guard work weighs far more than on SD 1.5)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from memguard.testbed.registry import DEFAULT_TESTBED, TESTBEDS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-amg", action="store_true", help="skip the AMG-style variant (slowest)")
    p.add_argument("--no-testbed", action="store_true")
    p.add_argument("--testbed", choices=tuple(TESTBEDS), default=DEFAULT_TESTBED,
                   help="part 2's shipped testbed (its model, index and policy unless given below)")
    p.add_argument("--testbed-rounds", type=int, default=3)
    p.add_argument("--testbed-model", type=Path)
    p.add_argument("--testbed-index", type=Path)
    p.add_argument("--testbed-policy", type=Path)
    p.add_argument("--no-sd15", action="store_true", help="skip part 1 (SD 1.5 UNet)")
    p.add_argument("--sdxl", action="store_true", help="part 3: SDXL's UNet (~2.6B parameters, ~10 GB in float32)")
    p.add_argument("--sdxl-latent", type=int, default=128, help="latent side (128: 1024×1024 images)")
    p.add_argument("--sdxl-rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    doc = {"rounds": args.rounds, "threads": args.threads, "device": "cpu", "dtype": "float32"}
    if not args.no_sd15:
        print(f"SD 1.5 UNet, {args.rounds} rounds:", flush=True)
        doc["sd15"] = ratio_table(interleave(sd15_variants(args), args.rounds))
    if args.sdxl:
        print(f"SDXL UNet, {args.sdxl_latent}×{args.sdxl_latent} latents, {args.sdxl_rounds} rounds:", flush=True)
        doc.update(sdxl=sdxl_table(args), sdxl_latent=args.sdxl_latent, sdxl_rounds=args.sdxl_rounds)
    if not args.no_testbed:
        torch.set_num_threads(1)
        doc["testbed"] = blocked_cost(args)
    text = markdown(doc)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        args.json.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
