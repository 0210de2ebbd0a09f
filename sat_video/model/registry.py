"""Mixins and frozen stages registered by name: what a config's ``type:`` can refer to.

A config names mixins by their registered name (``model.dit.mixins.<name>.type: rotary_3d``) and frozen stages the
same way (``model.first_stage.type: video_vae``). The built-in ones register when :mod:`sat_video.model.build`
imports the ``mixins`` package; code outside it registers its own with :func:`register_mixin` /
:func:`register_stage` in a module that the config lists under ``model.dit.mixin_modules``, and a mixin ``type``
may also be a dotted ``module.Class`` path inside one of those modules. Nothing else is ever imported from a config.
This module only records and looks up; it imports no plugin.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import TypeVar

from sat_video.common.errors import UnknownMixinError, did_you_mean
from sat_video.model.hooks import Mixin
from sat_video.model.stages import FrozenStage

_MIXINS: dict[str, type[Mixin]] = {}
_STAGES: dict[str, type[FrozenStage]] = {}
T = TypeVar("T", bound=type)


def _register(registry: dict, base: type, decorator_name: str, name: str):
    def decorator(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"@{decorator_name}('{name}') must decorate a {base.__name__} subclass, got {cls!r}")
        existing = registry.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"the name '{name}' is already registered by {existing.__module__}.{existing.__qualname__}")
        registry[name] = cls
        return cls

    return decorator


def register_mixin(name: str):
    """Class decorator: make a :class:`Mixin` subclass available to configs as ``type: <name>``."""
    return _register(_MIXINS, Mixin, "register_mixin", name)


def register_stage(name: str):
    """Class decorator: make a :class:`FrozenStage` subclass available as ``model.first_stage.type`` or
    ``model.text_encoder.type``; the class builds itself from that section with ``from_config``."""

    def decorator(cls: T) -> T:
        cls = _register(_STAGES, FrozenStage, "register_stage", name)(cls)
        cls.config_type = name
        return cls

    return decorator


def stage_types(hook: str) -> list[str]:
    """Registered stage types that provide catalogue hook ``hook`` (``encode_moments``: first stages)."""
    return sorted(name for name, cls in _STAGES.items() if getattr(cls, hook) is not getattr(FrozenStage, hook))


def resolve_stage_class(type_name: str, hook: str, key: str) -> type[FrozenStage]:
    """The stage class registered as ``type_name``; it must provide ``hook`` (``key`` names the config key)."""
    allowed = stage_types(hook)
    if type_name not in allowed:
        raise UnknownMixinError(f"{key}: expected one of {allowed}, found '{type_name}'{did_you_mean(type_name, allowed)}")
    return _STAGES[type_name]


def import_modules(modules: Iterable[str]) -> None:
    """Import the modules a config explicitly allows (they register their mixins and stages on import)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UnknownMixinError(f"model.dit.mixin_modules lists '{module}', which cannot be imported: {err}") from err


def resolve_mixin_class(type_name: str, allowed_modules: Iterable[str] = ()) -> type[Mixin]:
    """Find the class for a mixin's ``type``: a registered name, or ``module.Class`` inside an allowed module.
    The allowed modules must be imported already (:func:`sat_video.model.build.mixin_class` does it)."""
    allowed = list(allowed_modules)
    if type_name in _MIXINS:
        return _MIXINS[type_name]
    module_name, _, class_name = type_name.rpartition(".")
    if module_name and any(module_name == m or module_name.startswith(m + ".") for m in allowed):
        cls = getattr(importlib.import_module(module_name), class_name, None)
        if isinstance(cls, type) and issubclass(cls, Mixin):
            return cls
        raise UnknownMixinError(f"'{type_name}' is not a Mixin subclass")
    raise UnknownMixinError(
        f"unknown mixin type '{type_name}'{did_you_mean(type_name, _MIXINS)} Registered: {', '.join(sorted(_MIXINS))}."
        + (" A dotted path must lie inside a module listed under model.dit.mixin_modules." if "." in type_name else "")
    )
