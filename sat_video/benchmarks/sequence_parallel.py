"""Section *Sequence parallelism*: the DiT step in one process vs split over two (torchrun, DeepSpeed-Ulysses):
per-rank activation memory and the share of the step spent in collectives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING

import torch

from sat_video.benchmarks import sequence_parallel_rank
from sat_video.benchmarks.markdown import table
from sat_video.benchmarks.measure import MIB

if TYPE_CHECKING:
    from sat_video.benchmarks.context import Bench


def run(bench: Bench) -> dict:
    """The DiT step of ``preset.sequence_parallel`` in this process, then split over two processes (torchrun) that
    share the same threads (CPU) or take one GPU each: ``rows`` (one per split) and the ``size``."""
    size, preset = bench.preset.sequence_parallel, bench.preset
    args = {"config": str(bench.configs / f"{size.variant}.yaml"), "overrides": list(size.overrides),
            "batch": size.batch, "warmup": preset.warmup, "reps": preset.reps, "device": str(bench.device)}
    rows = [{"size": size.name, **sequence_parallel_rank.measure(args)}]
    if bench.device.type == "cuda" and torch.cuda.device_count() < 2:
        print("sequence parallelism: one GPU here, the split row needs two", flush=True)
        return {"rows": rows, "size": size}
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, bench.threads // 2))}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "-m", sequence_parallel_rank.__name__, json.dumps(args)]
    proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"the sequence-parallel benchmark failed:\n{proc.stderr[-3000:]}")
    rows.append({"size": size.name, **json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])})
    for row in rows:
        print(f"sequence parallelism {row['split']} process(es): {row['time']:.3f}s, {row['activations'] / MIB:.0f} MiB "
              f"activations per rank, {row['communication']:.0%} in collectives", flush=True)
    return {"rows": rows, "size": size}


def render(result: dict) -> list[str]:
    size, rows = result["size"], result["rows"]
    return [
        "## Sequence parallelism (DeepSpeed-Ulysses)",
        "",
        f"**{size.name}** = `{size.variant}` with {', '.join(o.split('.')[-1] for o in size.overrides)}, batch {size.batch}: "
        "the DiT step (fp32) in one process, then split over two (`parallel.sequence_parallel_size=2`; on CPU the two "
        "processes share the threads the one process had, over gloo).",
        "",
        table(
            ["processes", "video tokens", "tokens per rank", "step (s)", "activations per rank (MiB)", "vs one process",
             "collectives (share of step)"],
            [[r["split"], r["video_tokens"], r["tokens_per_rank"], f"{r['time']:.3f}", f"{r['activations'] / MIB:.0f}",
              f"{r['activations'] / rows[0]['activations']:.2f}x", f"{r['communication']:.0%}"] for r in rows],
        ),
    ]
