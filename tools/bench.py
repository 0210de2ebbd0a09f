#!/usr/bin/env python3
"""Benchmark sat_video against diffusers on this machine and write benchmarks/RESULTS.md.

    python tools/bench.py                       # default sizes, fp32 and bf16
    python tools/bench.py --sizes tiny --out /tmp/bench.md    # seconds; what the CI test runs
    python tools/bench.py --compile --dtypes fp32   # also torch.compile'd blocks; 10 minutes on a 2-core AVX2 CPU

Sections (each a function below; DiT figures are medians over interleaved repetitions after warm-up):

* GEMM peak: square matmuls per dtype, the yardstick for achieved FLOP/s.
* DiT forward + backward: sat_video and diffusers' ``CogVideoXTransformer3DModel`` with identical weights
  (exported by ``sat_video.diffusers_export``), alternating in one process, fp32 and bf16 autocast.
* Activation checkpointing on vs off (sat_video): step time and activation memory.
* Where the time goes: one profiled step per implementation.
* The full training step through ``tools/train_video.py`` (trainer, DeepSpeed, engine) from raw video and from
  the latent cache of ``tools/precompute_latents.py``.
* Data loading: clips/s through ``VideoDataset`` (decord) and the DataLoader with 0..N workers.
* Mixed sizes: training steps on clips of three aspect ratios, at one size vs with a bucket per aspect ratio.
* Sequence parallelism: the DiT step in one process vs split over two (torchrun, DeepSpeed-Ulysses), per-rank
  activation memory and the share of the step spent in collectives.
* Sampling memory: VAE decode exact vs tiled (time, peak, PSNR, the estimate), and the predicted full-size peak of
  each model per offload and tiling mode.
* Fine-tuning: ``tools/train_video.py`` against diffusers' ``examples/cogvideo/train_cogvideox_lora.py`` (LoRA, same
  tiny model, VAE, T5 and clips), first-epoch and later-epoch step time, start-up, peak RSS, where a step's time goes.
  ``--only trainers`` runs just this section and replaces it inside an existing ``--out``:

    python tools/bench.py --only trainers --trainer-steps 24 --trainer-rounds 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import astuple, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sat_video.config.cli import run_tool  # noqa: E402
from sat_video.experiments.benchmark import (  # noqa: E402 (after the sys.path line above)
    DiTPair,
    count_flops,
    gemm_peak,
    gradient_bytes,
    interleaved_times,
    machine,
    median,
    saved_bytes,
    step_peak_bytes,
)
from sat_video.experiments.sampling_memory_bench import DecodeCase, full_size_rows, vae_decode_rows  # noqa: E402
from sat_video.experiments.trainer_comparison import (  # noqa: E402
    DIFFUSERS,
    DIFFUSERS_SCRIPT_ENV,
    DIT_SIZES,
    SAT_CACHE,
    SAT_LOADER_WORKERS,
    SAT_RAW,
    ComparisonSetup,
    compare,
    diffusers_script,
    marked,
    replace_section,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COMPILED = "sat_video + torch.compile"
MIB = 2**20


@dataclass(frozen=True)
class DiTSize:
    """One model shape compared with diffusers: ``configs/<variant>.yaml`` plus ``overrides``."""

    name: str
    variant: str
    overrides: tuple[str, ...]
    batch: int
    flops_target: bool = False
    """The FLOP/s target (>= 60% of the fp32 GEMM peak) is judged at this size."""


@dataclass(frozen=True)
class Preset:
    dits: tuple[DiTSize, ...]
    checkpointing: str
    """Name of the DiT size the activation-checkpointing comparison runs at."""
    gemm_sizes: tuple[int, ...]
    warmup: int
    reps: int
    clip: tuple[int, int, int]
    """Frames, height, width of the clips the data-loading section decodes."""
    clip_videos: int
    clip_batches: int
    train_videos: int
    train_iters: int
    sequence_parallel: DiTSize
    """A long video (many latent frames, thousands of tokens) at a small width, for the sequence-parallel row."""
    vae_decode: DecodeCase
    """The VAE decode timed exactly and in tiles."""
    full_size: bool
    """Predict full-size sampling memory for the README's models (a minute of probes at their real widths)."""
    trainers: ComparisonSetup | None
    """Clips, steps and rounds of the fine-tuning comparison with diffusers' LoRA script; ``None``: not run (the tiny
    preset: a dozen training processes are a benchmark, not a CI test; ``--only trainers --sizes tiny`` still runs it)."""


def _dit(
    name, variant, batch, hidden, layers, heads, latent_hw, frames, text, text_hidden, flops_target=False, **more
) -> DiTSize:
    keys = dict(hidden_size=hidden, num_layers=layers, num_attention_heads=heads, latent_height=latent_hw[0],
                latent_width=latent_hw[1], num_frames=frames, text_length=text, text_hidden_size=text_hidden, **more)
    return DiTSize(name, variant, tuple(f"model.dit.{k}={v}" for k, v in keys.items()), batch, flops_target)


PRESETS = {
    "tiny": Preset(
        dits=(_dit("tiny", "cogvideox_5b", 2, 64, 2, 2, (8, 8), 13, 8, 32),),
        checkpointing="tiny", gemm_sizes=(128, 256), warmup=1, reps=3,
        clip=(9, 64, 64), clip_videos=2, clip_batches=4, train_videos=2, train_iters=4,
        sequence_parallel=_dit("tiny", "cogvideox_5b", 1, 64, 2, 2, (16, 16), 29, 8, 32),
        vae_decode=DecodeCase(9, 64, 96, (32, 48), (8, 8), ("cogvideox_2b.yaml", "tiny.yaml", "tiny_train.yaml")),
        full_size=False, trainers=None),
    "default": Preset(
        dits=(
            # 5B layout (3D RoPE), 4 x 16 x 16 latents -> 256 video + 64 text tokens
            _dit("small", "cogvideox_5b", 2, 256, 4, 4, (16, 16), 13, 64, 512),
            # 5B layout, 4 x 32 x 32 latents -> 1024 video + 226 text tokens
            _dit("mid", "cogvideox_5b", 1, 512, 8, 8, (32, 32), 13, 226, 4096, flops_target=True),
            # CogVideoX-2B's block (1920 wide, 30 heads, sin-cos positions) on one 60 x 90 latent frame, 1 layer
            _dit("2b_layer", "cogvideox_2b", 1, 1920, 1, 30, (60, 90), 1, 226, 4096),
        ),
        checkpointing="mid", gemm_sizes=(1024, 2048, 4096), warmup=2, reps=9,
        clip=(49, 480, 720), clip_videos=4, clip_batches=12, train_videos=4, train_iters=20,
        # 5B layout, 8 x 32 x 32 latents -> 2048 video + 16 text tokens, 4 blocks of width 128
        sequence_parallel=_dit("long", "cogvideox_5b", 1, 128, 4, 4, (32, 32), 29, 16, 64, time_embed_dim=64),
        # CogVideoX's VAE (random weights): 3 latent frames of 12 x 20, tiles of 8 x 12 latents sharing 2 x 3
        vae_decode=DecodeCase(9, 96, 160, (64, 96), (16, 24), ("cogvideox_2b.yaml", "tiny.yaml")),
        full_size=True, trainers=ComparisonSetup(clips=16, steps=32, rounds=3)),
}


