"""The built-in mixins; importing this package registers them by name."""

from .adaln import AdaLNMixin
from .final_layer import FinalLayerMixin
from .lora import LoRAMixin
from .patch_embed import ImagePatchEmbedMixin
from .rotary3d import Rotary3DMixin
from .sincos_pos import SinCosInterpolatedPosMixin

__all__ = ["AdaLNMixin", "FinalLayerMixin", "ImagePatchEmbedMixin", "LoRAMixin", "Rotary3DMixin", "SinCosInterpolatedPosMixin"]
