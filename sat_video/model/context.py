"""The typed per-forward context that every hook receives.

A leaf of the model layer: it imports nothing of sat_video, so the hook catalogue, the composition and the
transformer can all name it without an import circle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch


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


class BlockHooks(Protocol):
    """What the modules of a block dispatch through: one callable per in-block hook of the catalogue
    (:mod:`sat_video.model.hooks`, where each signature is documented). The model's
    :class:`~sat_video.model.composition.HookTable` is one; it is described here rather than imported so that this
    module stays a leaf."""

    layer_forward: Callable[..., torch.Tensor]
    attention_forward: Callable[..., torch.Tensor]
    project: Callable[..., torch.Tensor]
    process_qkv: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    attention_kernel: Callable[..., torch.Tensor]
    mlp_forward: Callable[..., torch.Tensor]


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
        hooks (`BlockHooks`): the model's resolved hooks (its ``HookTable``), used by the layer modules to dispatch.
        ofs (`torch.Tensor`, *optional*): the raw ofs values ``[B]`` of CogVideoX 1.5 I2V.
        shard (`SequenceShard`, *optional*): set between ``split_sequence`` and ``join_sequence`` under sequence
            parallelism: this rank's hidden states hold the condition tokens and ``shard.size`` video tokens
            (``grid`` still describes the whole video). ``None``: the whole sequence is here.
    """

    temb: torch.Tensor
    num_condition_tokens: int
    grid: TokenGrid
    hooks: BlockHooks
    ofs: torch.Tensor | None = None
    shard: SequenceShard | None = None
