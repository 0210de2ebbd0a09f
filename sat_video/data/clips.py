"""Captioned video and image clips for training: decoding, cutting, skipping bad files, batching.

* :func:`load_clip` decodes one sample into a ``[3, T, H, W]`` clip in ``[-1, 1]`` (SAT's recipe: frames
  sampled at a target fps with a few frames skipped at each end, resized to cover, center-cropped).
* :class:`VideoDataset` replaces a file that cannot be used by the next usable one of the same kind and
  reports what it skipped, so one broken file never stops a run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import decord
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sat_video.common.errors import DataError, UnusableSample
from sat_video.data.buckets import Bucket, SourceShape, usable_frames
from sat_video.data.config import DEFAULT_MAX_SOURCE_PIXELS, DataConfig
from sat_video.data.sources import SampleRef
from sat_video.data.video_probe import check_consistent, check_declared, check_decoded_size, probe_video
from sat_video.model.config import DiTConfig
from sat_video.model.stages import SPATIAL_COMPRESSION

logger = logging.getLogger(__name__)

DECORD_ERRORS = (RuntimeError, decord.DECORDError)
"""decord's ``VideoReader`` raises RuntimeError when ffmpeg cannot open a file, DECORDError (a bare Exception)
when its C++ side fails."""
PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
"""What PIL raises for unreadable, truncated, corrupt or absurdly large images, depending on the format."""
RESIZE_CHUNK = 8
"""Frames resized and converted at once: bounds the float32 temporaries of long high-resolution clips."""


@dataclass(frozen=True)
class ClipSpec:
    """How a clip is cut from a file.

    Args:
        num_frames: frames of a video clip, of the form 4k+1 (the VAE compresses 4 frames after the first).
        height, width: pixel size of the clip.
        fps: rate at which frames are sampled from the source (8 for CogVideoX 1.0, 16 for 1.5).
        skip_frames: frames never used at each end of a video (fades, title cards).
        min_frames: ``None``: a video must provide ``num_frames`` at ``fps``; otherwise a video with at least
            this many is padded by repeating its last frame (SAT's behaviour).
        max_source_pixels: files whose declared frames are larger are skipped before decoding.
        random_start: a video's clip starts at a random frame of those that leave room for the whole clip (drawn from
            the ``rng`` :func:`load_clip` is given) instead of right after ``skip_frames``.
        require_captions: ``False``: a sample without a usable caption gets an empty one instead of being skipped.
    """

    num_frames: int
    height: int
    width: int
    fps: float
    skip_frames: int = 0
    min_frames: int | None = None
    max_source_pixels: int = DEFAULT_MAX_SOURCE_PIXELS
    random_start: bool = False
    require_captions: bool = True

    def __post_init__(self):
        problems = []
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            problems.append(f"num_frames must be of the form 4k+1 (1, 5, 9, ..., 49), found {self.num_frames}")
        if self.height <= 0 or self.width <= 0:
            problems.append(f"height and width must be positive, found {self.height}x{self.width}")
        if not self.fps > 0:
            problems.append(f"fps must be positive, found {self.fps}")
        if self.skip_frames < 0:
            problems.append(f"skip_frames must be >= 0, found {self.skip_frames}")
        if self.min_frames is not None and not 1 <= self.min_frames <= self.num_frames:
            problems.append(f"min_frames must be null or between 1 and num_frames ({self.num_frames}), found {self.min_frames}")
        if problems:
            raise DataError("clip settings: " + "; ".join(problems))

    @classmethod
    def from_config(cls, data: DataConfig, dit: DiTConfig) -> ClipSpec:
        """From the ``data`` section and ``model.dit.num_frames``; a null ``data.height`` / ``data.width`` is the
        model's latent size times the first stage's spatial compression (8)."""
        try:
            return cls(
                num_frames=dit.num_frames,
                height=data.height if data.height is not None else dit.latent_height * SPATIAL_COMPRESSION,
                width=data.width if data.width is not None else dit.latent_width * SPATIAL_COMPRESSION,
                fps=data.fps, skip_frames=data.skip_frames, min_frames=data.min_frames,
                max_source_pixels=data.max_source_pixels, random_start=data.random_start,
                require_captions=data.require_captions,
            )
        except DataError as err:
            raise DataError(f"{err} (num_frames is model.dit.num_frames; the others are data.*)") from None


def read_caption(ref: SampleRef) -> str:
    """The sample's caption (from its metadata line or the first line of its label file).

    Raises:
        UnusableSample: no caption, an unreadable label file, or an empty caption.
    """
    if ref.caption is not None:
        text = ref.caption
    elif ref.caption_file is None:
        raise UnusableSample(ref.path, "no caption")
    else:
        try:
            text = (ref.caption_file.read_text(encoding="utf-8-sig").splitlines() or [""])[0]
        except FileNotFoundError:
            raise UnusableSample(ref.path, f"caption file missing: {ref.caption_file}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise UnusableSample(ref.path, f"caption file {ref.caption_file} cannot be read as UTF-8 text ({err})") from None
    if not text.strip():
        raise UnusableSample(ref.path, "empty caption")
    return text.strip()


def _short(err: Exception, path: Path) -> str:
    """First line of a decoder's message (which can run over many lines), naming the file only by its name."""
    lines = str(err).replace(str(path), path.name).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:160] if lines else ''}"


