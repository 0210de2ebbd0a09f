"""Captioned video and image clips for training: discovery, decoding, skipping bad files, batch order.

* :func:`discover` lists samples of SAT SFT folders and ``.jsonl`` / ``.csv`` metadata files.
* :func:`load_clip` decodes one sample into a ``[3, T, H, W]`` clip in ``[-1, 1]`` (SAT's recipe: frames
  sampled at a target fps with a few frames skipped at each end, resized to cover, center-cropped).
* :class:`VideoDataset` replaces a file that cannot be used by the next usable one of the same kind and
  reports what it skipped, so one broken file never stops a run.
* :class:`ClipBatchSampler` yields batches forever, sharded by rank, never mixing images with videos, with
  every rank drawing the same kind at each step, and can start at any ``(epoch, batch)`` position so a
  resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import decord
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DECORD_ERRORS = (RuntimeError, decord.DECORDError)
"""decord's ``VideoReader`` raises RuntimeError when ffmpeg cannot open a file, DECORDError (a bare Exception)
when its C++ side fails."""
PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
"""What PIL raises for unreadable, truncated, corrupt or absurdly large images, depending on the format."""
RESIZE_CHUNK = 8
"""Frames resized and converted at once: bounds the float32 temporaries of long high-resolution clips."""


class DataError(ValueError):
    """The data sources cannot be used: missing, malformed, or without a single usable sample."""


class UnusableSample(Exception):
    """One file cannot be used (unreadable, too short, no caption); the dataset skips it."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(str(path), reason)  # both in ``args`` so the exception pickles across worker processes
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class SampleRef:
    """One discovered sample; nothing is read until :func:`load_clip`.

    Args:
        path: the video or image file.
        caption: the caption given by a metadata file; ``None`` when it is read from ``caption_file``.
        caption_file: SFT layout's ``labels/<name>.txt`` (first line), possibly missing.
        is_image: a one-frame image sample rather than a video.
    """

    path: Path
    caption: str | None = None
    caption_file: Path | None = None
    is_image: bool = False


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _discover_folder(root: Path) -> list[SampleRef]:
    """SAT's SFT layout, searched recursively as SAT does: ``videos/a/b.mp4`` is captioned by ``labels/a/b.txt``."""
    videos = root / "videos"
    if not videos.is_dir():
        raise DataError(f"{root}: expected SAT's SFT layout (videos/<name>.mp4 + labels/<name>.txt), but it has no videos/ folder")
    refs = []
    for path in sorted(videos.rglob("*")):
        # Hidden names are temporaries (write_mp4 writes ".<name>.*.mp4" first) or macOS "._" metadata.
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
            continue
        label = (root / "labels" / path.relative_to(videos)).with_suffix(".txt")
        refs.append(SampleRef(path, None, label, _is_image(path)))
    return refs


def _metadata_ref(entry: object, metadata: Path, where: str) -> SampleRef:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object with 'path' and 'caption', found {type(entry).__name__}")
    path, caption = entry.get("path"), entry.get("caption")
    if not isinstance(path, str) or not path.strip():
        raise DataError(f"{where}: 'path' must be a non-empty string, found {path!r}")
    if not isinstance(caption, str):
        raise DataError(f"{where}: 'caption' must be a string, found {caption!r}")
    file = metadata.parent / path.strip()
    return SampleRef(file, caption, None, _is_image(file))


