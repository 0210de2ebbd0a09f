"""Write uint8 frames as an H.264 ``.mp4`` (synthetic data sets, sampled videos) and contact sheets as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch

from sat_video.common.errors import OutputExistsError
from sat_video.common.files import atomic_write

CRF = 10
"""x264 constant rate factor: low enough that flat colours decode within a few levels of the input."""


def write_mp4(path: str | Path, frames: np.ndarray | torch.Tensor, fps: float, *, overwrite: bool = False) -> Path:
    """Encode ``frames`` (uint8 ``[T, H, W, 3]``, RGB) as H.264 / yuv420p at ``fps``.

    The file appears complete or not at all: it is written under a temporary name in the same folder, then
    renamed. Height and width must be even (yuv420p halves the chroma planes; frames are never rescaled).

    Args:
        path: the ``.mp4`` to write; missing parent folders are created.
        frames: uint8 array or tensor ``[T, H, W, 3]`` with ``T >= 1``.
        fps: frame rate stored in the file.
        overwrite: replace an existing file instead of raising ``FileExistsError``.
    Returns:
        ``path`` as a :class:`Path`.
    """
    path = Path(path)
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"{path}: frames must be uint8 [T, H, W, 3] with T >= 1, got {frames.dtype} {list(frames.shape)}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"{path}: height and width must be even for yuv420p H.264, got {height}x{width}")
    if fps <= 0:
        raise ValueError(f"{path}: fps must be positive, got {fps}")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists (pass overwrite=True to replace it)")

    def encode(temp: Path) -> None:
        writer = imageio_ffmpeg.write_frames(
            str(temp), (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=None,
            output_params=["-crf", str(CRF)], macro_block_size=1, ffmpeg_log_level="error",
        )
        try:
            writer.send(None)  # starts ffmpeg
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
        finally:
            writer.close()  # waits for ffmpeg to finish the file

    atomic_write(path, encode, suffix=".mp4")  # ffmpeg picks the container from the extension
    return path


def contact_sheet(videos: Sequence[np.ndarray | torch.Tensor], labels: Sequence[str], *, max_frames: int = 8,
                  label_height: int = 14) -> np.ndarray:
    """One row per video: its caption, then up to ``max_frames`` evenly spaced frames side by side (uint8 RGB)."""
    from PIL import Image, ImageDraw

    rows = []
    for video, label in zip(videos, labels):
        video = video.detach().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
        picks = np.linspace(0, len(video) - 1, min(max_frames, len(video))).round().astype(int)
        strip = np.concatenate([np.pad(video[i], ((0, 0), (0, 2), (0, 0)), constant_values=255) for i in picks], axis=1)
        caption = Image.new("RGB", (strip.shape[1], label_height), "white")
        ImageDraw.Draw(caption).text((2, 1), label, fill="black")
        rows.append(np.concatenate([np.asarray(caption), strip, np.full((2, strip.shape[1], 3), 255, np.uint8)], axis=0))
    width = max(row.shape[1] for row in rows)
    return np.concatenate([np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows])


def write_png(path: str | Path, image: np.ndarray, *, overwrite: bool = False) -> Path:
    """Write a uint8 ``[H, W, 3]`` image atomically (temporary name, then rename)."""
    from PIL import Image

    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    atomic_write(path, lambda temp: Image.fromarray(np.ascontiguousarray(image)).save(temp), suffix=".png")
    return path
