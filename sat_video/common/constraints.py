"""Allowed values of config fields, declared next to the field and checked when a config is loaded.

A section dataclass says what a field accepts in its ``metadata``::

    precision: str = field(default="bf16", metadata=one_of("bf16", "fp16", "fp32"))
    train_iters: int = field(default=1000, metadata=at_least(1))

:func:`sat_video.config.loader.load_config` checks every such field of every section (mixin ``Config`` classes
included) before anything else runs, and names the file, the full key, what is allowed and the closest value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sat_video.common.errors import ConfigError, did_you_mean


def one_of(*values: Any) -> dict:
    """The field takes one of ``values``."""
    return {"one_of": values}


def at_least(low: float, *, exclusive: bool = False) -> dict:
    """The field is ``>= low`` (``> low`` when ``exclusive``); ``null`` passes where the field is optional."""
    return {"at_least": (low, exclusive)}


def each_one_of(*values: Any) -> dict:
    """The field is a list whose every item is one of ``values``."""
    return {"each_one_of": values}


def between(low: float, high: float) -> dict:
    """The field lies in ``[low, high]``."""
    return {"between": (low, high)}


def value_problem(value: Any, metadata: Mapping) -> str | None:
    """What is wrong with ``value`` under a field's constraint, or ``None`` (``None`` values are the type's business)."""
    if value is None:
        return None
    if "one_of" in metadata:
        allowed = metadata["one_of"]
        if value not in allowed:
            shown = ", ".join(repr(v) for v in allowed)
            return f"expected one of {shown}, found {value!r}{did_you_mean(value, [str(v) for v in allowed])}"
    if "each_one_of" in metadata:
        allowed = metadata["each_one_of"]
        for item in value:
            if item not in allowed:
                shown = ", ".join(repr(v) for v in allowed)
                return f"expected items among {shown}, found {item!r}{did_you_mean(item, [str(v) for v in allowed])}"
    if "at_least" in metadata:
        low, exclusive = metadata["at_least"]
        if value < low or (exclusive and value == low):
            return f"expected a value {'>' if exclusive else '>='} {low}, found {value!r}"
    if "between" in metadata:
        low, high = metadata["between"]
        if not low <= value <= high:
            return f"expected a value in [{low}, {high}], found {value!r}"
    return None


def check_fields(section: Any, key: str) -> None:
    """Raise :class:`~sat_video.common.errors.ConfigError` listing every constrained field of ``section`` (a section
    dataclass, or its ``DictConfig`` from a loaded config) that breaks its constraint; ``key`` is its config key
    (``train.lr_schedule``)."""
    if isinstance(section, DictConfig):
        problems = field_problems(OmegaConf.get_type(section), section)
    else:
        problems = field_problems(type(section), vars(section))
    if problems:
        raise ConfigError(f"{key}: " + "; ".join(f"{name}: {problem}" for name, problem in problems))


def field_problems(schema: type, values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(field name, problem)`` for every constrained field of dataclass ``schema`` whose value in ``values`` breaks
    its constraint (nested dataclasses are the caller's to walk)."""
    problems = []
    for spec in dataclasses.fields(schema):
        if spec.name in values:
            problem = value_problem(values[spec.name], spec.metadata)
            if problem:
                problems.append((spec.name, problem))
    return problems


def divisors(count: int) -> list[int]:
    """The values that divide ``count`` evenly: what a size that must divide it may be (error messages list them)."""
    return [d for d in range(1, count + 1) if count % d == 0]
