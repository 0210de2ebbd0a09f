"""Section 5: training memory on one GPU, measured against the planner (``tools/train_video.py --estimate-memory``):
5B LoRA and SFT (activation checkpointing, ZeRO-2, bf16) at the check's clip size, then LoRA with fp8-stored base
weights and with block offload. Each case is ``tools/train_video.py`` for real on generated clips, SIGKILLed once it
has logged two steps (a 5B SFT checkpoint would take minutes to write); the measured peak is the largest
``peak_memory_gb`` of ``metrics.jsonl`` (CUDA ``max_memory_allocated`` per step). The planner's probes run on the CPU
while the run trains."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sat_video.gpu_check.check import Check
from sat_video.gpu_check.training_data import run_overrides
from sat_video.training.metrics import read_metrics

STEPS = 2
TOLERANCE = 0.20


def cases(check: Check) -> list[tuple[str, list[str], list[str]]]:
    """``(label, extra config files, overrides)``; block offload streams half the blocks."""
    layers = check.config(check.sizes.train_variant).model.dit.num_layers
    return [("LoRA", ["lora.yaml"], []), ("SFT", [], []),
            ("LoRA, fp8 base weights", ["lora.yaml"], ["model.dit.storage_dtype=float8_e4m3fn"]),
            (f"LoRA, {layers // 2} blocks offloaded", ["lora.yaml"], [f"train.offload_blocks={layers // 2}"])]


class _Run:
    """``tools/train_video.py`` on one case, started at once; :meth:`finish` kills it once it logged ``STEPS`` steps."""

    def __init__(self, check: Check, files: list[str], overrides: list[str], save: Path):
        variant = check.sizes.train_variant
        self.files = [str(check.configs / name) for name in (f"{variant}.yaml", *check.sizes.train_configs, *files)]
        self.keys = [*run_overrides(check, variant, save), "train.activation_checkpointing=true", "deepspeed.zero_stage=2",
                     f"train.train_iters={STEPS + 1}", "data.cache_latents=false", *overrides]
        if check.torch_device.type != "cuda":
            self.keys.append("train.measure_memory=true")
        self.save, self.log = save, save.parent / f"{save.name}.log"
        self.started = time.perf_counter()
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(check.train_script), "--base", *self.files, *self.keys], cwd=check.workdir, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")})

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def finish(self) -> tuple[float, float]:
        """``(peak GiB over the first STEPS steps, seconds)``."""
        while self.process.poll() is None:
            records = read_metrics(self.save)
            if records and records[-1]["step"] >= STEPS:
                os.killpg(self.process.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        self.process.wait()
        peaks = [record["peak_memory_gb"] for record in read_metrics(self.save) if "peak_memory_gb" in record]
        if not peaks:
            lines = self.log.read_text().splitlines()
            cause = next((line for line in reversed(lines) if "Error" in line or "error:" in line), lines[-1] if lines else "")
            raise RuntimeError(f"no peak_memory_gb logged (status {self.process.returncode}): {cause.strip()[:200]}")
        return max(peaks), time.perf_counter() - self.started


def _capacity_gib(check: Check) -> float | None:
    if check.torch_device.type != "cuda":
        return None
    import torch

    return torch.cuda.get_device_properties(check.torch_device).total_memory / 2**30


def run(check: Check) -> None:
    """The three LoRA cases train together (each process has its own ``max_memory_allocated``, and together they fit
    where SFT alone needs most of the GPU), sharing the planner's probes; then SFT alone. A case predicted not to fit
    in 90% of the GPU is stopped and reported as such."""
    from sat_video.config.loader import load_config
    from sat_video.training.memory_plan import USABLE_SHARE, TrainingMemoryPlan

    report = check.report
    frames, height, width = check.sizes.train_clip
    capacity = _capacity_gib(check)
    report.text("", f"`{check.sizes.train_variant}` at {frames}x{height}x{width}, one GPU, micro-batch 1, activation "
                "checkpointing, ZeRO-2, bf16, random weights. Predicted: `TrainingMemoryPlan`, what `--estimate-memory` "
                "prints. Off by more than 20% is marked.")
    report.table(["case", "measured peak (GiB)", "predicted (GiB)", "predicted / measured", "run (s)"])
    every = cases(check)
    lora, sft = [case for case in every if case[1]], [case for case in every if not case[1]]
    probes = None
    for group in (lora, sft):
        runs = [(label, _Run(check, files, overrides, check.workdir / f"training_memory_{label.split(',')[0]}_{i}"))
                for i, (label, files, overrides) in enumerate(group)]
        for label, launched in runs:
            try:
                plan = TrainingMemoryPlan(load_config(launched.files, launched.keys), gpus=1, probes=probes)
                probes = plan.probes if group is lora else None
                predicted = plan.predict().peak_gib
                if capacity is not None and predicted > USABLE_SHARE * capacity:
                    launched.stop()
                    fits = f"not run: predicted not to fit in {USABLE_SHARE:.0%} of {capacity:.0f} GiB"
                    report.row(label, fits, f"{predicted:.3g}", "", "")
                    continue
                measured, seconds = launched.finish()
            except Exception as error:  # one case failing (out of memory, say) leaves the others to run
                launched.stop()
                report.row(label, f"**failed**: {error}", "", "", "")
                if launched.log.exists():
                    report.text("", "```", *launched.log.read_text().splitlines()[-12:], "```", "")
                continue
            ratio = predicted / measured
            mark = "" if abs(ratio - 1) <= TOLERANCE else " **off**"
            report.row(label, f"{measured:.3g}", f"{predicted:.3g}", f"{ratio:.2f}{mark}", f"{seconds:.0f}")
