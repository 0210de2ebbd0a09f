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
class SequenceShard:
    """The video tokens one rank of a sequence-parallel group computes.

    The ``num_tokens`` video tokens are padded to ``world_size * size`` and rank ``r`` holds rows
    ``[r * size, (r + 1) * size)`` of that padded sequence; the text (condition) tokens stay whole on every rank.
    Padding rows are computed but never attended to and never reach the output.
    """

    rank: int
    world_size: int
    num_tokens: int

    @property
    def size(self) -> int:
        """Video tokens per rank, padding included."""
        return -(-self.num_tokens // self.world_size)

    @property
    def start(self) -> int:
        return self.rank * self.size

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows ``[size, ...]`` of a per-video-token table ``rows`` ``[num_tokens, ...]``; zeros for padding."""
        local = rows[self.start : self.start + self.size]
        missing = self.size - local.shape[0]
        return torch.cat([local, local.new_zeros(missing, *rows.shape[1:])]) if missing else local


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
        shard (`SequenceShard`, *optional*): set between ``split_sequence`` and ``join_sequence`` under sequence
            parallelism: this rank's hidden states hold the condition tokens and ``shard.size`` video tokens
            (``grid`` still describes the whole video). ``None``: the whole sequence is here.
    """

    temb: torch.Tensor
    num_condition_tokens: int
    grid: TokenGrid
    hooks: HookTable
    ofs: torch.Tensor | None = None
    shard: SequenceShard | None = None
