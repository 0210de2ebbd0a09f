"""Synthetic captioned videos: one large coloured shape crossing a plain background.

Used by the tests and the built-in demo. Shape, colour and direction are each visible in every frame
and named in the caption ("a red circle moving left"), so even a tiny model can learn all three, and
:func:`describe_clip` reads them back from any clip (a generated one included), so a demo can count how
many of its samples match their captions instead of leaving it to the eye.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np

from .video_io import write_mp4

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (30, 70, 235), "yellow": (240, 220, 30)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = (24, 24, 24)
"""Dark grey: every colour above stands out from it."""
NUM_COMBINATIONS = len(SHAPES) * len(COLOURS) * len(DIRECTIONS)
# Fraction of its bounding box a shape fills: triangle 0.5, circle pi/4, square 1 (in between: the cut-offs).
FILL_CUTOFFS = ((0.65, "triangle"), (0.86, "circle"), (float("inf"), "square"))
FOREGROUND_DISTANCE = 120
"""A pixel whose summed |RGB - BACKGROUND| exceeds this belongs to the shape."""


def combination(index: int) -> tuple[str, str, str]:
    """(shape, colour, direction) of video ``index``: all three change from one video to the next, and any
    ``NUM_COMBINATIONS`` consecutive videos hold every combination once (3 and 4 are coprime, and the
    direction moves one step further each lap of the 12 shape x colour pairs)."""
    colours, directions = list(COLOURS), list(DIRECTIONS)
    laps = index // (len(SHAPES) * len(colours))
    return SHAPES[index % len(SHAPES)], colours[index % len(colours)], directions[(index + laps) % len(directions)]


def _shape_mask(shape: str, ys: np.ndarray, xs: np.ndarray, cy: float, cx: float, radius: float) -> np.ndarray:
    dy, dx = ys - cy, xs - cx
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        half = 0.85 * radius  # about the circle's area
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # Upward triangle: width grows linearly from the apex (dy = -radius) to the base (dy = radius).
    return (np.abs(dy) <= radius) & (np.abs(dx) <= 0.6 * (dy + radius))


def render_clip(shape: str, colour: str, direction: str, num_frames: int, height: int, width: int,
                rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[num_frames, height, width, 3]``: the shape travels from one edge to the opposite one."""
    radius = min(height, width) * rng.uniform(0.22, 0.28)
    step_x, step_y = DIRECTIONS[direction]
    # The shape travels along the motion axis from one edge to the other; its place across the axis is random.
    along = np.linspace(-1.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    across = rng.uniform(-1.0, 1.0)
    travel_x, travel_y = width / 2 - radius - 1, height / 2 - radius - 1
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        offset_x = step_x * along[t] if step_x else across
        offset_y = step_y * along[t] if step_y else across
        mask = _shape_mask(shape, ys, xs, height / 2 + offset_y * travel_y, width / 2 + offset_x * travel_x, radius)
        frames[t] = BACKGROUND
        frames[t][mask] = COLOURS[colour]
    return frames


def make_moving_shapes(root: str | Path, num_videos: int, num_frames: int, height: int, width: int, fps: float,
                       seed: int, layout: Literal["sft", "jsonl"] = "sft", *, overwrite: bool = False) -> list[tuple[Path, str]]:
    """Write ``num_videos`` captioned ``.mp4`` files of moving shapes under ``root``.

    Args:
        root: output folder.
        num_videos: number of videos; combinations of shape x colour x direction cycle (see :func:`combination`).
        num_frames, height, width, fps: size of every video (height and width even, see :func:`write_mp4`).
        seed: the same seed gives the same files (shape size and the position across the motion axis).
        layout: ``"sft"``: ``root/videos/<name>.mp4`` + ``root/labels/<name>.txt`` (SAT's SFT layout);
            ``"jsonl"``: ``root/videos/<name>.mp4`` + ``root/metadata.jsonl`` lines ``{"path", "caption"}``.
        overwrite: replace existing files instead of raising ``FileExistsError``.
    Returns:
        ``(video path, caption)`` of every video, in order.
    """
    if layout not in ("sft", "jsonl"):
        raise ValueError(f"layout must be 'sft' or 'jsonl', got {layout!r}")
    root = Path(root)
    metadata = root / "metadata.jsonl"
    if layout == "jsonl" and metadata.exists() and not overwrite:
        raise FileExistsError(f"{metadata} already exists (pass overwrite=True to replace it)")
    rng = np.random.default_rng(seed)
    written = []
    for index in range(num_videos):
        shape, colour, direction = combination(index)
        caption = f"a {colour} {shape} moving {direction}"
        name = f"{index:05d}_{colour}_{shape}_{direction}"
        frames = render_clip(shape, colour, direction, num_frames, height, width, rng)
        path = write_mp4(root / "videos" / f"{name}.mp4", frames, fps, overwrite=overwrite)
        if layout == "sft":
            (root / "labels").mkdir(parents=True, exist_ok=True)
            (root / "labels" / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
        written.append((path, caption))
    if layout == "jsonl":
        lines = [json.dumps({"path": path.relative_to(root).as_posix(), "caption": caption}) for path, caption in written]
        metadata.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return written


def describe_clip(frames: np.ndarray) -> tuple[str, str, str]:
    """``(shape, colour, direction)`` of a clip ``[T, H, W, 3]`` uint8 showing one shape on the background.

    Shape from how much of its bounding box the shape fills (median over frames), colour as the palette entry
    nearest to the median foreground pixel, direction from the centroid's travel between the first and the
    last quarter of the frames. Raises ``ValueError`` when no frame shows a shape.
    """
    frames = np.asarray(frames, dtype=np.float32)
    masks = np.abs(frames - np.asarray(BACKGROUND, np.float32)).sum(-1) > FOREGROUND_DISTANCE  # [T, H, W]
    shown = [t for t in range(len(frames)) if masks[t].any()]
    if not shown:
        raise ValueError("describe_clip: no frame shows a shape (every pixel is close to the background)")
    fills, centroids = [], []
    for t in shown:
        ys, xs = np.nonzero(masks[t])
        fills.append(len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
        centroids.append((xs.mean(), ys.mean()))
    fill = float(np.median(fills))
    shape = next(name for cutoff, name in FILL_CUTOFFS if fill < cutoff)
    pixel = np.median(frames[masks], axis=0)
    colour = min(COLOURS, key=lambda name: float(np.sum((np.asarray(COLOURS[name]) - pixel) ** 2)))
    quarter = max(len(centroids) // 4, 1)
    travel = np.mean(centroids[-quarter:], axis=0) - np.mean(centroids[:quarter], axis=0)  # (dx, dy)
    direction = max(DIRECTIONS, key=lambda name: float(np.dot(DIRECTIONS[name], travel)))
    return shape, colour, direction
