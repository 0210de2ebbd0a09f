"""The VAE's losses and quality measures against hand computations, and what trains under ``vae.trainable``."""

import math

import pytest
import torch

from sat_video.fixtures.tiny_vae import TINY_VAE_ARCHITECTURE
from sat_video.vae_training.autoencoder import Reconstruction, TrainableAutoencoder
from sat_video.vae_training.config import VaeLossConfig
from sat_video.vae_training.losses import (
    ADAPTIVE_EPS,
    ADAPTIVE_MAX,
    VaeLoss,
    adaptive_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
    r1_penalty,
)
from sat_video.vae_training.quality import SSIM_C1, psnr, ssim
from tests.numerics import assert_close_rel, assert_identical


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    """A linear last layer ``out = h W^T`` has closed-form gradients: 2/N (out - y)^T h for the mean squared error and
    -1/B v (sum_b h_b)^T for the hinge generator loss of a linear critic ``out @ v``."""
    generator = torch.Generator().manual_seed(0)
    batch, features, outputs = 5, 7, 3
    h, y = torch.randn(batch, features, generator=generator), torch.randn(batch, outputs, generator=generator)
    weight = torch.nn.Parameter(torch.randn(outputs, features, generator=generator))
    v = torch.randn(outputs, generator=generator)
    out = h @ weight.T
    rec, gan = (out - y).pow(2).mean(), hinge_generator_loss(out @ v)
    rec_grad = 2.0 / (batch * outputs) * (out - y).detach().T @ h
    gan_grad = -torch.outer(v, h.sum(0)) / batch
    expected = rec_grad.norm() / (gan_grad.norm() + ADAPTIVE_EPS)
    assert_close_rel(adaptive_weight(rec, gan, weight), expected)
    assert weight.grad is None  # autograd.grad leaves .grad alone
    flat = hinge_generator_loss((out @ torch.zeros(outputs)) + 0.0 * out.sum())  # no gradient at all: the ceiling
    assert adaptive_weight(rec, flat, weight).item() == ADAPTIVE_MAX


def test_the_generator_loss_adds_its_terms_with_their_weights():
    cfg = VaeLossConfig(pixel="l1", pixel_weight=2.0, perceptual_weight=0.0, kl_weight=0.5, adversarial_weight=0.25)
    generator = torch.Generator().manual_seed(1)
    target = torch.rand(2, 3, 5, 8, 8, generator=generator) * 2 - 1
    last = torch.nn.Parameter(torch.ones(()))
    video = target * 0.5 * last + 0.1
    mean, logvar = torch.randn(2, 4, 2, 1, 1, generator=generator), torch.randn(2, 4, 2, 1, 1, generator=generator) * 0.1
    judge = lambda clip: clip.mean(dim=(1, 2, 3, 4)) * 3.0  # noqa: E731
    loss = VaeLoss(cfg, "all", None).generator(Reconstruction(video, mean, logvar), target, generator, last, judge)
    pixel = (video - target).abs().mean().detach()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    gan = -judge(video).mean()
    weight = adaptive_weight(2.0 * (video - target).abs().mean(), gan, last)
    assert_close_rel(loss.total.detach(), (2.0 * pixel + 0.5 * kl + 0.25 * weight * gan).detach())
    assert loss.pixel == pytest.approx(pixel.item(), rel=1e-6) and loss.kl == pytest.approx(kl.item(), rel=1e-6)
    decoder_only = VaeLoss(cfg, "decoder", None).generator(Reconstruction(video, mean, logvar), target, generator, last, None)
    assert decoder_only.kl == 0.0 and decoder_only.gan == 0.0  # no KL without the encoder training, no GAN without a judge


def test_hinge_losses_and_the_r1_penalty_by_hand():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 3.0])
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(((0 + 0.5 + 2.0) + (0 + 1 + 4)) / 3)
    assert hinge_generator_loss(fake).item() == pytest.approx(-1 / 3)
    x = torch.randn(4, 3, 2, 5, 5, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    a = 0.7
    logits = (a * x.pow(2)).flatten(1).sum(1)  # grad 2 a x per clip
    expected = (2 * a * x.detach()).pow(2).flatten(1).sum(1).mean()
    assert_close_rel(r1_penalty(x, logits), expected)


def test_psnr_and_ssim_by_hand():
    generator = torch.Generator().manual_seed(3)
    target = torch.rand(2, 3, 3, 16, 24, generator=generator) * 2 - 1
    shifted = (target + 0.1).clamp(-1, 1)
    mse = ((shifted.double() + 1) / 2 - (target.double() + 1) / 2).pow(2).flatten(1).mean(1)
    assert_close_rel(psnr(shifted, target), 10 * torch.log10(1 / mse))
    assert math.isinf(float(psnr(target, target)[0]))
    assert_close_rel(ssim(target, target), torch.ones(2, dtype=torch.float64))
    noisy = (target + 0.3 * torch.randn(target.shape, generator=generator)).clamp(-1, 1)
    assert (ssim(noisy, target) < ssim(shifted, target)).all() and (ssim(noisy, target) < 0.9).all()
    # flat frames: no variance, so SSIM is the luminance term alone
    a, b = torch.full((1, 3, 1, 12, 12), -0.5), torch.full((1, 3, 1, 12, 12), 0.5)
    c1, c2 = 0.25, 0.75
    assert ssim(a, b).item() == pytest.approx((2 * c1 * c2 + SSIM_C1) / (c1**2 + c2**2 + SSIM_C1), rel=1e-9)


def _tiny_vae():
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    return AutoencoderKLCogVideoX(**TINY_VAE_ARCHITECTURE)


def test_what_trains_and_checkpointing_changes_no_gradient():
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    grads = {}
    for checkpointing in (False, True):
        model = TrainableAutoencoder(_tiny_vae(), "decoder", gradient_checkpointing=checkpointing)
        model(video, torch.Generator().manual_seed(5)).video.square().mean().backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen and all(n.startswith(("vae.encoder.", "vae.quant_conv.")) for n in frozen)
        assert not any(n.startswith("vae.encoder.") for n in grads[checkpointing])
    assert grads[False].keys() == grads[True].keys()
    for name, grad in grads[False].items():
        assert_identical(grads[True][name], grad, name)
    whole = TrainableAutoencoder(_tiny_vae(), "all")
    whole(video, torch.Generator().manual_seed(5)).video.square().mean().backward()
    assert all(p.grad is not None for n, p in whole.named_parameters() if n.startswith("vae.encoder.conv_in"))
