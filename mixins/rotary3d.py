"""Rotary3DMixin: 3D rotary positions on the video queries and keys (CogVideoX-5B, 1.5).

The head dim is split ``[t | h | w] = [hd/4 | 3hd/8 | 3hd/8]``; each axis rotates adjacent pairs
``(x_2i, x_2i+1)`` by ``pos * theta^(-2i/d)`` at *integer* positions, so other grids extrapolate
(no interpolation). Text tokens are not rotated. It always runs after qk-LayerNorm, whatever the order the
mixins were added in: qk-LayerNorm's ``process_qkv`` link declares ``chain_priority`` -10, this one the default 0.

``learned_table: true`` adds the 5B-I2V learned ``[1, L + T*H*W, D]`` table (zero init) to all
tokens, text included; it exists only for the training grid (shorter clips use its prefix, as SAT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sat_video.common.errors import ConfigError
from sat_video.model.context import ForwardContext, SequenceShard, TokenGrid
from sat_video.model.hooks import Mixin
from sat_video.model.registry import register_mixin


def _axis_angles(dim: int, length: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * freqs[None]
    return angles.repeat_interleave(2, dim=-1)  # [length, dim]: [f0, f0, f1, f1, ...]


def rotary_3d_cos_sin(head_dim: int, grid: TokenGrid, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[T*H*W, head_dim]`` in float32, rows ordered t, h, w."""
    dim_t, dim_hw = head_dim // 4, head_dim // 8 * 3
    shape = (grid.frames, grid.height, grid.width)
    angles = torch.cat(
        [
            _axis_angles(dim_t, grid.frames, theta)[:, None, None].expand(*shape, -1),
            _axis_angles(dim_hw, grid.height, theta)[None, :, None].expand(*shape, -1),
            _axis_angles(dim_hw, grid.width, theta)[None, None].expand(*shape, -1),
        ],
        dim=-1,
    ).reshape(grid.num_tokens, -1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Adjacent pairs ``(x_2i, x_2i+1) -> (-x_2i+1, x_2i)``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotation(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x`` ``[B, H, S, hd]`` and ``rotation`` = ``(cos, sin)`` per adjacent
    pair, float32 ``[S, hd / 2, 2]``. Eager: one complex product of the pairs (a single element-wise pass each way,
    where the real form takes five). Compiled: the real form, which inductor fuses into one kernel (it has no
    complex kernels)."""
    if torch.compiler.is_compiling():
        a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = rotation.unbind(-1)
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, H, S, hd / 2]
    return torch.view_as_real(pairs * torch.view_as_complex(rotation)).flatten(-2).to(x.dtype)


@register_mixin("rotary_3d")
class Rotary3DMixin(Mixin):
    """3D RoPE (``process_qkv`` hook) with an optional learned absolute table (``add_position`` hook)."""

    runs_sharded = True  # rotations are taken for ctx.shard; the learned table is added before split_sequence

    @dataclass
    class Config:
        theta: float = 10000.0
        """RoPE base."""
        learned_table: bool = False
        """Add the learned absolute table of CogVideoX-5B-I2V (``pos_embedding``)."""

    derived_checkpoint_keys = ("freqs_sin", "freqs_cos")

    def __init__(self, dit_config, config=None):
        super().__init__(dit_config, config)
        if dit_config.head_dim % 16:
            raise ConfigError(
                f"3D RoPE splits the head dim 4/8 : 3/8 : 3/8 into even parts; head dim {dit_config.head_dim} "
                "is not a multiple of 16"
            )
        self._rotations: dict = {}
        if self.config.learned_table:
            self.train_grid = dit_config.token_grid(dit_config.num_frames, dit_config.latent_height, dit_config.latent_width)
            self.pos_embedding = nn.Parameter(
                torch.zeros(1, dit_config.text_length + self.train_grid.num_tokens, dit_config.hidden_size)
            )

    def reset_parameters(self) -> None:
        if self.config.learned_table:
            nn.init.zeros_(self.pos_embedding)

    def implemented_hooks(self) -> list[str]:
        hooks = super().implemented_hooks()
        return hooks if self.config.learned_table else [h for h in hooks if h != "add_position"]

    def cos_sin(self, grid: TokenGrid, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` ``[T*H*W, head_dim]`` of ``grid`` (diffusers' ``image_rotary_emb`` layout)."""
        cos, sin = rotary_3d_cos_sin(self.dit_config.head_dim, grid, self.config.theta)
        return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)

    def rotation(
        self, grid: TokenGrid, num_condition_tokens: int, device: torch.device, shard: SequenceShard | None = None
    ) -> torch.Tensor:
        """``(cos, sin)`` of the angle per adjacent pair, float32 ``[L + N, head_dim / 2, 2]``; text rows are (1, 0)
        (no rotation), so the whole sequence is rotated at once, without slicing out the video tokens. With a
        ``shard``, only the rows of that rank's video tokens follow the text."""
        key = (grid, num_condition_tokens, device, shard)
        if key not in self._rotations:
            cos, sin = self.cos_sin(grid, device, torch.float32)
            video = torch.stack([cos[:, ::2], sin[:, ::2]], dim=-1)  # angles come repeated per pair
            if shard is not None:
                video = shard.take(video)
            text = torch.zeros(num_condition_tokens, *video.shape[1:], device=device)
            text[..., 0] = 1
            self._rotations[key] = torch.cat([text, video])
        return self._rotations[key]

    def process_qkv(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rotation = self.rotation(ctx.grid, ctx.num_condition_tokens, q.device, ctx.shard)  # broadcast over batch and heads
        return apply_rotation(q, rotation), apply_rotation(k, rotation), v

    def check_grid(self, grid: TokenGrid, num_condition_tokens: int) -> None:
        train = getattr(self, "train_grid", None)
        if train is None:
            return  # RoPE alone extrapolates to any grid
        if (
            (grid.height, grid.width) != (train.height, train.width)
            or grid.frames > train.frames
            or num_condition_tokens != self.dit_config.text_length
        ):
            raise ValueError(
                f"the learned position table covers {self.dit_config.text_length} text tokens and a "
                f"{train.frames}x{train.height}x{train.width} grid; this input has {num_condition_tokens} text "
                f"tokens and a {grid.frames}x{grid.height}x{grid.width} grid (only fewer frames are possible)"
            )

    def add_position(self, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        self.check_grid(ctx.grid, ctx.num_condition_tokens)
        return hidden + self.pos_embedding[:, : hidden.shape[1]]
