"""sat_video: SAT-style video diffusion transformers built from mixins.

Public API (kept stable):

* :func:`load_config` - YAML files merged left to right plus ``key=value`` overrides, validated whole.
* :func:`build_dit` - the DiT a config describes.
* :func:`load_checkpoint` / :func:`save_checkpoint` - SAT checkpoints (folder, iteration folder, ``.pt``, ``.safetensors``).
* :class:`Mixin`, :func:`register_mixin`, :func:`wraps_previous` - write your own mixins;
  :class:`FrozenStage`, :func:`register_stage` - your own first stage or text encoder.

The layers and what may import what: ``docs/architecture.md``.
"""

from sat_video.common.errors import (
    CheckpointError,
    ConfigError,
    HookConflictError,
    MissingHookError,
    SatVideoError,
)
from sat_video.config.loader import load_config
from sat_video.formats.sat_checkpoint import load_checkpoint, save_checkpoint
from sat_video.model.build import build_dit
from sat_video.model.config import DiTConfig
from sat_video.model.context import ForwardContext, TokenGrid
from sat_video.model.dit import DiffusionTransformer
from sat_video.model.hooks import Mixin, wraps_previous
from sat_video.model.registry import register_mixin, register_stage
from sat_video.model.stages import FrozenStage

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DiTConfig", "DiffusionTransformer", "ForwardContext", "FrozenStage",
    "HookConflictError", "MissingHookError", "Mixin", "SatVideoError", "TokenGrid", "build_dit", "load_checkpoint",
    "load_config", "register_mixin", "register_stage", "save_checkpoint", "wraps_previous",
]
