"""The diffusion training step: frozen stages turn a batch of clips into typed inputs, the engine turns
inputs, timesteps and noise into the v-prediction loss.

Two modules, because they are treated differently: :class:`FrozenStages` (VAE and T5, no gradients, outside
the optimizer and the checkpoint) and :class:`DiffusionEngine` (the trainable DiT, handed to DeepSpeed; its
state dict is SAT's ``model.diffusion_model.*``). All randomness comes from one generator per rank, so a
resumed run draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from mixins.video_vae import latents_from_moments

from .config import DiffusionConfig, DiTConfig
from .diffusion import NoiseSchedule

if TYPE_CHECKING:
    from .latent_cache import CachedBatch


def leading_pad_frames(latent_frames: int, dims: DiTConfig) -> int:
    """Latent frames CogVideoX 1.5 repeats in front so that the count divides ``patch_size_t`` (0 for 1.0)."""
    return -latent_frames % (dims.patch_size_t or 1)


@dataclass
class TrainingInputs:
    """What the DiT trains on, in its layout ``[B, T, C, H, W]``."""

    latents: torch.Tensor
    """Clean latents, already multiplied by the VAE scale factor."""
    text: torch.Tensor
    """T5 embeddings ``[B, L, D]``; all zeros for samples that dropped their caption."""
    image_latents: Optional[torch.Tensor] = None
    """I2V: the encoded noisy first frame, then zero latents; all zeros for dropped samples."""


class FrozenStages(nn.Module):
    """VAE encode, T5 encode, caption dropout and the I2V image condition (reference section 5).

    Args:
        dims: the DiT sizes (I2V when ``in_channels`` exceeds ``out_channels``; 1.5 models pad an odd number
            of latent frames to a multiple of ``patch_size_t`` by repeating the first latent frame, as SAT).
        diffusion: dropout rates and the image-noise distribution.
        first_stage: a ``VideoVAEMixin`` or ``PatchPCAFirstStage`` (``encode(video, generator)``); only I2V
            needs it when training from a latent cache.
        text_encoder: a ``T5TextEncoder`` (``captions -> [B, L, D]``); not needed with a latent cache.
        scale_factor: ``model.first_stage.scale_factor``, applied to cached latents.
    """

    def __init__(self, dims: DiTConfig, diffusion: DiffusionConfig, first_stage: Optional[nn.Module],
                 text_encoder: Optional[nn.Module], scale_factor: float = 1.0):
        super().__init__()
        self.dims = dims
        self.diffusion = diffusion
        self.first_stage = first_stage
        self.text_encoder = text_encoder
        self.scale_factor = scale_factor
        self.image_condition = dims.in_channels > dims.out_channels
        if self.image_condition and dims.in_channels != 2 * dims.out_channels:
            raise ValueError(
                f"model.dit.in_channels ({dims.in_channels}) must equal out_channels ({dims.out_channels}) for "
                f"text-to-video or twice it for image-to-video"
            )

    @torch.no_grad()
    def prepare(self, video: torch.Tensor, captions: list[str], generator: torch.Generator) -> TrainingInputs:
        """``video`` ``[B, 3, T, H, W]`` in [-1, 1] (an image is ``T = 1``) -> :class:`TrainingInputs`."""
        latents = self.first_stage.encode(video, generator=generator)
        text = self.text_encoder(list(captions))
        return self._condition(latents, text, video[:, :, :1], generator)

    @torch.no_grad()
    def prepare_cached(self, batch: "CachedBatch", generator: torch.Generator) -> TrainingInputs:
        """The same from a latent-cache batch (already on the training device): for the same generator state, the
        same inputs as :meth:`prepare` on the clips the cache was made from (the posterior is sampled here, as
        encoding would)."""
        latents = latents_from_moments(batch.latent_mean, batch.latent_std, self.scale_factor, generator)
        return self._condition(latents, batch.text, batch.first_frame, generator)

    def _condition(self, latents: torch.Tensor, text: torch.Tensor, first_frame: Optional[torch.Tensor],
                   generator: torch.Generator) -> TrainingInputs:
        """Latents ``[B, C, F, h, w]`` and text -> padded latents, caption dropout, the I2V condition."""
        batch = latents.shape[0]
        latents = self._pad_frames(latents.permute(0, 2, 1, 3, 4))  # -> [B, T, C, H, W]
        text = text.float()
        keep_text = torch.rand(batch, generator=generator) >= self.diffusion.text_dropout
        text = text * keep_text.to(text.device, text.dtype).view(-1, 1, 1)

        image_latents = None
        if self.image_condition:
            mean, std = self.diffusion.image_noise_log_sigma
            sigma = torch.exp(torch.randn(batch, generator=generator) * std + mean)
            first = first_frame.float()
            noise = torch.randn(first.shape, generator=generator).to(first.device)
            noisy_first = first + sigma.to(first.device).view(-1, 1, 1, 1, 1) * noise
            encoded = self.first_stage.encode(noisy_first.to(first_frame.dtype), generator=generator).permute(0, 2, 1, 3, 4)
            image_latents = torch.cat([encoded, torch.zeros_like(latents[:, 1:])], dim=1)
            keep_image = torch.rand(batch, generator=generator) >= self.diffusion.image_dropout
            image_latents = image_latents * keep_image.to(image_latents.device, image_latents.dtype).view(-1, 1, 1, 1, 1)
        return TrainingInputs(latents=latents, text=text, image_latents=image_latents)

    def _pad_frames(self, latents: torch.Tensor) -> torch.Tensor:
        missing = leading_pad_frames(latents.shape[1], self.dims)
        if missing:
            latents = torch.cat([latents[:, :1].expand(-1, missing, -1, -1, -1), latents], dim=1)
        return latents


class DiffusionEngine(nn.Module):
    """The trainable part: ``model.diffusion_model`` is the DiT (SAT's state-dict prefix).

    ``forward(inputs, timesteps, noise)`` returns the per-sample v-prediction MSE ``[B]`` in float32.
    """

    def __init__(self, dit: nn.Module, schedule: NoiseSchedule, ofs: Optional[float] = None):
        super().__init__()
        self.model = nn.ModuleDict({"diffusion_model": dit})
        self.schedule = schedule
        self.ofs = ofs if dit.dims.ofs_embed_dim else None

    @property
    def dit(self) -> nn.Module:
        return self.model["diffusion_model"]

    def forward(self, inputs: TrainingInputs, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x0 = inputs.latents.float()
        noise = noise.to(x0.device, torch.float32)
        noisy = self.schedule.add_noise(x0, noise, timesteps)
        target = self.schedule.velocity(x0, noise, timesteps)
        if inputs.image_latents is not None:
            noisy = torch.cat([noisy, inputs.image_latents.float()], dim=2)
        dtype = next(self.dit.parameters()).dtype
        prediction = self.dit(noisy.to(dtype), timesteps.to(x0.device), inputs.text.to(dtype), ofs=self.ofs)
        return (prediction.float() - target).pow(2).flatten(1).mean(dim=1)
