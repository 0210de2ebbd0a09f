"""The built-in mixins; importing this package registers them by name."""

from .adaln import AdaLNMixin
from .condition_tokens import ConditionTokensMixin
from .factorized_attention import FactorizedAttentionMixin
from .final_layer import FinalLayerMixin
from .lora import LoRAMixin
from .patch_embed import ImagePatchEmbedMixin
from .qk_layernorm import QKLayerNormMixin
from .rotary3d import Rotary3DMixin
from .sincos_pos import SinCosInterpolatedPosMixin

__all__ = [
    "AdaLNMixin", "ConditionTokensMixin", "FactorizedAttentionMixin", "FinalLayerMixin", "ImagePatchEmbedMixin", "LoRAMixin",
    "QKLayerNormMixin", "Rotary3DMixin", "SinCosInterpolatedPosMixin",
]