# ---------------------------------------------------------------------- DiT: sat_video vs diffusers


def load_size(size: DiTSize):
    import sat_video

    return sat_video.load_config([ROOT / "configs" / f"{size.variant}.yaml"], list(size.overrides))


def dit_section(
    preset: Preset, device: torch.device, peaks: dict, compile_blocks: bool, dtypes: dict
) -> tuple[list[dict], list[dict]]:
    """Rows of the comparison table, and of the activation-checkpointing table."""
    rows, checkpointing = [], []
    for size in preset.dits:
        pair = DiTPair(load_size(size), size.batch, device)
        if compile_blocks:  # as train.compile does; the first call compiles
            compiled = copy.deepcopy(pair.ours)
            compiled.compile_blocks()
        for label, dtype in dtypes.items():
            steps = pair.steps(dtype)
            if compile_blocks:
                steps[COMPILED] = pair.step(compiled, dtype)
            times = interleaved_times(steps, device=device, warmup=preset.warmup, reps=preset.reps)
            # per round, sat_video / diffusers: the spread shows how much the machine moved during the measurement
            paired = [a / b for a, b in zip(times["sat_video"], times["diffusers"])]
            row = {"size": size, "dtype": label, "tokens": pair.tokens, "params": pair.params,
                   "paired": (min(paired), max(paired))}
            for name in ("sat_video", "diffusers"):
                flops = count_flops(steps[name])
                row[name] = {
                    "time": median(times[name]),
                    "peak": step_peak_bytes(steps[name], device),
                    "flops": flops,
                    "fraction": flops / median(times[name]) / peaks[label],
                }
            if compile_blocks:  # same FLOPs as eager; inductor's kernels allocate outside the dispatcher, so no CPU memory
                row[COMPILED] = {
                    "time": median(times[COMPILED]),
                    "fraction": row["sat_video"]["flops"] / median(times[COMPILED]) / peaks[label],
                }
            rows.append(row)
            print(_dit_line(row), flush=True)
            if size.name == preset.checkpointing:
                checkpointing.append(checkpointing_row(size, label, pair, dtype, device, preset))
        del pair, steps
    return rows, checkpointing


# Activation checkpointing modes: (model.activation_checkpointing, model.checkpoint_keeps_attention).
CHECKPOINTING_MODES = {"off": (False, True), "on": (True, True), "recompute all": (True, False)}
CHECKPOINTING_LABELS = {"off": "off", "on": "on (keeps attention outputs; the default)", "recompute all": "on, recompute all"}


def checkpointing_row(size: DiTSize, label: str, pair: DiTPair, dtype: torch.dtype, device: torch.device, preset: Preset) -> dict:
    model, step, forward = pair.ours, pair.step(pair.ours, dtype), pair.forward(pair.ours, dtype)

    def in_mode(mode: str, fn):
        def run():
            model.activation_checkpointing, model.checkpoint_keeps_attention = CHECKPOINTING_MODES[mode]
            return fn()

        return run

    variants = {mode: in_mode(mode, step) for mode in CHECKPOINTING_MODES}
    times = interleaved_times(variants, device=device, warmup=preset.warmup, reps=preset.reps)
    grads = gradient_bytes(model)
    row = {"size": size.name, "dtype": label}
    for mode, fn in variants.items():
        row[mode] = {
            "time": median(times[mode]),
            "activations": step_peak_bytes(fn, device) - grads,
            "saved": saved_bytes(in_mode(mode, forward), device),
        }
    model.activation_checkpointing, model.checkpoint_keeps_attention = CHECKPOINTING_MODES["off"]
    print(
        f"checkpointing {size.name} {label}: "
        + ", ".join(f"{mode} {row[mode]['time']:.3f}s {row[mode]['activations'] / MIB:.0f} MiB" for mode in CHECKPOINTING_MODES),
        flush=True,
    )
    return row


def _dit_line(row: dict) -> str:
    ours, theirs = row["sat_video"], row["diffusers"]
    compiled = f", compiled {row[COMPILED]['time']:.3f}s" if COMPILED in row else ""
    return (
        f"{row['size'].name} {row['dtype']}: sat_video {ours['time']:.3f}s / diffusers {theirs['time']:.3f}s "
        f"= {ours['time'] / theirs['time']:.2f}x time, {ours['peak'] / theirs['peak']:.2f}x memory, "
        f"{ours['fraction']:.0%} of GEMM peak{compiled}"
    )


