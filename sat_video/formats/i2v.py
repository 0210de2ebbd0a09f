"""Start an image-to-video model from a text-to-video checkpoint.

Only the patch embedding's input grows: the new channels (the encoded first frame) get zero weights,
so the widened model reproduces the T2V model exactly while the image channels are zero, and learns
to use them from there.
"""

from __future__ import annotations

import torch

from sat_video.common.errors import CheckpointError
from sat_video.model.config import DiTConfig


def widen_patch_embedding(
    state: dict[str, torch.Tensor], dit_config: DiTConfig, in_channels: int, patch_embed: str = "patch_embed"
) -> dict[str, torch.Tensor]:
    """Return a copy of ``state`` whose ``mixins.<patch_embed>.proj.weight`` takes ``in_channels`` inputs.

    Handles both layouts: 1.0 ``Conv2d`` ``[D, C, p, p]`` and 1.5 ``Linear`` ``[D, C * pt * p * p]`` (features
    ordered c, t, h, w, so each channel owns a contiguous block).
    """
    key = f"mixins.{patch_embed}.proj.weight"
    if key not in state:
        raise CheckpointError(f"{key} not in the checkpoint; is the patch-embedding mixin named '{patch_embed}'?")
    weight = state[key]
    if in_channels <= dit_config.in_channels:
        raise CheckpointError(f"in_channels must grow: the checkpoint has {dit_config.in_channels}, asked for {in_channels}")
    if dit_config.patch_size_t is None:  # [D, C, p, p]
        if weight.shape[1] != dit_config.in_channels:
            raise CheckpointError(f"{key} has {weight.shape[1]} input channels, the config says {dit_config.in_channels}")
        extra = weight.new_zeros(weight.shape[0], in_channels - dit_config.in_channels, *weight.shape[2:])
        widened = torch.cat([weight, extra], dim=1)
    else:  # [D, C * patch volume]
        volume = dit_config.patch_size_t * dit_config.patch_size**2
        if weight.shape[1] != dit_config.in_channels * volume:
            raise CheckpointError(f"{key} has {weight.shape[1]} inputs, the config implies {dit_config.in_channels * volume}")
        per_channel = weight.view(weight.shape[0], dit_config.in_channels, volume)
        extra = weight.new_zeros(weight.shape[0], in_channels - dit_config.in_channels, volume)
        widened = torch.cat([per_channel, extra], dim=1).flatten(1)
    return {**state, key: widened}
