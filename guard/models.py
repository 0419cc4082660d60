"""Model builders from configs, with random weights: the testbed's tiny pipeline, SD 1.5's UNet, and
SDXL's (a tiny pipeline of its structure, and its real UNet).

Tests and benchmarks build these instead of downloading anything. The testbed trains the tiny
architecture; the SD 1.5 UNet has Stable Diffusion 1.5's real architecture (320/640/1280/1280
channels, 8 heads of dim 40-160, cross-attention dim 768) for realistic overhead measurements.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77


@dataclass(frozen=True)
class TinyPipelineConfig:
    """Architecture of the testbed pipeline (64×64 RGB images, 16×16×4 latents)."""
    image_size: int = 64
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (32, 64, 64)
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_heads: int = 4
    # GroupNorm groups in the UNet. 32 groups over 32 channels normalizes each channel on its own, so
    # no feature keeps its spatial mean: the output cannot pass the input's per-channel mean through.
    unet_norm_groups: int = 32
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def build_vae(cfg: TinyPipelineConfig = TinyPipelineConfig()) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels, layers_per_block=1, norm_num_groups=16,
        sample_size=cfg.image_size,
    )


def build_text_encoder(cfg: TinyPipelineConfig = TinyPipelineConfig()) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=cfg.text_hidden, intermediate_size=cfg.text_hidden * 4,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return CLIPTextModel(config)


def build_tiny_unet(cfg: TinyPipelineConfig = TinyPipelineConfig()) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=cfg.latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=cfg.unet_channels, layers_per_block=1, norm_num_groups=cfg.unet_norm_groups,
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.unet_heads,
    )


def build_scheduler(prediction_type: str = "epsilon", zero_terminal_snr: bool = False) -> DDIMScheduler:
    """Stable Diffusion's noise schedule (scaled linear betas), DDIM.

    Defaults: SD 1.x exactly (ε-prediction, leading timesteps). zero_terminal_snr rescales the betas so
    the last timestep is pure noise and samples from it ("trailing" timesteps), after Lin et al.
    (2024), "Common Diffusion Noise Schedules and Sample Steps are Flawed"; it needs v-prediction,
    because ε-prediction cannot recover x0 from pure noise.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if zero_terminal_snr and prediction_type != "v_prediction":
        raise ValueError("a zero terminal SNR schedule needs prediction_type='v_prediction'")
    if zero_terminal_snr:
        return DDIMScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type,
            rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=1,   # unused by trailing; SD pipelines set it
        )
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def build_sd15_unet(dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """UNet2DConditionModel with Stable Diffusion 1.5's architecture and random weights (~860M params)."""
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    ).to(dtype)


def build_tiny_pipeline(cfg: TinyPipelineConfig = TinyPipelineConfig(), tokenizer=None):
    """A StableDiffusionPipeline of the testbed's architecture with random weights."""
    from diffusers import StableDiffusionPipeline

    from memguard.testbed.tokenizer import load_clip_tokenizer

    return StableDiffusionPipeline(
        vae=build_vae(cfg), text_encoder=build_text_encoder(cfg), tokenizer=tokenizer or load_clip_tokenizer(),
        unet=build_tiny_unet(cfg), scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


# ----------------------------------------------------------------------------- SDXL
@dataclass(frozen=True)
class TinySDXLConfig:
    """A tiny pipeline with SDXL's structure: two CLIP text encoders (the second with a projection,
    whose pooled embedding conditions the UNet with the size/crop time ids), their penultimate states
    concatenated into the cross-attention context, a `text_time` UNet with SDXL's block layout
    (no attention in the first down block, more transformer layers deeper), an Euler scheduler and
    SDXL's VAE scaling. Widths are scaled down (context 32 + 64 = 96 instead of 768 + 1280 = 2048).
    """
    image_size: int = 128
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (32, 64, 64)
    unet_channels: tuple[int, ...] = (32, 64)
    unet_head_dims: tuple[int, ...] = (2, 4)          # SDXL: attention_head_dim (5, 10, 20) = heads
    transformer_layers: tuple[int, ...] = (1, 2)      # SDXL: (1, 2, 10)
    unet_norm_groups: int = 16                        # SDXL: 32 (of 320 channels); see TinyPipelineConfig
    text_hidden: tuple[int, int] = (32, 64)           # SDXL: 768, 1280
    text_layers: int = 2
    text_heads: int = 4
    projection_dim: int = 32                          # SDXL: 1280
    time_embed_dim: int = 8                           # SDXL: addition_time_embed_dim 256

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)

    @property
    def context_dim(self) -> int:
        return sum(self.text_hidden)


