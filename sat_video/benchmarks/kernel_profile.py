"""Section *Where the time goes*: one profiled DiT step per implementation and dtype, its time split into matmuls,
attention and everything else."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sat_video.benchmarks.dit_pair import DiTPair
from sat_video.benchmarks.markdown import table
from sat_video.benchmarks.presets import DTYPES

if TYPE_CHECKING:
    from sat_video.benchmarks.context import Bench

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::convolution_backward", "aten::mkldnn_convolution")


def run(bench: Bench) -> list[dict]:
    """Share of one step's time in matmuls, attention and everything else, at the FLOP-target size."""
    from torch.profiler import ProfilerActivity, profile

    size = next((s for s in bench.preset.dits if s.flops_target), bench.preset.dits[-1])
    pair = DiTPair(size.load(bench.configs), size.batch, bench.device)
    cuda = bench.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    field = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = []
    for label, dtype in bench.dtypes.items():
        for name, fn in pair.steps(dtype).items():
            fn()  # warm-up outside the profile
            with profile(activities=activities) as prof:
                fn()
            groups = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
            for event in prof.key_averages():
                key = ("attention" if "scaled_dot_product" in event.key else "matmul" if event.key in MATMUL_OPS
                       else "other")
                groups[key] += getattr(event, field)
            total = sum(groups.values())
            top = sorted(prof.key_averages(), key=lambda e: getattr(e, field), reverse=True)[:5]
            rows.append(
                {
                    "size": size.name,
                    "dtype": label,
                    "impl": name,
                    "total_ms": total / 1e3,
                    **{k: v / total for k, v in groups.items()},
                    "top": ", ".join(f"{e.key.removeprefix('aten::')} {getattr(e, field) / total:.0%}" for e in top),
                }
            )
    return rows


def render(rows: list[dict]) -> list[str]:
    return [
        "## Where the time goes",
        "",
        "One profiled step per implementation (torch.profiler, self time per operator); *matmul* is mm / addmm / bmm "
        "and the patch convolution, *attention* the SDPA kernels, forward and backward.",
        "",
        table(
            ["size", "dtype", "implementation", "step (ms, profiled)", "matmul", "attention", "other", "top operators"],
            [[r["size"], r["dtype"], r["impl"], f"{r['total_ms']:.0f}", f"{r['matmul']:.0%}", f"{r['attention']:.0%}",
              f"{r['other']:.0%}", r["top"]] for r in rows],
        ),
        "",
        *_dominance(rows),
    ]


def _dominance(rows: list[dict]) -> list[str]:
    """What the profile says about the room left for sat_video to differ from diffusers, in numbers."""
    lines = []
    for dtype in DTYPES:
        by_impl = {r["impl"]: r for r in rows if r["dtype"] == dtype}
        if len(by_impl) == 2:
            ours, theirs = by_impl["sat_video"], by_impl["diffusers"]
            lines.append(
                f"* {dtype} ({ours['size']}): matmul + attention kernels take {ours['matmul'] + ours['attention']:.0%} of "
                f"sat_video's step and {theirs['matmul'] + theirs['attention']:.0%} of diffusers' (attention alone "
                f"{ours['attention']:.0%} / {theirs['attention']:.0%}); everything else, where the two implementations "
                f"differ, {ours['other']:.0%} / {theirs['other']:.0%}. With none of that left, sat_video's step would "
                f"still take about {theirs['matmul'] + theirs['attention']:.2f}x diffusers'."
            )
    return [
        "Both implementations run the same PyTorch GEMM and attention kernels on the same shapes (sat_video projects "
        "q, k and v with one GEMM where diffusers runs three), so their step times can differ only by the element-wise "
        "work, copies and framework overhead around those kernels:",
        "",
        *lines,
    ]
