"""FactorizedAttentionMixin: Latte's four ways to split full 3D attention into spatial and temporal attention.

* **Spatial attention**: a video token attends to the condition tokens and to the video tokens of its own
  frame. Condition tokens (text, and any token an ``embed`` wrapper prepends) attend to the whole sequence,
  so text still reaches the video and the video still updates the text, as in full joint attention.
* **Temporal attention**: a video token attends to the video tokens at its own ``(h, w)`` in every frame;
  condition tokens attend only to each other. Conditions enter through spatial attention, as in Latte, which
  also keeps temporal attention at ``T`` keys per query instead of ``L + T``.

Arrangements (``arrangement``):

1. ``interleaved``: even blocks spatial, odd blocks temporal (Latte's best at equal FLOPs).
2. ``sequential``: the first half of the blocks spatial, the rest temporal.
3. ``serial_in_block``: every block runs spatial attention ``s = S(x)``, then its own temporal attention on
   ``x + s``, and returns ``s + T(x + s)``: two residual sub-layers sharing one LayerNorm (and one AdaLN gate).
4. ``parallel_in_block``: every block returns ``S(x) + T(x)`` (Latte's cheapest and worst).

(1) and (2) only restrict the attention of existing blocks (``attention_kernel``); (3) and (4) add one
temporal ``SelfAttention`` per block (``attention_forward``). Queries and keys still pass ``process_qkv``, so
qk-LayerNorm and RoPE apply to both attentions (the temporal one shares its block's qk-LayerNorm).

**Joint image and video training.** A batch whose token grid has one frame is an image batch (the data
loader never mixes images and videos in a batch). There the temporal parts are the identity: temporal blocks
of (1)/(2) return their input and the temporal attention of (3)/(4) adds nothing, so image samples train only
spatial parameters. The temporal parts still run, weighted by zero, so that their parameters receive an
exact zero gradient rather than none. DeepSpeed ZeRO-2 reduces gradient buckets across ranks and aborts when
ranks disagree on which parameters have gradients; ``ClipBatchSampler`` already gives every rank the same kind
(image or video) at each step, and the zero gradients keep every parameter in every reduction on top of that,
so training does not depend on the data order to stay in step. (AdamW still moves temporal weights on image
steps through its momentum and weight decay, as it moves any parameter whose gradient is zero.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sat_video.common.errors import ConfigError
from sat_video.model.context import ForwardContext, TokenGrid
from sat_video.model.hooks import Mixin, wraps_previous
from sat_video.model.registry import register_mixin
from sat_video.model.transformer import SelfAttention, TransformerLayer

ARRANGEMENTS = ("interleaved", "sequential", "serial_in_block", "parallel_in_block")
BLOCK_ARRANGEMENTS = ("interleaved", "sequential")  # whole blocks are spatial or temporal


def spatial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_condition_tokens: int, grid: TokenGrid
) -> torch.Tensor:
    """Video queries see the condition tokens and their own frame; condition queries see everything.

    Args:
        q, k, v: ``[B, H, L + N, hd]``, video tokens ordered t, h, w.
    Returns:
        ``[B, H, L + N, hd]``.
    """
    n, frames, per_frame = num_condition_tokens, grid.frames, grid.height * grid.width
    batch = q.shape[0]
    condition = F.scaled_dot_product_attention(q[:, :, :n], k, v)  # [B, H, L, hd]

    def by_frame(x):  # [B, H, N, hd] -> [B*T, H, h*w, hd]
        return x.unflatten(2, (frames, per_frame)).transpose(1, 2).flatten(0, 1)

    def per_frame_copy(x):  # [B, H, L, hd] -> [B*T, H, L, hd]: every frame sees all condition tokens
        return x[:, None].expand(-1, frames, -1, -1, -1).flatten(0, 1)

    keys = torch.cat([per_frame_copy(k[:, :, :n]), by_frame(k[:, :, n:])], dim=2)  # [B*T, H, L + h*w, hd]
    values = torch.cat([per_frame_copy(v[:, :, :n]), by_frame(v[:, :, n:])], dim=2)
    video = F.scaled_dot_product_attention(by_frame(q[:, :, n:]), keys, values)  # [B*T, H, h*w, hd]
    video = video.unflatten(0, (batch, frames)).transpose(1, 2).flatten(2, 3)  # [B, H, N, hd]
    return torch.cat([condition, video], dim=2)


def temporal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_condition_tokens: int, grid: TokenGrid
) -> torch.Tensor:
    """Video queries see their own ``(h, w)`` in every frame; condition queries see only condition tokens.

    Args:
        q, k, v: ``[B, H, L + N, hd]``, video tokens ordered t, h, w.
    Returns:
        ``[B, H, L + N, hd]``.
    """
    n, frames, per_frame = num_condition_tokens, grid.frames, grid.height * grid.width
    batch = q.shape[0]
    condition = F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n])  # [B, H, L, hd]

    def by_position(x):  # [B, H, N, hd] -> [B*h*w, H, T, hd]
        return x.unflatten(2, (frames, per_frame)).permute(0, 3, 1, 2, 4).flatten(0, 1)

    video = F.scaled_dot_product_attention(by_position(q[:, :, n:]), by_position(k[:, :, n:]), by_position(v[:, :, n:]))
    video = video.unflatten(0, (batch, per_frame)).permute(0, 2, 3, 1, 4).flatten(2, 3)  # [B, H, N, hd]
    return torch.cat([condition, video], dim=2)


@register_mixin("factorized_attention")
class FactorizedAttentionMixin(Mixin):
    """Spatial / temporal factorisation of the attention (Latte), in one of four arrangements.

    Hooks: ``attention_kernel`` and a ``layer_forward`` wrapper for ``interleaved`` / ``sequential``;
    ``attention_forward`` for ``serial_in_block`` / ``parallel_in_block``.

    State dict: none for ``interleaved`` / ``sequential``; otherwise ``temporal_attention.{i}.query_key_value``
    ``[3 D, D]`` and ``temporal_attention.{i}.dense`` ``[D, D]`` (with biases) per block ``i``.
    """

    @dataclass
    class Config:
        arrangement: str = "interleaved"
        """``interleaved`` (even blocks spatial, odd blocks temporal), ``sequential`` (first half spatial, second
        half temporal), ``serial_in_block`` (spatial then temporal attention in every block) or
        ``parallel_in_block`` (spatial plus temporal attention in every block, summed)."""

        def __post_init__(self):
            if self.arrangement not in ARRANGEMENTS:
                raise ConfigError(
                    f"factorized_attention mixin: arrangement must be one of {', '.join(ARRANGEMENTS)}, "
                    f"found '{self.arrangement}'"
                )

    def __init__(self, dit_config, config=None):
        super().__init__(dit_config, config)
        arrangement = self.config.arrangement
        if arrangement in BLOCK_ARRANGEMENTS and dit_config.num_layers < 2:
            raise ConfigError(
                f"factorized_attention mixin: arrangement '{arrangement}' needs at least one spatial and one "
                f"temporal block, but model.dit.num_layers is {dit_config.num_layers}"
            )
        if arrangement not in BLOCK_ARRANGEMENTS:
            self.temporal_attention = nn.ModuleList(
                SelfAttention(dit_config.hidden_size, dit_config.num_attention_heads, role="temporal_attention")
                for _ in range(dit_config.num_layers)
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The base blocks' initialisation (SAT's), so that (3)/(4) differ from (1)/(2) by arrangement, not by init.
        if self.config.arrangement in BLOCK_ARRANGEMENTS:
            return
        out_std = 0.02 / math.sqrt(2.0 * self.dit_config.num_layers)
        for attention in self.temporal_attention:
            for linear, std in ((attention.query_key_value, 0.02), (attention.dense, out_std)):
                if not linear.weight.is_meta:  # as the base blocks: a meta normal_ imports torch._dynamo
                    nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)

    def implemented_hooks(self) -> list[str]:
        if self.config.arrangement in BLOCK_ARRANGEMENTS:
            return ["layer_forward", "attention_kernel"]
        return ["attention_forward"]

    def is_temporal_block(self, layer_idx: int) -> bool:
        """Whether block ``layer_idx`` is a temporal block (``interleaved`` / ``sequential`` only)."""
        if self.config.arrangement == "interleaved":
            return layer_idx % 2 == 1
        if self.config.arrangement == "sequential":
            return layer_idx >= (self.dit_config.num_layers + 1) // 2
        return False

    # (1) and (2): whole blocks are spatial or temporal

    def attention_kernel(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, layer_idx: int
    ) -> torch.Tensor:
        kernel = temporal_attention if self.is_temporal_block(layer_idx) else spatial_attention
        return kernel(q, k, v, ctx.num_condition_tokens, ctx.grid)

    @wraps_previous
    def layer_forward(
        self,
        layer: TransformerLayer,
        hidden: torch.Tensor,
        ctx: ForwardContext,
        layer_idx: int,
        *,
        inner: Callable[..., torch.Tensor],
    ) -> torch.Tensor:
        out = inner(layer, hidden, ctx, layer_idx)
        if ctx.grid.frames > 1 or not self.is_temporal_block(layer_idx):
            return out
        return hidden + 0.0 * out  # image batch: identity, with a zero gradient for the block (module docstring)

    # (3) and (4): one spatial and one temporal attention per block

    def _spatial(self, q, k, v, ctx, layer_idx):
        return spatial_attention(q, k, v, ctx.num_condition_tokens, ctx.grid)

    def _temporal(self, q, k, v, ctx, layer_idx):
        return temporal_attention(q, k, v, ctx.num_condition_tokens, ctx.grid)

    def attention_forward(self, attention: SelfAttention, x: torch.Tensor, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
        spatial = attention.attend(x, ctx, layer_idx, kernel=self._spatial)  # [B, L + N, D]
        temporal_input = x + spatial if self.config.arrangement == "serial_in_block" else x
        temporal = self.temporal_attention[layer_idx].attend(temporal_input, ctx, layer_idx, kernel=self._temporal)
        if ctx.grid.frames == 1:
            temporal = 0.0 * temporal  # image batch: no temporal contribution, a zero gradient (module docstring)
        return spatial + temporal
