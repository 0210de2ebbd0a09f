"""Ablation grids for ``tools/ablate.py``: variants of one base config, trained on the same data, seeds and step
budget, then compared in ``results.md`` (:mod:`~sat_video.experiments.ablation_report`).

A grid file (``configs/ablations/latte.yaml`` is the example)::

    defaults:                       # optional: settings every variant starts from
      model.dit.mixins.spatiotemporal: {type: factorized_attention, arrangement: interleaved}
    variants:
      sequential:                   # the variant's folder name: letters, digits, '_', '-', '.'
        description: all spatial blocks, then all temporal blocks   # optional, shown in results.md
        set:                        # optional: dotted config keys -> values, applied in order after the defaults
          model.dit.mixins.spatiotemporal.arrangement: sequential
        images: false               # optional: true adds the --images sources to the data (joint image + video)

A value of ``null`` drops an inherited mixin, and giving a mixin another ``type`` replaces it, as in config
files. The keys that make runs comparable (``data.*``, the seed, the step budget, the batch, the run folder)
cannot be set by a variant.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sat_video.common.errors import ConfigError, GridError
from sat_video.common.files import atomic_write
from sat_video.config.loader import load_config, read_yaml
from sat_video.data.clips import ClipSpec
from sat_video.diffusion.conditioning import leading_pad_frames
from sat_video.experiments.sample_quality import QualityScores
from sat_video.model.build import build_dit
from sat_video.model.config import DiTConfig
from sat_video.model.stages import SPATIAL_COMPRESSION
from sat_video.training.metrics import read_metrics as run_records
from sat_video.training.optim import select_trainable

VARIANT_KEYS = ("description", "set", "images")
SHARED_KEYS = ("data", "train.seed", "train.train_iters", "train.micro_batch_size", "train.gradient_accumulation_steps",
               "train.save", "train.resume", "train.overwrite")
"""Config keys (and sections) every variant shares: same data, seeds, step budget and batch, one run folder each."""
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
REPORT_FILES = ("results.md", "results.json", "loss.png", "quality.png")
UNTRAINED = "untrained"
"""Folder of the untrained baseline's samples and scores; not a variant name."""
DATA_FOLDER = "data"
"""Folder of ``--synthetic`` data; not a variant name."""


@dataclass(frozen=True)
class Variant:
    """One variant of a grid: ``settings`` are ``(dotted key, value)`` pairs applied in order."""

    name: str
    description: str = ""
    settings: tuple[tuple[str, Any], ...] = ()
    images: bool = False


@dataclass(frozen=True)
class Grid:
    path: Path
    defaults: tuple[tuple[str, Any], ...]
    variants: tuple[Variant, ...]

    def select(self, names: Sequence[str] | None) -> list[Variant]:
        """The variants named in ``names`` (all when empty), in grid order."""
        if not names:
            return list(self.variants)
        known = [v.name for v in self.variants]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise GridError(f"{self.path}: no variant named {', '.join(map(repr, unknown))} (variants: {', '.join(known)})")
        return [v for v in self.variants if v.name in names]


