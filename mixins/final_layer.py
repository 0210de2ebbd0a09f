"""FinalLayerMixin: the output head (``final_forward``): video tokens back to latent frames.

``LayerNorm(eps 1e-6)`` then AdaLN with ``(shift, scale) = Linear(SiLU(temb)).chunk(2)`` (shift
first), ``Linear(D, pt * p * p * C_out)`` and unpatchify ``b (t h w) (c o p q) -> b (t o) c (h p) (w q)``.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from sat_video.model.context import ForwardContext
from sat_video.model.hooks import Mixin
from sat_video.model.modulation import modulate
from sat_video.model.registry import register_mixin

FINAL_NORM_EPS = 1e-6  # SAT's; the diffusers export folds the difference to its 1e-5 into the weights


@register_mixin("final_layer")
class FinalLayerMixin(Mixin):
    """State dict: ``norm_final``, ``linear`` and ``adaLN_modulation.1`` ``[2 D, time_embed_dim]``."""

    runs_sharded = True  # the output head runs after join_sequence

    def __init__(self, dit_config, config=None):
        super().__init__(dit_config, config)
        patch_volume = (dit_config.patch_size_t or 1) * dit_config.patch_size**2
        self.norm_final = nn.LayerNorm(dit_config.hidden_size, eps=FINAL_NORM_EPS)
        self.linear = nn.Linear(dit_config.hidden_size, patch_volume * dit_config.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dit_config.time_embed_dim, 2 * dit_config.hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def final_forward(self, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        dit_config, grid = self.dit_config, ctx.grid
        video = hidden[:, ctx.num_condition_tokens :]  # [B, N, D]
        shift, scale = self.adaLN_modulation(ctx.temb)[:, None].chunk(2, dim=-1)
        video = self.linear(modulate(self.norm_final(video), shift, scale))  # [B, N, C_out * pt * p * p]
        return rearrange(
            video, "b (t h w) (c o p q) -> b (t o) c (h p) (w q)",
            t=grid.frames, h=grid.height, w=grid.width,
            o=dit_config.patch_size_t or 1, p=dit_config.patch_size, q=dit_config.patch_size,
        )