def _open_video(path: Path, max_source_pixels: int):
    """``(reader, frames, fps, declared header)`` of a video that passed every check made before decoding (the header's
    size as displayed, rotation applied, as decord decodes it)."""
    declared = probe_video(path)
    check_declared(path, declared, max_source_pixels)
    # decord indexes every packet when opening, so truncated files already fail here.
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        total, source_fps = len(reader), reader.get_avg_fps()
    except DECORD_ERRORS as err:
        raise UnusableSample(path, f"not a readable video ({_short(err, path)})") from None
    check_consistent(path, declared, total, source_fps)
    if not source_fps > 0:
        raise UnusableSample(path, f"unknown frame rate ({source_fps})")
    return reader, total, source_fps, declared


def _read_video(path: Path, spec: ClipSpec, rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 ``[T, H, W, 3]``: ``num_frames`` frames at ``spec.fps``, fewer (at least ``min_frames``) if the video is short;
    with ``spec.random_start``, from a start drawn with ``rng``. Frames not of the size the header displays are refused."""
    reader, total, source_fps, declared = _open_video(path, spec.max_source_pixels)
    stride = source_fps / spec.fps
    start = spec.skip_frames
    if spec.random_start and rng is not None:
        latest = total - spec.skip_frames - 1 - math.floor((spec.num_frames - 1) * stride + 0.5)  # the clip's last frame fits
        start = int(rng.integers(start, max(start, latest) + 1))
    wanted = (start + math.floor(i * stride + 0.5) for i in range(spec.num_frames))
    indices = [index for index in wanted if index < total - spec.skip_frames]
    needed = spec.num_frames if spec.min_frames is None else spec.min_frames
    if len(indices) < needed:
        at_least = "" if spec.min_frames is None else "at least "
        raise UnusableSample(
            path, f"too few frames: needs {at_least}{needed} at {spec.fps:g} fps after skipping {spec.skip_frames} at each end, "
            f"has {len(indices)} ({total} frames at {source_fps:g} fps)",
        )
    try:
        frames = reader.get_batch(indices).asnumpy()
    except DECORD_ERRORS as err:
        raise UnusableSample(path, f"decoding failed ({_short(err, path)})") from None
    check_decoded_size(path, declared, frames.shape[2], frames.shape[1])
    return frames


def _read_image(path: Path, max_pixels: int, decode: bool = True) -> np.ndarray | tuple[int, int]:
    """uint8 ``[1, H, W, 3]`` (``decode=False``: only ``(width, height)``); an image declaring more than
    ``max_pixels`` is refused before it is decoded."""
    try:
        with Image.open(path) as image:  # reads the header only
            pixels = image.width * image.height
            if pixels > max_pixels:
                raise UnusableSample(path, f"declared image size {image.width}x{image.height} ({pixels:,} pixels) "
                                           f"exceeds data.max_source_pixels={max_pixels:,}")
            if not decode:
                return image.width, image.height
            return np.array(image.convert("RGB"))[None]  # a writable copy, as torch.from_numpy wants
    except PIL_ERRORS as err:
        raise UnusableSample(path, f"not a readable image ({_short(err, path)})") from None


def _to_clip(frames: np.ndarray, height: int, width: int, num_frames: int = 1) -> torch.Tensor:
    """uint8 ``[T, h, w, 3]`` -> float32 ``[3, max(T, num_frames), height, width]`` in ``[-1, 1]``.

    Frames not already ``height x width`` are resized keeping the aspect ratio so both sides cover the target
    (bilinear, antialiased), then center-cropped; frames already at that size are only converted. Frames past
    ``T`` repeat the last one. Works ``RESIZE_CHUNK`` frames at a time, writing each chunk straight into the
    output (no other full-clip copy); the values are those of ``interpolate(frames.float()) / 127.5 - 1``.
    """
    source = torch.from_numpy(frames)  # [T, h, w, 3]
    count, (source_height, source_width) = len(source), source.shape[1:3]
    clip = torch.empty(3, max(count, num_frames), height, width)
    resize = (source_height, source_width) != (height, width)
    if resize:
        scale = max(height / source_height, width / source_width)
        size = (max(height, round(source_height * scale)), max(width, round(source_width * scale)))
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
    for start in range(0, count, RESIZE_CHUNK):
        chunk = source[start:start + RESIZE_CHUNK].permute(3, 0, 1, 2)  # [3, t, h, w], a view
        target = clip[:, start:start + chunk.shape[1]]
        if resize:
            # Channels-first contiguous input: interpolate's faster layout, and the same values as channels-last.
            resized = F.interpolate(chunk.transpose(0, 1).contiguous().float(), size=size, mode="bilinear",
                                    antialias=True, align_corners=False)  # [t, 3, size]
            target.copy_(resized[..., top:top + height, left:left + width].transpose(0, 1))
        else:
            target.copy_(chunk)
        target.div_(127.5).sub_(1.0)
    if count < clip.shape[1]:
        clip[:, count:] = clip[:, count - 1:count]
    return clip


def bucket_spec(spec: ClipSpec, bucket: Bucket) -> ClipSpec:
    """``spec`` at ``bucket``'s size."""
    min_frames = None if spec.min_frames is None else min(spec.min_frames, bucket.frames)
    return dataclasses.replace(spec, num_frames=bucket.frames, height=bucket.height, width=bucket.width, min_frames=min_frames)


def _check_file(ref: SampleRef) -> None:
    if ref.path.is_symlink() and not ref.path.exists():
        raise UnusableSample(ref.path, f"broken link to {os.readlink(ref.path)} (is that storage mounted?)")
    if not ref.path.is_file():
        raise UnusableSample(ref.path, "file not found")
    if ref.path.stat().st_size == 0:
        raise UnusableSample(ref.path, "empty file (0 bytes)")


def _caption(ref: SampleRef, spec: ClipSpec) -> str:
    try:
        return read_caption(ref)
    except UnusableSample:
        if spec.require_captions:
            raise
        return ""


def source_shape(ref: SampleRef, spec: ClipSpec) -> SourceShape:
    """A file's frame size as displayed (a video's rotation applied) and how many frames it gives at ``spec.fps`` after
    ``spec.skip_frames``, from its header and decord's index (nothing is decoded): what bucket assignment needs.

    Raises:
        UnusableSample: what :func:`load_clip` would refuse before decoding (a caption missing included).
    """
    _check_file(ref)
    _caption(ref, spec)
    if ref.is_image:
        width, height = _read_image(ref.path, spec.max_source_pixels, decode=False)
        return SourceShape(width, height, 1, True)
    _, total, source_fps, declared = _open_video(ref.path, spec.max_source_pixels)
    return SourceShape(declared.width, declared.height, usable_frames(total, source_fps, spec.fps, spec.skip_frames), False)


def source_metadata(ref: SampleRef, max_source_pixels: int = DEFAULT_MAX_SOURCE_PIXELS) -> dict:
    """What ``tools/make_shards.py`` stores beside a file: its caption and header (``width`` x ``height`` as displayed,
    ``frames`` and ``fps`` as decord indexes them, ``duration`` in seconds; ``None`` for images), after every check
    :func:`load_clip` makes that needs no clip size, the first frame's decoded size included.

    Raises:
        UnusableSample: as :func:`load_clip` would for the file.
    """
    _check_file(ref)
    caption = read_caption(ref)
    if ref.is_image:
        width, height = _read_image(ref.path, max_source_pixels, decode=False)
        return {"caption": caption, "width": width, "height": height, "frames": 1, "fps": None, "duration": None}
    reader, total, source_fps, declared = _open_video(ref.path, max_source_pixels)
    try:
        first = reader.get_batch([0]).asnumpy()
    except DECORD_ERRORS as err:
        raise UnusableSample(ref.path, f"decoding failed ({_short(err, ref.path)})") from None
    check_decoded_size(ref.path, declared, first.shape[2], first.shape[1])
    duration = declared.duration_s if declared.duration_s is not None else total / source_fps
    return {"caption": caption, "width": declared.width, "height": declared.height, "frames": total, "fps": source_fps,
            "duration": duration}


def load_clip(ref: SampleRef, spec: ClipSpec, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, str]:
    """Decode one sample (``rng``: where a ``spec.random_start`` clip starts).

    Returns:
        ``(clip, caption)``: float32 ``[3, spec.num_frames, height, width]`` in ``[-1, 1]`` for a video (a short
        video that ``spec.min_frames`` allows is padded by repeating its last frame), ``[3, 1, height, width]``
        for an image.
    Raises:
        UnusableSample: missing, empty or undecodable file, too few frames, frames not of the size the header displays,
            missing or empty caption.
    """
    _check_file(ref)
    caption = _caption(ref, spec)
    if ref.is_image:
        return _to_clip(_read_image(ref.path, spec.max_source_pixels), spec.height, spec.width), caption
    return _to_clip(_read_video(ref.path, spec, rng), spec.height, spec.width, spec.num_frames), caption


def load_image(path: str | Path, height: int, width: int, max_pixels: int = DEFAULT_MAX_SOURCE_PIXELS) -> torch.Tensor:
    """An image prepared like a training frame (cover, center crop): float32 ``[3, height, width]`` in ``[-1, 1]``.

    Raises:
        UnusableSample: missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise UnusableSample(path, "file not found")
    return _to_clip(_read_image(path, max_pixels), height, width)[:, 0]


@dataclass
class Sample:
    """One loaded clip; ``skipped`` lists ``(path, reason)`` of the files tried (and skipped) before it. ``video`` is
    ``None`` (and caption and path empty) for a clip left undecoded because the run's latent cache holds it."""

    video: torch.Tensor | None
    caption: str
    path: str
    position: tuple[int, int]
    skipped: tuple[tuple[str, str], ...] = ()
    bucket: str | None = None
    index: int | str = 0
    """The sample's key in the run's latent cache: its index in the data set, or a shard sample's key."""


@dataclass
class Batch:
    """What the data loader yields.

    Args:
        video: float32 ``[M, 3, T, H, W]`` in ``[-1, 1]`` (``T = 1`` for images): the samples not ``from_cache``, in
            order; ``None`` when all are.
        captions, paths: one per sample (empty for samples ``from_cache``).
        position: ``(epoch, batch index in the epoch)``; resume with ``start=(epoch, batch index + 1)``.
        skipped: ``(path, reason)`` of every file skipped while producing this batch.
        bucket: the bucket all its clips were cut for (``"FxHxW"``), ``None`` without ``data.buckets``.
        indices: each sample's index in the data set (a shard sample's key, :mod:`sat_video.data.shard_dataset`).
        from_cache: per sample, left undecoded because the run's latent cache holds it (:mod:`sat_video.data.run_cache`).
    """

    video: torch.Tensor | None
    captions: list[str]
    paths: list[str]
    position: tuple[int, int]
    skipped: list[tuple[str, str]]
    bucket: str | None = None
    indices: list[int | str] = dataclasses.field(default_factory=list)
    from_cache: list[bool] = dataclasses.field(default_factory=list)

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)``."""
        return self if self.video is None else dataclasses.replace(self, video=self.video.pin_memory())


def _examples(failures: Sequence[tuple[str, str]], limit: int = 3) -> str:
    shown = "; ".join(f"{path}: {reason}" for path, reason in failures[:limit])
    return shown + ("; ..." if len(failures) > limit else "")


class VideoDataset(torch.utils.data.Dataset):
    """Map-style dataset over discovered samples, indexed by the ``(index, epoch, batch index)`` items of
    :class:`ClipBatchSampler`.

    An unusable file is logged (logger ``sat_video.data``) and replaced by the next usable sample of the same
    kind (image or video, or the same bucket, so batch shapes still match), wrapping around the list.

    Args:
        refs: from :func:`discover`.
        spec: how clips are cut.
        buckets: with ``data.buckets``, the bucket of each ref (:func:`sat_video.data.buckets.assign_bucket`): its clip
            is cut at that size instead of ``spec``'s.
        seed: with ``spec.random_start``, where sample ``i`` starts in epoch ``e`` is drawn from ``(seed, e, i)``, so a
            resumed run cuts the same clips.
    """

    def __init__(self, refs: Sequence[SampleRef], spec: ClipSpec, buckets: Sequence[Bucket] | None = None, seed: int = 0):
        if not refs:
            raise DataError("VideoDataset needs at least one sample")
        if buckets is not None and len(buckets) != len(refs):
            raise ValueError(f"one bucket per sample: {len(refs)} samples, {len(buckets)} buckets")
        self.refs = list(refs)
        self.spec = spec
        self.buckets = list(buckets) if buckets is not None else None
        self.seed = seed

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def kinds(self) -> list:
        """What a batch must not mix, per sample (:class:`ClipBatchSampler`): its bucket, or whether it is an image."""
        return list(self.buckets) if self.buckets is not None else [ref.is_image for ref in self.refs]

    def spec_for(self, index: int) -> ClipSpec:
        """How sample ``index`` is cut: at its bucket's size, or ``spec``."""
        if self.buckets is None:
            return self.spec
        return bucket_spec(self.spec, self.buckets[index])

    def _try_load(self, index: int, failures: list[tuple[str, str]],
                  rng: np.random.Generator | None = None) -> tuple[torch.Tensor, str] | None:
        try:
            return load_clip(self.refs[index], self.spec_for(index), rng)
        except UnusableSample as err:
            logger.warning("skipping %s: %s", err.path, err.reason)
            failures.append((err.path, err.reason))
            return None

    def __getitem__(self, item: tuple[int, int, int] | tuple[int, int, int, bool]) -> Sample:
        """``(index, epoch, batch index)``, or with a fourth element from :meth:`RunLatentCache.planned`: ``True`` skips
        decoding (the run's latent cache holds the clip)."""
        index, epoch, batch_index, *from_cache = item
        bucket = self.buckets[index].name if self.buckets is not None else None
        if from_cache and from_cache[0]:
            return Sample(None, "", "", (epoch, batch_index), (), bucket, index)
        rng = np.random.default_rng([self.seed, epoch, index]) if self.spec.random_start else None
        kinds = self.kinds
        failures: list[tuple[str, str]] = []
        for offset in range(len(self.refs)):
            candidate = (index + offset) % len(self.refs)
            if kinds[candidate] != kinds[index]:
                continue
            loaded = self._try_load(candidate, failures, rng)
            if loaded is not None:
                return Sample(loaded[0], loaded[1], str(self.refs[candidate].path), (epoch, batch_index),
                              tuple(failures), bucket, index)
        kind = "image" if self.refs[index].is_image else "video"
        if self.buckets is not None:
            kind = f"{kind} of bucket {kinds[index].name}"
        raise DataError(f"no usable {kind}: all {len(failures)} {kind} files failed, e.g. {_examples(failures)}")

    def first_usable(self) -> int:
        """Index of the first sample that loads; call it before training so a data set without a single usable
        sample fails at once rather than inside a data-loader worker.

        Raises:
            DataError: no sample loads; the message names the folders and the first failures.
        """
        failures: list[tuple[str, str]] = []
        for index in range(len(self.refs)):
            if self._try_load(index, failures) is not None:
                return index
        folders = sorted({str(ref.path.parent) for ref in self.refs})
        where = ", ".join(folders[:3]) + (", ..." if len(folders) > 3 else "")
        raise DataError(f"no usable sample in {where}: {len(failures)} files, e.g. {_examples(failures)}")


def collate(samples: list[Sample]) -> Batch:
    """Stack the samples of one batch (``DataLoader(collate_fn=collate)``)."""
    videos = [sample.video for sample in samples if sample.video is not None]
    shapes = {tuple(video.shape) for video in videos}
    if len(shapes) > 1:
        raise DataError(f"cannot batch clips of shapes {sorted(shapes)}: a batch must not mix images and videos "
                        "(use ClipBatchSampler)")
    return Batch(
        video=torch.stack(videos) if videos else None,
        captions=[sample.caption for sample in samples],
        paths=[sample.path for sample in samples],
        position=samples[0].position,
        skipped=[failure for sample in samples for failure in sample.skipped],
        bucket=samples[0].bucket,
        indices=[sample.index for sample in samples],
        from_cache=[sample.video is None for sample in samples],
    )
