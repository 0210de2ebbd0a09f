"""Section *GEMM peak*: square matmuls per dtype, the yardstick for achieved FLOP/s."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sat_video.benchmarks.markdown import table
from sat_video.benchmarks.measure import interleaved_times, median

if TYPE_CHECKING:
    from sat_video.benchmarks.context import Bench


def gemm_peak(dtype: torch.dtype, device: torch.device, sizes: tuple[int, ...], reps: int) -> tuple[float, int]:
    """Best median FLOP/s of square ``n x n @ n x n`` products over ``sizes``, and the size that gave it."""
    best = (0.0, sizes[0])
    for n in sizes:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        times = interleaved_times({"mm": lambda a=a, b=b: torch.mm(a, b)}, device=device, warmup=1, reps=reps)["mm"]
        best = max(best, (2 * n**3 / median(times), n))
    return best


def run(bench: Bench) -> dict[str, tuple[float, int]]:
    """dtype label -> (FLOP/s, n)."""
    sizes = bench.preset.gemm_sizes + ((8192,) if bench.device.type == "cuda" else ())
    peaks = {label: gemm_peak(dtype, bench.device, sizes, bench.preset.reps) for label, dtype in bench.dtypes.items()}
    print("GEMM peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s (n={n})" for k, (v, n) in peaks.items()), flush=True)
    return peaks


def render(peaks: dict[str, tuple[float, int]]) -> list[str]:
    return ["## GEMM peak", "",
            table(["dtype", "best n (n x n @ n x n)", "TFLOP/s"], [[k, n, f"{v / 1e12:.3f}"] for k, (v, n) in peaks.items()])]
