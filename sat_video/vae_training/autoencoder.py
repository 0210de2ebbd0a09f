"""The VAE under training: diffusers' ``AutoencoderKLCogVideoX`` (the network ``VideoVAEMixin`` loads), what of it
trains, its forward with the posterior, and the two forms a trained VAE is written in.

* ``<save>/<iteration>/vae/``: a diffusers folder, which ``AutoencoderKLCogVideoX.from_pretrained`` and
  ``model.first_stage.path`` read as they are;
* SAT's ``3d-vae.pt`` layout (:func:`save_sat_vae`): ``{"state_dict": {encoder.*, decoder.*, loss.*}}``, which
  ``model.first_stage.path`` and SAT read, with the discriminator and LPIPS as ``loss.*`` for a later warm start.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from mixins.video_vae import (
    SAT_CHECKPOINT_SUFFIXES,
    SAT_TRAINING_PREFIX,
    VideoVAEMixin,
    diffusers_vae_to_sat,
    read_sat_state_dict,
)
from sat_video.common.files import atomic_write
from sat_video.model.config import FirstStageConfig

if TYPE_CHECKING:
    from diffusers import AutoencoderKLCogVideoX

FROZEN_WITH_DECODER = ("encoder.", "quant_conv.")
"""What ``vae.trainable: decoder`` keeps: everything a DiT's latents depend on."""


def load_autoencoder(first_stage: FirstStageConfig) -> tuple[AutoencoderKLCogVideoX, dict[str, torch.Tensor]]:
    """The network of ``model.first_stage`` in fp32 (random from ``init_seed``, a diffusers folder, or SAT's file), and
    the ``loss.*`` tensors of a SAT file without their prefix (the discriminator and LPIPS it was trained with;
    ``{}`` otherwise)."""
    vae = VideoVAEMixin.from_config(first_stage).vae.float()
    path = Path(first_stage.path).expanduser() if first_stage.path else None
    loss_state = {}
    if path is not None and path.is_file() and path.suffix in SAT_CHECKPOINT_SUFFIXES:
        loss_state = {key[len(SAT_TRAINING_PREFIX):]: value for key, value in read_sat_state_dict(path).items()
                      if key.startswith(SAT_TRAINING_PREFIX)}
    return vae, loss_state


@dataclass
class Reconstruction:
    """One forward of :class:`TrainableAutoencoder`: the decoded clip and the posterior it was sampled from."""

    video: torch.Tensor
    """``[B, 3, T, H, W]``, not clamped (the losses see what the decoder gives)."""
    mean: torch.Tensor
    logvar: torch.Tensor

    def kl(self) -> torch.Tensor:
        """KL(posterior || N(0, I)), the mean over latent elements."""
        return 0.5 * (self.mean.float().pow(2) + self.logvar.float().exp() - 1.0 - self.logvar.float()).mean()


class TrainableAutoencoder(nn.Module):
    """The VAE with ``trainable`` (``decoder`` or ``all``) set: what DeepSpeed trains. With ``decoder`` the encoder runs
    without gradients and its weights never reach the optimizer."""

    def __init__(self, vae: AutoencoderKLCogVideoX, trainable: str, gradient_checkpointing: bool = False):
        super().__init__()
        # SAT encodes a whole clip at once, as VideoVAEMixin does for the DiT: the latents a trained decoder learns from
        # are those the DiT trains on. Decoding keeps diffusers' 2-latent-frame chunks, as sampling decodes.
        vae.num_sample_frames_batch_size = sys.maxsize
        vae.disable_tiling()
        self.vae, self.trainable = vae, trainable
        for name, param in vae.named_parameters():
            param.requires_grad_(trainable == "all" or not name.startswith(FROZEN_WITH_DECODER))
        if gradient_checkpointing:
            vae.enable_gradient_checkpointing()

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's output convolution, where the adaptive GAN weight compares gradients."""
        return self.vae.decoder.conv_out.conv.weight

    def forward(self, video: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Reconstruction:
        """Encode ``video`` (``[B, 3, T, H, W]`` in ``[-1, 1]``), draw a latent from the posterior with ``generator``
        (``sample=False``: its mean) and decode it."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable == "all"):
            posterior = self.vae.encode(video).latent_dist
        latents = posterior.mean
        if sample:
            noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
            latents = latents + posterior.std * noise
        return Reconstruction(self.vae.decode(latents).sample, posterior.mean, posterior.logvar)


def save_diffusers_folder(vae: AutoencoderKLCogVideoX, folder: Path) -> None:
    """``vae`` as a diffusers folder (``config.json`` + safetensors), in fp32."""
    vae.save_pretrained(folder, safe_serialization=True)


def save_sat_vae(vae: AutoencoderKLCogVideoX, path: Path, loss_state: Mapping[str, torch.Tensor] = {}) -> None:
    """``vae`` in SAT's ``3d-vae.pt`` layout, with ``loss_state`` (the discriminator's and LPIPS's tensors, named as in
    SAT's loss module) under ``loss.``; written whole or not at all."""
    state = {key: value.detach().cpu().clone() for key, value in diffusers_vae_to_sat(vae.state_dict()).items()}
    state.update({SAT_TRAINING_PREFIX + key: value.detach().cpu().clone() for key, value in loss_state.items()})
    atomic_write(path, lambda tmp: torch.save({"state_dict": state}, tmp))
