"""What training knows of a set of shards before reading one: ``index.json``, and the kind (bucket) of a sample from its
metadata, never from the file.

``index.json`` (written by :mod:`sat_video.data.shard_writer`) lists each shard with its sample count and a summary of
its samples' shapes: rows ``[is_image, width, height, frames, fps, count]``, one per distinct shape. That summary is
all bucket assignment needs (:func:`sat_video.data.buckets.assign_bucket` on the shape), so a run learns how many
samples of each bucket every shard holds from the index alone: start-up reads one file per shard folder, not one per
sample. Each sample's ``<key>.json`` repeats its own shape, which the stream assigns the same way.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from sat_video.common.errors import ConfigError, DataError, UnusableSample
from sat_video.data.buckets import Bucket, SourceShape, assign_bucket, usable_frames
from sat_video.data.clips import ClipSpec
from sat_video.data.shard_reader import ShardReadError, expand_shards, index_url, read_all, shard_name

INDEX_FORMAT = "sat_video shards"
INDEX_VERSION = 1
IMAGE, VIDEO = "image", "video"
"""Kinds without ``data.buckets``: a batch holds images or videos, never both."""


@dataclass(frozen=True)
class SampleShape:
    """What a sample's kind depends on: a video's size as displayed, its frame count and rate as decord indexes them."""

    is_image: bool
    width: int
    height: int
    frames: int
    fps: float

    @classmethod
    def from_metadata(cls, meta: object, is_image: bool, where: str) -> SampleShape:
        """From a sample's json (:func:`sat_video.data.clips.source_metadata`).

        Raises:
            UnusableSample: a field missing or of the wrong type, naming ``where`` (shard and key), expected and found.
        """
        if not isinstance(meta, dict):
            raise UnusableSample(where, f"its json is {type(meta).__name__}, expected an object")
        values = {}
        for name in ("width", "height", "frames") + (() if is_image else ("fps",)):
            value = meta.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                raise UnusableSample(where, f"its json's {name!r} must be a positive number, found {value!r}")
            values[name] = value
        return cls(is_image, int(values["width"]), int(values["height"]), int(values["frames"]),
                   float(values.get("fps", 0.0)))


@dataclass(frozen=True)
class ShardInfo:
    """One shard as its ``index.json`` describes it: samples per shape."""

    url: str
    samples: int
    shapes: tuple[tuple[SampleShape, int], ...]


def _parse_shapes(rows: object, where: str) -> tuple[tuple[SampleShape, int], ...]:
    try:
        return tuple((SampleShape(bool(row[0]), int(row[1]), int(row[2]), int(row[3]), float(row[4])), int(row[5]))
                     for row in rows)
    except (TypeError, ValueError, IndexError):
        raise DataError(f"{where}: 'shapes' must be rows [is_image, width, height, frames, fps, count], found "
                        f"{str(rows)[:120]}") from None


def load_shard_infos(urls: Sequence[str], timeout_s: float) -> list[ShardInfo]:
    """The index entry of every shard in ``urls``: one ``index.json`` read per folder (per command for ``pipe:``).

    Raises:
        DataError: an index that is missing, unreadable or of another format, or a shard it does not list.
    """
    indexes: dict[str, dict] = {}
    infos = []
    for url in urls:
        where = index_url(url)
        if where not in indexes:
            indexes[where] = _read_index(where, timeout_s)
        entry = indexes[where].get(shard_name(url))
        if entry is None:
            listed = sorted(indexes[where])
            raise DataError(f"data.shards: {url}: its index {where} does not list {shard_name(url)} (it lists "
                            f"{len(listed)} shard(s): {', '.join(listed[:3])}{', ...' if len(listed) > 3 else ''})")
        infos.append(ShardInfo(url, int(entry["samples"]), _parse_shapes(entry.get("shapes"), f"{where}: {entry['name']}")))
    return infos


def _read_index(where: str, timeout_s: float) -> dict[str, dict]:
    """``{shard name: entry}`` of the index at ``where``."""
    try:
        index = json.loads(read_all(where, timeout_s))
    except ShardReadError as err:
        raise DataError(f"data.shards: cannot read the shards' index: {err} (tools/make_shards.py writes it beside the "
                        f"shards)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"data.shards: {where} is not valid JSON ({err})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise DataError(f"data.shards: {where}: expected format {INDEX_FORMAT!r} (written by tools/make_shards.py), "
                        f"found {found!r}")
    if index.get("version") != INDEX_VERSION:
        raise DataError(f"data.shards: {where}: expected version {INDEX_VERSION}, found {index.get('version')!r}")
    return {entry["name"]: entry for entry in index["shards"]}


class KindRule:
    """The kind of a sample from its shape: its bucket's name with ``data.buckets`` (the folder path's rule), else
    :data:`IMAGE` or :data:`VIDEO`; a sample the run cannot use raises :class:`UnusableSample` with the reason."""

    def __init__(self, spec: ClipSpec, buckets: Sequence[Bucket] | None, max_upscale: float):
        self.spec, self.max_upscale = spec, max_upscale
        self.buckets = {bucket.name: bucket for bucket in buckets} if buckets else None
        self._known: dict[SampleShape, str] = {}  # shape -> kind, or "!" + the reason it has none

    def of(self, shape: SampleShape, where: str) -> str:
        if shape not in self._known:
            try:
                self._known[shape] = self._assign(shape)
            except UnusableSample as err:
                self._known[shape] = "!" + err.reason
        kind = self._known[shape]
        if kind.startswith("!"):
            raise UnusableSample(where, kind[1:])
        return kind

    def _assign(self, shape: SampleShape) -> str:
        spec = self.spec
        pixels = shape.width * shape.height
        if pixels > spec.max_source_pixels:
            raise UnusableSample("", f"declared frame size {shape.width}x{shape.height} ({pixels:,} pixels) exceeds "
                                     f"data.max_source_pixels={spec.max_source_pixels:,}")
        frames = 1 if shape.is_image else usable_frames(shape.frames, shape.fps, spec.fps, spec.skip_frames)
        if self.buckets is not None:
            source = SourceShape(shape.width, shape.height, frames, shape.is_image)
            return assign_bucket("", source, list(self.buckets.values()), self.max_upscale, spec.min_frames).name
        if shape.is_image:
            return IMAGE
        needed = spec.num_frames if spec.min_frames is None else spec.min_frames
        if frames < needed:
            at_least = "" if spec.min_frames is None else "at least "
            raise UnusableSample("", f"too few frames: needs {at_least}{needed} at {spec.fps:g} fps after skipping "
                                     f"{spec.skip_frames} at each end, has {frames} ({shape.frames} frames at "
                                     f"{shape.fps:g} fps)")
        return VIDEO

    def counts(self, info: ShardInfo) -> Counter:
        """Samples of each kind in the shard (``None``: those of no kind)."""
        counts: Counter = Counter()
        for shape, count in info.shapes:
            try:
                counts[self.of(shape, info.url)] += count
            except UnusableSample:
                counts[None] += count
        return counts


def check_shard_config(data) -> None:
    """What a run (or stage) on ``data.shards`` cannot combine, refused when the config loads (``data``: the section).

    Raises:
        ConfigError: shards with ``data.sources`` or ``data.latent_cache``, with ``data.bucket_weights``, or a pattern
            :func:`~sat_video.data.shard_reader.expand_shards` refuses.
    """
    if not data.shards:
        return
    if data.sources:
        raise ConfigError("data.shards and data.sources cannot be mixed in one run (or stage): the shards' plan cannot "
                          "deal folder samples to the same steps; write the sources as shards too (tools/make_shards.py "
                          "SOURCE --out FOLDER) and list both in data.shards")
    if data.latent_cache:
        raise ConfigError("data.shards and data.latent_cache cannot be combined: a precomputed cache replaces the "
                          "sources; the in-run cache (data.cache_latents) works with shards")
    if data.bucket_weights:
        raise ConfigError("data.bucket_weights cannot be used with data.shards: a stream cannot draw a bucket more often "
                          "than its shards hold it; buckets are drawn in proportion to their samples")
    expand_shards(list(data.shards))
