"""``resize`` and ``crop`` of ``torchvision.transforms.functional`` for float tensors ``[..., C, H, W]``, with torch
ops that compute what torchvision's tensor path computes (``F.interpolate``, antialiased by default, as torchvision
>= 0.17 does; float tensors are neither rounded nor clamped)."""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F


class InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def resize(img: torch.Tensor, size: list[int], interpolation: InterpolationMode = InterpolationMode.BILINEAR,
           max_size: int | None = None, antialias: bool | None = True) -> torch.Tensor:
    if len(size) != 2 or max_size is not None:
        raise NotImplementedError("this stand-in resizes to an explicit [height, width] only")
    if not img.is_floating_point():
        raise NotImplementedError("this stand-in resizes float tensors only (the script passes frames in [-1, 1])")
    if list(img.shape[-2:]) == list(size):  # torchvision returns the input unchanged too
        return img
    mode = interpolation.value
    smooth = mode in ("bilinear", "bicubic")
    batch = img.reshape(-1, *img.shape[-3:])
    out = F.interpolate(batch, size=list(size), mode=mode, align_corners=False if smooth else None,
                        antialias=bool(antialias) and smooth)
    return out.reshape(*img.shape[:-2], *size)


def crop(img: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    if top < 0 or left < 0 or top + height > img.shape[-2] or left + width > img.shape[-1]:
        raise NotImplementedError("this stand-in crops inside the image only (torchvision would zero-pad)")
    return img[..., top : top + height, left : left + width]
