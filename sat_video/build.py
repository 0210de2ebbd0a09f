"""Config -> model: the DiT with the mixins its config lists, added in order."""

from __future__ import annotations

import importlib
from typing import Union

from omegaconf import DictConfig
from torch import nn

from .config import ConfigError, DiTConfig, dit_config
from .dit import DiffusionTransformer
from .hooks import Mixin
from .registry import resolve_mixin_class


def build_mixin(dims: DiTConfig, entry) -> Mixin:
    """One mixin from its ``model.dit.mixins`` entry (``{type: ..., <params>}``)."""
    params = dict(entry)
    cls = resolve_mixin_class(params.pop("type"), dims.mixin_modules)
    return cls(dims, cls.Config(**params))


def build_dit(cfg: Union[DictConfig, DiTConfig]) -> DiffusionTransformer:
    """Build the DiT described by ``cfg`` (a config from :func:`load_config`, or a :class:`DiTConfig`).

    Weights are initialised as for training from scratch. Build under ``torch.device("meta")`` to get
    the structure without memory, then load weights with :func:`sat_video.load_checkpoint`.
    """
    dims = dit_config(cfg)
    dims.validate()
    model = DiffusionTransformer(dims)
    for name, entry in dims.mixins.items():
        model.add_mixin(name, build_mixin(dims, entry))
    return model


FIRST_STAGES = {"video_vae": ("mixins.video_vae", "VideoVAEMixin"), "patch_pca": ("mixins.pca_first_stage", "PatchPCAFirstStage")}


def build_first_stage(cfg: DictConfig) -> nn.Module:
    """The frozen first stage ``model.first_stage`` names (``encode(video, generator)`` / ``decode(latents)``)."""
    first_stage = cfg.model.first_stage
    if first_stage.type not in FIRST_STAGES:
        raise ConfigError(f"model.first_stage.type: expected one of {sorted(FIRST_STAGES)}, found '{first_stage.type}'")
    module, name = FIRST_STAGES[first_stage.type]
    return getattr(importlib.import_module(module), name).from_config(first_stage)
