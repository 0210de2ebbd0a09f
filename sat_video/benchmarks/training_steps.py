"""Section *Training step through the engine*: the full training step of ``tools/train_video.py`` (trainer, DeepSpeed,
engine) from raw video and from the latent cache of ``tools/precompute_latents.py``, each run in its own process."""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sat_video.benchmarks.markdown import table
from sat_video.benchmarks.measure import median

if TYPE_CHECKING:
    from sat_video.benchmarks.context import Bench

BASE_CONFIGS = ("cogvideox_5b.yaml", "tiny.yaml", "tiny_train.yaml")


@dataclass(frozen=True)
class TrainAssets:
    """Clips and text encoder that the training-step measurements share (the tiny training config)."""

    clips: Path
    t5: Path
    base: tuple[Path, ...]


def train_assets(bench: Bench) -> TrainAssets:
    """The clips and tiny T5 in ``bench.workdir``, made by the first section that asks."""
    from sat_video.fixtures.synthetic import make_moving_shapes
    from sat_video.fixtures.tiny_t5 import make_tiny_t5

    assets = TrainAssets(bench.workdir / "train_clips", bench.workdir / "t5", tuple(bench.configs / n for n in BASE_CONFIGS))
    if not assets.t5.exists():
        items = make_moving_shapes(assets.clips, num_videos=bench.preset.train_videos, num_frames=16, height=64, width=64,
                                   fps=8, seed=0)
        make_tiny_t5([caption for _, caption in items], assets.t5, d_model=32)  # tiny.yaml's text_hidden_size
    return assets


def run_program(command: list[str]) -> None:
    """Run ``command`` with this process's torch threads; its stderr's end in the error when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{proc.stderr[-3000:]}")


def train_steps(bench: Bench, assets: TrainAssets, label: str, overrides: tuple[str, ...] = (),
                sources: list[Path] | None = None) -> dict:
    """Median step time of ``tools/train_video.py`` (data, frozen stages, DiT, DeepSpeed update), read from the
    run's metrics.jsonl; the first quarter of the steps is warm-up. Also the video tokens per second of the timed
    steps (each step's bucket decides its tokens)."""
    from sat_video.config.loader import load_config
    from sat_video.training.metrics import read_metrics

    save = bench.workdir / f"run-{len(list(bench.workdir.glob('run-*')))}"
    iters = bench.preset.train_iters
    run_program([
        *bench.commands.train,
        "--base",
        *map(str, assets.base),
        f"data.sources=[{','.join(map(str, sources or [assets.clips]))}]",
        f"model.text_encoder.path={assets.t5}",
        f"train.save={save}",
        f"train.train_iters={iters}",
        f"train.save_interval={iters}",
        "train.log_interval=1",
        "train.report_to=[none]",
        *overrides,
    ])
    records = read_metrics(save)
    timed = records[max(1, len(records) // 4) :]
    times = [r["step_time_s"] for r in timed]
    cfg = load_config(save / "config.yaml")
    batch = cfg.train.micro_batch_size
    tokens = [batch * video_tokens(r.get("bucket"), cfg) for r in timed]
    return {"input": label, "batch": batch, "steps": len(times), "time": median(times), "samples_per_s": batch / median(times),
            "tokens_per_s": sum(tokens) / sum(times)}


def video_tokens(bucket: str | None, cfg) -> int:
    """Video tokens of one sample of ``bucket`` (``"FxHxW"``), or of the config's single clip size."""
    from sat_video.data.buckets import Bucket
    from sat_video.model.config import DiTConfig
    from sat_video.model.stages import SPATIAL_COMPRESSION

    dit = DiTConfig.from_config(cfg)
    frames, height, width = (astuple(Bucket.from_name(bucket)) if bucket else
                             (dit.num_frames, cfg.data.height or dit.latent_height * SPATIAL_COMPRESSION,
                              cfg.data.width or dit.latent_width * SPATIAL_COMPRESSION))
    return dit.token_grid(frames, height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION).num_tokens


def precompute_latents(bench: Bench, assets: TrainAssets) -> Path:
    """Encode the training clips once with ``tools/precompute_latents.py`` (same config as the raw-video run)."""
    out = bench.workdir / "latents"
    run_program([*bench.commands.precompute, "--base", *map(str, assets.base), f"data.sources=[{assets.clips}]",
                 f"model.text_encoder.path={assets.t5}", "--out", str(out)])
    return out


def run(bench: Bench) -> list[dict]:
    assets = train_assets(bench)
    rows = [train_steps(bench, assets, "raw video")]
    rows.append(train_steps(bench, assets, "latent cache", (f"data.latent_cache={precompute_latents(bench, assets)}",)))
    for row in rows:
        print(f"training step from {row['input']}: {row['time']:.3f}s, {row['samples_per_s']:.2f} samples/s", flush=True)
    return rows


def render(rows: list[dict]) -> list[str]:
    return [
        "## Training step through the engine (tools/train_video.py)",
        "",
        table(["input", "micro-batch", "steps timed", "step (s)", "samples/s"],
              [[r["input"], r["batch"], r["steps"], f"{r['time']:.3f}", f"{r['samples_per_s']:.2f}"] for r in rows]),
    ]
