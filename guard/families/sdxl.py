"""SDXL: two CLIP text encoders, `text_time` added conditioning, a UNet2DConditionModel.

Facts from diffusers' StableDiffusionXLPipeline (our own code):
- each prompt goes through both tokenizers/encoders; the per-token context is the two encoders'
  penultimate hidden states concatenated on the feature axis (768 + 1280 = 2048 for SDXL base);
- the pooled embedding is the second encoder's (CLIPTextModelWithProjection) projected text embedding;
- time ids are (original height, width, crop top, crop left, target height, width); with no
  micro-conditioning given they are (H, W, 0, 0, H, W) of the requested size, for both halves of CFG;
- the UNet takes added_cond_kwargs {"text_embeds": pooled, "time_ids": time ids};
- an empty negative prompt is all zeros (context and pooled) when the pipeline's config has
  force_zeros_for_empty_prompt (SDXL base's default), else it is encoded like a prompt;
- the VAE (scaling 0.13025 for SDXL) runs in float32 when it is float16 and force_upcast is set;
  latents_mean/latents_std, where configured, denormalize before decoding.
"""
from __future__ import annotations

from typing import Sequence

import torch

from memguard.errors import InvalidInput
from memguard.families.base import FamilyAdapter, PromptEncoding
from memguard.families.sd import eos_positions


class StableDiffusionXLFamily(FamilyAdapter):
    name = "sdxl"
    description = "SDXL"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    load_kwargs = {"add_watermarker": False}   # plain decode: the guard screens what it releases

    def __init__(self, pipe):
        super().__init__(pipe)
        unet = pipe.unet
        if getattr(unet.config, "addition_embed_type", None) != "text_time":
            raise InvalidInput("model", f"an SDXL UNet needs addition_embed_type 'text_time', this one has "
                                        f"{unet.config.addition_embed_type!r}")
        if unet.config.time_cond_proj_dim is not None:
            raise InvalidInput("model", "guidance-distilled SDXL UNets (time_cond_proj_dim, LCM) are not supported")
        self._encoders = [(tok, enc) for tok, enc in ((pipe.tokenizer, pipe.text_encoder),
                                                      (pipe.tokenizer_2, pipe.text_encoder_2)) if enc is not None]
        if not self._encoders or pipe.text_encoder_2 is None:
            raise InvalidInput("model", "an SDXL pipeline needs text_encoder_2 (CLIPTextModelWithProjection)")
        te2 = pipe.text_encoder_2
        pooled_dim = int(te2.config.projection_dim)
        expected = unet.add_embedding.linear_1.in_features
        passed = unet.config.addition_time_embed_dim * 6 + pooled_dim
        if expected != passed:
            raise InvalidInput("model", f"the UNet's added embedding takes {expected} features, but 6 time ids × "
                                        f"{unet.config.addition_time_embed_dim} + pooled {pooled_dim} = {passed}")

    @property
    def _eos_tokenizer(self):
        return self.pipe.tokenizer if self.pipe.tokenizer is not None else self.pipe.tokenizer_2

    def _encode(self, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """([N, 77, D1+D2] penultimate states of both encoders, [N, P] the second encoder's pooled)."""
        states, pooled = [], None
        for tokenizer, encoder in self._encoders:
            ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            if out[0].ndim == 2:          # CLIPTextModelWithProjection: text_embeds come first
                pooled = out[0]
            states.append(out.hidden_states[-2])
        dtype = self.pipe.text_encoder_2.dtype
        return torch.cat(states, dim=-1).to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)

    def encode(self, prompts: Sequence[str], negatives: Sequence[str], *, height: int, width: int,
               device: torch.device) -> PromptEncoding:
        prompts, negatives = list(prompts), list(negatives)
        cond, pooled = self._encode(prompts, device)
        uncond, pooled_u = torch.zeros_like(cond), torch.zeros_like(pooled)
        zero_empty = bool(self.pipe.config.get("force_zeros_for_empty_prompt", True))
        encode = [i for i, n in enumerate(negatives) if n or not zero_empty]
        if encode:
            neg, neg_pooled = self._encode([negatives[i] for i in encode], device)
            idx = torch.tensor(encode, device=device)
            uncond[idx], pooled_u[idx] = neg, neg_pooled
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=cond.dtype,
                                device=device).repeat(len(prompts), 1)
        return PromptEncoding(cond, uncond, eos_positions(self._eos_tokenizer, prompts),
                              {"text_embeds": pooled, "time_ids": time_ids},
                              {"text_embeds": pooled_u, "time_ids": time_ids.clone()})

    def denoise(self, model_in, t, context, added):
        return self.denoiser(model_in, t, encoder_hidden_states=context, added_cond_kwargs=added,
                             return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        if vae.dtype == torch.float16 and vae.config.force_upcast:   # SDXL's VAE overflows in float16
            vae.to(torch.float32)
            try:
                return vae.decode(self.vae_latents(latents.float()), return_dict=False)[0]
            finally:
                vae.to(torch.float16)
        return vae.decode(self.vae_latents(latents.to(vae.dtype)), return_dict=False)[0]
