"""Section *Training memory: the planner against measured peaks*: :class:`~sat_video.training.memory_plan.TrainingMemoryPlan`
(what ``tools/train_video.py --estimate-memory`` prints) against the ``peak_memory_gb`` that real tiny runs of
``tools/train_video.py`` log with ``train.measure_memory=true``, for LoRA and SFT under ZeRO-2 and ZeRO-3 at clip sizes
the planner's tests do not use (held out). Each run is a fresh process. Regenerates alone:
``tools/bench.py --only training_memory``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sat_video.benchmarks.markdown import met, regenerate_alone, table
from sat_video.benchmarks.measure import MIB

if TYPE_CHECKING:
    from sat_video.benchmarks.context import Bench

STANDALONE = "training_memory"
TOLERANCE = 0.20
"""The planner's claim: within 20% of the measured peak."""
RECIPES = {"LoRA": ("model.dit.mixins.lora.type=lora", "model.dit.mixins.lora.rank=8", "train.trainable=[mixins.lora.*]"),
           "SFT": ()}
# As the planner's tests run: fp32 (the CPU's dtype), no encoding ahead (its concurrent peak is a GPU matter), and a
# small gradient bucket, since DeepSpeed's default (5e8 elements, allocated whatever the model's size) would be nearly
# all of a tiny run's peak and hide the activations, states and frozen stages.
SETUP = ("data.prefetch=0", "deepspeed.extra.zero_optimization.reduce_bucket_size=20000", "deepspeed.precision=fp32",
         "train.activation_checkpointing=true", "train.measure_memory=true", "train.log_interval=1")


@dataclass(frozen=True)
class MemoryGrid:
    """The runs: every recipe x ZeRO stage x clip size (frames, height, width), ``steps`` optimizer steps each."""

    recipes: tuple[str, ...]
    stages: tuple[int, ...]
    sizes: tuple[tuple[int, int, int], ...]
    steps: int = 2


def run(bench: Bench) -> dict:
    """``rows``: one per run; ``command``: what regenerates the section."""
    from sat_video.benchmarks.training_steps import run_program, train_assets
    from sat_video.config.loader import load_config
    from sat_video.training.memory_plan import TrainingMemoryPlan
    from sat_video.training.metrics import read_metrics

    grid: MemoryGrid = bench.preset.training_memory
    assets = train_assets(bench)
    rows = []
    for recipe in grid.recipes:
        for stage in grid.stages:
            for frames, height, width in grid.sizes:
                save = bench.workdir / f"memory-{recipe}-zero{stage}-{frames}x{height}x{width}"
                keys = [f"data.sources=[{assets.clips}]", f"model.text_encoder.path={assets.t5}", f"train.save={save}",
                        "train.report_to=[none]", f"train.train_iters={grid.steps}", f"train.save_interval={grid.steps}",
                        *SETUP, f"deepspeed.zero_stage={stage}", f"model.dit.num_frames={frames}", f"data.height={height}",
                        f"data.width={width}", *RECIPES[recipe]]
                prediction = TrainingMemoryPlan(load_config(list(assets.base), keys), gpus=1).predict()
                run_program([*bench.commands.train, "--base", *map(str, assets.base), *keys])
                records = read_metrics(save)
                measured = max(record["peak_memory_gb"] for record in records) * 2**30
                rows.append({"recipe": recipe, "stage": stage, "size": (frames, height, width), "steps": len(records),
                             "predicted": prediction.peak_bytes, "phase": prediction.peak_phase, "measured": measured})
                print(f"training memory {recipe} ZeRO-{stage} {frames}x{height}x{width}: predicted "
                      f"{prediction.peak_bytes / MIB:.1f} MiB, measured {measured / MIB:.1f} MiB", flush=True)
    return {"rows": rows, "command": bench.command_alone(STANDALONE)}


def within(row: dict) -> bool:
    return abs(row["predicted"] / row["measured"] - 1) <= TOLERANCE


def render(result: dict) -> list[str]:
    rows = result["rows"]
    ratios = [r["predicted"] / r["measured"] for r in rows]
    return [
        "## Training memory: the planner against measured peaks",
        "",
        regenerate_alone(result["command"]),
        "",
        "`TrainingMemoryPlan(cfg).predict()` (what `tools/train_video.py --estimate-memory` prints, docs/memory.md) "
        "against the largest `peak_memory_gb` in metrics.jsonl of a real run of `tools/train_video.py` with the same "
        "config, in a fresh process (`configs/cogvideox_5b.yaml configs/tiny.yaml configs/tiny_train.yaml`: tiny DiT, "
        "VAE and T5 encoding each clip during the run; one rank on the CPU; fp32, activation checkpointing, "
        "`data.prefetch=0`, a 20,000-element gradient bucket; LoRA: rank 8 on the attention, only the adapters train). "
        "On the CPU the measured peak is what the run keeps on its device when a step starts (weights, gradients, "
        "optimizer states, frozen stages) plus the live-tensor peak of the step (`train.measure_memory=true`). Sizes "
        "differ in frames and area, none of them a size the planner's tests check. *Peak phase*: where the planner "
        f"puts the peak. Target: predicted within {TOLERANCE:.0%} of measured in every row.",
        "",
        table(
            ["recipe", "ZeRO", "frames x H x W", "steps", "predicted (MiB)", "measured (MiB)", "predicted / measured",
             "peak phase", f"within {TOLERANCE:.0%}"],
            [[r["recipe"], r["stage"], "x".join(map(str, r["size"])), r["steps"], f"{r['predicted'] / MIB:.1f}",
              f"{r['measured'] / MIB:.1f}", f"{r['predicted'] / r['measured']:.2f}", r["phase"], met(within(r))]
             for r in rows],
        ),
        "",
        f"{sum(map(within, rows))} of {len(rows)} runs within {TOLERANCE:.0%}; predicted / measured from "
        f"{min(ratios):.2f} to {max(ratios):.2f}.",
    ]
