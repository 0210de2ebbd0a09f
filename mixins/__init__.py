"""The built-in mixins and frozen stages; importing this package registers them by name."""

from mixins.adaln import AdaLNMixin
from mixins.condition_tokens import ConditionTokensMixin
from mixins.factorized_attention import FactorizedAttentionMixin
from mixins.final_layer import FinalLayerMixin
from mixins.lora import LoRAMixin
from mixins.patch_embed import ImagePatchEmbedMixin
from mixins.pca_first_stage import PatchPCAFirstStage
from mixins.qk_layernorm import QKLayerNormMixin
from mixins.rotary3d import Rotary3DMixin
from mixins.sincos_pos import SinCosInterpolatedPosMixin
from mixins.t5_encoder import T5TextEncoder
from mixins.video_vae import VideoVAEMixin

__all__ = [
    "AdaLNMixin", "ConditionTokensMixin", "FactorizedAttentionMixin", "FinalLayerMixin", "ImagePatchEmbedMixin", "LoRAMixin",
    "PatchPCAFirstStage", "QKLayerNormMixin", "Rotary3DMixin", "SinCosInterpolatedPosMixin", "T5TextEncoder", "VideoVAEMixin",
]
