"""Section *DiT forward + backward*: sat_video and diffusers' ``CogVideoXTransformer3DModel`` with identical weights,
alternating in one process, per dtype; optionally sat_video with every block ``torch.compile``'d."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from sat_video.benchmarks import gemm_peak
from sat_video.benchmarks.dit_pair import DiTPair
from sat_video.benchmarks.markdown import table
from sat_video.benchmarks.measure import MIB, count_flops, interleaved_times, median, step_peak_bytes

if TYPE_CHECKING:
    from sat_video.benchmarks.context import Bench

COMPILED = "sat_video + torch.compile"


def run(bench: Bench) -> list[dict]:
    """One row per size and dtype: medians of both implementations' step time, peak memory, FLOPs and the fraction
    of the GEMM peak they reach."""
    peaks = {label: flops for label, (flops, _) in bench.rows(gemm_peak).items()}
    rows = []
    for size in bench.preset.dits:
        pair = DiTPair(size.load(bench.configs), size.batch, bench.device)
        if bench.compile_blocks:  # as train.compile does; the first call compiles
            compiled = copy.deepcopy(pair.ours)
            compiled.compile_blocks()
        for label, dtype in bench.dtypes.items():
            steps = pair.steps(dtype)
            if bench.compile_blocks:
                steps[COMPILED] = pair.step(compiled, dtype)
            times = interleaved_times(steps, device=bench.device, warmup=bench.preset.warmup, reps=bench.preset.reps)
            # per round, sat_video / diffusers: the spread shows how much the machine moved during the measurement
            paired = [a / b for a, b in zip(times["sat_video"], times["diffusers"])]
            row = {"size": size, "dtype": label, "tokens": pair.tokens, "params": pair.params,
                   "paired": (min(paired), max(paired))}
            for name in ("sat_video", "diffusers"):
                flops = count_flops(steps[name])
                row[name] = {
                    "time": median(times[name]),
                    "peak": step_peak_bytes(steps[name], bench.device),
                    "flops": flops,
                    "fraction": flops / median(times[name]) / peaks[label],
                }
            if bench.compile_blocks:  # same FLOPs as eager; inductor's kernels allocate outside the dispatcher, so no CPU memory
                row[COMPILED] = {
                    "time": median(times[COMPILED]),
                    "fraction": row["sat_video"]["flops"] / median(times[COMPILED]) / peaks[label],
                }
            rows.append(row)
            print(_line(row), flush=True)
        del pair, steps
    return rows


def _line(row: dict) -> str:
    ours, theirs = row["sat_video"], row["diffusers"]
    compiled = f", compiled {row[COMPILED]['time']:.3f}s" if COMPILED in row else ""
    return (
        f"{row['size'].name} {row['dtype']}: sat_video {ours['time']:.3f}s / diffusers {theirs['time']:.3f}s "
        f"= {ours['time'] / theirs['time']:.2f}x time, {ours['peak'] / theirs['peak']:.2f}x memory, "
        f"{ours['fraction']:.0%} of GEMM peak{compiled}"
    )


def render(rows: list[dict]) -> list[str]:
    sizes = dict.fromkeys(r["size"] for r in rows)
    lines = [
        "## DiT forward + backward, sat_video vs diffusers",
        "",
        "Sizes: "
        + "; ".join(f"**{s.name}** = `{s.variant}` with {', '.join(o.split('.')[-1] for o in s.overrides)}, batch {s.batch}"
                    for s in sizes)
        + ".",
        "",
        table(
            ["size", "dtype", "tokens", "params", "sat_video step (s)", "diffusers step (s)", "time ratio (range per round)",
             "sat_video peak (MiB)", "diffusers peak (MiB)", "memory ratio", "sat_video FLOP/s (of peak)",
             "diffusers FLOP/s (of peak)"],
            [
                [
                    r["size"].name,
                    r["dtype"],
                    r["tokens"],
                    f"{r['params'] / 1e6:.1f}M",
                    f"{r['sat_video']['time']:.3f}",
                    f"{r['diffusers']['time']:.3f}",
                    f"{r['sat_video']['time'] / r['diffusers']['time']:.2f} ({r['paired'][0]:.2f}-{r['paired'][1]:.2f})",
                    f"{r['sat_video']['peak'] / MIB:.0f}",
                    f"{r['diffusers']['peak'] / MIB:.0f}",
                    f"{r['sat_video']['peak'] / r['diffusers']['peak']:.2f}",
                    *(f"{r[i]['flops'] / r[i]['time'] / 1e9:.1f} G ({r[i]['fraction']:.0%})" for i in ("sat_video", "diffusers")),
                ]
                for r in rows
            ],
        ),
    ]
    compiled = [r for r in rows if COMPILED in r]
    if compiled:
        lines += [
            "",
            "### sat_video with torch.compile (each block compiled, inductor)",
            "",
            table(
                ["size", "dtype", "eager step (s)", "compiled step (s)", "compiled / eager", "compiled / diffusers",
                 "compiled FLOP/s (of peak)"],
                [
                    [
                        r["size"].name,
                        r["dtype"],
                        f"{r['sat_video']['time']:.3f}",
                        f"{r[COMPILED]['time']:.3f}",
                        f"{r[COMPILED]['time'] / r['sat_video']['time']:.2f}",
                        f"{r[COMPILED]['time'] / r['diffusers']['time']:.2f}",
                        f"{r['sat_video']['flops'] / r[COMPILED]['time'] / 1e9:.1f} G ({r[COMPILED]['fraction']:.0%})",
                    ]
                    for r in compiled
                ],
            ),
        ]
    return lines
