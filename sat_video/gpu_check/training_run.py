"""Section 6: ``tools/train_video.py`` for real: torchrun on every GPU (NCCL), bf16, ZeRO-2, LoRA on 2B from raw
generated clips with the in-run latent cache and encode-ahead on. The run is SIGKILLed a few steps after its first
checkpoint and restarted with ``train.resume=auto``: the steps both ran must give equal losses. The step profile shows
whether the side stream hides the VAE encode (the share of the step spent waiting for data)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from sat_video.gpu_check.check import Check
from sat_video.gpu_check.training_data import run_overrides
from sat_video.training.metrics import read_metrics

PHASES = ("data_wait_s", "encode_s", "forward_s", "backward_s", "optimizer_s")


def _launch(check: Check, save: Path, *extra: str) -> subprocess.Popen:
    gpus = torch.cuda.device_count() if check.torch_device.type == "cuda" else 1
    variant = check.sizes.run_variant
    steps = check.sizes.run_steps
    base = [check.configs / f"{variant}.yaml", *(check.configs / name for name in check.sizes.train_configs),
            check.configs / "lora.yaml"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               str(check.train_script), "--base", *map(str, base), *run_overrides(check, variant, save),
               f"train.train_iters={steps}", f"train.save_interval={steps // 2}", "deepspeed.zero_stage=2",
               "train.activation_checkpointing=true", "data.cache_latents=true", "data.prefetch=1", "data.num_workers=2",
               *extra]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    log = open(save.parent / f"{save.name}.log", "a")
    return subprocess.Popen(command, cwd=check.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _tail(save: Path) -> str:
    return (save.parent / f"{save.name}.log").read_text()[-3000:]


def run(check: Check) -> None:
    report, steps = check.report, check.sizes.run_steps
    save = check.workdir / "training_run"
    save.mkdir()
    checkpoint = steps // 2
    kill_after = checkpoint + min(3, steps - checkpoint - 1)
    first = _launch(check, save)
    started = time.perf_counter()
    while first.poll() is None:  # SIGKILL (no clean-up) once the checkpoint is written and a few more steps logged
        records = read_metrics(save)
        if (save / "latest").exists() and records and records[-1]["step"] >= kill_after:
            os.killpg(first.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    first.wait()
    killed_at = time.perf_counter() - started
    before = {r["step"]: r for r in read_metrics(save)}
    if first.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the first run ended by itself (status {first.returncode}) before it could be killed:\n"
                           + _tail(save))
    resumed = _launch(check, save, "train.resume=auto")
    resumed.wait()
    if resumed.returncode:
        raise RuntimeError(f"the resumed run failed (status {resumed.returncode}):\n" + _tail(save))
    after = {r["step"]: r for r in read_metrics(save) if r["step"] > checkpoint}  # resuming drops the killed run's later lines
    both = sorted(set(before) & set(after) - set(range(checkpoint + 1)))
    differences = [abs(before[s]["loss"] - after[s]["loss"]) / max(abs(before[s]["loss"]), 1e-12) for s in both]
    first_records = [before[s] for s in sorted(before)]
    warm = first_records[1:] or first_records
    mean = {phase: sum(r.get(phase, 0.0) for r in warm) / len(warm) for phase in PHASES}
    step = sum(r["step_time_s"] for r in warm) / len(warm)
    peaks = [r["peak_memory_gb"] for r in first_records if "peak_memory_gb" in r]
    report.text("", f"`{check.sizes.run_variant}` + `lora.yaml`, {check.sizes.train_clip[0]}x{check.sizes.train_clip[1]}x"
                f"{check.sizes.train_clip[2]} clips, {steps} steps, checkpoint at {checkpoint}, SIGKILL after step "
                f"{max(before)} ({killed_at:.0f} s after launch), then `train.resume=auto`.")
    report.table(["what", "value"])
    report.row("processes (one per GPU)", torch.cuda.device_count() if check.torch_device.type == "cuda" else 1)
    report.row("start-up (launch to first step)", f"{first_records[0].get('startup_s', float('nan')):.1f} s")
    report.row("s/step after the first (killed run)", f"{step:.3f}")
    report.row("step profile (mean s: data wait / encode / forward / backward / optimizer)",
               " / ".join(f"{mean[p]:.3f}" for p in PHASES))
    report.row("data wait, share of the step", f"{mean['data_wait_s'] / step:.1%}" if step else "n/a")
    report.row("peak memory (metrics.jsonl)", f"{max(peaks):.2f} GB" if peaks else "not logged")
    report.row("steps run by both parts", f"{both[0]}..{both[-1]}" if both else "none")
    report.row("losses, largest relative difference", f"{max(differences):.2e}" if differences else "n/a")
    identical = both and all(before[s]["loss"] == after[s]["loss"] for s in both)
    report.row("verdict", "bit-identical losses" if identical else ("equal within 1e-3" if both and max(differences) < 1e-3
                                                                   else "**FAIL: losses differ or nothing to compare**"))
    report.row("final step of the resumed run", max(after) if after else "none")
