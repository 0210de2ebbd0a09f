"""Reconstruction quality of clips in ``[-1, 1]``: PSNR and SSIM, computed on ``[0, 1]`` as image libraries report them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2


def _unit(video: torch.Tensor) -> torch.Tensor:
    return ((video.double() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per clip (``[B, C, T, H, W]`` -> ``[B]``), in dB; an exact copy gives ``inf``."""
    mse = (_unit(reconstruction) - _unit(target)).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)


def _gaussian_window(size: int, channels: int) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per clip (``[B, C, T, H, W]`` -> ``[B]``): the mean SSIM of its frames and channels, with the 11x11 Gaussian
    window (sigma 1.5) of Wang et al. over the window positions inside the frame (frames smaller than 11 pixels use a
    window of their size)."""
    batch, channels, frames, height, width = target.shape
    size = min(SSIM_WINDOW, height, width)
    window = _gaussian_window(size, channels).to(target.device)
    x = _unit(reconstruction).transpose(1, 2).flatten(0, 1)  # [B*T, C, H, W]
    y = _unit(target).transpose(1, 2).flatten(0, 1)

    def blur(image):
        return F.conv2d(image, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.pow(2)
    var_y = blur(y * y) - mu_y.pow(2)
    cov = blur(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)
    index = numerator / ((mu_x.pow(2) + mu_y.pow(2) + SSIM_C1) * (var_x + var_y + SSIM_C2))
    return index.flatten(1).mean(1).view(batch, frames).mean(1)
