"""Sample quality of a trained DiT, the quality stage of ``tools/ablate.py``: the model samples a fixed prompt set
with fixed seeds, and the samples are scored against real clips of the same captions.

- **Prompt set**: one prompt per distinct caption of the training data (``seen``) and, when the study holds some
  clips out of training, of those (``heldout``); at most ``limit`` per split, spread evenly over the sorted captions.
  Each prompt's reference is the first real clip with its caption.
- **Attribute accuracy** (synthetic shapes only: every caption reads "a <colour> <shape> moving <direction>"):
  :func:`~sat_video.fixtures.synthetic.describe_clip` reads shape, colour and direction back from each sample;
  the share of samples that show their caption's shape, colour, direction, and all three at once. A sample
  that shows no shape counts as wrong on every attribute.
- **Fréchet statistics distance (FSD)**, any data: each clip becomes a vector of colour and motion statistics
  (:func:`clip_statistics`); FSD is the Fréchet distance between Gaussians fitted to the vectors of the samples
  and of the references (the formula of FID and FVD, on features that need no download). 0 for identical
  statistics; lower is better.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from sat_video.common.errors import DataError, UnusableSample
from sat_video.common.files import atomic_write
from sat_video.data.clips import ClipSpec, load_clip, read_caption
from sat_video.data.sources import SampleRef, discover
from sat_video.diffusion.sampling import VideoGenerator, to_uint8_frames, write_samples
from sat_video.fixtures.synthetic import describe_clip, parse_caption
from sat_video.formats.sat_checkpoint import load_checkpoint
from sat_video.model.build import build_dit, build_frozen_stages

SPLITS = ("seen", "heldout")
ATTRIBUTES = ("shape", "colour", "direction", "all")
HISTOGRAM_BINS = 2
"""Per colour channel: the colour histogram has ``HISTOGRAM_BINS ** 3`` cells."""


@dataclass(frozen=True)
class QualityPrompt:
    caption: str
    split: str
    """``seen`` (a caption of the training data) or ``heldout`` (of clips kept out of training)."""
    reference: SampleRef
    """The real clip the sample is compared with."""


def _spread_evenly(items: list, limit: int) -> list:
    if len(items) <= limit:
        return items
    return [items[i * (len(items) - 1) // max(limit - 1, 1)] for i in range(limit)]


def quality_prompts(seen_sources: Sequence[str | Path], heldout_sources: Sequence[str | Path], limit: int) -> list[QualityPrompt]:
    """The prompt set: see the module's docstring.

    Raises:
        DataError: a held-out caption also captions a training clip (the split would not hold anything out).
    """
    splits = {"seen": seen_sources, "heldout": heldout_sources}
    firsts: dict[str, dict[str, SampleRef]] = {}
    for split, sources in splits.items():
        firsts[split] = {}
        for ref in discover(sources) if sources else ():
            if ref.is_image:
                continue
            try:
                firsts[split].setdefault(read_caption(ref), ref)
            except UnusableSample:  # training skips it too
                continue
    overlap = sorted(set(firsts["seen"]) & set(firsts["heldout"]))
    if overlap:
        raise DataError(f"held-out clips ({', '.join(map(str, heldout_sources))}) share {len(overlap)} caption(s) with the "
                        f"training data, e.g. '{overlap[0]}'; held-out captions must never occur in training")
    return [QualityPrompt(caption, split, firsts[split][caption])
            for split in SPLITS for caption in _spread_evenly(sorted(firsts[split]), limit)]


def shapes_attributes(prompts: Sequence[QualityPrompt]) -> bool:
    """Whether every prompt is a caption of the synthetic shapes, so attribute accuracy can be read."""
    return bool(prompts) and all(parse_caption(p.caption) for p in prompts)


# ---------------------------------------------------------------------- statistics and distance


def clip_statistics(frames: np.ndarray) -> np.ndarray:
    """Colour and motion statistics of a clip, uint8 ``[T, H, W, 3]``, as a float64 vector of 17 values in about [-1, 1].

    Colour: the mean and standard deviation of each channel (6) and the share of pixels in each cell of a
    2 x 2 x 2 RGB histogram (8). Motion: the mean absolute change between consecutive frames (1), and the
    travel, in frame widths and heights, of the centroid of what moves: pixels weighted by their distance from
    the clip's per-pixel median, from the first to the last quarter of the frames (2).
    """
    video = np.asarray(frames, dtype=np.float64) / 255.0
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"clip_statistics: expected uint8 frames [T, H, W, 3], found shape {video.shape}")
    pixels = video.reshape(-1, 3)
    cells = np.minimum((pixels * HISTOGRAM_BINS).astype(int), HISTOGRAM_BINS - 1)
    index = (cells[:, 0] * HISTOGRAM_BINS + cells[:, 1]) * HISTOGRAM_BINS + cells[:, 2]
    histogram = np.bincount(index, minlength=HISTOGRAM_BINS**3) / len(index)
    change = np.abs(np.diff(video, axis=0)).mean() if len(video) > 1 else 0.0
    moving = np.abs(video - np.median(video, axis=0)).sum(-1)  # [T, H, W]
    height, width = moving.shape[1:]
    ys, xs = np.mgrid[0:height, 0:width]
    mass = moving.sum((1, 2)) + 1e-8
    centroids = np.stack([(moving * xs).sum((1, 2)) / mass / width, (moving * ys).sum((1, 2)) / mass / height], -1)
    quarter = max(len(video) // 4, 1)
    travel = centroids[-quarter:].mean(0) - centroids[:quarter].mean(0)
    return np.concatenate([pixels.mean(0), pixels.std(0), histogram, [change], travel])


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``a`` and of ``b`` (``[N, D]``, N >= 2):
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance: needs at least 2 vectors on each side, found {len(a)} and {len(b)}")
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace = np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(np.sum((mean_a - mean_b) ** 2) + max(trace, 0.0))


# ---------------------------------------------------------------------- scores


@dataclass
class QualityScores:
    """What the quality stage measured of one model."""

    samples: dict[str, int]
    """Split -> number of prompts sampled."""
    fsd: float
    """Fréchet statistics distance of all samples to their references."""
    accuracy: dict[str, dict[str, float]] | None = None
    """Split -> attribute (``shape``, ``colour``, ``direction``, ``all``) -> share of samples that show their
    caption's; ``None`` when the captions are not those of the synthetic shapes."""
    undescribed: int = 0
    """Samples that show no shape at all."""

    def save(self, path: Path) -> None:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(asdict(self), indent=1) + "\n"))

    @classmethod
    def load(cls, path: Path) -> QualityScores:
        return cls(**json.loads(path.read_text()))


