"""Measured activation memory of one training step, for the training memory planner
(:mod:`sat_video.training.memory_plan`).

Activations are measured, not modelled, as the sampling estimate does (:mod:`sat_video.diffusion.memory_estimate`):
DiTs of one and two blocks at the config's real width run forward and backward once at two small token counts, on
the CPU in fp32, with the run's trainable parameters, counted by
:class:`~sat_video.common.live_tensors.LiveTensorBytes`. Each gradient is dropped as soon as it is accumulated (ZeRO
moves it into its own buffers at once; the planner counts those), so the peak holds activations only. A peak is linear
in the blocks (every block saves the same) and in the tokens (SDPA's memory is linear in them), so four runs give
``peak(L, n) = outside(n) + L * per_block(n)``. With checkpointing the ``L``-free part also holds one block's
recomputation; it is told apart from the embedding, output head and loss by the run without checkpointing.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from sat_video.common.live_tensors import LiveTensorBytes
from sat_video.diffusion.memory_estimate import materialised
from sat_video.model.build import build_dit
from sat_video.model.config import DiTConfig
from sat_video.model.stages import SPATIAL_COMPRESSION
from sat_video.training.optim import select_trainable

PROBE_PATCHES = (2, 4)
"""Patches per side of a DiT probe's one temporal patch (4 and 16 video tokens)."""
PROBE_TEXT_TOKENS = 8
"""Text tokens of a DiT probe: blocks treat text and video tokens alike, so the probes extrapolate in all tokens, and a
short text keeps them cheap (at 5B's width a block's matmuls cost the same per token whatever its kind)."""
VAE_PROBE_AREAS = ((2, 2), (4, 4))
"""Latent ``h x w`` of the VAE-encode probes."""
CHECKPOINT_MODES = ("none", "keep_attention", "recompute_attention")
"""No checkpointing; checkpointing that keeps each block's attention output; checkpointing of the block input only."""


@dataclass(frozen=True)
class Line:
    """``at(n) = intercept + slope * n`` bytes, through two measured points."""

    intercept: float
    slope: float

    @classmethod
    def through(cls, x0: float, y0: float, x1: float, y1: float) -> Line:
        slope = (y1 - y0) / (x1 - x0)
        return cls(y0 - slope * x0, slope)

    def at(self, n: float) -> float:
        return max(0.0, self.intercept + self.slope * n)


@dataclass(frozen=True)
class ActivationFit:
    """fp32 activation bytes of a training step of one sample of ``n`` tokens, split where they scale differently.

    ``outside``: embeddings, output head and loss (on every token, even under sequence parallelism); ``per_block``: what
    each block keeps for backward; ``recompute``: one block's activations while checkpointing recomputes it (0 without).
    """

    outside: Line
    per_block: Line
    recompute: Line

    def bytes(self, layers: int, tokens: float, tokens_per_rank: float) -> float:
        """fp32 bytes for ``tokens`` in all (batch included) of which this rank's blocks hold ``tokens_per_rank``."""
        return self.outside.at(tokens) + layers * self.per_block.at(tokens_per_rank) + self.recompute.at(tokens_per_rank)


def _drop_gradients(model: nn.Module) -> None:
    for param in model.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))


