"""Load a config: YAML files merged left to right, then ``key=value`` overrides, then checked whole.

Every section maps to a dataclass owned by the layer that uses it (:mod:`sat_video.config.schema`); unknown keys
and wrong types fail with the file, the full key and the closest valid key, and values outside what a field
allows (:mod:`sat_video.common.constraints`) with the file that set them. Mixin parameters
(``model.dit.mixins.<name>``) are checked against the ``Config`` dataclass of the mixin their ``type`` names, and
frozen-stage types against the registered stages. A config that passes never fails later for one of these reasons.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sat_video.common.constraints import divisors, field_problems
from sat_video.common.errors import ConfigError, UnknownMixinError, did_you_mean
from sat_video.config.schema import Config
from sat_video.data.buckets import parse_buckets
from sat_video.data.config import DataConfig
from sat_video.data.shard_index import check_shard_config
from sat_video.model.build import build_dit, import_plugins, mixin_class, stage_class
from sat_video.model.config import DiTConfig
from sat_video.model.stages import SPATIAL_COMPRESSION
from sat_video.training.config import TrainConfig
from sat_video.training.optim import check_schedule
from sat_video.training.progressive import lr_lambda_by_period, plan_periods


def _check_known_keys(data: Any, schema: type, path: str, source: str) -> None:
    """Walk a plain mapping against dataclass ``schema``; open ``Dict`` fields are left to later checks."""
    if not isinstance(data, dict):
        return
    fields = typing.get_type_hints(schema)
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            where = f"'{path}'" if path else "the top level"
            raise ConfigError(
                f"{source}: unknown key '{full}'{did_you_mean(key, fields)} "
                f"(valid keys under {where}: {', '.join(fields)})"
            )
        if dataclasses.is_dataclass(fields[key]):
            _check_known_keys(value, fields[key], full, source)


def _dotlist_to_nested(overrides: Sequence[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))


def _drop_retyped_mixins(cfg: DictConfig, data: dict, source: str) -> None:
    """A layer that gives a mixin another ``type`` replaces the entry instead of merging parameters into it."""
    model = data.get("model") or {}
    dit = model.get("dit") or {} if isinstance(model, dict) else {}
    incoming = dit.get("mixins") or {} if isinstance(dit, dict) else {}
    if not isinstance(incoming, dict):
        raise ConfigError(f"{source}: model.dit.mixins: expected a mapping of mixin name -> {{type: ..., ...}}, "
                          f"found {type(incoming).__name__} {incoming!r}")
    current = cfg.model.dit.mixins
    for name, entry in incoming.items():
        if (
            isinstance(entry, dict)
            and "type" in entry
            and current.get(name) is not None
            and current[name].get("type") != entry["type"]
        ):
            current[name] = None


def _source_of(key: str, layers: Sequence[tuple[str, dict]]) -> str:
    """The last layer that sets dotted ``key`` (``default`` when none does): where a bad value came from."""
    for source, data in reversed(layers):
        node: Any = data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return source
    return "default"


def _check_section(node: DictConfig, schema: type, path: str, layers: Sequence[tuple[str, dict]]) -> None:
    """Every constrained field of ``schema`` (and of its nested sections) under ``path``."""
    for name, problem in field_problems(schema, node):
        key = f"{path}.{name}" if path else name
        raise ConfigError(f"{_source_of(key, layers)}: {key}: {problem}")
    for name, hint in typing.get_type_hints(schema).items():
        if dataclasses.is_dataclass(hint):
            _check_section(node[name], hint, f"{path}.{name}" if path else name, layers)


def _validate_mixins(dit: DictConfig, layers: Sequence[tuple[str, dict]]) -> None:
    """Each ``model.dit.mixins`` entry: a registered type, known parameters of the right types, allowed values."""
    for name in list(dit.mixins.keys()):
        entry = dit.mixins[name]
        where = f"model.dit.mixins.{name}"
        if entry is None:
            del dit.mixins[name]
            continue
        if not isinstance(entry, DictConfig) or "type" not in entry:
            raise ConfigError(
                f"{where}: expected a mapping with a 'type' key, "
                f"found {OmegaConf.to_container(entry) if isinstance(entry, DictConfig) else entry!r}"
            )
        if not str(name).isidentifier():
            raise ConfigError(f"{where}: mixin names must be Python identifiers")
        params = {k: v for k, v in OmegaConf.to_container(entry, resolve=True).items() if k != "type"}
        try:
            cls = mixin_class(entry.type, dit.mixin_modules)
        except UnknownMixinError as err:
            raise ConfigError(f"{_source_of(where + '.type', layers)}: {where}.type: {err}") from None
        valid = [f.name for f in dataclasses.fields(cls.Config)]
        for key in params:
            if key not in valid:
                raise ConfigError(
                    f"unknown key '{where}.{key}' for mixin type '{entry.type}'{did_you_mean(key, valid)} "
                    f"(valid: {', '.join(valid) or 'none'})"
                )
        try:
            typed = OmegaConf.merge(OmegaConf.structured(cls.Config), params)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{where}: {err.msg if hasattr(err, 'msg') else err}") from None
        _check_section(typed, cls.Config, where, layers)
        dit.mixins[name] = {"type": entry.type, **OmegaConf.to_container(typed)}


def _validate_stages(model: DictConfig, layers: Sequence[tuple[str, dict]]) -> None:
    for section, hook in (("first_stage", "encode_moments"), ("text_encoder", "encode_text")):
        key = f"model.{section}.type"
        try:
            stage_class(model[section].type, hook, key)
        except UnknownMixinError as err:
            raise ConfigError(f"{_source_of(key, layers)}: {err}") from None


def _check_across_sections(cfg: DictConfig) -> None:
    """Rules that tie keys of several sections together."""
    validation, dit = cfg.train.validation, cfg.model.dit
    if validation.interval and not validation.prompts:
        raise ConfigError("train.validation.interval is set but train.validation.prompts is empty")
    if validation.interval and dit.in_channels > dit.out_channels and not validation.image:
        raise ConfigError("train.validation.image: an image-to-video model needs a first frame to validate with")
    check_schedule(cfg.train.lr_schedule, cfg.train.optimizer.lr)
    _check_sequence_parallel(cfg)
    _check_tiling(cfg)


def _check_tiling(cfg: DictConfig) -> None:
    first_stage = cfg.model.first_stage
    size, overlap = list(first_stage.tile_size), list(first_stage.tile_overlap)
    step = SPATIAL_COMPRESSION
    if len(size) != 2 or any(side <= 0 or side % step for side in size):
        raise ConfigError(f"model.first_stage.tile_size: expected [height, width], positive multiples of {step} "
                          f"pixels, found {size}")
    if len(overlap) != 2 or any(not 0 <= shared < side or shared % step for shared, side in zip(overlap, size)):
        raise ConfigError(f"model.first_stage.tile_overlap: expected [height, width] pixels, multiples of {step} and "
                          f"smaller than model.first_stage.tile_size {size}, found {overlap}")
    for side, (pixels, shared) in zip(("height", "width"), zip(size, overlap)):
        if not _blends_exactly(pixels, shared):
            near = [o for o in range(max(0, shared - 4 * step), min(pixels, shared + 5 * step), step)
                    if _blends_exactly(pixels, o)]
            raise ConfigError(f"model.first_stage.tile_overlap: diffusers' tiling cannot blend {shared} of {pixels} pixels "
                              f"along the {side} without a seam (floating point); nearby overlaps that work: {near}")
    tiling = [key for key, on in (("sample.vae_tiling", cfg.sample.vae_tiling), ("data.vae_tiling", cfg.data.vae_tiling)) if on]
    if tiling and first_stage.type != "video_vae":
        raise ConfigError(f"{tiling[0]}: only the video_vae first stage tiles; model.first_stage.type is {first_stage.type}")


def _blends_exactly(tile: int, overlap: int) -> bool:
    from mixins.video_vae import overlap_factor

    try:
        overlap_factor(tile, overlap)
    except ValueError:
        return False
    return True


def _check_sequence_parallel(cfg: DictConfig) -> None:
    size, dit = cfg.parallel.sequence_parallel_size, cfg.model.dit
    if size == 1:
        return
    heads = dit.num_attention_heads
    if heads % size:
        raise ConfigError(f"parallel.sequence_parallel_size={size} must divide model.dit.num_attention_heads={heads}: "
                          f"Ulysses gives each rank whole heads (allowed: {divisors(heads)})")
    for name, entry in dit.mixins.items():
        if not mixin_class(entry.type, dit.mixin_modules).runs_sharded:
            raise ConfigError(
                f"parallel.sequence_parallel_size={size}: mixin model.dit.mixins.{name} (type {entry.type}) cannot run "
                "on a part of the sequence (its class does not declare runs_sharded = True); use "
                "sequence_parallel_size 1 with it"
            )


def read_yaml(path: str | Path, *, what: str = "config file", error: type[ConfigError] = ConfigError):
    """The plain data of a YAML file; ``error`` names the file when it is missing or does not parse."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:  # yaml errors carry the line and column
        raise error(f"{path}: cannot parse YAML: {err}") from None


