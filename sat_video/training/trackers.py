"""Where a run's figures go besides ``metrics.jsonl`` (``train.report_to``): TensorBoard and Weights & Biases.

Each tracker takes the same calls from :class:`~sat_video.training.metrics.MetricsLog` on the main rank: the scalars of
every record, the validation contact sheets and videos, and once at start the config and the bucket table. TensorBoard
shows a video as a strip of its frames (its own video summaries need moviepy); wandb gets the mp4 itself. A tracker
that is not installed is refused when the run starts (:func:`check_trackers`), not at its first log.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from pathlib import Path
from typing import Protocol

import numpy as np

from sat_video.common.errors import ConfigError

INSTALL = {"tensorboard": "pip install tensorboard", "wandb": 'pip install -e ".[wandb]" (or pip install wandb)'}

STRIP_FRAMES = 8
"""Frames of a video shown in its TensorBoard strip, evenly spaced."""


class Tracker(Protocol):
    def scalars(self, values: dict[str, float], step: int) -> None: ...

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """``image``: uint8 ``[H, W, 3]``."""

    def video(self, tag: str, file: Path, frames: np.ndarray, fps: float, step: int) -> None:
        """``file``: the written mp4 of ``frames`` (uint8 ``[T, H, W, 3]``)."""

    def text(self, tag: str, text: str) -> None: ...

    def close(self) -> None: ...


def check_trackers(report_to: list[str]) -> list[str]:
    """The trackers ``train.report_to`` names (``none``: no tracker), each installed; refused otherwise, at start."""
    names = list(dict.fromkeys(report_to))
    if "none" in names and len(names) > 1:
        raise ConfigError(f"train.report_to: 'none' cannot be combined with other trackers, found {list(report_to)}")
    names = [name for name in names if name != "none"]
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError("train.report_to lists " + ", ".join(missing) + ", not installed here: "
                          + "; ".join(INSTALL[name] for name in missing) + ", or leave it out of train.report_to")
    return names


def open_trackers(names: list[str], folder: Path, config: dict) -> list[Tracker]:
    """The trackers of :func:`check_trackers`, writing under the run ``folder``; ``config``: the run's, to record."""
    opened = []
    for name in names:
        opened.append(TensorBoardTracker(folder / "tensorboard") if name == "tensorboard" else WandbTracker(folder, config))
    return opened


def frame_strip(frames: np.ndarray, count: int = STRIP_FRAMES) -> np.ndarray:
    """Up to ``count`` evenly spaced frames of ``[T, H, W, 3]`` side by side, ``[H, count * W, 3]``."""
    picks = np.unique(np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int))
    return np.concatenate(list(frames[picks]), axis=1)


class TensorBoardTracker:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def video(self, tag: str, file: Path, frames: np.ndarray, fps: float, step: int) -> None:
        self.image(tag, frame_strip(frames), step)

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, f"```\n{text}\n```", 0)  # fenced: TensorBoard renders text as markdown
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One wandb run per run folder: its id is kept in ``<save>/wandb_run_id``, so a resumed run continues the same
    curves. ``WANDB_MODE=offline`` writes it under ``<save>/wandb`` for ``wandb sync``; ``WANDB_PROJECT`` names the
    project (default ``sat_video``)."""

    def __init__(self, folder: Path, config: dict):
        import wandb

        self.wandb = wandb
        id_file = folder / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sat_video"), name=folder.name, id=run_id,
                              resume="allow", dir=str(folder), config=config)
        id_file.write_text(run_id + "\n")

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def video(self, tag: str, file: Path, frames: np.ndarray, fps: float, step: int) -> None:
        self.run.log({tag: self.wandb.Video(str(file), format="mp4")}, step=step)

    def text(self, tag: str, text: str) -> None:
        rows = [line.split() for line in text.splitlines()]
        if rows and all(len(row) == len(rows[0]) for row in rows):  # a table (the bucket table)
            self.run.log({tag: self.wandb.Table(columns=rows[0], data=rows[1:])})
        else:
            self.run.summary[tag] = text

    def close(self) -> None:
        self.run.finish()
