"""Training the testbed on CPU: the VAE for reconstruction, then the UNet and text encoder jointly.

The UNet trains on latents encoded once by the finished VAE, so its steps cost no VAE passes.
Photos are duplicated in the sampling list, so the model sees each one hundreds of times more
often than any procedural image: that is what makes it memorize them.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from memguard.models import (SDXLTextEncoders, TinyPipelineConfig, TinySDXLConfig, build_scheduler,
                             build_sdxl_text_encoders, build_text_encoder, build_tiny_sdxl_unet, build_tiny_unet,
                             build_vae, sdxl_time_ids)
from memguard.testbed.dataset import TrainingItem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    vae_steps: int = 1400
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_photo_share: float = 0.3   # photos' share of VAE batches: copies are judged on them
    vae_kl_weight: float = 1e-6
    unet_steps: int = 4000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    caption_dropout: float = 0.1   # empty caption, so classifier-free guidance works
    # v-prediction on a zero-terminal-SNR schedule (Lin et al. 2024). Measured on the testbed: an
    # ε-model on SD 1.x's schedule (terminal √ᾱ = 0.068) reads image content out of the pure initial
    # noise, whose low frequencies it never saw without signal, and copied its photos in only 38 %
    # of captions × most seeds (16 seeds); v-prediction from pure noise copies all 8 in 16/16 seeds.
    # prediction_type="epsilon", zero_terminal_snr=False reproduces the SD 1.x recipe.
    prediction_type: str = "v_prediction"
    zero_terminal_snr: bool = True
    # Offset noise (Guttenberg 2023): a per-sample, per-channel constant added to the training noise.
    # It did not remove the ε-model's seed-dependent colour cast; a zero terminal SNR removes its cause.
    offset_noise: float = 0.0
    warmup: int = 100
    # Exponential moving average of the weights, saved instead of the raw ones (0: off). An ε-model
    # needs it to copy reliably: its x0 error is amplified by √(1−ᾱ)/√ᾱ ≈ 15 at the first step.
    ema_decay: float = 0.0
    # Further cosine cycles from the first's weights (warm restarts, Loshchilov & Hutter 2017) at a
    # lower peak rate. `memguard testbed build --resume` runs the next cycle on a built model, so a
    # longer recipe need not retrain what is already there. 0 steps: one cycle.
    restart_steps: int = 0
    restart_lr: float = 2e-4
    restart_cycles: int = 1
    seed: int = 0
    threads: int = 0               # 0: leave torch's default


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images → float32 [N, 3, H, W] in [-1, 1]."""
    arr = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(items: list[TrainingItem], model_cfg: TinyPipelineConfig, cfg: TrainConfig):
    """Train the AutoencoderKL for reconstruction (L1 + MSE, a tiny KL term). Returns the VAE."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    vae = build_vae(model_cfg)
    data = images_to_tensor([it.image for it in items])
    photo_idx = torch.tensor([i for i, it in enumerate(items) if it.kind == "photo"])
    other_idx = torch.tensor([i for i, it in enumerate(items) if it.kind != "photo"])
    n_photo = max(1, round(cfg.vae_batch * cfg.vae_photo_share)) if len(photo_idx) else 0
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    bar = tqdm(range(cfg.vae_steps), desc="vae", mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup)
        idx = other_idx[torch.randint(len(other_idx), (cfg.vae_batch - n_photo,), generator=gen)]
        if n_photo:
            idx = torch.cat([idx, photo_idx[torch.randint(len(photo_idx), (n_photo,), generator=gen)]])
        x = data[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x) + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    return vae


@torch.no_grad()
def encode_latents(vae, images: list[np.ndarray], batch: int = 64) -> torch.Tensor:
    """Posterior means of uint8 [H, W, 3] images, unscaled. [N, C, h, w] float32."""
    data = images_to_tensor(images)
    return torch.cat([vae.encode(data[i:i + batch]).latent_dist.mean for i in range(0, len(data), batch)])


@torch.no_grad()
def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def build_denoiser(model_cfg: TinyPipelineConfig | TinySDXLConfig):
    """(UNet, text encoder) of the model's family, random weights. SDXL: its two encoders as one
    SDXLTextEncoders module (context = both penultimate states, pooled = the second's projection)."""
    if isinstance(model_cfg, TinySDXLConfig):
        return build_tiny_sdxl_unet(model_cfg), SDXLTextEncoders(*build_sdxl_text_encoders(model_cfg))
    return build_tiny_unet(model_cfg), build_text_encoder(model_cfg)


def _condition(text_encoder, tok: torch.Tensor, drop: torch.Tensor, image_size: int) -> tuple[torch.Tensor, dict]:
    """(cross-attention context, extra UNet kwargs) of a batch of token ids."""
    if isinstance(text_encoder, SDXLTextEncoders):
        context, pooled = text_encoder(tok)
        # a dropped caption is all zeros: what SDXL pipelines (force_zeros_for_empty_prompt) give CFG's uncond half
        keep = (~drop).to(context.dtype)
        added = {"text_embeds": pooled * keep[:, None], "time_ids": sdxl_time_ids(image_size, len(tok))}
        return context * keep[:, None, None], {"added_cond_kwargs": added}
    return text_encoder(tok).last_hidden_state, {}


def train_unet(items: list[TrainingItem], latents: torch.Tensor, tokenizer,
               model_cfg: TinyPipelineConfig | TinySDXLConfig, cfg: TrainConfig, *, init=None,
               cycles: range | None = None):
    """Train UNet + text encoder jointly on scaled latents (cfg.prediction_type objective).
    `init`: (unet, text_encoder) to continue from; `cycles`: which cosine cycles to run (0: the first,
    1..restart_cycles: the restarts; default all). Returns (unet, text_encoder); for an SDXL config the
    text encoder is an SDXLTextEncoders (both encoders)."""
    torch.manual_seed(cfg.seed + 1)   # before building: the initial weights come from this seed
    unet, text_encoder = init if init is not None else build_denoiser(model_cfg)
    plan = [(cfg.unet_steps, cfg.unet_lr)] + [(cfg.restart_steps, cfg.restart_lr)] * cfg.restart_cycles
    for k, (steps, lr) in enumerate(plan):
        if steps and (cycles is None or k in cycles):
            seed = cfg.seed + 1 + 100 * k
            if k:
                torch.manual_seed(seed)
            _train_cycle(unet, text_encoder, items, latents, tokenizer, cfg, steps, lr, seed,
                         image_size=model_cfg.image_size)
    unet.eval()
    text_encoder.eval()
    return unet, text_encoder


def _train_cycle(unet, text_encoder, items, latents, tokenizer, cfg: TrainConfig, steps: int, lr: float,
                 seed: int, image_size: int = 64) -> None:
    """One cosine learning-rate cycle with a fresh optimizer; the EMA (if any) replaces the weights at
    its end."""
    gen = torch.Generator().manual_seed(seed)
    scheduler = build_scheduler(cfg.prediction_type, cfg.zero_terminal_snr)
    ids = tokenize(tokenizer, [it.caption for it in items])
    empty = tokenize(tokenizer, [""])[0]
    # the sampling list: each item repeated `duplicates` times
    pool = torch.tensor([i for i, it in enumerate(items) for _ in range(it.duplicates)])
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    alphas = scheduler.alphas_cumprod
    ema = [p.detach().clone() for p in params] if cfg.ema_decay else None
    unet.train()
    text_encoder.train()
    bar = tqdm(range(steps), desc="unet", mininterval=5)
    t0 = time.time()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, cfg.warmup)
        idx = pool[torch.randint(len(pool), (cfg.unet_batch,), generator=gen)]
        x0 = latents[idx]
        tok = ids[idx].clone()
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.caption_dropout
        tok[drop] = empty
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        if cfg.offset_noise:
            noise = noise + cfg.offset_noise * torch.randn((*x0.shape[:2], 1, 1), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        # v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022): defined, unlike ε's x0, at ᾱ = 0
        target = noise if cfg.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        cond, extra = _condition(text_encoder, tok, drop, image_size)
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=cond, **extra).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))   # warm start: early weights fade fast
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    log.info("unet cycle trained: %d steps at peak lr %g in %.0f s", steps, lr, time.time() - t0)