def _settings(value: Any, where: str) -> tuple[tuple[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise GridError(f"{where}: expected a mapping of dotted config keys to values, found {type(value).__name__}")
    for key in value:
        if not isinstance(key, str) or not all(part.isidentifier() for part in key.split(".")):
            raise GridError(f"{where}: '{key}' is not a dotted config key such as model.dit.num_layers")
        shared = next((s for s in SHARED_KEYS if key == s or key.startswith(s + ".") or s.startswith(key + ".")), None)
        if shared:
            raise GridError(f"{where}: '{key}' sets '{shared}', which every variant shares (same data, seeds, step budget "
                            "and batch); set it with --base or on the command line instead")
    return tuple(value.items())


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file (its structure; each variant's config is checked by :func:`variant_config`).

    Raises:
        GridError: naming the file, the variant and the key, with what was expected and what was found.
    """
    path = Path(path)
    data = read_yaml(path, what="grid file", error=GridError)
    if not isinstance(data, dict):
        raise GridError(f"{path}: expected a mapping with 'variants' (and optionally 'defaults'), found {type(data).__name__}")
    unknown = [key for key in data if key not in ("defaults", "variants")]
    if unknown:
        raise GridError(f"{path}: unknown top-level key '{unknown[0]}' (valid: defaults, variants)")
    variants = data.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise GridError(f"{path}: 'variants' must be a non-empty mapping of variant names to settings, found {variants!r}")
    parsed = []
    for name, spec in variants.items():
        where = f"{path}: variant '{name}'"
        if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name) or name in (*REPORT_FILES, UNTRAINED, DATA_FOLDER):
            raise GridError(f"{where}: a variant name becomes a folder name next to {', '.join(REPORT_FILES)}, "
                            f"{UNTRAINED}/ and {DATA_FOLDER}/; use other letters, digits, '_', '-' and '.'")
        spec = {} if spec is None else spec
        if not isinstance(spec, dict):
            raise GridError(f"{where}: expected a mapping with keys {', '.join(VARIANT_KEYS)}, found {type(spec).__name__}")
        for key in spec:
            if key not in VARIANT_KEYS:
                raise GridError(f"{where}: unknown key '{key}' (valid: {', '.join(VARIANT_KEYS)})")
        description, images = spec.get("description", ""), spec.get("images", False)
        if not isinstance(description, str):
            raise GridError(f"{where}: 'description' must be a string, found {description!r}")
        if not isinstance(images, bool):
            raise GridError(f"{where}: 'images' must be true or false, found {images!r}")
        parsed.append(Variant(name, description, _settings(spec.get("set"), f"{where}, 'set'"), images))
    return Grid(path, _settings(data.get("defaults"), f"{path}: 'defaults'"), tuple(parsed))


def _layer(key: str, value: Any) -> dict:
    """``("a.b.c", v)`` -> ``{"a": {"b": {"c": v}}}``, a config layer for :func:`load_config`."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def variant_config(base: DictConfig, grid: Grid, variant: Variant, *, save: Path, seed: int | None = None,
                   images: Sequence[str] = ()) -> DictConfig:
    """The config of one variant: ``base``, the grid's defaults, the variant's settings, its run folder, training
    seed (default: the base's) and data.

    Raises:
        GridError: a setting is invalid for the config (unknown key, wrong type, unknown mixin type), naming
            the grid file and the variant; or the variant wants images and none were given.
    """
    if variant.images and not images:
        raise GridError(f"{grid.path}: variant '{variant.name}' trains on images too (images: true); pass --images "
                        "with a folder or metadata file of captioned images")
    layers = [OmegaConf.to_container(base), *(_layer(k, v) for k, v in grid.defaults + variant.settings),
              _layer("train.save", str(save))]
    if seed is not None:
        layers.append(_layer("train.seed", seed))
    if variant.images:
        layers.append(_layer("data.sources", [*base.data.sources, *images]))
    try:
        return load_config(layers)
    except ConfigError as err:
        raise GridError(f"{grid.path}: variant '{variant.name}': {str(err).removeprefix('in-memory config: ')}") from None


# ---------------------------------------------------------------------- measurements


def parameter_counts(cfg: DictConfig) -> tuple[int, int]:
    """``(all, trainable)`` DiT parameters of a config (built on the meta device, so any size is free)."""
    with torch.device("meta"):
        model = build_dit(cfg)
    select_trainable(model, list(cfg.train.trainable))
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def flops_per_step(cfg: DictConfig) -> int:
    """FLOPs of one optimizer step per process: forward and backward of the DiT on a video micro-batch at the
    config's shape, times the gradient-accumulation steps.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no memory, no time; there,
    attention decomposes into the matrix products the counter knows): matrix products, convolutions and
    attention, backward only for trainable weights. Element-wise operations and the frozen VAE and T5 are
    not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    dit_config, clip = DiTConfig.from_config(cfg), ClipSpec.from_config(cfg.data, cfg.model.dit)
    batch = cfg.train.micro_batch_size
    frames = dit_config.latent_frames + leading_pad_frames(dit_config.latent_frames, dit_config)
    height, width = clip.height // SPATIAL_COMPRESSION, clip.width // SPATIAL_COMPRESSION
    with torch.device("meta"):
        model = build_dit(cfg)
        select_trainable(model, list(cfg.train.trainable))
        x = torch.zeros(batch, frames, dit_config.in_channels, height, width)
        context = torch.zeros(batch, dit_config.text_length, dit_config.text_hidden_size)
        timesteps = torch.zeros(batch, dtype=torch.long)
        ofs = torch.zeros(batch) if dit_config.ofs_embed_dim else None
        with FlopCounterMode(display=False) as counter:
            model(x, timesteps, context, ofs=ofs).pow(2).mean().backward()
    return counter.get_total_flops() * cfg.train.gradient_accumulation_steps


@dataclass
class RunSummary:
    """What ``results.md`` shows of one variant's run."""

    returncode: int | None = None
    """``None``: not run (yet)."""
    error: str = ""
    log: str = ""
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    step_time_s: float | None = None
    peak_memory_gb: float | None = None
    quality: QualityScores | None = None
    """The quality stage's scores of the trained model (``None``: not measured)."""
    eval_loss: float | None = None
    """The last held-out loss (``train.eval`` in the grid's base config; ``None``: not measured)."""
    eval_ema_loss: float | None = None
    """The same with the moving average of the weights (``train.ema``)."""

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    @property
    def best_loss(self) -> float | None:
        finite = [loss for loss in self.losses if math.isfinite(loss)]
        return min(finite) if finite else None


def read_metrics(run: Path) -> RunSummary:
    """Loss curve, median step time, peak memory and the last held-out loss from a run folder's ``metrics.jsonl`` (empty
    if absent)."""
    summary = RunSummary()
    records = run_records(run)
    evaluations = [r for r in records if "eval_loss" in r]
    if evaluations:
        summary.eval_loss, summary.eval_ema_loss = evaluations[-1]["eval_loss"], evaluations[-1].get("eval_ema_loss")
    records = [r for r in records if "loss" in r]  # the training steps'
    summary.steps = [r["step"] for r in records]
    summary.losses = [float(r["loss"]) for r in records]
    times = [r["step_time_s"] for r in records if r.get("step_time_s") is not None]
    summary.step_time_s = statistics.median(times) if times else None
    # CUDA: the allocator's peak; CPU: the peak resident set of the rank-0 process
    memory = [r.get("memory_allocated_gb", r.get("cpu_peak_rss_gb")) for r in records]
    memory = [m for m in memory if m is not None]
    summary.peak_memory_gb = max(memory) if memory else None
    return summary


def seed_folder(out: Path, variant: str, seed: int) -> Path:
    """Where the run of ``variant`` with training seed ``seed`` lives: its config, log, run folder, samples and scores."""
    return out / variant / f"seed-{seed}"


def finished_seeds(out: Path, variant: str) -> list[int]:
    """The seeds of ``variant`` with a recorded outcome in ``out``, in order."""
    seeds = (result.parent.name.removeprefix("seed-") for result in (out / variant).glob("seed-*/result.json"))
    return sorted(int(seed) for seed in seeds if seed.isdigit())


def read_run(folder: Path) -> RunSummary:
    """A seed folder's run: its metrics, the outcome ``result.json`` recorded (not run when absent) and the
    quality stage's ``quality.json``."""
    summary = read_metrics(folder / "run")
    result = folder / "result.json"
    if result.is_file():
        outcome = json.loads(result.read_text())
        summary.returncode, summary.error, summary.log = outcome["returncode"], outcome["error"], outcome["log"]
    if (folder / "quality.json").is_file():
        summary.quality = QualityScores.load(folder / "quality.json")
    return summary


def record_run(folder: Path, returncode: int, log: Path) -> RunSummary:
    """Store the outcome of a finished run in ``<folder>/result.json`` (the error line when it failed) and read it back."""
    outcome = {"returncode": returncode, "error": error_line(log.read_text()) if returncode else "", "log": str(log)}
    atomic_write(folder / "result.json", lambda tmp: tmp.write_text(json.dumps(outcome) + "\n"))
    return read_run(folder)


def error_line(log_text: str) -> str:
    """The line of a failed run's output that says why: train_video's own error line, else the last exception
    line of a traceback, else the last line."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    for pattern in (r"train_video: (error|stopped):", r"[\w.]*(Error|Exception|Interrupt)\b"):
        matches = [line for line in lines if re.match(pattern, line)]
        if matches:
            return matches[-1]
    return lines[-1] if lines else "(no output)"


@dataclass(frozen=True)
class Baseline:
    """The quality of a variant's model at its initial weights, what training must beat."""

    variant: str
    scores: QualityScores


def record_baseline(out: Path, variant: str, scores: QualityScores) -> Baseline:
    """Name the variant whose untrained samples and ``quality.json`` (``scores``) are in ``<out>/untrained``."""
    atomic_write(out / UNTRAINED / "variant.txt", lambda tmp: tmp.write_text(variant + "\n"))
    return Baseline(variant, scores)


def read_baseline(out: Path) -> Baseline | None:
    folder = out / UNTRAINED
    if not (folder / "variant.txt").is_file() or not (folder / "quality.json").is_file():
        return None
    return Baseline((folder / "variant.txt").read_text().strip(), QualityScores.load(folder / "quality.json"))


@dataclass
class VariantReport:
    variant: Variant
    parameters: tuple[int, int]
    flops: int
    runs: dict[int, RunSummary] = field(default_factory=dict)
    """Training seed -> its run."""


def measure(grid: Grid, variant: Variant, cfg: DictConfig) -> VariantReport:
    """Parameters and FLOPs of a variant.

    Raises:
        GridError: the model cannot be built or run at the config's shape (a mixin refusing its settings, say).
    """
    try:
        return VariantReport(variant, parameter_counts(cfg), flops_per_step(cfg))
    except Exception as err:  # re-raised with the grid and variant it came from
        raise GridError(
            f"{grid.path}: variant '{variant.name}': the model cannot be built and run: {type(err).__name__}: {err}"
        ) from err
