"""Section *Activation checkpointing*: sat_video's DiT step with checkpointing off, on (keeping the attention outputs)
and recomputing everything: step time, activation memory, and what the forward pass leaves for backward."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sat_video.benchmarks import kernel_profile
from sat_video.benchmarks.dit_pair import DiTPair
from sat_video.benchmarks.markdown import table
from sat_video.benchmarks.measure import MIB, gradient_bytes, interleaved_times, median, saved_bytes, step_peak_bytes

if TYPE_CHECKING:
    from sat_video.benchmarks.context import Bench

# Activation checkpointing modes: (model.activation_checkpointing, model.checkpoint_keeps_attention).
MODES = {"off": (False, True), "on": (True, True), "recompute all": (True, False)}
LABELS = {"off": "off", "on": "on (keeps attention outputs; the default)", "recompute all": "on, recompute all"}


def run(bench: Bench) -> dict:
    """``rows``: one per dtype at the preset's checkpointing size; ``attention``: dtype -> attention's share of
    sat_video's step in the profile (the note on what checkpointing recomputes)."""
    size = next(s for s in bench.preset.dits if s.name == bench.preset.checkpointing)
    pair = DiTPair(size.load(bench.configs), size.batch, bench.device)
    rows = [_row(size.name, label, pair, dtype, bench) for label, dtype in bench.dtypes.items()]
    attention = {r["dtype"]: r["attention"] for r in bench.rows(kernel_profile) if r["impl"] == "sat_video"}
    return {"rows": rows, "attention": attention}


def _row(size: str, label: str, pair: DiTPair, dtype: torch.dtype, bench: Bench) -> dict:
    model, step, forward = pair.ours, pair.step(pair.ours, dtype), pair.forward(pair.ours, dtype)

    def in_mode(mode: str, fn):
        def run():
            model.activation_checkpointing, model.checkpoint_keeps_attention = MODES[mode]
            return fn()

        return run

    variants = {mode: in_mode(mode, step) for mode in MODES}
    times = interleaved_times(variants, device=bench.device, warmup=bench.preset.warmup, reps=bench.preset.reps)
    grads = gradient_bytes(model)
    row = {"size": size, "dtype": label}
    for mode, fn in variants.items():
        row[mode] = {
            "time": median(times[mode]),
            "activations": step_peak_bytes(fn, bench.device) - grads,
            "saved": saved_bytes(in_mode(mode, forward), bench.device),
        }
    model.activation_checkpointing, model.checkpoint_keeps_attention = MODES["off"]
    print(
        f"checkpointing {size} {label}: "
        + ", ".join(f"{mode} {row[mode]['time']:.3f}s {row[mode]['activations'] / MIB:.0f} MiB" for mode in MODES),
        flush=True,
    )
    return row


def reduction(row: dict, mode: str = "on") -> float:
    """Activation memory off / ``mode``; infinite when checkpointing leaves nothing above the gradients (tiny models)."""
    on = row[mode]["activations"]
    return row["off"]["activations"] / on if on > 0 else float("inf")


def render(result: dict) -> list[str]:
    return [
        "## Activation checkpointing (sat_video)",
        "",
        "*Activations* = peak bytes of the step minus the gradients'; with checkpointing that "
        "peak can come late in the backward pass, when most gradients exist, which hides how much the forward pass keeps; "
        "*saved after forward* (what the forward pass leaves for backward, output included) shows that.",
        "",
        *_note(result["attention"]),
        table(
            ["size", "dtype", "checkpointing", "step (s)", "extra time", "activations (MiB)", "reduction",
             "saved after forward (MiB)", "reduction"],
            [
                [
                    r["size"],
                    r["dtype"],
                    LABELS[mode],
                    f"{r[mode]['time']:.3f}",
                    f"{r[mode]['time'] / r['off']['time'] - 1:+.0%}",
                    f"{r[mode]['activations'] / MIB:.0f}",
                    f"{reduction(r, mode):.1f}x",
                    f"{r[mode]['saved'] / MIB:.0f}",
                    f"{r['off']['saved'] / r[mode]['saved']:.1f}x",
                ]
                for r in result["rows"]
                for mode in MODES
            ],
        ),
    ]


def _note(attention: dict[str, float]) -> list[str]:
    if not attention:
        return []
    return [
        "Checkpointing recomputes each block's forward pass during backward. By default it keeps the outputs of the "
        "attention kernels (`DiffusionTransformer.checkpoint_keeps_attention`, one `[B, N, D]` tensor and the softmax "
        "statistics per block), so the attention forward kernel does not run twice; attention is "
        + " and ".join(f"{share:.0%} of the {dtype} step" for dtype, share in attention.items())
        + " (profile above). *Recompute all* (`train.checkpoint_keeps_attention: false`) keeps only each block's input.",
        "",
    ]
