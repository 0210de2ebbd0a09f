"""Section *Mixed sizes*: training steps on clips of three aspect ratios, cropped to one size vs a bucket per aspect
ratio (``data.buckets``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sat_video.benchmarks.markdown import table
from sat_video.benchmarks.training_steps import train_assets, train_steps

if TYPE_CHECKING:
    from sat_video.benchmarks.context import Bench

BUCKET_CLIPS = {"wide": (72, 128), "four_three": (96, 128), "tall": (128, 80)}
"""Folder -> clip height, width of the bucket comparison: 16:9, 4:3 and portrait."""
BUCKETS = "data.buckets=[[13,64,112],[13,48,64],[13,112,64]]"


def run(bench: Bench) -> dict:
    """The same clips of three aspect ratios trained at one size (cropped to the square default) and with a bucket
    per aspect ratio: ``rows``, and ``videos`` per aspect ratio."""
    from sat_video.fixtures.synthetic import make_moving_shapes

    videos = bench.preset.train_videos
    folders = []
    for seed, (name, (height, width)) in enumerate(BUCKET_CLIPS.items()):
        make_moving_shapes(bench.workdir / "bucket_clips" / name, videos, 16, height, width, 8, seed)
        folders.append(bench.workdir / "bucket_clips" / name)
    assets = train_assets(bench)
    rows = [train_steps(bench, assets, "one size (64 x 64, cropped)", sources=folders),
            train_steps(bench, assets, "3 buckets (64 x 112, 48 x 64, 112 x 64)", (BUCKETS,), sources=folders)]
    for row in rows:
        print(f"training step, {row['input']}: {row['samples_per_s']:.2f} samples/s, {row['tokens_per_s']:.0f} tokens/s",
              flush=True)
    return {"rows": rows, "videos": videos}


def render(result: dict) -> list[str]:
    return [
        "## Mixed sizes: buckets vs one size (tools/train_video.py)",
        "",
        f"{3 * result['videos']} clips of 16 frames, a third each at 72 x 128 (16:9), 96 x 128 (4:3) and 128 x 80 "
        "(portrait), trained as in the previous section: once at the one 13 x 64 x 64 size (each clip resized to cover "
        f"it and center-cropped), once with `{BUCKETS}` (each clip at its aspect ratio). Video tokens/s counts each "
        "step's tokens from its bucket; no bucket is padded.",
        "",
        table(["clip sizes", "micro-batch", "steps timed", "step (s)", "samples/s", "video tokens/s"],
              [[r["input"], r["batch"], r["steps"], f"{r['time']:.3f}", f"{r['samples_per_s']:.2f}",
                f"{r['tokens_per_s']:.0f}"] for r in result["rows"]]),
    ]
