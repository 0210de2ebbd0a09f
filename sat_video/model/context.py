"""The typed per-forward context that every hook receives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sat_video.model.composition import HookTable


@dataclass(frozen=True)
class TokenGrid:
    """Video token grid of one forward pass: frames, rows and columns after patching."""

    frames: int
    height: int
    width: int

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width


@dataclass(frozen=True)
class ForwardContext:
    """What the stages of one forward pass share.

    Attributes:
        temb (`torch.Tensor`): conditioning embedding ``[B, time_embed_dim]`` (timestep, plus ofs when the
            model has an ofs embedding).
        num_condition_tokens (`int`): tokens in front of the video tokens: the text (``model.dit.text_length``),
            plus any token a mixin's ``embed`` prepends (set from the embedded sequence).
        grid (`TokenGrid`): video token grid of this input (positions are computed for it, so any
            resolution and length works).
        hooks (`HookTable`): the model's resolved hooks, used by the layer modules to dispatch.
        ofs (`torch.Tensor`, *optional*): the raw ofs values ``[B]`` of CogVideoX 1.5 I2V.
    """

    temb: torch.Tensor
    num_condition_tokens: int
    grid: TokenGrid
    hooks: HookTable
    ofs: torch.Tensor | None = None
