"""Section *Targets*: each target of the benchmarks against what the other sections measured."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sat_video.benchmarks import checkpointing, dit_steps, mixed_sizes, sequence_parallel, training_steps
from sat_video.benchmarks.markdown import met, table

if TYPE_CHECKING:
    from sat_video.benchmarks.context import Bench

SUMMARY = True
"""Reads the rows of the measuring sections, so runs after them."""


def run(bench: Bench) -> list[list[str]]:
    """``[target, measured, met]`` per target."""
    rows = []
    dits = bench.rows(dit_steps)
    for row in dits:
        ours, theirs = row["sat_video"], row["diffusers"]
        ratio = ours["time"] / theirs["time"]
        memory = ours["peak"] / theirs["peak"]
        where = f"{row['size'].name}, {row['dtype']}"
        rows.append([f"DiT step time <= 0.85x diffusers ({where})", f"{ratio:.2f}x", met(ratio <= 0.85)])
        rows.append([f"DiT peak memory <= diffusers ({where})", f"{memory:.2f}x", met(memory <= 1.0)])
    for row in dits:
        if row["size"].flops_target and row["dtype"] == "fp32":
            fraction = row["sat_video"]["fraction"]
            rows.append([f"achieved FLOP/s >= 60% of the fp32 GEMM peak ({row['size'].name})", f"{fraction:.0%}",
                         met(fraction >= 0.6)])
    for row in bench.rows(checkpointing)["rows"]:
        reduction = checkpointing.reduction(row)
        extra = row["on"]["time"] / row["off"]["time"] - 1
        rows.append([f"checkpointing: activation memory down >= 3x ({row['size']}, {row['dtype']})", f"{reduction:.1f}x",
                     met(reduction >= 3)])
        rows.append([f"checkpointing: <= 35% extra step time ({row['size']}, {row['dtype']})", f"{extra:+.0%}",
                     met(extra <= 0.35)])
    training = bench.rows(training_steps)
    raw = [r for r in training if r["input"] == "raw video"]
    for row in training:
        if raw and row["input"] != "raw video":
            speedup = raw[0]["time"] / row["time"]
            rows.append([f"training step from {row['input']} >= 3x faster than from raw video", f"{speedup:.1f}x",
                         met(speedup >= 3)])
    buckets = bench.rows(mixed_sizes)["rows"]
    if len(buckets) == 2:
        per_token = buckets[0]["tokens_per_s"] / buckets[1]["tokens_per_s"]  # bucketed time per token / one size's
        rows.append(["buckets: time per video token <= 1.05x one size (same clips)", f"{per_token:.2f}x", met(per_token <= 1.05)])
    split = bench.rows(sequence_parallel)["rows"]
    if len(split) == 2:
        ratio = split[1]["activations"] / split[0]["activations"]
        rows.append([f"sequence parallelism: activations per rank <= 0.6x one process (S=2, {split[0]['size']})",
                     f"{ratio:.2f}x", met(ratio <= 0.6)])
    return rows


def render(rows: list[list[str]]) -> list[str]:
    return [
        "## Targets",
        "",
        table(["target", "measured", "met"], rows),
        "",
        "Every figure comes from the sections below; *Where the time goes* shows what dominates the DiT step, and so "
        "what a missed step-time or checkpointing target is made of.",
    ]
