"""The sampling-memory rows of ``tools/bench.py``: VAE decode, exact vs tiled (time, peak, PSNR, the estimate), and the
predicted peak of full-size sampling per model, offload and tiling mode."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sat_video.common.live_tensors import LiveTensorBytes
from sat_video.diffusion.memory_estimate import SamplingMemoryModel
from sat_video.model.stages import SPATIAL_COMPRESSION

FULL_SIZES = (("CogVideoX-2B", "cogvideox_2b", (49, 480, 720)), ("CogVideoX-5B", "cogvideox_5b", (49, 480, 720)),
              ("CogVideoX1.5-5B", "cogvideox1.5_5b", (81, 768, 1360)))
"""The models of the README's table at their native sizes."""


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


def vae_decode_rows(case: DecodeCase, config_folder, seed: int = 0) -> list[dict]:
    """Decode the same random latents exactly and in tiles: seconds, live-tensor peak, what the estimate predicts for
    that peak (fp32), and the PSNR of tiled against exact."""
    from sat_video.config.loader import load_config
    from sat_video.model.build import build_frozen_stages

    overrides = [f"model.first_stage.tile_size=[{case.tile[0]},{case.tile[1]}]",
                 f"model.first_stage.tile_overlap=[{case.overlap[0]},{case.overlap[1]}]", "model.first_stage.path=null"]
    cfg = load_config([config_folder / name for name in case.configs], overrides)
    stages = build_frozen_stages(cfg.model, text_encoder=False)
    latent_frames = (case.frames - 1) // 4 + 1
    latents = torch.randn(1, 16, latent_frames, case.height // SPATIAL_COMPRESSION, case.width // SPATIAL_COMPRESSION,
                          generator=torch.Generator().manual_seed(seed))
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


def full_size_rows(config_folder) -> list[dict]:
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