def profile_section(preset: Preset, device: torch.device, dtypes: dict) -> list[dict]:
    """Share of one step's time in matmuls, attention and everything else, at the FLOP-target size."""
    from torch.profiler import ProfilerActivity, profile

    size = next((s for s in preset.dits if s.flops_target), preset.dits[-1])
    pair = DiTPair(load_size(size), size.batch, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    field = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = []
    for label, dtype in dtypes.items():
        for name, fn in pair.steps(dtype).items():
            fn()  # warm-up outside the profile
            with profile(activities=activities) as prof:
                fn()
            groups = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
            for event in prof.key_averages():
                key = (
                    "attention"
                    if "scaled_dot_product" in event.key
                    else "matmul"
                    if event.key
                    in ("aten::mm", "aten::addmm", "aten::bmm", "aten::convolution_backward", "aten::mkldnn_convolution")
                    else "other"
                )
                groups[key] += getattr(event, field)
            total = sum(groups.values())
            top = sorted(prof.key_averages(), key=lambda e: getattr(e, field), reverse=True)[:5]
            rows.append(
                {
                    "size": size.name,
                    "dtype": label,
                    "impl": name,
                    "total_ms": total / 1e3,
                    **{k: v / total for k, v in groups.items()},
                    "top": ", ".join(f"{e.key.removeprefix('aten::')} {getattr(e, field) / total:.0%}" for e in top),
                }
            )
    return rows


# ---------------------------------------------------------------------- training step and data loading


@dataclass(frozen=True)
class TrainAssets:
    """Clips and text encoder that the training-step measurements share (the tiny training config)."""

    clips: Path
    t5: Path
    base: tuple[Path, ...] = tuple(ROOT / "configs" / n for n in ("cogvideox_5b.yaml", "tiny.yaml", "tiny_train.yaml"))


def make_train_assets(preset: Preset, workdir: Path) -> TrainAssets:
    from sat_video.fixtures.synthetic import make_moving_shapes
    from sat_video.fixtures.tiny_t5 import make_tiny_t5

    items = make_moving_shapes(
        workdir / "train_clips", num_videos=preset.train_videos, num_frames=16, height=64, width=64, fps=8, seed=0
    )
    make_tiny_t5([caption for _, caption in items], workdir / "t5", d_model=32)  # tiny.yaml's text_hidden_size
    return TrainAssets(workdir / "train_clips", workdir / "t5")


def train_steps(assets: TrainAssets, preset: Preset, workdir: Path, label: str, overrides: tuple[str, ...] = (),
                sources: list[Path] | None = None) -> dict:
    """Median step time of ``tools/train_video.py`` (data, frozen stages, DiT, DeepSpeed update), read from the
    run's metrics.jsonl; the first quarter of the steps is warm-up. Also the video tokens per second of the timed
    steps (each step's bucket decides its tokens)."""
    save = workdir / f"run-{len(list(workdir.glob('run-*')))}"
    command = [
        sys.executable,
        str(ROOT / "tools" / "train_video.py"),
        "--base",
        *map(str, assets.base),
        f"data.sources=[{','.join(map(str, sources or [assets.clips]))}]",
        f"model.text_encoder.path={assets.t5}",
        f"train.save={save}",
        f"train.train_iters={preset.train_iters}",
        f"train.save_interval={preset.train_iters}",
        "train.log_interval=1",
        "train.tensorboard=false",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    timed = records[max(1, len(records) // 4) :]
    times = [r["step_time_s"] for r in timed]
    import sat_video

    cfg = sat_video.load_config(save / "config.yaml")
    batch = cfg.train.micro_batch_size
    tokens = [batch * _video_tokens(r.get("bucket"), cfg) for r in timed]
    return {"input": label, "batch": batch, "steps": len(times), "time": median(times), "samples_per_s": batch / median(times),
            "tokens_per_s": sum(tokens) / sum(times)}


def _video_tokens(bucket: str | None, cfg) -> int:
    """Video tokens of one sample of ``bucket`` (``"FxHxW"``), or of the config's single clip size."""
    from sat_video.data.buckets import Bucket
    from sat_video.model.config import DiTConfig

    dit = DiTConfig.from_config(cfg)
    frames, height, width = (astuple(Bucket.from_name(bucket)) if bucket else
                             (dit.num_frames, cfg.data.height or dit.latent_height * 8, cfg.data.width or dit.latent_width * 8))
    return dit.token_grid(frames, height // 8, width // 8).num_tokens


BUCKET_CLIPS = {"wide": (72, 128), "four_three": (96, 128), "tall": (128, 80)}
"""Folder -> clip height, width of the bucket comparison: 16:9, 4:3 and portrait."""
BUCKETS = "data.buckets=[[13,64,112],[13,48,64],[13,112,64]]"


def bucket_section(assets: TrainAssets, preset: Preset, workdir: Path) -> list[dict]:
    """The same clips of three aspect ratios trained at one size (cropped to the square default) and with a bucket
    per aspect ratio."""
    from sat_video.fixtures.synthetic import make_moving_shapes

    folders = []
    for seed, (name, (height, width)) in enumerate(BUCKET_CLIPS.items()):
        make_moving_shapes(workdir / "bucket_clips" / name, preset.train_videos, 16, height, width, 8, seed)
        folders.append(workdir / "bucket_clips" / name)
    rows = [train_steps(assets, preset, workdir, "one size (64 x 64, cropped)", sources=folders),
            train_steps(assets, preset, workdir, "3 buckets (64 x 112, 48 x 64, 112 x 64)", (BUCKETS,), sources=folders)]
    for row in rows:
        print(f"training step, {row['input']}: {row['samples_per_s']:.2f} samples/s, {row['tokens_per_s']:.0f} tokens/s",
              flush=True)
    return rows


def precompute_latents(assets: TrainAssets, workdir: Path) -> Path:
    """Encode the training clips once with ``tools/precompute_latents.py`` (same config as the raw-video run)."""
    out = workdir / "latents"
    command = [
        sys.executable,
        str(ROOT / "tools" / "precompute_latents.py"),
        "--base",
        *map(str, assets.base),
        f"data.sources=[{assets.clips}]",
        f"model.text_encoder.path={assets.t5}",
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}, capture_output=True, text=True
    )
    if proc.returncode:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{proc.stderr[-3000:]}")
    return out


def data_section(preset: Preset, workdir: Path) -> list[dict]:
    """Clips/s through the trainer's data path: VideoDataset (decord, resize, crop) and a DataLoader."""
    import time

    from sat_video.data.clips import ClipSpec, VideoDataset, collate
    from sat_video.data.sampler import ClipBatchSampler
    from sat_video.data.sources import discover
    from sat_video.fixtures.synthetic import make_moving_shapes

    frames, height, width = preset.clip
    make_moving_shapes(
        workdir / "clips", num_videos=preset.clip_videos, num_frames=frames, height=height, width=width, fps=8, seed=0
    )
    refs = discover([workdir / "clips"])
    dataset = VideoDataset(refs, ClipSpec(num_frames=frames, height=height, width=width, fps=8))
    rows = []
    for workers in sorted({0, *(w for w in (1, 2, 4, 8) if w <= (os.cpu_count() or 1))}):
        sampler = ClipBatchSampler([ref.is_image for ref in refs], 1, 0, 1, seed=0)
        loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate))
        for _ in range(max(1, workers)):  # workers started and their first clips decoded
            next(loader)
        start = time.perf_counter()
        for _ in range(preset.clip_batches):
            next(loader)
        rows.append({"workers": workers, "clips_per_s": preset.clip_batches / (time.perf_counter() - start)})
        del loader
        print(f"data loading, {workers} workers: {rows[-1]['clips_per_s']:.2f} clips/s", flush=True)
    return rows


# ---------------------------------------------------------------------- report


# ---------------------------------------------------------------------- sequence parallelism


def sequence_parallel_section(preset: Preset, device: torch.device, threads: int) -> list[dict]:
    """The DiT step of ``preset.sequence_parallel`` in this process, then split over two processes (torchrun) that
    share the same threads (CPU) or take one GPU each."""
    from sat_video.experiments.sequence_parallel_bench import measure

    size = preset.sequence_parallel
    args = {"config": str(ROOT / "configs" / f"{size.variant}.yaml"), "overrides": list(size.overrides),
            "batch": size.batch, "warmup": preset.warmup, "reps": preset.reps, "device": str(device)}
    rows = [{"size": size.name, **measure(args)}]
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        print("sequence parallelism: one GPU here, the split row needs two", flush=True)
        return rows
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // 2))}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "-m", "sat_video.experiments.sequence_parallel_bench", json.dumps(args)]
    proc = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"the sequence-parallel benchmark failed:\n{proc.stderr[-3000:]}")
    rows.append({"size": size.name, **json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])})
    for row in rows:
        print(f"sequence parallelism {row['split']} process(es): {row['time']:.3f}s, {row['activations'] / MIB:.0f} MiB "
              f"activations per rank, {row['communication']:.0%} in collectives", flush=True)
    return rows


