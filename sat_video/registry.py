"""Mixins registered by name, and the explicit allow-list of modules a config may import.

A config names mixins by their registered name (``type: rotary_3d``). Code outside this package
registers its own with :func:`register_mixin` in a module that the config lists under
``model.dit.mixin_modules``; a ``type`` may also be a dotted ``module.Class`` path, but only inside one
of those listed modules. Nothing else is ever imported from a config.
"""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Iterable

from .hooks import Mixin

_REGISTRY: dict[str, type[Mixin]] = {}
# The built-in ``mixins`` package is installed beside ``sat_video`` (editable or not).
BUILTIN_MIXINS = Path(__file__).resolve().parents[1] / "mixins"


class UnknownMixinError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def register_mixin(name: str):
    """Class decorator: make a :class:`Mixin` subclass available to configs as ``type: <name>``."""

    def decorator(cls: type[Mixin]) -> type[Mixin]:
        if not (isinstance(cls, type) and issubclass(cls, Mixin)):
            raise TypeError(f"@register_mixin('{name}') must decorate a Mixin subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"mixin name '{name}' is already registered by {existing.__module__}.{existing.__qualname__}")
        _REGISTRY[name] = cls
        return cls

    return decorator


def _import_builtin() -> None:
    module = importlib.import_module("mixins")
    found = Path(module.__file__).resolve().parent if getattr(module, "__file__", None) else None
    if found != BUILTIN_MIXINS:
        where = found or ", ".join(getattr(module, "__path__", [])) or "?"
        raise UnknownMixinError(
            f"'import mixins' found {where}, not sat_video's built-in mixins ({BUILTIN_MIXINS}): a folder named "
            "'mixins' on the Python path (often the working directory) shadows them; rename it and list your "
            "module under model.dit.mixin_modules")


def import_mixin_modules(modules: Iterable[str]) -> None:
    """Import the modules a config explicitly allows (they register their mixins on import).

    Raises:
        UnknownMixinError: the built-in mixins are shadowed, or a listed module cannot be imported.
    """
    _import_builtin()
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UnknownMixinError(f"model.dit.mixin_modules lists '{module}', which cannot be imported: {err}") from err


def resolve_mixin_class(type_name: str, allowed_modules: Iterable[str] = ()) -> type[Mixin]:
    """Find the class for a config's ``type``: a registered name, or ``module.Class`` inside an allowed module."""
    allowed = list(allowed_modules)
    import_mixin_modules(allowed)
    if type_name in _REGISTRY:
        return _REGISTRY[type_name]
    module_name, _, class_name = type_name.rpartition(".")
    if module_name and any(module_name == m or module_name.startswith(m + ".") for m in allowed):
        cls = getattr(importlib.import_module(module_name), class_name, None)
        if isinstance(cls, type) and issubclass(cls, Mixin):
            return cls
        raise UnknownMixinError(f"'{type_name}' is not a Mixin subclass")
    hint = difflib.get_close_matches(type_name, list(_REGISTRY), n=1)
    raise UnknownMixinError(
        f"unknown mixin type '{type_name}'"
        + (f"; did you mean '{hint[0]}'?" if hint else "")
        + f" Registered: {', '.join(sorted(_REGISTRY))}."
        + (" A dotted path must lie inside a module listed under model.dit.mixin_modules." if "." in type_name else "")
    )