class TrainingProbes:
    """The measurements of ``cfg``'s models a plan needs; each runs once, on first use (seconds at full widths).

    Args:
        cfg: a loaded config (``model``, ``train.trainable``).
    """

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.dit_config = DiTConfig.from_config(cfg)

    @functools.cached_property
    def _probe_config(self) -> DiTConfig:
        return dataclasses.replace(self.dit_config, text_length=PROBE_TEXT_TOKENS)

    def _dit(self, side: int) -> tuple[nn.Module, torch.Tensor]:
        """A two-block probe DiT for one temporal patch of ``side x side`` patches, and its input."""
        dit_config = self._probe_config
        patch, patch_t = dit_config.patch_size, dit_config.patch_size_t or 1
        frames = dit_config.temporal_compression_ratio * (patch_t - 1) + 1  # one temporal patch
        probe_config = dataclasses.replace(dit_config, num_layers=2, num_frames=frames, latent_height=side * patch,
                                           latent_width=side * patch)
        with torch.device("meta"):
            dit = build_dit(probe_config)
        dit = materialised(dit).train()
        select_trainable(dit, list(self.cfg.train.trainable))
        latent = torch.zeros(1, patch_t, dit_config.in_channels, side * patch, side * patch)
        return dit, latent

    def _step_peak(self, dit: nn.Module, latent: torch.Tensor, mode: str) -> int:
        dit_config = self._probe_config
        dit.activation_checkpointing = mode != "none"
        dit.checkpoint_keeps_attention = mode == "keep_attention"
        text = torch.zeros(1, dit_config.text_length, dit_config.text_hidden_size)
        ofs = torch.ones(1) if dit_config.ofs_embed_dim else None
        target = torch.zeros(latent.shape[0], latent.shape[1], dit_config.out_channels, *latent.shape[3:])
        with LiveTensorBytes() as tracker:
            F.mse_loss(dit(latent, torch.full((1,), 500), text, ofs=ofs), target).backward()
        return tracker.peak

    def _tokens(self, side: int) -> int:
        return PROBE_TEXT_TOKENS + side * side

    @functools.cached_property
    def dit(self) -> dict[str, ActivationFit]:
        """Per checkpointing mode (:data:`CHECKPOINT_MODES`), the DiT's activation fit."""
        peaks = {}
        for side in PROBE_PATCHES:
            dit, latent = self._dit(side)
            _drop_gradients(dit)
            blocks = dit.transformer.layers
            for layers in (1, 2):
                dit.transformer.layers = blocks[:layers]  # the first block alone runs as a one-block DiT
                for mode in CHECKPOINT_MODES:
                    peaks[mode, layers, side] = self._step_peak(dit, latent, mode)
            del dit
        (x0, x1), fits = (self._tokens(side) for side in PROBE_PATCHES), {}
        outside = None
        for mode in CHECKPOINT_MODES:
            per_block = [peaks[mode, 2, side] - peaks[mode, 1, side] for side in PROBE_PATCHES]
            rest = [peaks[mode, 1, side] - block for side, block in zip(PROBE_PATCHES, per_block)]
            if mode == "none":
                outside = Line.through(x0, rest[0], x1, rest[1])
                recompute = Line(0.0, 0.0)
            else:  # the L-free part beyond the embedding, head and loss: one block's recomputation
                recompute = Line.through(x0, rest[0] - outside.at(x0), x1, rest[1] - outside.at(x1))
            fits[mode] = ActivationFit(outside, Line.through(x0, per_block[0], x1, per_block[1]), recompute)
        return fits

    @functools.cache  # noqa: B019 - the probes live as long as the plan that asks
    def vae_encode(self, frames: int) -> Line:
        """fp32 bytes of encoding one clip of ``frames`` pixel frames, in the latent area ``h x w`` (whole-clip encode,
        as training does: memory grows with the area at a given length)."""
        from mixins.video_vae import VideoVAEMixin

        first_stage = self.cfg.model.first_stage
        with torch.device("meta"):
            vae = VideoVAEMixin.network(first_stage.architecture)
        stage = VideoVAEMixin(materialised(vae), first_stage.scale_factor)
        points = []
        for h, w in VAE_PROBE_AREAS:
            video = torch.zeros(1, 3, frames, h * SPATIAL_COMPRESSION, w * SPATIAL_COMPRESSION)
            with torch.no_grad(), LiveTensorBytes() as tracker:
                stage.encode_moments(video)
            points.append((h * w, tracker.peak))
        (a0, y0), (a1, y1) = points
        return Line.through(a0, y0, a1, y1)