def build_sdxl_scheduler():
    """SDXL base's scheduler: Euler, scaled linear betas, leading timesteps, ε-prediction."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", interpolation_type="linear",
                                  prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
                                  use_karras_sigmas=False)


def build_tiny_sdxl_unet(cfg: TinySDXLConfig = TinySDXLConfig()) -> UNet2DConditionModel:
    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        block_out_channels=cfg.unet_channels, layers_per_block=2, norm_num_groups=cfg.unet_norm_groups,
        attention_head_dim=cfg.unet_head_dims, transformer_layers_per_block=cfg.transformer_layers,
        use_linear_projection=True, cross_attention_dim=cfg.context_dim,
        addition_embed_type="text_time", addition_time_embed_dim=cfg.time_embed_dim,
        projection_class_embeddings_input_dim=cfg.time_embed_dim * 6 + cfg.projection_dim,
    )


def build_sdxl_text_encoders(cfg: TinySDXLConfig = TinySDXLConfig()):
    """(CLIPTextModel, CLIPTextModelWithProjection) of the two widths."""
    from transformers import CLIPTextModelWithProjection

    def config(hidden: int, **extra) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=hidden * 4,
                              num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                              max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=49406, eos_token_id=49407,
                              pad_token_id=49407, **extra)

    return (CLIPTextModel(config(cfg.text_hidden[0])),
            CLIPTextModelWithProjection(config(cfg.text_hidden[1], projection_dim=cfg.projection_dim)))


def build_tiny_sdxl_pipeline(cfg: TinySDXLConfig = TinySDXLConfig(), tokenizer=None):
    """A StableDiffusionXLPipeline of SDXL's structure at tiny widths, random weights."""
    from diffusers import StableDiffusionXLPipeline

    from memguard.testbed.tokenizer import load_clip_tokenizer

    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels, layers_per_block=1, norm_num_groups=16,
        sample_size=cfg.image_size, scaling_factor=0.13025, force_upcast=True,
    )
    text_encoder, text_encoder_2 = build_sdxl_text_encoders(cfg)
    tokenizer = tokenizer or load_clip_tokenizer()
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=build_tiny_sdxl_unet(cfg), scheduler=build_sdxl_scheduler(),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def build_sdxl_unet(dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """UNet2DConditionModel with SDXL base 1.0's architecture and random weights (~2.6B params):
    320/640/1280 channels, transformer depths 1/2/10, heads of dim 64, cross-attention dim 2048,
    `text_time` added conditioning (6 time ids × 256 + pooled 1280 = 2816)."""
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        cross_attention_dim=2048, norm_num_groups=32, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )
    return unet if dtype == torch.float32 else unet.to(dtype)


class SDXLTextEncoders(torch.nn.Module):
    """SDXL's two text encoders as one module (training): tokens → (context [B, 77, D1+D2]: both
    penultimate hidden states concatenated, pooled [B, P]: the second encoder's projected embedding)."""

    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.first(ids, output_hidden_states=True)
        b = self.second(ids, output_hidden_states=True)
        return torch.cat([a.hidden_states[-2], b.hidden_states[-2]], dim=-1), b.text_embeds


def sdxl_time_ids(size: int, batch: int) -> torch.Tensor:
    """SDXL's size/crop conditioning for square `size`-pixel images, uncropped: [batch, 6]."""
    return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(batch, 1)
