"""Config sections -> objects: the DiT with the mixins ``model.dit.mixins`` lists, and the frozen stages.

It imports the built-in ``mixins`` package, which registers its mixins and stages, and sits above it, so that the
model's core (hooks, composition, registry, DiT) never imports a plug-in.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from omegaconf import DictConfig

from sat_video.common.errors import UnknownMixinError
from sat_video.model.config import DiTConfig, FirstStageConfig, TextEncoderConfig
from sat_video.model.dit import DiffusionTransformer
from sat_video.model.hooks import Mixin
from sat_video.model.registry import import_modules, resolve_mixin_class, resolve_stage_class
from sat_video.model.stages import FrozenStage, FrozenStages

# The built-in ``mixins`` package is installed beside ``sat_video`` (editable or not).
BUILTIN_MIXINS = Path(__file__).resolve().parents[2] / "mixins"
# SAT's names for the frozen stages inside a diffusion engine (its checkpoints' ``first_stage_model.*`` / ``conditioner.*``).
FIRST_STAGE_NAME, TEXT_ENCODER_NAME = "first_stage_model", "conditioner"


def import_plugins(modules: tuple[str, ...] | list[str] = ()) -> None:
    """Register the built-in mixins and stages, then those of the modules a config lists (``model.dit.mixin_modules``).

    Raises:
        UnknownMixinError: a folder named ``mixins`` shadows the built-in one, or a listed module cannot be imported.
    """
    module = importlib.import_module("mixins")
    found = Path(module.__file__).resolve().parent if getattr(module, "__file__", None) else None
    if found != BUILTIN_MIXINS:
        where = found or ", ".join(getattr(module, "__path__", [])) or "?"
        raise UnknownMixinError(
            f"'import mixins' found {where}, not sat_video's built-in mixins ({BUILTIN_MIXINS}): a folder named "
            "'mixins' on the Python path (often the working directory) shadows them; rename it and list your "
            "module under model.dit.mixin_modules")
    import_modules(modules)


def mixin_class(type_name: str, allowed_modules: tuple[str, ...] | list[str] = ()) -> type[Mixin]:
    """The class a ``model.dit.mixins.<name>.type`` names (built-in, registered, or dotted path in an allowed module)."""
    import_plugins(allowed_modules)
    return resolve_mixin_class(type_name, allowed_modules)


def stage_class(type_name: str, hook: str, key: str) -> type[FrozenStage]:
    """The stage class registered as ``type_name``, which must provide catalogue hook ``hook`` (``key``: its config key)."""
    import_plugins()
    return resolve_stage_class(type_name, hook, key)


def build_mixin(dit: DiTConfig, entry) -> Mixin:
    """One mixin from its ``model.dit.mixins`` entry (``{type: ..., <params>}``)."""
    params = dict(entry)
    cls = mixin_class(params.pop("type"), dit.mixin_modules)
    return cls(dit, cls.Config(**params))


def build_dit(cfg: DictConfig | DiTConfig) -> DiffusionTransformer:
    """Build the DiT described by ``cfg`` (a config from :func:`load_config`, or a :class:`DiTConfig`).

    Weights are initialised as for training from scratch. Build under ``torch.device("meta")`` to get
    the structure without memory, then load weights with :func:`sat_video.load_checkpoint`.
    """
    dit = DiTConfig.from_config(cfg)
    dit.validate()
    model = DiffusionTransformer(dit)
    for name, entry in dit.mixins.items():
        model.add_mixin(name, build_mixin(dit, entry))
    return model


def build_first_stage(first_stage: FirstStageConfig) -> FrozenStage:
    """The frozen first stage that ``model.first_stage.type`` names, built from that section."""
    return stage_class(first_stage.type, "encode_moments", "model.first_stage.type").from_config(first_stage)


def build_text_encoder(text_encoder: TextEncoderConfig, dit: DiTConfig) -> FrozenStage:
    """The frozen text encoder that ``model.text_encoder.type`` names; its output is ``[B, dit.text_length,
    dit.text_hidden_size]``."""
    cls = stage_class(text_encoder.type, "encode_text", "model.text_encoder.type")
    return cls.from_config(text_encoder, dit.text_length, dit.text_hidden_size)


def build_frozen_stages(model: DictConfig, *, first_stage: bool = True, text_encoder: bool = True,
                        tiled: bool = False) -> FrozenStages:
    """The frozen stages of the ``model`` section, under SAT's names; leave out what a run does not need. ``tiled``:
    the first stage encodes and decodes in tiles (``data.vae_tiling``)."""
    stages = FrozenStages()
    if first_stage:
        stages.add_stage(FIRST_STAGE_NAME, build_first_stage(model.first_stage))
        stages.first_stage.set_tiling(tiled)
    if text_encoder:
        stages.add_stage(TEXT_ENCODER_NAME, build_text_encoder(model.text_encoder, DiTConfig.from_config(model.dit)))
    return stages
