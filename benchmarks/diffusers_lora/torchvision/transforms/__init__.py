"""``torchvision.transforms`` as far as ``train_cogvideox_lora.py`` uses it: ``TT.functional.crop`` and
``InterpolationMode``."""

from torchvision.transforms import functional
from torchvision.transforms.functional import InterpolationMode

__all__ = ["InterpolationMode", "functional"]