def _discover_jsonl(metadata: Path) -> list[SampleRef]:
    refs = []
    for number, line in enumerate(_read_text(metadata).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{metadata}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        refs.append(_metadata_ref(entry, metadata, f"{metadata}:{number}"))
    return refs


def _discover_csv(metadata: Path) -> list[SampleRef]:
    reader = csv.DictReader(_read_text(metadata).splitlines())
    if reader.fieldnames is None or not {"path", "caption"} <= set(reader.fieldnames):
        raise DataError(f"{metadata}: the header must name the columns 'path' and 'caption', found {reader.fieldnames}")
    return [_metadata_ref(row, metadata, f"{metadata}:{reader.line_num}") for row in reader]


def _read_text(metadata: Path) -> str:
    try:
        return metadata.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{metadata}: cannot be read as UTF-8 text ({err})") from None


def discover(sources: Sequence[str | Path]) -> list[SampleRef]:
    """List the samples of every source, sorted by path.

    Args:
        sources: folders in SAT's SFT layout (``videos/**/<name>.mp4`` or ``.png`` / ``.jpg``, captioned by
            the first line of ``labels/**/<name>.txt``), ``.jsonl`` files (lines ``{"path": ..., "caption": ...}``)
            or ``.csv`` files (columns ``path,caption``); metadata paths are relative to the metadata file.
    Raises:
        DataError: a source is missing or of an unknown kind, a metadata line is malformed (``file:line``), or
            the sources hold no sample at all. A missing file or caption is not checked here:
            :func:`load_clip` reports it and the dataset skips the sample.
    """
    if not sources:
        raise DataError("no data sources given (data.sources is empty)")
    refs = []
    for source in sources:
        source = Path(source)
        if source.is_dir():
            refs += _discover_folder(source)
        elif not source.exists():
            raise DataError(f"data source not found: {source}")
        elif source.suffix.lower() == ".jsonl":
            refs += _discover_jsonl(source)
        elif source.suffix.lower() == ".csv":
            refs += _discover_csv(source)
        else:
            raise DataError(f"{source}: unknown kind of data source; expected a folder in SAT's SFT layout, a .jsonl or a .csv file")
    if not refs:
        raise DataError(f"no videos or images found in {', '.join(map(str, sources))}")
    return sorted(refs, key=lambda ref: ref.path.as_posix())


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
    """

    num_frames: int
    height: int
    width: int
    fps: float
    skip_frames: int = 0
    min_frames: int | None = None

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
    def from_config(cls, cfg) -> ClipSpec:
        """From a loaded config: ``data.*`` and ``model.dit.num_frames``; a null ``data.height`` / ``data.width``
        is the model's latent size times 8 (the VAE's spatial compression)."""
        data, dit = cfg.data, cfg.model.dit
        try:
            return cls(
                num_frames=dit.num_frames,
                height=data.height if data.height is not None else dit.latent_height * 8,
                width=data.width if data.width is not None else dit.latent_width * 8,
                fps=data.fps, skip_frames=data.skip_frames, min_frames=data.min_frames,
            )
        except DataError as err:
            raise DataError(f"{err} (num_frames is model.dit.num_frames; the others are data.*)") from None


def _read_caption(ref: SampleRef) -> str:
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


def _read_video(path: Path, spec: ClipSpec) -> np.ndarray:
    """uint8 ``[T, H, W, 3]``: ``num_frames`` frames at ``spec.fps``, fewer (at least ``min_frames``) if the video is short."""
    # decord indexes every packet when opening, so truncated files already fail here.
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        total, source_fps = len(reader), reader.get_avg_fps()
    except DECORD_ERRORS as err:
        raise UnusableSample(path, f"not a readable video ({_short(err, path)})") from None
    if not source_fps > 0:
        raise UnusableSample(path, f"unknown frame rate ({source_fps})")
    stride = source_fps / spec.fps
    wanted = (spec.skip_frames + math.floor(i * stride + 0.5) for i in range(spec.num_frames))
    indices = [index for index in wanted if index < total - spec.skip_frames]
    needed = spec.num_frames if spec.min_frames is None else spec.min_frames
    if len(indices) < needed:
        at_least = "" if spec.min_frames is None else "at least "
        raise UnusableSample(
            path, f"too few frames: needs {at_least}{needed} at {spec.fps:g} fps after skipping {spec.skip_frames} at each end, "
            f"has {len(indices)} ({total} frames at {source_fps:g} fps)",
        )
    try:
        return reader.get_batch(indices).asnumpy()
    except DECORD_ERRORS as err:
        raise UnusableSample(path, f"decoding failed ({_short(err, path)})") from None


def _read_image(path: Path) -> np.ndarray:
    """uint8 ``[1, H, W, 3]``."""
    try:
        with Image.open(path) as image:
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


def load_clip(ref: SampleRef, spec: ClipSpec) -> tuple[torch.Tensor, str]:
    """Decode one sample.

    Returns:
        ``(clip, caption)``: float32 ``[3, spec.num_frames, height, width]`` in ``[-1, 1]`` for a video (a short
        video that ``spec.min_frames`` allows is padded by repeating its last frame), ``[3, 1, height, width]``
        for an image.
    Raises:
        UnusableSample: missing, empty or undecodable file, too few frames, missing or empty caption.
    """
    if not ref.path.is_file():
        raise UnusableSample(ref.path, "file not found")
    if ref.path.stat().st_size == 0:
        raise UnusableSample(ref.path, "empty file (0 bytes)")
    caption = _read_caption(ref)
    if ref.is_image:
        return _to_clip(_read_image(ref.path), spec.height, spec.width), caption
    return _to_clip(_read_video(ref.path, spec), spec.height, spec.width, spec.num_frames), caption


def load_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """An image prepared like a training frame (cover, center crop): float32 ``[3, height, width]`` in ``[-1, 1]``.

    Raises:
        UnusableSample: missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise UnusableSample(path, "file not found")
    return _to_clip(_read_image(path), height, width)[:, 0]


