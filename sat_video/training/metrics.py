"""What a run reports: one record per logged step (and per held-out evaluation) in ``<save>/metrics.jsonl``, in the
trackers (:mod:`~sat_video.training.trackers`) and as a log line, the progress bar, and how long the process took to its
first step."""

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
from omegaconf import DictConfig, OmegaConf

from sat_video.common.files import atomic_write
from sat_video.training.distributed import DistributedEnv
from sat_video.training.run_folder import RunFolder
from sat_video.training.step_memory import StepMemory
from sat_video.training.step_profile import StepProfile
from sat_video.training.trackers import Tracker, check_trackers, open_trackers

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


def _log_line(record: dict) -> None:
    logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``; ``None`` elsewhere). Under torchrun that is the worker,
    started a second or two after the command."""
    try:
        started_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime_s - started_ticks / os.sysconf("SC_CLK_TCK")


def read_metrics(save: Path) -> list[dict]:
    """The records of ``save``'s ``metrics.jsonl`` in order (none before the first is written)."""
    file = save / "metrics.jsonl"
    if not file.exists():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


class MetricsLog:
    """The steps since the last record (a log window), and where records go. Records are written by the main rank.

    ``cfg``: the run's config (``train.report_to``, ``train.progress_bar``, ``train.train_iters``; the whole of it goes to
    the trackers). A tracker that is not installed is refused here, on every rank.
    """

    def __init__(self, run_folder: RunFolder, cfg: DictConfig, env: DistributedEnv):
        self.run_folder, self.cfg, self.train, self.env = run_folder, cfg, cfg.train, env
        self._tracker_names = check_trackers(list(cfg.train.report_to))
        self.profile = StepProfile(env.device)
        self.memory: StepMemory | None = None
        """Each step's peak (the trainer sets it once the engine exists)."""
        self._loss, self._steps, self._seconds = 0.0, 0, 0.0  # the window: loss of its applied steps, time of all
        self._startup_s: float | None = None
        self._trackers: list[Tracker] | None = None
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
        _log_line(record)
        self._loss, self._steps, self._seconds = 0.0, 0, 0.0

    def write(self, record: dict, group: str = "train") -> None:
        """One line of ``metrics.jsonl``; its numbers also go to the trackers, as ``<group>/<key>`` at
        ``record["step"]``."""
        with open(self.run_folder.path / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        scalars = {f"{group}/{key}": value for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)}
        for tracker in self.trackers():
            tracker.scalars(scalars, record["step"])

    def log_evaluation(self, iteration: int, results: dict[str, dict]) -> None:
        """One record of held-out losses, ``{"live": {...}, "ema": {...}}`` (the EMA weights' keys get ``eval_ema_``)."""
        record = {"step": iteration}
        for weights, values in results.items():
            if weights == "ema":  # the same clips
                values = {key.replace("eval_", "eval_ema_", 1): value for key, value in values.items() if key != "eval_samples"}
            record.update(values)
        self.write(record, group="eval")
        _log_line(record)

    def add_image(self, tag: str, image_file: Path, iteration: int) -> None:
        """``image_file`` to the trackers."""
        trackers = self.trackers()
        if trackers:
            from PIL import Image

            image = np.asarray(Image.open(image_file).convert("RGB"))
            for tracker in trackers:
                tracker.image(tag, image, iteration)

    def add_video(self, tag: str, file: Path, frames: np.ndarray, fps: float, iteration: int) -> None:
        """The mp4 ``file`` of ``frames`` (uint8 ``[T, H, W, 3]``) to the trackers."""
        for tracker in self.trackers():
            tracker.video(tag, file, frames, fps, iteration)

    def add_text(self, tag: str, text: str) -> None:
        for tracker in self.trackers():
            tracker.text(tag, text)

    def trackers(self) -> list[Tracker]:
        """Opened at their first use, on the main rank (the others have none), with the run's config."""
        if self._trackers is None:
            self._trackers = []
            if self.env.is_main:
                config = OmegaConf.to_container(self.cfg, resolve=True)
                self._trackers = open_trackers(self._tracker_names, self.run_folder.path, config)
                for tracker in self._trackers:
                    tracker.text("config", OmegaConf.to_yaml(self.cfg))
        return self._trackers

    def close(self) -> None:
        for tracker in self._trackers or []:
            tracker.close()
        self._trackers = None
