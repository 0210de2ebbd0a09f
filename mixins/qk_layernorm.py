"""QKLayerNormMixin: per-layer LayerNorm of queries and keys over the head dim, without AdaLN; and the qk-LayerNorm
that both it and :class:`~mixins.adaln.AdaLNMixin` use.

:class:`~mixins.adaln.AdaLNMixin` carries CogVideoX's qk-LayerNorm together with its modulation. A config that
drops the AdaLN mixin (the "all tokens" conditioning ablation) adds this one to keep qk-LayerNorm, so that the
ablation changes the conditioning only. Same parameter names as the AdaLN mixin's (:func:`qk_layernorm_lists`), the
same computation (:func:`normalize_qk`) and the same place in the ``process_qkv`` chain (before RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sat_video.model.config import DiTConfig
from sat_video.model.context import ForwardContext
from sat_video.model.hooks import Mixin
from sat_video.model.registry import register_mixin

QK_LAYERNORM_EPS = 1e-6
"""CogVideoX's epsilon of the q/k LayerNorm."""


def qk_layernorm_lists(dit_config: DiTConfig, eps: float) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Per block, a LayerNorm over the head dim (shared across heads) for the queries and one for the keys. A mixin
    keeps them as ``query_layernorm_list`` and ``key_layernorm_list``: SAT's checkpoint names."""

    def per_block() -> nn.ModuleList:
        return nn.ModuleList(nn.LayerNorm(dit_config.head_dim, eps=eps) for _ in range(dit_config.num_layers))

    return per_block(), per_block()


def normalize_qk(
    query_norm: nn.LayerNorm, key_norm: nn.LayerNorm, q: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` and ``k`` ``[B, H, S, hd]`` normalised over ``hd``.

    Normalised in the fused projection's ``[B, S, H, hd]`` memory order and handed on as ``[B, H, S, hd]`` views of it:
    attention then returns that order too, so the output projection reads it without a transposing copy.
    """
    return query_norm(q.transpose(1, 2)).transpose(1, 2), key_norm(k.transpose(1, 2)).transpose(1, 2)


@register_mixin("qk_layernorm")
class QKLayerNormMixin(Mixin):
    """LayerNorm (shared across heads) on queries and keys of every block (``process_qkv`` hook).

    State dict: ``query_layernorm_list.{i}`` and ``key_layernorm_list.{i}``, ``[head_dim]`` weight and bias.
    """

    runs_sharded = True  # token by token

    @dataclass
    class Config:
        eps: float = QK_LAYERNORM_EPS
        """LayerNorm epsilon (CogVideoX's: 1e-6)."""

    chain_priority = {"process_qkv": -10}  # normalise q/k before any rotation

    def __init__(self, dit_config, config=None):
        super().__init__(dit_config, config)
        self.query_layernorm_list, self.key_layernorm_list = qk_layernorm_lists(dit_config, self.config.eps)

    def reset_parameters(self) -> None:
        for norm in (*self.query_layernorm_list, *self.key_layernorm_list):
            norm.reset_parameters()

    def process_qkv(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return *normalize_qk(self.query_layernorm_list[layer_idx], self.key_layernorm_list[layer_idx], q, k), v
