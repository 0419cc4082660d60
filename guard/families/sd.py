"""SD 1.x / 2.x: one CLIP text encoder (last hidden state), a UNet2DConditionModel, ε or v."""
from __future__ import annotations

from typing import Sequence

import torch

from memguard.families.base import FamilyAdapter, PromptEncoding


def eos_positions(tokenizer, prompts: Sequence[str]) -> list[int]:
    """Each prompt's first end-of-text position among the tokenizer's max_length tokens."""
    from memguard.mitigation import prompt_lengths

    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return prompt_lengths(ids, tokenizer.eos_token_id)


class StableDiffusionFamily(FamilyAdapter):
    name = "sd"
    description = "SD 1.x/2.x"
    pipeline_classes = ("StableDiffusionPipeline",)
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    def encode(self, prompts: Sequence[str], negatives: Sequence[str], *, height: int, width: int,
               device: torch.device) -> PromptEncoding:
        # diffusers' own encoder: SD 1.x/2.x prompts encode exactly as its __call__ encodes them
        cond, uncond = self.pipe.encode_prompt(list(prompts), device, 1, True, negative_prompt=list(negatives))
        return PromptEncoding(cond, uncond, eos_positions(self.pipe.tokenizer, prompts))

    def denoise(self, model_in, t, context, added):
        return self.denoiser(model_in, t, encoder_hidden_states=context).sample
