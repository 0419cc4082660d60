"""A cross-attention processor that reads per-token attention mass inside the fused kernel.

Drop-in for diffusers' AttnProcessor2_0 on the UNet's cross-attention layers (`...attn2`):
same projections and reshapes, but the attention itself runs through
`kernels.cross_attention_with_stats`, which also returns Σ_n P[b, h, n, t] — the statistic Ren et al.
compute with an explicit softmax — at no extra pass over memory. It also applies the reroute
mitigation's per-sample BOS logit scaling and padding mask.

With `AttentionControl.stats` off, the processor runs exactly AttnProcessor2_0's arithmetic
(`F.scaled_dot_product_attention`), so an unguarded batch reproduces diffusers bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from memguard import kernels


@dataclass
class AttentionControl:
    """Per-step state shared by every processor of one UNet.

    key_logit_scale / key_mask: [B2, T] for the UNet's batch rows (uncond rows then cond rows), or
    None for plain attention. mass: running Σ over layers of token mass normalised per layer and
    head (so every layer weighs the same), [B2, T] float32; reset before each UNet call.
    stats: False → plain SDPA (AttnProcessor2_0's arithmetic), no mass, no logit scale or mask.
    """
    key_logit_scale: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    mass: torch.Tensor | None = None
    layers: int = 0
    record: bool = True
    stats: bool = True
    layer_names: list[str] = field(default_factory=list)

    def reset(self) -> None:
        self.mass, self.layers = None, 0

    def add(self, token_mass: torch.Tensor, queries: int) -> None:
        per_layer = token_mass.sum(dim=1) / (queries * token_mass.shape[1])   # [B2, T], rows sum to 1
        self.mass = per_layer if self.mass is None else self.mass + per_layer
        self.layers += 1

    def mean_mass(self) -> torch.Tensor:
        """[B2, T] token mass averaged over layers (each row sums to 1)."""
        if self.mass is None:
            raise RuntimeError("no cross-attention layer ran since the last reset")
        return self.mass / self.layers


class StatsCrossAttnProcessor:
    """AttnProcessor2_0's computation with the attention done by cross_attention_with_stats."""

    def __init__(self, control: AttentionControl):
        self.control = control

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("StatsCrossAttnProcessor is for cross-attention layers (attn2) only")
        if attention_mask is not None:
            raise ValueError("attention_mask is not supported; masks come from AttentionControl.key_mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        ctl = self.control
        if ctl.stats:
            out, token_mass = kernels.cross_attention_with_stats(
                query, key, value, scale=attn.scale, key_logit_scale=ctl.key_logit_scale, key_mask=ctl.key_mask)
            if ctl.record:
                ctl.add(token_mass, query.shape[2])
        else:  # AttnProcessor2_0 exactly: an unguarded batch matches diffusers bit for bit
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)

        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_stats_processors(unet) -> AttentionControl:
    """Give every cross-attention layer of `unet` a StatsCrossAttnProcessor sharing one control."""
    control = AttentionControl()
    processors = {}
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            processors[name] = StatsCrossAttnProcessor(control)
            control.layer_names.append(name)
        else:
            processors[name] = proc
    if not control.layer_names:
        raise ValueError("the UNet has no cross-attention layers (attn2)")
    unet.set_attn_processor(processors)
    return control
