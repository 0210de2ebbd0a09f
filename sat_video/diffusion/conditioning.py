"""Training inputs: the frozen stages turn a batch of clips (or latent-cache entries) into what the DiT trains on.

:class:`TrainingInputBuilder` encodes clips and captions through the frozen stages (:mod:`sat_video.model.stages`),
drops captions for classifier-free guidance and builds the image-to-video condition. All randomness comes from the
generator it is given (one per rank), so a resumed run draws exactly what the uninterrupted run would have drawn.
The loss on these inputs is :mod:`sat_video.diffusion.loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sat_video.diffusion.config import DiffusionConfig
from sat_video.model.config import DiTConfig
from sat_video.model.stages import FrozenStages, latents_from_moments

if TYPE_CHECKING:
    from sat_video.data.latent_cache import CachedBatch


def leading_pad_frames(latent_frames: int, dit_config: DiTConfig) -> int:
    """Latent frames CogVideoX 1.5 repeats in front so that the count divides ``patch_size_t`` (0 for 1.0)."""
    return -latent_frames % (dit_config.patch_size_t or 1)


@dataclass
class TrainingInputs:
    """What the DiT trains on, in its layout ``[B, T, C, H, W]``."""

    latents: torch.Tensor
    """Clean latents, already multiplied by the VAE scale factor."""
    text: torch.Tensor
    """T5 embeddings ``[B, L, D]``; all zeros for samples that dropped their caption."""
    image_latents: torch.Tensor | None = None
    """I2V: the encoded noisy first frame, then zero latents; all zeros for dropped samples."""


class TrainingInputBuilder:
    """Clips and captions -> :class:`TrainingInputs`: encoding, caption dropout and the I2V image condition.

    Args:
        dit_config: the DiT's sizes (I2V when ``in_channels`` exceeds ``out_channels``; 1.5 models pad an odd number
            of latent frames to a multiple of ``patch_size_t`` by repeating the first latent frame, as SAT).
        diffusion: dropout rates and the image-noise distribution (``model.diffusion``).
        stages: the frozen stages; training from a latent cache needs the first stage only for I2V and no text
            encoder.
        scale_factor: ``model.first_stage.scale_factor``, applied to cached latents.
    """

    def __init__(self, dit_config: DiTConfig, diffusion: DiffusionConfig, stages: FrozenStages, scale_factor: float = 1.0):
        self.dit_config = dit_config
        self.diffusion = diffusion
        self.stages = stages
        self.scale_factor = scale_factor
        dit_config.validate()  # I2V: in_channels is twice out_channels
        self.image_condition = dit_config.in_channels > dit_config.out_channels

    @torch.no_grad()
    def prepare(self, video: torch.Tensor, captions: list[str], generator: torch.Generator) -> TrainingInputs:
        """``video`` ``[B, 3, T, H, W]`` in [-1, 1] (an image is ``T = 1``) -> :class:`TrainingInputs`."""
        latents = self.stages.encode(video, generator=generator)
        text = self.stages.encode_text(list(captions))
        return self._condition(latents, text, video[:, :, :1], generator)

    @torch.no_grad()
    def prepare_cached(self, batch: CachedBatch, generator: torch.Generator, dropout: bool = True) -> TrainingInputs:
        """The same from a latent-cache batch (already on the training device): for the same generator state, the
        same inputs as :meth:`prepare` on the clips the cache was made from (the posterior is sampled here, as
        encoding would). ``dropout=False``: every caption and first frame kept (a held-out loss)."""
        latents = latents_from_moments(batch.latent_mean, batch.latent_std, self.scale_factor, generator)
        return self._condition(latents, batch.text, batch.first_frame, generator, dropout)

    def _condition(self, latents: torch.Tensor, text: torch.Tensor, first_frame: torch.Tensor | None,
                   generator: torch.Generator, dropout: bool = True) -> TrainingInputs:
        """Latents ``[B, C, F, h, w]`` and text -> padded latents, caption dropout, the I2V condition."""
        batch = latents.shape[0]
        latents = self._pad_frames(latents.permute(0, 2, 1, 3, 4))  # -> [B, T, C, H, W]
        text = text.float()
        if dropout:
            keep_text = torch.rand(batch, generator=generator) >= self.diffusion.text_dropout
            text = text * keep_text.to(text.device, text.dtype).view(-1, 1, 1)

        image_latents = None
        if self.image_condition:
            mean, std = self.diffusion.image_noise_log_sigma
            sigma = torch.exp(torch.randn(batch, generator=generator) * std + mean)
            first = first_frame.float()
            noise = torch.randn(first.shape, generator=generator).to(first.device)
            noisy_first = first + sigma.to(first.device).view(-1, 1, 1, 1, 1) * noise
            encoded = self.stages.encode(noisy_first.to(first_frame.dtype), generator=generator).permute(0, 2, 1, 3, 4)
            image_latents = torch.cat([encoded, torch.zeros_like(latents[:, 1:])], dim=1)
            if dropout:
                keep_image = torch.rand(batch, generator=generator) >= self.diffusion.image_dropout
                image_latents = image_latents * keep_image.to(image_latents.device, image_latents.dtype).view(-1, 1, 1, 1, 1)
        return TrainingInputs(latents=latents, text=text, image_latents=image_latents)

    def _pad_frames(self, latents: torch.Tensor) -> torch.Tensor:
        missing = leading_pad_frames(latents.shape[1], self.dit_config)
        if missing:
            latents = torch.cat([latents[:, :1].expand(-1, missing, -1, -1, -1), latents], dim=1)
        return latents