def score(prompts: Sequence[QualityPrompt], samples: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> QualityScores:
    """Score uint8 ``[T, H, W, 3]`` samples of ``prompts`` against the prompts' reference clips."""
    if not len(prompts) == len(samples) == len(references):
        raise ValueError(f"score: {len(prompts)} prompts, {len(samples)} samples and {len(references)} references")
    counts = {split: sum(p.split == split for p in prompts) for split in SPLITS}
    fsd = frechet_distance(np.stack([clip_statistics(s) for s in samples]), np.stack([clip_statistics(r) for r in references]))
    if not shapes_attributes(prompts):
        return QualityScores(counts, fsd)
    hits = {split: dict.fromkeys(ATTRIBUTES, 0) for split in SPLITS}
    undescribed = 0
    for prompt, sample in zip(prompts, samples):
        try:
            seen = describe_clip(sample)
        except ValueError:  # nothing drawn: wrong on every attribute
            undescribed += 1
            continue
        matches = [got == wanted for got, wanted in zip(seen, parse_caption(prompt.caption))]
        for attribute, match in zip(ATTRIBUTES, [*matches, all(matches)]):
            hits[prompt.split][attribute] += match
    accuracy = {split: {a: hits[split][a] / counts[split] for a in ATTRIBUTES} for split in SPLITS if counts[split]}
    return QualityScores(counts, fsd, accuracy, undescribed)


def reference_frames(prompts: Sequence[QualityPrompt], cfg: DictConfig) -> list[np.ndarray]:
    """The prompts' real clips as the data pipeline cuts them, uint8 ``[T, H, W, 3]``."""
    spec = ClipSpec.from_config(cfg.data, cfg.model.dit)
    return [to_uint8_frames(load_clip(p.reference, spec)[0]).numpy() for p in prompts]


def measure_quality(cfg: DictConfig, checkpoint: Path | None, prompts: Sequence[QualityPrompt],
                    references: Sequence[np.ndarray], out: Path, *, batch_size: int = 16) -> QualityScores:
    """Sample ``prompts`` with the DiT of ``cfg`` (weights from ``checkpoint``; ``None``: the initial weights a run
    with ``train.seed`` starts from) and score the samples; writes ``out/samples/`` and ``out/quality.json``.

    ``cfg.sample`` gives the sampler, steps, guidance and seeds (prompt ``i``: seed + i), so every model of a
    study starts from the same noise for the same prompt.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if checkpoint is None:
        with torch.random.fork_rng(devices=[]):  # the trainer's initialisation, leaving the caller's RNG as it was
            torch.manual_seed(cfg.train.seed)
            dit = build_dit(cfg)
    else:
        with torch.device("meta"):
            dit = build_dit(cfg)
        load_checkpoint(dit, checkpoint)
    spec = ClipSpec.from_config(cfg.data, cfg.model.dit)
    video_generator = VideoGenerator(dit.eval(), build_frozen_stages(cfg.model), device=device,
                               snr_shift_scale=cfg.model.diffusion.snr_shift_scale)
    videos = video_generator.generate([p.caption for p in prompts], cfg.sample, num_frames=spec.num_frames, height=spec.height,
                                width=spec.width, batch_size=batch_size)
    write_samples(out / "samples", videos, cfg.data.fps, overwrite=True)
    scores = score(prompts, [v.frames.numpy() for v in videos], references)
    scores.save(out / "quality.json")
    return scores
