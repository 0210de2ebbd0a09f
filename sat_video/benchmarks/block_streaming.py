"""Section *Block offload while training*: a LoRA step (forward and backward, activation checkpointing on) with the frozen
weights of the first K blocks streamed from host memory (``train.offload_blocks``, :mod:`sat_video.training.block_offload`)
for K = 0, half and all blocks: step time and the weights left on the device, measured beside what
:func:`~sat_video.training.block_offload.offloaded_bytes` (the memory planner's term) predicts; plus that prediction for
the published models. Regenerates alone: ``tools/bench.py --only block_streaming``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sat_video.benchmarks.markdown import regenerate_alone, table
from sat_video.benchmarks.measure import MIB

if TYPE_CHECKING:
    from pathlib import Path

    from sat_video.benchmarks.context import Bench

STANDALONE = "block_streaming"
FULL_SIZE = ("cogvideox_2b", "cogvideox_5b")
GIB = 2**30


def _config(configs: Path, variant: str, overrides: list[str]):
    from sat_video.config.loader import load_config

    return load_config([configs / f"{variant}.yaml", configs / "lora.yaml"], overrides)


def predicted(cfg, ks: tuple[int, ...], dtype: torch.dtype, device_type: str) -> dict[int, dict[str, int]]:
    """Per K: ``all`` weight bytes, ``host`` (off the device between steps) and ``in_flight`` (back on it at once),
    from the DiT of ``cfg`` built on the meta device (no memory, so the published sizes too)."""
    from sat_video.model.build import build_dit
    from sat_video.training.block_offload import device_weight_bytes, offloaded_bytes
    from sat_video.training.optim import select_trainable

    with torch.device("meta"):
        dit = build_dit(cfg)
    select_trainable(dit, list(cfg.train.trainable))
    dit.to(dtype)  # the engine's cast: frozen weights at the compute dtype too
    total = device_weight_bytes(dit)
    return {k: {"all": total, **offloaded_bytes(dit, k, device_type=device_type)._asdict()} for k in ks}


def run(bench: Bench) -> dict:
    """``rows``: per compute dtype and K at the preset's checkpointing size; ``full_size``: the prediction for the
    published models in bf16 on CUDA; ``command``: what regenerates the section."""
    from sat_video.training.block_offload import block_offload_cost

    size = next(s for s in bench.preset.dits if s.name == bench.preset.checkpointing)
    cfg = _config(bench.configs, size.variant, list(size.overrides))
    layers = cfg.model.dit.num_layers
    ks = (0, layers // 2, layers)
    rows = []
    for label, dtype in bench.dtypes.items():
        expected = predicted(cfg, ks, dtype, bench.device.type)
        for step in block_offload_cost(cfg, ks, bench.device, dtype, batch=size.batch, steps=bench.preset.reps):
            rows.append({"size": size.name, "dtype": label, "k": step.k, "layers": layers, "time": step.step_s,
                         "weights": step.device_weight_bytes, "loaded": step.peak_loaded_bytes,
                         "peak": step.peak_memory_bytes, **{f"predicted_{key}": v for key, v in expected[step.k].items()}})
            resident = expected[step.k]["all"] - expected[step.k]["host"]
            print(f"block offload {size.name} {label} K={step.k}/{layers}: {step.step_s:.3f}s, device weights "
                  f"{step.device_weight_bytes / MIB:.1f} MiB (predicted {resident / MIB:.1f})", flush=True)
    full_size = []
    for variant in FULL_SIZE:
        full = _config(bench.configs, variant, [])
        half = full.model.dit.num_layers // 2
        for k, bytes_ in predicted(full, (0, half, full.model.dit.num_layers), torch.bfloat16, "cuda").items():
            full_size.append({"variant": variant, "k": k, "layers": full.model.dit.num_layers, **bytes_})
    return {"rows": rows, "full_size": full_size, "lora": _lora(cfg), "command": bench.command_alone(STANDALONE)}


def _lora(cfg) -> str:
    lora = cfg.model.dit.mixins.lora
    return f"rank {lora.rank} on {', '.join(f'`{t}`' for t in lora.targets)}"


def render(result: dict) -> list[str]:
    base = {(r["size"], r["dtype"]): r for r in result["rows"] if r["k"] == 0}
    return [
        "## Block offload while training (LoRA)",
        "",
        regenerate_alone(result["command"]),
        "",
        "`train.offload_blocks: K`: the frozen weights of the first K blocks wait in host memory and are copied in for "
        "each block's forward and again for its recomputation in backward (docs/memory.md). One DiT step (forward and "
        f"backward, activation checkpointing on, `configs/lora.yaml`: {result['lora']}; no optimizer), the median of "
        "the timed steps after one untimed step, each K in turn. *Device weights*: the DiT's parameters and buffers on "
        "the device between steps, measured against all weights minus the `host` bytes of `offloaded_bytes`; *most "
        "streamed in at once*: the peak of offloaded bytes back on the device during a step, against its `in_flight` "
        "(one block on the CPU, three on CUDA). On the CPU the \"copy\" is a plain tensor copy in the same memory, so "
        "the extra time is the bookkeeping and copies, not a PCIe transfer.",
        "",
        table(
            ["size", "dtype", "K (of blocks)", "step (s)", "extra time", "device weights (MiB)", "predicted (MiB)",
             "most streamed in at once (MiB)", "predicted (MiB)"],
            [[r["size"], r["dtype"], f"{r['k']} of {r['layers']}", f"{r['time']:.3f}",
              f"{r['time'] / base[r['size'], r['dtype']]['time'] - 1:+.0%}", f"{r['weights'] / MIB:.1f}",
              f"{(r['predicted_all'] - r['predicted_host']) / MIB:.1f}", f"{r['loaded'] / MIB:.1f}",
              f"{r['predicted_in_flight'] / MIB:.1f}"]
             for r in result["rows"]],
        ),
        "",
        "Full size, predicted (`offloaded_bytes`, built on the meta device) in bf16 on CUDA, where three blocks can be "
        "in at once (the one computing, the next copying in, the one just dropped):",
        "",
        table(
            ["model", "K (of blocks)", "weights between steps (GiB)", "weights at the step's peak (GiB)"],
            [[r["variant"], f"{r['k']} of {r['layers']}", f"{(r['all'] - r['host']) / GIB:.2f}",
              f"{(r['all'] - r['host'] + r['in_flight']) / GIB:.2f}"] for r in result["full_size"]],
        ),
    ]
