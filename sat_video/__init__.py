"""sat_video: SAT-style video diffusion transformers built from mixins.

Public API (kept stable):

* :func:`load_config` - YAML files merged left to right plus ``key=value`` overrides, validated.
* :func:`build_dit` - the DiT a config describes.
* :func:`load_checkpoint` - SAT checkpoints (folder, iteration folder, ``.pt``, ``.safetensors``).
"""

from .build import build_dit
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .composition import HookConflictError, MissingHookError
from .config import ConfigError, DiTConfig, load_config
from .context import ForwardContext, TokenGrid
from .dit import DiffusionTransformer
from .hooks import Mixin, wraps_previous
from .registry import register_mixin

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DiTConfig", "DiffusionTransformer", "ForwardContext", "HookConflictError",
    "Mixin", "MissingHookError", "TokenGrid", "build_dit", "load_checkpoint", "load_config", "register_mixin",
    "save_checkpoint", "wraps_previous",
]