def load_config(paths: str | Path | dict | Sequence[str | Path | dict], overrides: Sequence[str] = ()) -> DictConfig:
    """Load YAML files merged left to right, then apply ``key=value`` overrides.

    Args:
        paths: one path or a list; an item may also be a mapping (an in-memory config layer).
        overrides: dotted ``key=value`` strings, applied last (``model.dit.num_layers=4``).
    Returns:
        A typed, resolved ``DictConfig`` following :class:`Config` (read ``cfg.model.dit.hidden_size``).
    Raises:
        ConfigError: unknown key (with the closest valid one), wrong type, a value outside what its field allows
            (naming the file that set it, the full key, the allowed values and the closest one), an unregistered
            mixin or stage type, or inconsistent sizes. Nothing has been read or built when it is raised.
    """
    if isinstance(paths, (str, Path, dict, DictConfig)):
        paths = [paths]
    cfg = OmegaConf.structured(Config)
    layers = []
    for path in paths:
        if isinstance(path, (dict, DictConfig)):
            layers.append(("in-memory config", OmegaConf.to_container(OmegaConf.create(path))))
            continue
        layers.append((str(path), read_yaml(path) or {}))
    if overrides:
        layers.append(("command-line override", _dotlist_to_nested(overrides)))
    for source, data in layers:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, found {type(data).__name__}")
        _check_known_keys(data, Config, "", source)
        _drop_retyped_mixins(cfg, data, source)
        try:
            cfg = OmegaConf.merge(cfg, data)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{source}: {err.msg if hasattr(err, 'msg') else err} (key '{err.full_key}')") from None
        except TypeError as err:  # a mapping where a list belongs (train.stages.0=... on the command line), or the reverse
            raise ConfigError(f"{source}: {err}: a mapping given where the config has a list, or the reverse") from None
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve interpolation at '{err.full_key}': {err.msg}") from None
    try:
        import_plugins(cfg.model.dit.mixin_modules)
    except UnknownMixinError as err:
        raise ConfigError(f"{_source_of('model.dit.mixin_modules', layers)}: {err}") from None
    _validate_mixins(cfg.model.dit, layers)
    _validate_stages(cfg.model, layers)
    _check_section(cfg, Config, "", layers)
    DiTConfig.from_config(cfg).validate()
    _check_across_sections(cfg)
    with torch.device("meta"):  # mixins check the sizes they need (RoPE's head dim, ...) as they are built
        dit = build_dit(cfg)
    _check_buckets(cfg, dit)
    check_shard_config(cfg.data)
    _check_stages(cfg, dit, layers)
    return cfg