@dataclass
class Sample:
    """One loaded clip; ``skipped`` lists ``(path, reason)`` of the files tried (and skipped) before it."""

    video: torch.Tensor
    caption: str
    path: str
    position: tuple[int, int]
    skipped: tuple[tuple[str, str], ...] = ()


@dataclass
class Batch:
    """What the data loader yields.

    Args:
        video: float32 ``[B, 3, T, H, W]`` in ``[-1, 1]`` (``T = 1`` for images).
        captions, paths: one per sample.
        position: ``(epoch, batch index in the epoch)``; resume with ``start=(epoch, batch index + 1)``.
        skipped: ``(path, reason)`` of every file skipped while producing this batch.
    """

    video: torch.Tensor
    captions: list[str]
    paths: list[str]
    position: tuple[int, int]
    skipped: list[tuple[str, str]]

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)``."""
        return dataclasses.replace(self, video=self.video.pin_memory())


def _examples(failures: Sequence[tuple[str, str]], limit: int = 3) -> str:
    shown = "; ".join(f"{path}: {reason}" for path, reason in failures[:limit])
    return shown + ("; ..." if len(failures) > limit else "")


class VideoDataset(torch.utils.data.Dataset):
    """Map-style dataset over discovered samples, indexed by the ``(index, epoch, batch index)`` items of
    :class:`ClipBatchSampler`.

    An unusable file is logged (logger ``sat_video.data``) and replaced by the next usable sample of the same
    kind (image or video, so batch shapes still match), wrapping around the list.

    Args:
        refs: from :func:`discover`.
        spec: how clips are cut.
    """

    def __init__(self, refs: Sequence[SampleRef], spec: ClipSpec):
        if not refs:
            raise DataError("VideoDataset needs at least one sample")
        self.refs = list(refs)
        self.spec = spec

    def __len__(self) -> int:
        return len(self.refs)

    def _try_load(self, ref: SampleRef, failures: list[tuple[str, str]]) -> tuple[torch.Tensor, str] | None:
        try:
            return load_clip(ref, self.spec)
        except UnusableSample as err:
            logger.warning("skipping %s: %s", err.path, err.reason)
            failures.append((err.path, err.reason))
            return None

    def __getitem__(self, item: tuple[int, int, int]) -> Sample:
        index, epoch, batch_index = item
        is_image = self.refs[index].is_image
        failures: list[tuple[str, str]] = []
        for offset in range(len(self.refs)):
            ref = self.refs[(index + offset) % len(self.refs)]
            if ref.is_image != is_image:
                continue
            loaded = self._try_load(ref, failures)
            if loaded is not None:
                return Sample(loaded[0], loaded[1], str(ref.path), (epoch, batch_index), tuple(failures))
        kind = "image" if is_image else "video"
        raise DataError(f"no usable {kind}: all {len(failures)} {kind} files failed, e.g. {_examples(failures)}")

    def first_usable(self) -> int:
        """Index of the first sample that loads; call it before training so a data set without a single usable
        sample fails at once rather than inside a data-loader worker.

        Raises:
            DataError: no sample loads; the message names the folders and the first failures.
        """
        failures: list[tuple[str, str]] = []
        for index, ref in enumerate(self.refs):
            if self._try_load(ref, failures) is not None:
                return index
        folders = sorted({str(ref.path.parent) for ref in self.refs})
        where = ", ".join(folders[:3]) + (", ..." if len(folders) > 3 else "")
        raise DataError(f"no usable sample in {where}: {len(failures)} files, e.g. {_examples(failures)}")


def collate(samples: list[Sample]) -> Batch:
    """Stack the samples of one batch (``DataLoader(collate_fn=collate)``)."""
    shapes = {tuple(sample.video.shape) for sample in samples}
    if len(shapes) > 1:
        raise DataError(f"cannot batch clips of shapes {sorted(shapes)}: a batch must not mix images and videos (use ClipBatchSampler)")
    return Batch(
        video=torch.stack([sample.video for sample in samples]),
        captions=[sample.caption for sample in samples],
        paths=[sample.path for sample in samples],
        position=samples[0].position,
        skipped=[failure for sample in samples for failure in sample.skipped],
    )


class ClipBatchSampler:
    """Infinite batch sampler (``DataLoader(batch_sampler=...)``) yielding ``[(index, epoch, batch index), ...]``.

    Epoch ``e`` is planned with one generator seeded by ``(seed, e)``, identically on every rank and without
    communication:

    1. the image indices and the video indices are shuffled separately;
    2. each kind's shuffled list is dealt to the ranks (rank ``r`` takes ``shuffled[r::world_size]``) and every
       rank cuts its share, in order, into full batches; every rank keeps the same number of batches of that
       kind, ``n // (world_size * batch_size)`` for ``n`` samples of the kind, so within an epoch no sample is
       on two ranks, and the leftover (fewer than ``world_size * batch_size`` samples of each kind, a different
       set each epoch) is not drawn;
    3. the sequence of kinds of the epoch's positions (one entry per image batch and per video batch) is
       shuffled, and batch ``b`` of every rank is that rank's next batch of kind ``sequence[b]``.

    So every batch holds only images or only videos, every rank has the same number of batches, and at every
    ``(epoch, batch)`` position all ranks draw the same kind: ranks never disagree on which parameters a step
    reaches (an image step leaves temporal parameters without a sample, which DeepSpeed ZeRO-2 cannot reduce
    when only some ranks do that). Image and video steps are interleaved in random order, on average in
    proportion to their numbers of batches, and the order changes every epoch.

    A data set too small for one batch of either kind on every rank repeats each kind's shuffled list (both the
    same number of times) until the larger kind fills one (ranks then see overlapping samples). A kind with fewer than
    ``world_size * batch_size`` samples (after that repetition) gets no batch at all; a warning says so.

    Args:
        kinds: ``is_image`` of every sample (``[ref.is_image for ref in refs]``).
        batch_size: samples per batch (per rank).
        rank, world_size: this rank among the data-parallel ranks.
        seed: shuffling seed; must be the same on every rank.
        start: ``(epoch, batch index)`` of the first batch to yield; to resume after the batch at position
            ``(e, b)``, pass ``(e, b + 1)`` (past the end of an epoch moves on to the next one).
    """

    def __init__(self, kinds: Sequence[bool], batch_size: int, rank: int, world_size: int, seed: int,
                 start: tuple[int, int] = (0, 0)):
        if not kinds:
            raise ValueError("ClipBatchSampler needs at least one sample")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, found {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), found {rank}")
        if seed < 0 or min(start) < 0:
            raise ValueError(f"seed and start must be non-negative, found seed={seed}, start={start}")
        self.kinds = [bool(kind) for kind in kinds]
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start = (int(start[0]), int(start[1]))
        self._by_kind = {is_image: [index for index, kind in enumerate(self.kinds) if kind == is_image]
                         for is_image in (True, False)}
        per_position = batch_size * world_size  # samples of one kind that one position takes from all ranks
        self._repeats = max(1, -(-per_position // max(map(len, self._by_kind.values()))))  # ceil: the tiny-data-set case
        for is_image, indices in self._by_kind.items():
            if indices and len(indices) * self._repeats < per_position:
                name = "image" if is_image else "video"
                logger.warning("%d %s sample(s) cannot fill a batch of %d on each of %d ranks at the same step "
                               "(needs %d); no %s batch is drawn", len(indices), name, batch_size, world_size,
                               per_position, name)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches (sample indices) of ``epoch``, in order."""
        mixed_seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0])
        generator = torch.Generator().manual_seed(mixed_seed)
        per_position = self.batch_size * self.world_size
        batches: dict[bool, list[list[int]]] = {}
        for is_image in (True, False):  # images first, then videos: a fixed order of draws from the generator
            indices = self._by_kind[is_image]
            shuffled = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()] * self._repeats
            count = len(shuffled) // per_position
            mine = shuffled[self.rank:count * per_position:self.world_size]  # this rank's share of the full batches
            batches[is_image] = [mine[b * self.batch_size:(b + 1) * self.batch_size] for b in range(count)]
        sequence = [True] * len(batches[True]) + [False] * len(batches[False])
        next_of_kind = {is_image: iter(kind_batches) for is_image, kind_batches in batches.items()}
        return [next(next_of_kind[sequence[i]]) for i in torch.randperm(len(sequence), generator=generator).tolist()]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch, first = self.start
        while True:
            batches = self.epoch_batches(epoch)
            for batch_index in range(first, len(batches)):
                yield [(index, epoch, batch_index) for index in batches[batch_index]]
            epoch, first = epoch + 1, 0
