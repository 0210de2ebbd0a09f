"""AdaLNMixin: CogVideoX's expert adaptive LayerNorm (``layer_forward``) and qk-LayerNorm (``process_qkv``).

Per layer, ``SiLU -> Linear(time_embed_dim, 12 D)`` of the timestep embedding gives 12 chunks:
shift / scale / gate for attention and MLP of the video tokens, then the same six for the text
tokens. Text and video share the LayerNorms, the attention and the MLP; only the modulation and the
gates are per modality ("experts"). The modulation linears start at zero, so every block starts as
the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mixins.qk_layernorm import QK_LAYERNORM_EPS, normalize_qk, qk_layernorm_lists
from sat_video.model.context import ForwardContext
from sat_video.model.hooks import Mixin
from sat_video.model.modulation import gated_residual, modulate_per_modality
from sat_video.model.registry import register_mixin
from sat_video.model.transformer import TransformerLayer


@register_mixin("adaln")
class AdaLNMixin(Mixin):
    """Expert AdaLN modulation of every block, plus per-layer q/k LayerNorm over the head dim.

    State dict: ``adaLN_modulations.{i}.1.{weight,bias}`` ``[12 D, time_embed_dim]`` and, with
    ``qk_layernorm``, ``query_layernorm_list.{i}`` / ``key_layernorm_list.{i}`` ``[head_dim]``.
    """

    runs_sharded = True  # token by token (the text/video boundary is ctx.num_condition_tokens on every rank)

    @dataclass
    class Config:
        qk_layernorm: bool = True
        """LayerNorm (eps 1e-6, shared across heads) on queries and keys before attention."""

    chain_priority = {"process_qkv": -10}  # normalise q/k before any rotation

    def __init__(self, dit_config, config=None):
        super().__init__(dit_config, config)
        self.adaLN_modulations = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(dit_config.time_embed_dim, 12 * dit_config.hidden_size))
            for _ in range(dit_config.num_layers)
        )
        if self.config.qk_layernorm:
            self.query_layernorm_list, self.key_layernorm_list = qk_layernorm_lists(dit_config, QK_LAYERNORM_EPS)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for modulation in self.adaLN_modulations:
            nn.init.zeros_(modulation[1].weight)
            nn.init.zeros_(modulation[1].bias)

    def implemented_hooks(self) -> list[str]:
        hooks = super().implemented_hooks()
        return hooks if self.config.qk_layernorm else [h for h in hooks if h != "process_qkv"]

    def layer_forward(self, layer: TransformerLayer, hidden: torch.Tensor, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
        n = ctx.num_condition_tokens
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
         text_shift_msa, text_scale_msa, text_gate_msa, text_shift_mlp, text_scale_mlp, text_gate_mlp,
         ) = self.adaLN_modulations[layer_idx](ctx.temb)[:, None].chunk(12, dim=-1)  # each [B, 1, D]

        # attention over the joint sequence, modulated and gated per modality
        x = modulate_per_modality(layer.input_layernorm(hidden), n, (text_shift_msa, text_scale_msa), (shift_msa, scale_msa))
        hidden = gated_residual(hidden, layer.attention(x, ctx, layer_idx), n, text_gate_msa, gate_msa)

        # MLP likewise
        x = modulate_per_modality(
            layer.post_attention_layernorm(hidden), n, (text_shift_mlp, text_scale_mlp), (shift_mlp, scale_mlp)
        )
        return gated_residual(hidden, layer.mlp(x, ctx, layer_idx), n, text_gate_mlp, gate_mlp)

    def process_qkv(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return *normalize_qk(self.query_layernorm_list[layer_idx], self.key_layernorm_list[layer_idx], q, k), v
