"""Section *Sampling memory*: VAE decode exact vs tiled (time, peak, PSNR, the estimate), and the predicted peak of
full-size sampling per model, offload and tiling mode."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sat_video.benchmarks.markdown import table
from sat_video.benchmarks.measure import MIB
from sat_video.common.live_tensors import LiveTensorBytes
from sat_video.diffusion.memory_estimate import SamplingMemoryModel
from sat_video.model.config import DiTConfig
from sat_video.model.stages import SPATIAL_COMPRESSION

if TYPE_CHECKING:
    from sat_video.benchmarks.context import Bench

FULL_SIZES = (("CogVideoX-2B", "cogvideox_2b", (49, 480, 720)), ("CogVideoX-5B", "cogvideox_5b", (49, 480, 720)),
              ("CogVideoX1.5-5B", "cogvideox1.5_5b", (81, 768, 1360)))
"""The published models (README's table) at their native sizes."""
OFFLOADS = ("none", "model", "sequential")


@dataclass(frozen=True)
class DecodeCase:
    """VAE decode at ``frames x height x width`` pixels; ``tile`` and ``overlap``: ``[height, width]`` pixels."""

    frames: int
    height: int
    width: int
    tile: tuple[int, int]
    overlap: tuple[int, int]
    configs: tuple[str, ...]
    """Config files (under ``configs/``) of the first stage: CogVideoX's VAE with random weights unless one of them
    narrows ``model.first_stage.architecture`` (``tiny_train.yaml``)."""


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()  # values in [-1, 1]


def vae_decode_rows(case: DecodeCase, config_folder: Path, seed: int = 0) -> list[dict]:
    """Decode the same random latents exactly and in tiles: seconds, live-tensor peak, what the estimate predicts for
    that peak (fp32), and the PSNR of tiled against exact."""
    from sat_video.config.loader import load_config
    from sat_video.model.build import build_frozen_stages

    overrides = [f"model.first_stage.tile_size=[{case.tile[0]},{case.tile[1]}]",
                 f"model.first_stage.tile_overlap=[{case.overlap[0]},{case.overlap[1]}]", "model.first_stage.path=null"]
    cfg = load_config([config_folder / name for name in case.configs], overrides)
    stages = build_frozen_stages(cfg.model, text_encoder=False)
    dit = DiTConfig.from_config(cfg)  # the latents the sampler decodes: out_channels, the clip's latent frames
    latents = torch.randn(1, dit.out_channels, dit.latent_frames_of(case.frames), case.height // SPATIAL_COMPRESSION,
                          case.width // SPATIAL_COMPRESSION, generator=torch.Generator().manual_seed(seed))
    estimate = SamplingMemoryModel(cfg, num_frames=case.frames, height=case.height, width=case.width,
                                   dtype=torch.float32)
    rows, videos = [], {}
    for tiled in (False, True):
        with torch.no_grad(), stages.tiling(tiled), LiveTensorBytes() as tracker:
            start = time.perf_counter()
            videos[tiled] = stages.decode(latents)
            seconds = time.perf_counter() - start
        predicted = estimate.decode_activation(tiled)
        rows.append({"mode": "tiled" if tiled else "exact", "seconds": seconds, "peak": tracker.peak,
                     "predicted": predicted})
    rows[1]["psnr"] = _psnr(videos[True], videos[False])
    return rows


def full_size_rows(config_folder: Path) -> list[dict]:
    """The predicted peak (bf16) of every model of :data:`FULL_SIZES` in every offload and tiling mode."""
    from sat_video.config.loader import load_config

    rows = []
    for name, config, (frames, height, width) in FULL_SIZES:
        cfg = load_config([config_folder / f"{config}.yaml"])
        estimate = SamplingMemoryModel(cfg, num_frames=frames, height=height, width=width, dtype=torch.bfloat16)
        for offload, tiled, gib in estimate.table():
            rows.append({"model": name, "size": f"{frames}x{height}x{width}", "offload": offload, "tiling": tiled,
                         "peak_gib": gib})
    return rows


def run(bench: Bench) -> dict:
    """``decode``: the VAE decode exact vs tiled (measured) for ``case``; ``full_size``: the predicted full-size peaks
    (empty unless the preset asks)."""
    case = bench.preset.vae_decode
    decode = vae_decode_rows(case, bench.configs)
    for row in decode:
        print(f"VAE decode {row['mode']}: {row['seconds']:.1f}s, {row['peak'] / MIB:.0f} MiB "
              f"(predicted {row['predicted'] / MIB:.0f})", flush=True)
    return {"case": case, "decode": decode, "full_size": full_size_rows(bench.configs) if bench.preset.full_size else []}


def render(result: dict) -> list[str]:
    case, full_size = result["case"], result["full_size"]
    lines = [
        "## Sampling memory: VAE decode exact vs tiled",
        "",
        f"`{' + '.join(case.configs)}` first stage with random weights: {case.frames} frames at {case.height}x"
        f"{case.width} decoded from the same random latents (fp32, one process) whole (SAT's exact decode) and in "
        f"tiles of {case.tile[0]}x{case.tile[1]} pixels sharing {case.overlap[0]}x{case.overlap[1]} "
        "(`sample.vae_tiling`). Peak: live tensors allocated by the decode (`sat_video/common/live_tensors.py`); "
        "predicted: the estimate of `tools/sample_video.py --estimate-memory` for the same decode.",
        "",
        table(["decode", "seconds", "peak (MiB)", "predicted (MiB)", "PSNR vs exact (dB)"],
              [[r["mode"], f"{r['seconds']:.1f}", f"{r['peak'] / MIB:.0f}", f"{r['predicted'] / MIB:.0f}",
                f"{r['psnr']:.1f}" if "psnr" in r else ""] for r in result["decode"]]),
    ]
    if full_size:
        models = list(dict.fromkeys((r["model"], r["size"]) for r in full_size))
        peak = {(r["model"], r["offload"], r["tiling"]): r["peak_gib"] for r in full_size}
        modes = [(offload, tiled) for offload in OFFLOADS for tiled in (False, True)]
        lines += [
            "",
            "### Predicted peak at full size (bf16, GiB; not measured on a GPU)",
            "",
            "From `SamplingMemoryModel` (`sat_video/diffusion/memory_estimate.py`): weights from parameter counts, "
            "activations from fp32 probes on this CPU at the real widths, halved for bf16. T5 is T5 v1.1 XXL's encoder.",
            "",
            table(["model", "size", *(f"{offload}{', tiled' if tiled else ''}" for offload, tiled in modes)],
                  [[model, size, *(f"{peak[model, offload, tiled]:.1f}" for offload, tiled in modes)] for model, size in models]),
        ]
    return lines
