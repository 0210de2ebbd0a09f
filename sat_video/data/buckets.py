"""Resolution x duration buckets: each clip is cut at the size of the bucket that fits it best.

``data.buckets`` lists ``[frames, height, width]`` in pixels. A clip goes to the bucket whose aspect ratio is
closest to its own (images to the 1-frame buckets, videos to the others); among the buckets of that aspect ratio,
to the largest one whose frame count it fills at ``data.fps`` (after ``data.skip_frames`` at each end) and whose
height and width it covers without upscaling by more than ``data.max_upscale``. A clip that fits none of them is
skipped, with the reason. Assignment reads only headers and decord's index (size as displayed, frame count, frame
rate), never decodes a frame. The sampler then draws each batch from one bucket (:class:`sat_video.data.ClipBatchSampler`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from sat_video.common.errors import ConfigError, UnusableSample
from sat_video.model.stages import SPATIAL_COMPRESSION

ASPECT_TOLERANCE = 1e-3
"""Buckets whose aspect ratios differ by less than this (relative) count as one aspect ratio."""


@dataclass(frozen=True, order=True)
class Bucket:
    """A clip size in pixels: ``frames`` (4k+1; 1 for images) x ``height`` x ``width``."""

    frames: int
    height: int
    width: int

    @classmethod
    def from_name(cls, name: str) -> Bucket:
        """The bucket ``"FxHxW"`` (its :attr:`name`)."""
        return cls(*map(int, name.split("x")))

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def volume(self) -> int:
        return self.frames * self.height * self.width


def parse_buckets(values: Sequence[Sequence[int]], patch_size: int, key: str = "data.buckets") -> list[Bucket]:
    """``[[frames, height, width], ...]`` -> buckets, refusing malformed ones (naming the entry and the rule); sides
    must give whole patches of ``patch_size`` latents."""
    multiple = SPATIAL_COMPRESSION * patch_size
    buckets = []
    for i, value in enumerate(values):
        where = f"{key}[{i}] = {list(value)}"
        if len(value) != 3:
            raise ConfigError(f"{where}: expected [frames, height, width] in pixels")
        frames, height, width = (int(v) for v in value)
        if frames < 1 or (frames - 1) % 4:
            raise ConfigError(f"{where}: frames must be of the form 4k+1 (1, 5, 9, ..., 49), found {frames}")
        if height < multiple or width < multiple or height % multiple or width % multiple:
            raise ConfigError(f"{where}: height and width must be positive multiples of {multiple} "
                              f"(8 x model.dit.patch_size), found {height}x{width}")
        bucket = Bucket(frames, height, width)
        if bucket in buckets:
            raise ConfigError(f"{where}: listed twice")
        buckets.append(bucket)
    return buckets


def usable_frames(total: int, source_fps: float, fps: float, skip_frames: int) -> int:
    """How many frames a video of ``total`` frames at ``source_fps`` gives when sampled at ``fps`` with ``skip_frames``
    left out at each end (the indices :func:`sat_video.data.clips.load_clip` reads)."""
    stride = source_fps / fps
    last = total - 2 * skip_frames  # sample i is read when floor(i * stride + 0.5) < last
    return 0 if last <= 0 else math.ceil((last - 0.5) / stride)


@dataclass(frozen=True)
class SourceShape:
    """What assignment needs to know about a file: its frame size as displayed (a video's rotation applied) and how many
    frames it gives at ``data.fps``."""

    width: int
    height: int
    frames: int
    is_image: bool


def assign_bucket(path, shape: SourceShape, buckets: Sequence[Bucket], max_upscale: float,
                  min_frames: int | None = None) -> Bucket:
    """The bucket of a clip of ``shape`` (rule in the module docstring).

    Raises:
        UnusableSample: no bucket of the clip's kind, or none of the nearest aspect ratio that it fills and covers.
    """
    kind = [b for b in buckets if (b.frames == 1) == shape.is_image]
    if not kind:
        raise UnusableSample(path, f"no {'1-frame' if shape.is_image else 'video'} bucket in data.buckets")
    aspect = shape.width / shape.height
    distance = {b: abs(math.log(b.aspect / aspect)) for b in kind}
    nearest = min(distance.values())
    same_aspect = [b for b in kind if distance[b] <= nearest + ASPECT_TOLERANCE]
    fitting = [
        b for b in same_aspect
        if shape.frames >= (b.frames if min_frames is None else min(min_frames, b.frames))
        and max(b.height / shape.height, b.width / shape.width) <= max_upscale + 1e-9
    ]
    if not fitting:
        sizes = ", ".join(b.name for b in sorted(same_aspect))
        raise UnusableSample(
            path, f"fits no bucket: {shape.width}x{shape.height}, {shape.frames} frame(s) at data.fps; the buckets of the "
            f"nearest aspect ratio ({sizes}) need more frames or more than data.max_upscale={max_upscale:g}x upscaling")
    return max(fitting, key=lambda b: (b.volume, b.frames))


def bucket_table(assigned: dict[str, list[str] | int]) -> str:
    """The log's bucket -> clip count table, from ``{"FxHxW": [files]}`` (``buckets.json``; from shards, whose files are in
    the shards, ``{"FxHxW": count}``)."""
    width = max(len(name) for name in assigned) if assigned else 6
    counts = {name: files if isinstance(files, int) else len(files) for name, files in assigned.items()}
    lines = [f"{'bucket':<{width}}  clips", *(f"{name:<{width}}  {count}" for name, count in counts.items())]
    return "\n".join(lines)


def assign_buckets(refs: Sequence, buckets: Sequence[Bucket], shape_of, max_upscale: float,
                   min_frames: int | None = None) -> tuple[list[tuple[object, Bucket]], list[tuple[str, str]]]:
    """Assign each of ``refs``; ``shape_of(ref)`` gives its :class:`SourceShape` (or raises ``UnusableSample``).

    Returns ``([(ref, bucket), ...] in the order of refs, [(path, reason), ...] of the refs that fit none)``.
    """
    assigned, skipped = [], []
    for ref in refs:
        try:
            assigned.append((ref, assign_bucket(ref.path, shape_of(ref), buckets, max_upscale, min_frames)))
        except UnusableSample as err:
            skipped.append((err.path, err.reason))
    return assigned, skipped
