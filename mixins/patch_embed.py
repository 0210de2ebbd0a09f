"""ImagePatchEmbedMixin: latents and text embeddings to one token sequence (the ``embed`` hook).

CogVideoX 1.0 patches each frame with a ``Conv2d(C, D, p, stride=p)``; CogVideoX 1.5 flattens
``patch_size_t x p x p`` tubes (features ordered c, t, h, w) into a ``Linear(C * pt * p * p, D)``. The
model's ``patch_size_t`` picks the layout (``null`` = 1.0). Text goes through ``text_proj`` and comes
first in the sequence. I2V needs nothing here but ``in_channels: 32``.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from sat_video.model.context import ForwardContext
from sat_video.model.hooks import Mixin
from sat_video.model.registry import register_mixin


@register_mixin("image_patch_embed")
class ImagePatchEmbedMixin(Mixin):
    """Patch embedding for video latents plus the text projection.

    State dict: ``proj.{weight,bias}`` (1.0: ``[D, C, p, p]``; 1.5: ``[D, C*pt*p*p]``) and
    ``text_proj.{weight,bias}`` ``[D, text_hidden_size]``.
    """

    runs_sharded = True  # embedding runs before split_sequence

    def __init__(self, dit_config, config=None):
        super().__init__(dit_config, config)
        p, pt = dit_config.patch_size, dit_config.patch_size_t
        if pt is None:
            self.proj = nn.Conv2d(dit_config.in_channels, dit_config.hidden_size, kernel_size=p, stride=p)
        else:
            self.proj = nn.Linear(dit_config.in_channels * pt * p * p, dit_config.hidden_size)
        self.text_proj = nn.Linear(dit_config.text_hidden_size, dit_config.hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # SAT: xavier over the flattened patch, zero bias.
        nn.init.xavier_uniform_(self.proj.weight.view(self.proj.weight.shape[0], -1))
        nn.init.zeros_(self.proj.bias)
        self.text_proj.reset_parameters()

    def embed(self, x: torch.Tensor, encoder_hidden_states: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        dit_config = self.dit_config
        if x.shape[2] != dit_config.in_channels:
            raise ValueError(f"x has {x.shape[2]} channels, the model expects in_channels={dit_config.in_channels}")
        if encoder_hidden_states.shape[-1] != dit_config.text_hidden_size:
            raise ValueError(
                f"encoder_hidden_states width {encoder_hidden_states.shape[-1]} != text_hidden_size {dit_config.text_hidden_size}"
            )
        batch, frames = x.shape[:2]
        if dit_config.patch_size_t is None:
            video = self.proj(x.flatten(0, 1))  # [B*T, D, h, w]
            video = rearrange(video, "(b t) d h w -> b (t h w) d", b=batch, t=frames)
        else:
            video = rearrange(
                x,
                "b (t o) c (h p) (w q) -> b (t h w) (c o p q)",
                o=dit_config.patch_size_t,
                p=dit_config.patch_size,
                q=dit_config.patch_size,
            )
            video = self.proj(video)
        text = self.text_proj(encoder_hidden_states)
        return torch.cat([text, video], dim=1)  # [B, L + N, D]
