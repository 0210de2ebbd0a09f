"""Section 7: sequence parallelism (DeepSpeed-Ulysses) on two GPUs: the 5B step at 49x480x720 (bf16, activation
checkpointing) split S=2 against S=1, the losses and the activation memory per rank
(:mod:`sat_video.benchmarks.sequence_parallel_rank`). ``--quick`` splits a tiny model over two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from sat_video.benchmarks import sequence_parallel_rank
from sat_video.gpu_check.check import Check
from sat_video.gpu_check.report import gib, verdict
from sat_video.model.stages import SPATIAL_COMPRESSION


def skip_reason(check: Check) -> str | None:
    if check.torch_device.type == "cuda" and torch.cuda.device_count() < 2:
        return f"it needs 2 or more GPUs, this machine has {torch.cuda.device_count()}"
    return None


def run(check: Check) -> None:
    frames, height, width = check.sizes.step_clip
    variant = check.sizes.step_variant
    configs = [str(check.configs / f"{variant}.yaml"), *(str(check.configs / name) for name in check.sizes.model_configs)]
    overrides = [f"model.dit.num_frames={frames}", f"model.dit.latent_height={height // SPATIAL_COMPRESSION}",
                 f"model.dit.latent_width={width // SPATIAL_COMPRESSION}"]
    args = {"config": configs, "overrides": overrides, "batch": 1, "warmup": 1, "reps": 2, "device": check.device,
            "dtype": "bfloat16", "checkpointing": True}
    single = sequence_parallel_rank.measure(args)
    if check.torch_device.type == "cuda":
        torch.cuda.empty_cache()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "-m", sequence_parallel_rank.__name__, json.dumps(args)]
    proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600, cwd=check.configs.parent)
    if proc.returncode:
        raise RuntimeError(f"the S=2 run failed (status {proc.returncode}):\n{proc.stderr[-3000:]}")
    split = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    report = check.report
    report.text("", f"`{variant}` at {frames}x{height}x{width}, bf16, activation checkpointing, batch 1 "
                f"({single['video_tokens']:,} video tokens).")
    report.table(["S", "tokens per rank", "s/step", "activations per rank (GiB)", "collectives (share)", "loss"])
    for row in (single, split):
        report.row(row["split"], row["tokens_per_rank"], f"{row['time']:.3f}", gib(row["activations"]),
                   f"{row['communication']:.0%}", f"{row['loss']:.6f}")
    difference = abs(split["loss"] - single["loss"]) / abs(single["loss"])
    report.text("", f"Losses: relative difference {difference:.1e} ({verdict(difference < 1e-2)}, bf16 sums in another "
                f"order); activations per rank at S=2: {split['activations'] / single['activations']:.2f}x of S=1.")