# ---------------------------------------------------------------------- sampling memory


def sampling_memory_section(preset: Preset) -> tuple[list[dict], list[dict]]:
    """VAE decode exact vs tiled (measured), then the predicted full-size peaks."""
    decode = vae_decode_rows(preset.vae_decode, ROOT / "configs")
    for row in decode:
        print(f"VAE decode {row['mode']}: {row['seconds']:.1f}s, {row['peak'] / MIB:.0f} MiB "
              f"(predicted {row['predicted'] / MIB:.0f})", flush=True)
    return decode, full_size_rows(ROOT / "configs") if preset.full_size else []


# ---------------------------------------------------------------------- fine-tuning: sat_video vs diffusers' LoRA script


TRAINERS_HEADING = "## Fine-tuning: sat_video vs diffusers' train_cogvideox_lora.py"
PROFILE_LABELS = {"data_s": "data", "encode_s": "VAE + T5", "forward_s": "DiT forward", "backward_s": "backward",
                  "optimizer_s": "clip + optimizer"}


def trainers_section(setup: ComparisonSetup, diffusers_script: Path | None, command: str) -> str:
    """Run the comparison in a temporary folder; its markdown section (``command`` regenerates it alone)."""
    with tempfile.TemporaryDirectory(prefix="sat_video_trainers_") as tmp:
        result = compare(ROOT, Path(tmp), setup, diffusers_script)
    for name, row in result["rows"].items():
        print(f"fine-tuning, {name}: {_seconds(row['cold'], 3)} s/step first epoch, {_seconds(row['warm'], 3)} later, "
              f"start-up {_seconds(row['startup'], 1)} s, peak RSS {row['peak_rss_gib']:.2f} GiB", flush=True)
    return "\n".join(_trainer_lines(result, command))


