"""What a run reports: one record per logged step in ``<save>/metrics.jsonl``, in TensorBoard and as a log line, the
progress bar, and how long the process took to its first step."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from sat_video.common.files import atomic_write
from sat_video.training.distributed import DistributedEnv
from sat_video.training.run_folder import RunFolder
from sat_video.training.step_memory import StepMemory
from sat_video.training.step_profile import StepProfile

logger = logging.getLogger("sat_video.train")


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"memory_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "memory_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"cpu_peak_rss_gb": peak_rss_bytes() / 2**30}


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux's ``ru_maxrss`` also counts the process it was forked from (exec
    keeps the larger of the old and new peaks), so a run launched by a large parent would report the parent's peak;
    ``VmHWM`` belongs to this program's own address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``; ``None`` elsewhere). Under torchrun that is the worker,
    started a second or two after the command."""
    try:
        started_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime_s - started_ticks / os.sysconf("SC_CLK_TCK")


class MetricsLog:
    """The steps since the last record (a log window), and where records go. Records are written by the main rank.

    ``train``: the ``train`` section (``tensorboard``, ``progress_bar``, ``train_iters``).
    """

    def __init__(self, run_folder: RunFolder, train: DictConfig, env: DistributedEnv):
        self.run_folder, self.train, self.env = run_folder, train, env
        self.profile = StepProfile(env.device)
        self.memory: StepMemory | None = None
        """Each step's peak (the trainer sets it once the engine exists)."""
        self._loss, self._steps, self._seconds = 0.0, 0, 0.0  # the window: loss of its applied steps, time of all
        self._startup_s: float | None = None
        self._writer = None
        self._progress = None

    def truncate(self, iteration: int) -> None:
        """Drop metric lines a killed run wrote after the checkpoint we resume from."""
        file = self.run_folder.path / "metrics.jsonl"
        if file.is_file():
            kept = [line for line in file.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= iteration]
            atomic_write(file, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))

    @contextlib.contextmanager
    def progress(self, done: int) -> Iterator[None]:
        """The progress bar (main rank, ``train.progress_bar``) while the loop runs, from ``done`` iterations."""
        if self.env.is_main and self.train.progress_bar:
            from tqdm import tqdm

            self._progress = tqdm(total=self.train.train_iters, initial=done, desc="train", dynamic_ncols=True)
        try:
            yield
        finally:
            if self._progress is not None:
                self._progress.close()
                self._progress = None

    def first_step_done(self) -> None:
        """Logged now and recorded once, in the next record."""
        self._startup_s = process_age_s()
        if self._startup_s is not None and self.env.is_main:
            logger.info("first step done %.1f s after the process started", self._startup_s)

    def add_step(self, loss: float | None, seconds: float) -> None:
        """A step of ``seconds`` joins the window; ``loss`` is ``None`` for a skipped step."""
        if loss is not None:
            self._loss += loss
            self._steps += 1
        self._seconds += seconds
        if self._progress is not None:
            self._progress.update(1)

    def log(self, iteration: int, lr: float, grad_norm: float | None, global_batch: int, skipped_steps: int,
            data: dict) -> None:
        """Record the window up to ``iteration`` and start a new one; ``data``: the data pipeline's fields."""
        steps = max(self._steps, 1)
        record = {
            "step": iteration,
            "loss": self._loss / steps if self._steps else float("nan"),
            "lr": lr,
            "grad_norm": grad_norm,
            "samples_per_s": global_batch * steps / max(self._seconds, 1e-9),
            "step_time_s": self._seconds / steps,
            "skipped_steps": skipped_steps,
            **memory_stats(self.env.device),
            **self.profile.take(steps),
            **(self.memory.take() if self.memory is not None else {}),
            **data,
        }
        if self._startup_s is not None:  # once: in the first record after this process's first step
            record["startup_s"], self._startup_s = self._startup_s, None
        self.write(record)
        logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        self._loss, self._steps, self._seconds = 0.0, 0, 0.0

    def write(self, record: dict) -> None:
        """One line of ``metrics.jsonl``; its numbers also go to TensorBoard, as ``train/<key>`` at ``record["step"]``."""
        with open(self.run_folder.path / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(f"train/{key}", value, record["step"])
            writer.flush()

    def add_image(self, tag: str, image_file: Path, iteration: int) -> None:
        """``image_file`` to TensorBoard, when it is on."""
        writer = self._tensorboard()
        if writer is not None:
            from PIL import Image

            image = np.asarray(Image.open(image_file).convert("RGB"))
            writer.add_image(tag, image, iteration, dataformats="HWC")
            writer.flush()

    def _tensorboard(self):
        if self.train.tensorboard and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_folder.path / "tensorboard"))
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