def _check_stages(cfg: DictConfig, dit, layers) -> None:
    """Each stage of ``train.stages``: keys that may change, in order, and its config as valid as the run's."""
    periods = plan_periods(cfg)
    if not cfg.train.stages:
        return
    for period in periods:
        try:
            _check_section(period.cfg.data, DataConfig, "data", [])
            _check_section(period.cfg.train, TrainConfig, "train", [])
            _check_buckets(period.cfg, dit)
            check_shard_config(period.cfg.data)
        except ConfigError as err:
            raise ConfigError(f"train.stages[{period.index}]: {str(err).removeprefix('default: ')}") from None
    lr_lambda_by_period(cfg, periods)


def _check_buckets(cfg: DictConfig, dit) -> None:
    """``data.buckets`` and ``train.validation.sizes`` well formed and runnable by every mixin, and
    ``data.bucket_weights`` naming buckets."""
    data, dit_config = cfg.data, DiTConfig.from_config(cfg)
    buckets = parse_buckets(data.buckets, dit_config.patch_size)
    validation_sizes = parse_buckets(cfg.train.validation.sizes, dit_config.patch_size, "train.validation.sizes")
    for key, sizes in (("data.buckets", buckets), ("train.validation.sizes", validation_sizes)):
        for bucket in sizes:
            grid = dit_config.token_grid(bucket.frames, bucket.height // SPATIAL_COMPRESSION, bucket.width // SPATIAL_COMPRESSION)
            for name, mixin in dit.mixins.items():
                try:
                    mixin.check_grid(grid, dit_config.text_length)
                except ValueError as err:
                    raise ConfigError(f"{key}: {bucket.name} cannot run on mixin model.dit.mixins.{name} "
                                      f"({type(mixin).__name__}): {err}") from None
    names = [bucket.name for bucket in buckets]
    for name, weight in data.bucket_weights.items():
        if name not in names:
            raise ConfigError(f"data.bucket_weights: '{name}' is not a bucket{did_you_mean(name, names)} "
                              f"(data.buckets: {', '.join(names) or 'none'})")
        if weight < 0:
            raise ConfigError(f"data.bucket_weights.{name}: weights must be >= 0, found {weight}")
    if data.bucket_weights and not any(weight > 0 for weight in data.bucket_weights.values()):
        raise ConfigError("data.bucket_weights: at least one weight must be positive")