def _seconds(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def _profile_cell(row: dict, name: str, epochs: str) -> str:
    profile = row[f"profile_{epochs}"]
    if profile is None:
        return "n/a"
    labels = {**PROFILE_LABELS, "data_s": "data wait" if name != DIFFUSERS else "data",
              "encode_s": "T5" if name == DIFFUSERS else "VAE + T5"}
    in_step = [key for key in PROFILE_LABELS if not (row["encode_overlapped"] and key == "encode_s")]
    share = {key: round(value, 2) + 0.0 for key, value in profile.items()}  # + 0.0: no "-0%" for rounding noise
    cell = ", ".join(f"{labels[key]} {share[key]:.0%}" for key in in_step) + f", other {share['other']:.0%}"
    if row["encode_overlapped"]:
        cell += f"; in a background thread, ahead of the step: encoding {share['encode_s']:.0%}"
    return cell


def _trainer_lines(result: dict, command: str) -> list[str]:
    setup, rows = result["setup"], result["rows"]
    theirs = rows[DIFFUSERS]
    table = []
    for name in (SAT_RAW, SAT_CACHE, DIFFUSERS):
        row = rows[name]
        cold, warm = _ratio(row["cold"], theirs.get("cold")), _ratio(row["warm"], theirs.get("warm"))
        table.append([name, _seconds(row["cold"], 3), _seconds(row["warm"], 3),
                      f"{_times(cold)} / {_times(warm)}", _seconds(row["startup"], 1),
                      _seconds(row["first_epoch_done"], 1),
                      f"{row['peak_rss_gib']:.2f}", _profile_cell(row, name, "cold"), _profile_cell(row, name, "warm")])
    raw = rows[SAT_RAW]
    targets = []
    for label, key, limit in (("later epochs' step time", "warm", 1.0), ("first epoch's step time", "cold", 1.5),
                              ("start-up", "startup", 1.0), ("peak RSS", "peak_rss_gib", 1.1)):
        ratio = _ratio(raw[key], theirs.get(key))
        targets.append([f"raw video: {label} <= {limit:.1f}x diffusers'", _times(ratio),
                        "n/a" if ratio is None else _met(ratio <= limit)])
    hits = raw["warm_cache_hit_rate"]
    load = result["load"]
    return [
        TRAINERS_HEADING,
        "",
        f"Regenerate this section alone (it replaces itself in this file): `{command}`",
        "",
        f"LoRA fine-tuning (rank {setup.rank}, alpha {setup.rank}: scale 1, on q, k, v and the attention output; base "
        "weights frozen) of one tiny CogVideoX-2B-layout DiT (`configs/cogvideox_2b.yaml configs/tiny.yaml "
        "configs/tiny_train.yaml` with " + ", ".join(f"{k}={v}" for k, v in DIT_SIZES.items()) + "), the same "
        f"initial weights, VAE (`tiny_train.yaml`'s), T5 and tokenizer for both, on {setup.clips} synthetic clips of "
        f"13 x 64 x 64 at 8 fps; batch {setup.batch}, {setup.steps} optimizer steps per run ({setup.steps_per_epoch} "
        f"an epoch), fp32 on the CPU with {setup.threads} thread(s), AdamW with the schedule of `tiny_train.yaml`; "
        f"sat_video decodes in {SAT_LOADER_WORKERS} loader worker(s) and encodes `data.prefetch` batches ahead. "
        f"Each row ran {setup.rounds} time(s), the rows in turn (reversed every other round). diffusers: "
        f"{result['diffusers']}, unmodified, run by `benchmarks/diffusers_lora/run_timed.py` (its README says how).",
        "",
        _table(["trainer", "s/step, first epoch (cold)", "s/step, later epochs (warm)", "vs diffusers (cold / warm)",
                "start-up (s)", "first epoch done (s)", "peak RSS (GiB)", "where a first-epoch step's time goes",
                "where a later step's time goes"], table),
        "",
        _table(["target", "measured", "met"], targets),
        "",
        f"* Cold: steps of the first epoch, warm: of the later ones, medians over the steps of all runs of a row; the very "
        f"first step of every run (both trainers: lazy initialisation, first allocations) is left out "
        f"({raw['cold_steps']} cold and {raw['warm_steps']} warm steps per sat_video row).",
        "* Start-up: process start (`/proc/self/stat`) to the end of the first optimizer step, median over the runs. "
        "diffusers' includes decoding every clip and encoding it with the VAE before its loop "
        f"({_seconds(result['diffusers_encode_before_loop_s'], 1)} s of VAE encoding); the explicit-cache row's does not "
        f"include `tools/precompute_latents.py` ({result['precompute_s']:.1f} s, once, not in any row). *First epoch "
        "done*: start-up plus the first epoch's other steps, the same work for both trainers wherever they encode.",
        "* Peak RSS: `ru_maxrss` of the training process at its last step (sat_video: `cpu_peak_rss_gb` of metrics.jsonl).",
        "* Where the time goes: each phase's share of the steps' total time (cold or warm steps). sat_video's phases are "
        "the per-step keys of its metrics.jsonl; diffusers' come from `run_timed.py`, which wraps the data "
        "loader, `T5EncoderModel.forward`, `CogVideoXTransformer3DModel.forward`, `Accelerator.backward`, "
        "`Accelerator.clip_grad_norm_` and the optimizer step. *Other*: the rest of the step (noise, schedule, "
        "loss, logging).",
        "* Per step, diffusers encodes the prompts with T5 every step and samples latents from the posteriors it "
        "encoded before training; sat_video's raw-video row decodes and encodes each clip (VAE and T5) the first time "
        "it is drawn, ahead of the step in a thread, and keeps posterior and text embedding in its in-run cache"
        + (f" ({hits:.0%} cache hits in the warm steps)" if hits is not None else "")
        + "; the explicit-cache row reads both from `tools/precompute_latents.py`'s cache. Both train v-prediction "
        "(diffusers' x0 loss weighted by 1 / (1 - abar) is the same loss); sat_video also drops 10% of the captions "
        "(`model.diffusion.text_dropout`).",
        "* Load average (1/5/15 min) " + (f"before: {' / '.join(f'{x:.2f}' for x in load[0])}, after: "
                                          f"{' / '.join(f'{x:.2f}' for x in load[-1])}" if load else "not available") + ".",
    ]


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _reduction(row: dict, mode: str = "on") -> float:
    """Activation memory off / ``mode``; infinite when checkpointing leaves nothing above the gradients (tiny models)."""
    on = row[mode]["activations"]
    return row["off"]["activations"] / on if on > 0 else float("inf")


def targets(dits: list[dict], checkpointing: list[dict], training: list[dict], split: list[dict],
            buckets: list[dict]) -> list[list]:
    rows = []
    for row in dits:
        ours, theirs = row["sat_video"], row["diffusers"]
        ratio = ours["time"] / theirs["time"]
        rows.append(
            [f"DiT step time <= 0.85x diffusers ({row['size'].name}, {row['dtype']})", f"{ratio:.2f}x", _met(ratio <= 0.85)]
        )
        memory = ours["peak"] / theirs["peak"]
        rows.append([f"DiT peak memory <= diffusers ({row['size'].name}, {row['dtype']})", f"{memory:.2f}x", _met(memory <= 1.0)])
    for row in dits:
        if row["size"].flops_target and row["dtype"] == "fp32":
            fraction = row["sat_video"]["fraction"]
            rows.append(
                [f"achieved FLOP/s >= 60% of the fp32 GEMM peak ({row['size'].name})", f"{fraction:.0%}", _met(fraction >= 0.6)]
            )
    for row in checkpointing:
        reduction = _reduction(row)
        extra = row["on"]["time"] / row["off"]["time"] - 1
        rows.append(
            [
                f"checkpointing: activation memory down >= 3x ({row['size']}, {row['dtype']})",
                f"{reduction:.1f}x",
                _met(reduction >= 3),
            ]
        )
        rows.append(
            [f"checkpointing: <= 35% extra step time ({row['size']}, {row['dtype']})", f"{extra:+.0%}", _met(extra <= 0.35)]
        )
    raw = [r for r in training if r["input"] == "raw video"]
    for row in training:
        if raw and row["input"] != "raw video":
            speedup = raw[0]["time"] / row["time"]
            rows.append(
                [f"training step from {row['input']} >= 3x faster than from raw video", f"{speedup:.1f}x", _met(speedup >= 3)]
            )
    if len(buckets) == 2:
        per_token = buckets[0]["tokens_per_s"] / buckets[1]["tokens_per_s"]  # bucketed time per token / one size's
        rows.append(["buckets: time per video token <= 1.05x one size (same clips)", f"{per_token:.2f}x",
                     _met(per_token <= 1.05)])
    if len(split) == 2:
        ratio = split[1]["activations"] / split[0]["activations"]
        rows.append([f"sequence parallelism: activations per rank <= 0.6x one process (S=2, {split[0]['size']})",
                     f"{ratio:.2f}x", _met(ratio <= 0.6)])
    return rows


METHOD_HEADING = "## How these figures are measured"
METHOD = """\
* **Timing**: wall clock, the implementations alternating in one process (order ABBA, so drifting load hits
  both alike), {warmup} warm-up round(s), then the median of {reps}. A DiT step is `zero_grad(set_to_none=True)`,
  forward, loss = mean of the squared output in fp32, backward; no optimizer. bf16 means `torch.autocast`
  around the forward with fp32 weights, as in mixed-precision training.
* **Identical models**: diffusers' `CogVideoXTransformer3DModel` is loaded with the weights of the sat_video DiT
  through `sat_video.diffusers_export` (random weights everywhere, the zero-initialised gates included), at the
  model's own latent size; diffusers gets its RoPE tables precomputed, as its pipelines pass them.
* **Peak memory**: bytes allocated during one step above what existed before it (parameters and inputs, the
  same for both, are excluded; gradients are included). On CPU this is `sat_video.experiments.benchmark.LiveTensorBytes`, a
  `TorchDispatchMode` that adds up the storages every operator returns (forward and backward) and subtracts them
  when freed; kernels' internal scratch memory is invisible to it for both implementations. On CUDA it is
  `torch.cuda.max_memory_allocated`. Activation memory = that peak minus the gradients' bytes.
* **FLOPs**: `torch.utils.flop_counter.FlopCounterMode` over one step (matmuls, convolutions and attention,
  forward and backward, with formulas added for the CPU flash-attention kernels), divided by the median step
  time, as a fraction of the GEMM peak measured above in the same dtype.
* **Training step**: `tools/train_video.py` with `configs/cogvideox_5b.yaml configs/tiny.yaml
  configs/tiny_train.yaml` (tiny DiT, tiny random VAE, tiny T5, DeepSpeed ZeRO-2, fp32) on synthetic mp4
  clips; the median `step_time_s` of its metrics.jsonl after the first quarter of the steps (data loading,
  VAE and T5 encoding, DiT forward and backward, optimizer update); samples/s = micro-batch / step time. The
  "latent cache" row is the same run with `data.latent_cache` from `tools/precompute_latents.py` on the same
  clips (posterior sampling, caption dropout and the DiT step as before; no decoding, VAE or T5); the
  encoding itself is not timed.
* **Sequence parallelism**: activations per rank = bytes allocated during one step above the weights and gradients,
  measured as *Peak memory* above on each rank (rank 0 reported); collectives = the self time of the all-to-all,
  all-gather and all-reduce operators in one profiled step (CPU time under gloo, GPU kernel time under NCCL) over
  the step's total.
* **Data loading**: synthetic mp4 clips decoded by `VideoDataset` (decord, resize to cover, center crop, scale to
  [-1, 1]) through a `DataLoader` with `ClipBatchSampler`, batch 1, after the workers delivered their first clips.
"""


def _dominance(profile: list[dict]) -> list[str]:
    """What the profile says about the room left for sat_video to differ from diffusers, in numbers."""
    lines = []
    for dtype in DTYPES:
        rows = {r["impl"]: r for r in profile if r["dtype"] == dtype}
        if len(rows) == 2:
            ours, theirs = rows["sat_video"], rows["diffusers"]
            lines.append(
                f"* {dtype} ({ours['size']}): matmul + attention kernels take {ours['matmul'] + ours['attention']:.0%} of "
                f"sat_video's step and {theirs['matmul'] + theirs['attention']:.0%} of diffusers' (attention alone "
                f"{ours['attention']:.0%} / {theirs['attention']:.0%}); everything else, where the two implementations "
                f"differ, {ours['other']:.0%} / {theirs['other']:.0%}. With none of that left, sat_video's step would "
                f"still take about {theirs['matmul'] + theirs['attention']:.2f}x diffusers'."
            )
    return [
        "Both implementations run the same PyTorch GEMM and attention kernels on the same shapes (sat_video projects "
        "q, k and v with one GEMM where diffusers runs three), so their step times can differ only by the element-wise "
        "work, copies and framework overhead around those kernels:",
        "",
        *lines,
    ]


def _checkpointing_note(profile: list[dict]) -> list[str]:
    shares = {r["dtype"]: r["attention"] for r in profile if r["impl"] == "sat_video"}
    if not shares:
        return []
    return [
        "Checkpointing recomputes each block's forward pass during backward. By default it keeps the outputs of the "
        "attention kernels (`DiffusionTransformer.checkpoint_keeps_attention`, one `[B, N, D]` tensor and the softmax "
        "statistics per block), so the attention forward kernel does not run twice; attention is "
        + " and ".join(f"{share:.0%} of the {dtype} step" for dtype, share in shares.items())
        + " (profile above). *Recompute all* (`train.checkpoint_keeps_attention: false`) keeps only each block's input.",
        "",
    ]


def report(
    args,
    info: dict,
    peaks: dict,
    dits: list[dict],
    checkpointing: list[dict],
    profile: list[dict],
    training: list[dict],
    data: list[dict],
    split: list[dict],
    buckets: list[dict],
    sampling: tuple[list[dict], list[dict]],
    trainers: str,
    preset: Preset,
) -> str:
    out = [
        "# Benchmarks: sat_video vs diffusers",
        "",
        "Written by `tools/bench.py`; do not edit by hand. Regenerate with:",
        "",
        f"    {args.command}",
        "",
        "## Machine",
        "",
        _table(["", ""], list(info.items())),
        "",
        "## Targets (issue #6)",
        "",
        _table(["target", "measured", "met"], targets(dits, checkpointing, training, split, buckets)),
        "",
        "Every figure comes from the sections below; *Where the time goes* shows what dominates the DiT step, and so "
        "what a missed step-time or checkpointing target is made of.",
        "",
        "## GEMM peak",
        "",
        _table(["dtype", "best n (n x n @ n x n)", "TFLOP/s"], [[k, n, f"{v / 1e12:.3f}"] for k, (v, n) in peaks.items()]),
        "",
        "## DiT forward + backward, sat_video vs diffusers",
        "",
        "Sizes: "
        + "; ".join(
            f"**{s.name}** = `{s.variant}` with {', '.join(o.split('.')[-1] for o in s.overrides)}, batch {s.batch}"
            for s in preset.dits
        )
        + ".",
        "",
    ]
    out.append(
        _table(
            [
                "size",
                "dtype",
                "tokens",
                "params",
                "sat_video step (s)",
                "diffusers step (s)",
                "time ratio (range per round)",
                "sat_video peak (MiB)",
                "diffusers peak (MiB)",
                "memory ratio",
                "sat_video FLOP/s (of peak)",
                "diffusers FLOP/s (of peak)",
            ],
            [
                [
                    r["size"].name,
                    r["dtype"],
                    r["tokens"],
                    f"{r['params'] / 1e6:.1f}M",
                    f"{r['sat_video']['time']:.3f}",
                    f"{r['diffusers']['time']:.3f}",
                    f"{r['sat_video']['time'] / r['diffusers']['time']:.2f} ({r['paired'][0]:.2f}-{r['paired'][1]:.2f})",
                    f"{r['sat_video']['peak'] / MIB:.0f}",
                    f"{r['diffusers']['peak'] / MIB:.0f}",
                    f"{r['sat_video']['peak'] / r['diffusers']['peak']:.2f}",
                    *(f"{r[i]['flops'] / r[i]['time'] / 1e9:.1f} G ({r[i]['fraction']:.0%})" for i in ("sat_video", "diffusers")),
                ]
                for r in dits
            ],
        )
    )
    compiled = [r for r in dits if COMPILED in r]
    if compiled:
        out += [
            "",
            "### sat_video with torch.compile (each block compiled, inductor)",
            "",
            _table(
                [
                    "size",
                    "dtype",
                    "eager step (s)",
                    "compiled step (s)",
                    "compiled / eager",
                    "compiled / diffusers",
                    "compiled FLOP/s (of peak)",
                ],
                [
                    [
                        r["size"].name,
                        r["dtype"],
                        f"{r['sat_video']['time']:.3f}",
                        f"{r[COMPILED]['time']:.3f}",
                        f"{r[COMPILED]['time'] / r['sat_video']['time']:.2f}",
                        f"{r[COMPILED]['time'] / r['diffusers']['time']:.2f}",
                        f"{r['sat_video']['flops'] / r[COMPILED]['time'] / 1e9:.1f} G ({r[COMPILED]['fraction']:.0%})",
                    ]
                    for r in compiled
                ],
            ),
        ]
    out += [
        "",
        "## Where the time goes",
        "",
        "One profiled step per implementation (torch.profiler, self time per operator); *matmul* is mm / addmm / bmm "
        "and the patch convolution, *attention* the SDPA kernels, forward and backward.",
        "",
        _table(
            ["size", "dtype", "implementation", "step (ms, profiled)", "matmul", "attention", "other", "top operators"],
            [
                [
                    r["size"],
                    r["dtype"],
                    r["impl"],
                    f"{r['total_ms']:.0f}",
                    f"{r['matmul']:.0%}",
                    f"{r['attention']:.0%}",
                    f"{r['other']:.0%}",
                    r["top"],
                ]
                for r in profile
            ],
        ),
        "",
        *_dominance(profile),
        "",
        "## Activation checkpointing (sat_video)",
        "",
        "*Activations* = peak bytes of the step minus the gradients' (the issue's definition); with checkpointing that "
        "peak can come late in the backward pass, when most gradients exist, which hides how much the forward pass keeps; "
        "*saved after forward* (what the forward pass leaves for backward, output included) shows that.",
        "",
        *_checkpointing_note(profile),
        _table(
            [
                "size",
                "dtype",
                "checkpointing",
                "step (s)",
                "extra time",
                "activations (MiB)",
                "reduction",
                "saved after forward (MiB)",
                "reduction",
            ],
            [
                [
                    r["size"],
                    r["dtype"],
                    CHECKPOINTING_LABELS[mode],
                    f"{r[mode]['time']:.3f}",
                    f"{r[mode]['time'] / r['off']['time'] - 1:+.0%}",
                    f"{r[mode]['activations'] / MIB:.0f}",
                    f"{_reduction(r, mode):.1f}x",
                    f"{r[mode]['saved'] / MIB:.0f}",
                    f"{r['off']['saved'] / r[mode]['saved']:.1f}x",
                ]
                for r in checkpointing
                for mode in CHECKPOINTING_MODES
            ],
        ),
        "",
        "## Training step through the engine (tools/train_video.py)",
        "",
        _table(
            ["input", "micro-batch", "steps timed", "step (s)", "samples/s"],
            [[r["input"], r["batch"], r["steps"], f"{r['time']:.3f}", f"{r['samples_per_s']:.2f}"] for r in training],
        ),
        "",
        "## Mixed sizes: buckets vs one size (tools/train_video.py)",
        "",
        f"{3 * preset.train_videos} clips of 16 frames, a third each at 72 x 128 (16:9), 96 x 128 (4:3) and 128 x 80 "
        "(portrait), trained as in the previous section: once at the one 13 x 64 x 64 size (each clip resized to cover "
        f"it and center-cropped), once with `{BUCKETS}` (each clip at its aspect ratio). Video tokens/s counts each "
        "step's tokens from its bucket; no bucket is padded.",
        "",
        _table(["clip sizes", "micro-batch", "steps timed", "step (s)", "samples/s", "video tokens/s"],
               [[r["input"], r["batch"], r["steps"], f"{r['time']:.3f}", f"{r['samples_per_s']:.2f}",
                 f"{r['tokens_per_s']:.0f}"] for r in buckets]),
        "",
        "## Data loading (decord + DataLoader workers)",
        "",
        f"Clips of {preset.clip[0]} frames at {preset.clip[1]}x{preset.clip[2]} (8 fps) from {preset.clip_videos} "
        "synthetic mp4 files of that size. With 0 workers the main process decodes and resizes with all torch threads; "
        "each worker process uses one thread (the DataLoader's default).",
        "",
        _table(["workers", "clips/s"], [[r["workers"], f"{r['clips_per_s']:.2f}"] for r in data]),
        "",
        "## Sequence parallelism (DeepSpeed-Ulysses)",
        "",
        f"**{preset.sequence_parallel.name}** = `{preset.sequence_parallel.variant}` with "
        f"{', '.join(o.split('.')[-1] for o in preset.sequence_parallel.overrides)}, batch {preset.sequence_parallel.batch}: "
        "the DiT step (fp32) in one process, then split over two (`parallel.sequence_parallel_size=2`; on CPU the two "
        "processes share the threads the one process had, over gloo).",
        "",
        _table(
            ["processes", "video tokens", "tokens per rank", "step (s)", "activations per rank (MiB)", "vs one process",
             "collectives (share of step)"],
            [[r["split"], r["video_tokens"], r["tokens_per_rank"], f"{r['time']:.3f}", f"{r['activations'] / MIB:.0f}",
              f"{r['activations'] / split[0]['activations']:.2f}x", f"{r['communication']:.0%}"] for r in split],
        ),
        "",
        *_sampling_memory_lines(*sampling, preset.vae_decode),
        marked(trainers),
        "",
        METHOD_HEADING,
        "",
        METHOD.format(warmup=preset.warmup, reps=preset.reps),
    ]
    return "\n".join(out)


def _sampling_memory_lines(decode: list[dict], full_size: list[dict], case: DecodeCase) -> list[str]:
    lines = [
        "## Sampling memory: VAE decode exact vs tiled",
        "",
        f"`{' + '.join(case.configs)}` first stage with random weights: {case.frames} frames at {case.height}x"
        f"{case.width} decoded from the same random latents (fp32, one process) whole (SAT's exact decode) and in "
        f"tiles of {case.tile[0]}x{case.tile[1]} pixels sharing {case.overlap[0]}x{case.overlap[1]} "
        "(`sample.vae_tiling`). Peak: live tensors allocated by the decode (`sat_video/common/live_tensors.py`); "
        "predicted: the estimate of `tools/sample_video.py --estimate-memory` for the same decode.",
        "",
        _table(["decode", "seconds", "peak (MiB)", "predicted (MiB)", "PSNR vs exact (dB)"],
               [[r["mode"], f"{r['seconds']:.1f}", f"{r['peak'] / MIB:.0f}", f"{r['predicted'] / MIB:.0f}",
                 f"{r['psnr']:.1f}" if "psnr" in r else ""] for r in decode]),
        "",
    ]
    if full_size:
        models = list(dict.fromkeys((r["model"], r["size"]) for r in full_size))
        peak = {(r["model"], r["offload"], r["tiling"]): r["peak_gib"] for r in full_size}
        lines += [
            "### Predicted peak at full size (bf16, GiB; not measured on a GPU)",
            "",
            "From `SamplingMemoryModel` (`sat_video/diffusion/memory_estimate.py`): weights from parameter counts, "
            "activations from fp32 probes on this CPU at the real widths, halved for bf16. T5 is T5 v1.1 XXL's encoder.",
            "",
            _table(["model", "size", *(f"{offload}{', tiled' if tiled else ''}" for offload in ("none", "model", "sequential")
                                       for tiled in (False, True))],
                   [[model, size, *(f"{peak[model, offload, tiled]:.1f}" for offload in ("none", "model", "sequential")
                                    for tiled in (False, True))] for model, size in models]),
            "",
        ]
    return lines


def main(argv=None) -> int:
    return run_tool("bench", run, argv)


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", choices=sorted(PRESETS), default="default", help="tiny: seconds, for CI")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md", help="where the markdown goes")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all logical cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time sat_video with every block torch.compile'd")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                        help="precisions of the DiT sections (a CPU without bf16 instructions emulates bf16 matmuls "
                             "at a fraction of a GFLOP/s: measure fp32 only there)")
    parser.add_argument("--only", choices=["trainers"],
                        help="run only this section and replace it inside --out (which keeps everything else)")
    parser.add_argument("--trainer-steps", type=int, help="optimizer steps per fine-tuning run (default: the preset's)")
    parser.add_argument("--trainer-rounds", type=int, help="runs of each fine-tuning row (default: the preset's)")
    parser.add_argument("--diffusers-script", type=Path,
                        help=f"diffusers' train_cogvideox_lora.py for the fine-tuning section (default: ${DIFFUSERS_SCRIPT_ENV})")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "tools/bench.py", *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = PRESETS[args.sizes]
    trainers_preset = preset.trainers or ComparisonSetup(clips=4, steps=4, rounds=1)
    trainer_setup = replace(trainers_preset, threads=args.threads, steps=args.trainer_steps or trainers_preset.steps,
                            rounds=args.trainer_rounds or trainers_preset.rounds)
    if args.only == "trainers" or preset.trainers:
        diffusers_script(args.diffusers_script)  # the section comes last: a missing script fails now, not in an hour
    if args.only == "trainers":
        section = trainers_section(trainer_setup, args.diffusers_script, args.command)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        old = args.out.read_text() if args.out.exists() else ""
        args.out.write_text(replace_section(old, section, before=METHOD_HEADING))
        print(f"wrote the fine-tuning section of {args.out}")
        return 0
    info = machine(device)

    gemm_sizes = preset.gemm_sizes + ((8192,) if device.type == "cuda" else ())
    dtypes = {label: DTYPES[label] for label in args.dtypes}
    peaks = {label: gemm_peak(dtype, device, gemm_sizes, preset.reps) for label, dtype in dtypes.items()}
    print("GEMM peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s (n={n})" for k, (v, n) in peaks.items()), flush=True)
    dits, checkpointing = dit_section(preset, device, {k: v for k, (v, _) in peaks.items()}, args.compile, dtypes)
    profile = profile_section(preset, device, dtypes)
    with tempfile.TemporaryDirectory(prefix="sat_video_bench_") as tmp:
        workdir = Path(tmp)
        assets = make_train_assets(preset, workdir)
        training = [train_steps(assets, preset, workdir, "raw video")]
        training.append(
            train_steps(assets, preset, workdir, "latent cache", (f"data.latent_cache={precompute_latents(assets, workdir)}",))
        )
        for row in training:
            print(f"training step from {row['input']}: {row['time']:.3f}s, {row['samples_per_s']:.2f} samples/s", flush=True)
        buckets = bucket_section(assets, preset, workdir)
        data = data_section(preset, workdir)
    split = sequence_parallel_section(preset, device, args.threads)
    sampling = sampling_memory_section(preset)
    command = shlex.join(["python", "tools/bench.py", "--only", "trainers", *_trainer_arguments(args)])
    trainers = (trainers_section(trainer_setup, args.diffusers_script, command) if preset.trainers else
                f"{TRAINERS_HEADING}\n\nNot run at these sizes; `{command}` runs it.")
    if hasattr(os, "getloadavg"):
        info["load average at end (1/5/15 min; this run's own threads included)"] = " / ".join(
            f"{x:.2f}" for x in os.getloadavg()
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = report(args, info, peaks, dits, checkpointing, profile, training, data, split, buckets, sampling, trainers, preset)
    args.out.write_text(text + "\n")
    print(f"wrote {args.out}")
    return 0


def _trainer_arguments(args) -> list[str]:
    """The arguments of this run that the fine-tuning section depends on."""
    given = {"--sizes": args.sizes, "--threads": args.threads, "--trainer-steps": args.trainer_steps,
             "--trainer-rounds": args.trainer_rounds, "--diffusers-script": args.diffusers_script, "--out": args.out}
    defaults = {"--sizes": "default", "--threads": os.cpu_count(), "--out": ROOT / "benchmarks" / "RESULTS.md"}
    return [str(part) for flag, value in given.items() if value not in (None, defaults.get(flag)) for part in (flag, value)]


if __name__ == "__main__":
    sys.exit(main())
