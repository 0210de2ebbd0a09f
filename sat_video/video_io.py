"""Write uint8 frames as an H.264 ``.mp4`` (synthetic data sets, sampled videos)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch

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
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    # ffmpeg picks the container from the extension, so the temporary name keeps ".mp4".
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".mp4")
    os.close(handle)
    writer = imageio_ffmpeg.write_frames(
        temp_name, (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=None,
        output_params=["-crf", str(CRF)], macro_block_size=1, ffmpeg_log_level="error",
    )
    try:
        writer.send(None)  # starts ffmpeg
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()  # waits for ffmpeg to finish the file
        os.replace(temp_name, path)
    except BaseException:
        writer.close()
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path
