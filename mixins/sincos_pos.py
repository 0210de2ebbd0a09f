"""SinCosInterpolatedPosMixin: fixed 3D sin-cos positions added to the video tokens (CogVideoX-2B).

For token (t, h, w) the row is ``[E_{D/4}(t/tau_t) | E_{3D/8}(w/tau_w) | E_{3D/8}(h/tau_h)]`` with
``E_d(p) = [sin(p w_i) | cos(p w_i)]``, ``w_i = 10000^(-i / (d/2))``. Positions are *divided* by the
interpolation factors (2B: 1.875 for h and w), so a model trained on a small grid sees a larger grid
as interpolated positions. The table is computed for the grid of each input (cached), so any
resolution and length runs; for the training grid it equals SAT's stored table, which checkpoints
carry as ``mixins.pos_embed.pos_embedding`` and the loader drops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sat_video.common.errors import ConfigError
from sat_video.model.context import ForwardContext, TokenGrid
from sat_video.model.hooks import Mixin
from sat_video.model.registry import register_mixin


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.double()[:, None] * omega[None]  # [M, dim/2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_3d_table(dim: int, grid: TokenGrid, time_interp: float, height_interp: float, width_interp: float) -> torch.Tensor:
    """The ``[T*H*W, dim]`` table in float64, rows ordered t, h, w."""
    dim_t, dim_spatial_half = dim // 4, (dim - dim // 4) // 2
    # Positions in float32 before the float64 trigonometry, as SAT's numpy code does.
    t = _sincos_1d(dim_t, torch.arange(grid.frames, dtype=torch.float32) / time_interp)
    h = _sincos_1d(dim_spatial_half, torch.arange(grid.height, dtype=torch.float32) / height_interp)
    w = _sincos_1d(dim_spatial_half, torch.arange(grid.width, dtype=torch.float32) / width_interp)
    shape = (grid.frames, grid.height, grid.width)
    table = torch.cat(
        [t[:, None, None].expand(*shape, -1), w[None, None].expand(*shape, -1), h[None, :, None].expand(*shape, -1)],
        dim=-1,
    )
    return table.reshape(grid.num_tokens, dim)


@register_mixin("sincos_interpolated")
class SinCosInterpolatedPosMixin(Mixin):
    """3D sin-cos absolute positions with per-axis interpolation (``add_position`` hook)."""

    runs_sharded = True  # positions are added before split_sequence

    @dataclass
    class Config:
        height_interpolation: float = 1.0
        """Divide row positions by this (2B: 1.875)."""
        width_interpolation: float = 1.0
        """Divide column positions by this (2B: 1.875)."""
        time_interpolation: float = 1.0
        """Divide frame positions by this."""

    derived_checkpoint_keys = ("pos_embedding",)

    def __init__(self, dit_config, config=None):
        super().__init__(dit_config, config)
        if dit_config.hidden_size % 16:
            raise ConfigError(f"3D sin-cos positions need hidden_size divisible by 16, found {dit_config.hidden_size}")
        self._tables: dict = {}

    def table(self, grid: TokenGrid, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The ``[T*H*W, D]`` table of ``grid``."""
        c = self.config
        table = sincos_3d_table(
            self.dit_config.hidden_size, grid, c.time_interpolation, c.height_interpolation, c.width_interpolation
        )
        return table.to(device=device, dtype=dtype)

    def add_position(self, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        key = (ctx.grid, ctx.num_condition_tokens, hidden.device, hidden.dtype)
        if key not in self._tables:  # zero rows for the text: one addition over the whole sequence, no slicing
            table = self.table(ctx.grid, hidden.device, hidden.dtype)
            self._tables[key] = torch.cat([table.new_zeros(ctx.num_condition_tokens, table.shape[1]), table])  # [L + N, D]
        return hidden + self._tables[key]
