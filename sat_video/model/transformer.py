"""The bare pre-LN transformer, with SAT's module names so that official checkpoints load as they are.

State-dict layout (``i`` = layer)::

    transformer.layers.{i}.input_layernorm               LayerNorm(D), eps 1e-5
    transformer.layers.{i}.attention.query_key_value     Linear(D, 3D), rows [q; k; v]
    transformer.layers.{i}.attention.dense               Linear(D, D)
    transformer.layers.{i}.post_attention_layernorm      LayerNorm(D), eps 1e-5
    transformer.layers.{i}.mlp.dense_h_to_4h             Linear(D, 4D)
    transformer.layers.{i}.mlp.dense_4h_to_h             Linear(4D, D)
    transformer.final_layernorm                          LayerNorm(D), eps 1e-5

The modules dispatch through ``ctx.hooks`` so that mixins can replace any stage; the functions at the
bottom are the defaults of the ``REPLACE`` hooks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from sat_video.model.context import ForwardContext

LAYERNORM_EPS = 1e-5


class SelfAttention(nn.Module):
    """Self-attention with a fused QKV projection.

    Args:
        role (`str`): the name its linears carry in the ``project`` hook (``<role>.query_key_value``); the
            block's own attention is ``attention``, a mixin's extra attention names its own role.
    """

    def __init__(self, hidden_size: int, num_heads: int, role: str = "attention"):
        super().__init__()
        self.num_heads = num_heads
        self.role = role
        self.query_key_value = nn.Linear(hidden_size, 3 * hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
        return ctx.hooks.attention_forward(self, x, ctx, layer_idx)

    def attend(self, x: torch.Tensor, ctx: ForwardContext, layer_idx: int, kernel=None) -> torch.Tensor:
        """Projection, ``process_qkv``, ``kernel`` (default: the ``attention_kernel`` hook), output projection."""
        batch, seq, width = x.shape
        qkv = ctx.hooks.project(self.query_key_value, x, ctx, layer_idx, f"{self.role}.query_key_value")
        # [B, S, 3D] -> [3, B, H, S, hd]: q, k, v are contiguous thirds of the fused output (SAT layout)
        q, k, v = qkv.view(batch, seq, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k, v = ctx.hooks.process_qkv(q, k, v, ctx, layer_idx)
        out = (kernel or ctx.hooks.attention_kernel)(q, k, v, ctx, layer_idx)  # [B, H, S, hd]
        out = out.transpose(1, 2).reshape(batch, seq, width)
        return ctx.hooks.project(self.dense, out, ctx, layer_idx, f"{self.role}.dense")


class MLP(nn.Module):
    def __init__(self, hidden_size: int, inner_size: int):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(hidden_size, inner_size)
        self.dense_4h_to_h = nn.Linear(inner_size, hidden_size)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
        return ctx.hooks.mlp_forward(self, x, ctx, layer_idx)

    def feed_forward(self, x: torch.Tensor, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
        """``dense_h_to_4h`` -> GELU(tanh) -> ``dense_4h_to_h``, both through the ``project`` hook."""
        x = F.gelu(ctx.hooks.project(self.dense_h_to_4h, x, ctx, layer_idx, "mlp.dense_h_to_4h"), approximate="tanh")
        return ctx.hooks.project(self.dense_4h_to_h, x, ctx, layer_idx, "mlp.dense_4h_to_h")


class TransformerLayer(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden_size, eps=LAYERNORM_EPS)
        self.attention = SelfAttention(hidden_size, num_heads)
        self.post_attention_layernorm = nn.LayerNorm(hidden_size, eps=LAYERNORM_EPS)
        self.mlp = MLP(hidden_size, 4 * hidden_size)

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
        return ctx.hooks.layer_forward(self, hidden, ctx, layer_idx)


class BaseTransformer(nn.Module):
    """The block stack and its closing LayerNorm; embeddings and output head come from mixins."""

    def __init__(self, hidden_size: int, num_layers: int, num_heads: int):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(hidden_size, num_heads) for _ in range(num_layers))
        self.final_layernorm = nn.LayerNorm(hidden_size, eps=LAYERNORM_EPS)

    def reset_parameters(self) -> None:
        """SAT's initialisation: N(0, 0.02) for input projections, N(0, 0.02 / sqrt(2 * layers)) for
        the projections that write into the residual stream, zero biases."""
        std = 0.02
        out_std = std / math.sqrt(2.0 * len(self.layers))
        for layer in self.layers:
            for linear, s in ((layer.attention.query_key_value, std), (layer.attention.dense, out_std),
                              (layer.mlp.dense_h_to_4h, std), (layer.mlp.dense_4h_to_h, out_std)):
                if not linear.weight.is_meta:  # no values to draw; a meta normal_ imports torch._dynamo (~1.5 s)
                    nn.init.normal_(linear.weight, std=s)
                nn.init.zeros_(linear.bias)
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.reset_parameters()
        self.final_layernorm.reset_parameters()


# ---------------------------------------------------------------------- defaults of REPLACE hooks


def pre_ln_layer_forward(layer: TransformerLayer, hidden: torch.Tensor, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
    hidden = hidden + layer.attention(layer.input_layernorm(hidden), ctx, layer_idx)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden), ctx, layer_idx)


def single_attention(attention: SelfAttention, x: torch.Tensor, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
    return attention.attend(x, ctx, layer_idx)


def plain_projection(linear: nn.Linear, x: torch.Tensor, ctx: ForwardContext, layer_idx: int, name: str) -> torch.Tensor:
    return linear(x)


def sdpa_attention(q, k, v, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def plain_mlp_forward(mlp: MLP, x: torch.Tensor, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
    return mlp.feed_forward(x, ctx, layer_idx)


def whole_sequence(hidden: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, ForwardContext]:
    return hidden, ctx


DEFAULT_HOOKS = {
    "split_sequence": whole_sequence,
    "join_sequence": whole_sequence,
    "layer_forward": pre_ln_layer_forward,
    "attention_forward": single_attention,
    "project": plain_projection,
    "attention_kernel": sdpa_attention,
    "mlp_forward": plain_mlp_forward,
}
