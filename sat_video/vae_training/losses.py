"""The VAE's losses: pixel L1/L2, LPIPS on random frames, KL, and the GAN terms of a 3D discriminator (hinge, R1).

The generator's loss is ``pixel_weight * pixel + perceptual_weight * lpips [+ kl_weight * kl] + adversarial_weight * w *
gan`` where ``w`` is taming's / sgm's adaptive weight, ``||grad_L rec|| / (||grad_L gan|| + 1e-4)`` clamped to
``[0, 1e4]`` at the decoder's last layer ``L`` (``rec`` the reconstruction terms), and 0 before ``disc_start``.
The discriminator's is CogVideo's hinge loss ``mean(relu(1 - D(x)) + relu(1 + D(x_hat)))`` plus ``r1_weight / 2 *
E ||grad_x D(x)||^2`` on real clips.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sat_video.vae_training.autoencoder import Reconstruction
from sat_video.vae_training.config import VaeLossConfig
from sat_video.vae_training.lpips import LPIPS

ADAPTIVE_EPS, ADAPTIVE_MAX = 1e-4, 1e4


@dataclass
class GeneratorLoss:
    """The generator's loss and its parts (detached floats for the log; ``total`` keeps its graph)."""

    total: torch.Tensor
    pixel: float
    perceptual: float
    kl: float
    gan: float
    adaptive_weight: float


@dataclass
class DiscriminatorLoss:
    total: torch.Tensor
    hinge: float
    r1: float
    logits_real: float
    logits_fake: float


def adaptive_weight(reconstruction_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: nn.Parameter) -> torch.Tensor:
    """``||grad rec|| / (||grad gan|| + 1e-4)`` at ``last_layer``, clamped to ``[0, 1e4]``, detached. ``autograd.grad``
    leaves ``.grad`` (and DeepSpeed's gradient hooks) alone."""
    rec_grad, = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)
    gan_grad, = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    return (rec_grad.norm() / (gan_grad.norm() + ADAPTIVE_EPS)).clamp(0.0, ADAPTIVE_MAX).detach()


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.float().mean()


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return (F.relu(1.0 - real_logits.float()) + F.relu(1.0 + fake_logits.float())).mean()


def r1_penalty(real: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """``E ||grad_x D(x)||^2`` over the batch (``real`` must require grad; the graph is kept for backward)."""
    grad, = torch.autograd.grad(real_logits.float().sum(), real, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


def pick_frames(video: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``[B, C, T, H, W]`` -> ``[B * k, C, H, W]``: frames ``indices[b]`` (``[B, k]``) of each clip."""
    batch = torch.arange(video.shape[0], device=video.device)[:, None]
    return video.transpose(1, 2)[batch, indices.to(video.device)].flatten(0, 1)


class VaeLoss:
    """Both players' losses for ``vae.loss``; ``lpips`` is required when ``perceptual_weight > 0``."""

    def __init__(self, cfg: VaeLossConfig, trainable: str, lpips: LPIPS | None):
        if cfg.perceptual_weight > 0 and lpips is None:
            raise ValueError("vae.loss.perceptual_weight > 0 needs an LPIPS network")
        self.cfg, self.lpips = cfg, lpips
        self.kl_weight = cfg.kl_weight if trainable == "all" else 0.0

    def gan_active(self, iteration: int) -> bool:
        """Whether 1-based ``iteration`` trains with the discriminator."""
        return self.cfg.adversarial_weight > 0 and iteration >= self.cfg.disc_start

    def perceptual(self, reconstruction: torch.Tensor, target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """LPIPS of ``perceptual_frames`` frames per clip drawn with ``generator`` (the same ones in both clips)."""
        batch, frames = target.shape[0], target.shape[2]
        count = min(self.cfg.perceptual_frames, frames)
        indices = torch.rand(batch, frames, generator=generator).topk(count, dim=1).indices
        return self.lpips(pick_frames(reconstruction, indices), pick_frames(target, indices)).float().mean()

    def generator(self, out: Reconstruction, target: torch.Tensor, generator: torch.Generator, last_layer: nn.Parameter,
                  judge: Callable[[torch.Tensor], torch.Tensor] | None) -> GeneratorLoss:
        """``judge``: the discriminator with its weights detached, when the GAN terms are on at this step."""
        cfg, video = self.cfg, out.video.float()
        pixel = (F.l1_loss if cfg.pixel == "l1" else F.mse_loss)(video, target.float())
        perceptual = self.perceptual(out.video, target, generator) if cfg.perceptual_weight > 0 else video.new_zeros(())
        reconstruction = cfg.pixel_weight * pixel + cfg.perceptual_weight * perceptual
        total = reconstruction
        kl = out.kl() if self.kl_weight > 0 else video.new_zeros(())
        total = total + self.kl_weight * kl
        gan, weight = video.new_zeros(()), video.new_zeros(())
        if judge is not None:
            gan = hinge_generator_loss(judge(out.video))
            weight = adaptive_weight(reconstruction, gan, last_layer) if cfg.adaptive_weight else torch.ones_like(gan)
            total = total + cfg.adversarial_weight * weight * gan
        parts = (float(part.detach()) for part in (pixel, perceptual, kl, gan, weight))
        return GeneratorLoss(total, *parts)

    def discriminator(self, discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> DiscriminatorLoss:
        """``fake``: the generator's clips, detached."""
        real = real.detach().requires_grad_(self.cfg.r1_weight > 0)
        real_logits, fake_logits = discriminator(real), discriminator(fake.detach())
        hinge = hinge_discriminator_loss(real_logits, fake_logits)
        r1 = r1_penalty(real, real_logits) if self.cfg.r1_weight > 0 else hinge.new_zeros(())
        total = hinge + 0.5 * self.cfg.r1_weight * r1
        return DiscriminatorLoss(total, float(hinge.detach()), float(r1.detach()), float(real_logits.detach().float().mean()),
                                 float(fake_logits.detach().float().mean()))
