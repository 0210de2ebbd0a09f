"""QKLayerNormMixin: per-layer LayerNorm of queries and keys over the head dim, without AdaLN.

:class:`~mixins.adaln.AdaLNMixin` carries CogVideoX's qk-LayerNorm together with its modulation. A config that
drops the AdaLN mixin (the "all tokens" conditioning ablation) adds this one to keep qk-LayerNorm, so that the
ablation changes the conditioning only. Same parameter names as the AdaLN mixin's, and the same place in the
``process_qkv`` chain (before RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sat_video.model.context import ForwardContext
from sat_video.model.hooks import Mixin
from sat_video.model.registry import register_mixin


@register_mixin("qk_layernorm")
class QKLayerNormMixin(Mixin):
    """LayerNorm (shared across heads) on queries and keys of every block (``process_qkv`` hook).

    State dict: ``query_layernorm_list.{i}`` and ``key_layernorm_list.{i}``, ``[head_dim]`` weight and bias.
    """

    runs_sharded = True  # token by token

    @dataclass
    class Config:
        eps: float = 1e-6
        """LayerNorm epsilon (CogVideoX's: 1e-6)."""

    chain_priority = {"process_qkv": -10}  # normalise q/k before any rotation

    def __init__(self, dit_config, config=None):
        super().__init__(dit_config, config)
        eps = self.config.eps
        self.query_layernorm_list = nn.ModuleList(
            nn.LayerNorm(dit_config.head_dim, eps=eps) for _ in range(dit_config.num_layers)
        )
        self.key_layernorm_list = nn.ModuleList(nn.LayerNorm(dit_config.head_dim, eps=eps) for _ in range(dit_config.num_layers))

    def reset_parameters(self) -> None:
        for norm in (*self.query_layernorm_list, *self.key_layernorm_list):
            norm.reset_parameters()

    def process_qkv(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.query_layernorm_list[layer_idx](q), self.key_layernorm_list[layer_idx](k), v
