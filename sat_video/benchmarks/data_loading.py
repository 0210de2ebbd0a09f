"""Section *Data loading*: clips/s through the trainer's data path, ``VideoDataset`` (decord) and the DataLoader with
0..N workers."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import torch

from sat_video.benchmarks.markdown import table

if TYPE_CHECKING:
    from sat_video.benchmarks.context import Bench


def run(bench: Bench) -> dict:
    """``rows``: clips/s per worker count; ``clip`` (frames, height, width) and ``videos``: what was decoded."""
    from sat_video.data.clips import ClipSpec, VideoDataset, collate
    from sat_video.data.sampler import ClipBatchSampler
    from sat_video.data.sources import discover
    from sat_video.fixtures.synthetic import make_moving_shapes

    preset = bench.preset
    frames, height, width = preset.clip
    folder = bench.workdir / "clips"
    make_moving_shapes(folder, num_videos=preset.clip_videos, num_frames=frames, height=height, width=width, fps=8, seed=0)
    refs = discover([folder])
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
    return {"rows": rows, "clip": preset.clip, "videos": preset.clip_videos}


def render(result: dict) -> list[str]:
    frames, height, width = result["clip"]
    return [
        "## Data loading (decord + DataLoader workers)",
        "",
        f"Clips of {frames} frames at {height}x{width} (8 fps) from {result['videos']} "
        "synthetic mp4 files of that size. With 0 workers the main process decodes and resizes with all torch threads; "
        "each worker process uses one thread (the DataLoader's default).",
        "",
        table(["workers", "clips/s"], [[r["workers"], f"{r['clips_per_s']:.2f}"] for r in result["rows"]]),
    ]
