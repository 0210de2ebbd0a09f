"""Sampling at full size: offload modes give the same videos, VAE tiling stays close to exact decoding, the memory
report and its estimate agree (tiny models; the figures for real sizes are in benchmarks/RESULTS.md)."""

import numpy as np
import pytest
import torch

import sat_video
from sat_video.diffusion.config import SampleConfig
from sat_video.diffusion.memory_estimate import SamplingMemoryModel
from sat_video.diffusion.offload import WeightPlacement
from sat_video.diffusion.sampling import VideoGenerator
from sat_video.fixtures.synthetic import render_clip
from sat_video.model.build import build_frozen_stages
from tests.conftest import ROOT, randomize_

SETTINGS = SampleConfig(steps=2, guidance_scale=6.0)
SIZES = ((9, 64, 64), (17, 96, 128))


def load(variant, assets, *overrides):
    files = [ROOT / "configs" / name for name in (f"{variant}.yaml", "tiny.yaml", "tiny_train.yaml")]
    return sat_video.load_config(files, [f"model.text_encoder.path={assets / 't5'}", *overrides])


def generate(cfg, offload, size, *, tiled=False):
    torch.manual_seed(0)
    dit = randomize_(sat_video.build_dit(cfg)).eval()
    video_generator = VideoGenerator(dit, build_frozen_stages(cfg.model), snr_shift_scale=1.0, device="cpu", offload=offload)
    frames, height, width = size
    image = torch.linspace(-1, 1, 3 * height * width).reshape(3, height, width) if cfg.model.dit.in_channels > 16 else None
    settings = SampleConfig(steps=2, guidance_scale=6.0, vae_tiling=tiled)
    videos = video_generator.generate(["a red square", "a blue circle"], settings, num_frames=frames, height=height,
                                width=width, image=image)
    return videos, video_generator


@pytest.mark.parametrize("variant", ["cogvideox_5b", "cogvideox1.5_5b_i2v"])
def test_offload_modes_give_identical_videos_and_hold_less(variant, train_assets):
    cfg = load(variant, train_assets)
    runs = {mode: generate(cfg, mode, (9, 64, 64)) for mode in ("none", "model", "sequential")}
    reference = runs["none"][0]
    for mode in ("model", "sequential"):
        for ours, expected in zip(runs[mode][0], reference):
            assert torch.equal(ours.latents, expected.latents), mode
            assert torch.equal(ours.frames, expected.frames), mode
    peaks = {mode: video_generator.memory.stages["DiT steps"].peak_bytes for mode, (_, video_generator) in runs.items()}
    assert peaks["sequential"] < peaks["model"] < peaks["none"], peaks
    stages = ["T5", "VAE encode", "DiT steps", "VAE decode"] if variant.endswith("i2v") else ["T5", "DiT steps", "VAE decode"]
    assert list(runs["none"][1].memory.stages) == stages
    assert all(stage.runs == 1 for stage in runs["none"][1].memory.stages.values())  # each model runs once for all prompts


def test_an_offloaded_weight_fails_loudly_outside_its_stage(train_assets):
    cfg = load("cogvideox_2b", train_assets)
    dit = sat_video.build_dit(cfg).eval()
    placement = WeightPlacement("model", "cpu")
    placement.add("dit", dit)
    x = torch.zeros(1, 4, 16, 8, 8)
    text = torch.zeros(1, 8, 32)
    with pytest.raises(RuntimeError):
        dit(x, 500, text)
    with torch.no_grad(), placement.running("dit"):
        inside = dit(x, 500, text)
    placement.close()  # back to the host weights
    with torch.no_grad():
        assert torch.equal(dit(x, 500, text), inside)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return 10 * np.log10(4.0 / mse)  # values in [-1, 1]


def test_vae_tiling_stays_close_to_exact_decode(train_assets):
    # tiles of 4 x 6 latents sharing one, on 12 x 16 latents: a seam every few latents, the worst case for blending
    cfg = load("cogvideox_2b", train_assets, "model.first_stage.tile_size=[32,48]", "model.first_stage.tile_overlap=[8,8]")
    stages = build_frozen_stages(cfg.model, text_encoder=False)
    clip = render_clip("circle", "red", "right", 17, 96, 128, np.random.default_rng(0))
    video = torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # [1, 3, T, H, W]
    mean, _ = stages.encode_moments(video)
    exact = stages.decode(mean)
    with stages.tiling(True):
        tiled = stages.decode(mean)
        tiled_mean, _ = stages.encode_moments(video)
    assert stages.first_stage.tiling is False  # restored
    assert tiled.shape == exact.shape and not torch.equal(tiled, exact)
    assert psnr(tiled, exact) > 20  # 22.0 dB measured (random tiny VAE); docs/sampling.md "Sampling at full size"
    # each tile's GroupNorm sees only its tile: latents move far more than pixels (1.13 x the mean's norm here)
    assert tiled_mean.shape == mean.shape and not torch.equal(tiled_mean, mean)
    small, small_clip = mean[..., :4, :6], video[..., :32, :48]  # no larger than a tile: whole, exactly
    exact_small, exact_small_mean = stages.decode(small), stages.encode_moments(small_clip)[0]
    with stages.tiling(True):
        assert torch.equal(stages.decode(small), exact_small)
        assert torch.equal(stages.encode_moments(small_clip)[0], exact_small_mean)


@pytest.mark.slow
def test_memory_estimate_within_20_percent_of_the_measured_peak(train_assets):
    cfg = load("cogvideox_2b", train_assets, "model.first_stage.tile_size=[32,48]", "model.first_stage.tile_overlap=[8,8]")
    for offload, tiled in (("none", False), ("sequential", True)):
        for frames, height, width in SIZES:
            _, video_generator = generate(cfg, offload, (frames, height, width), tiled=tiled)
            measured = video_generator.memory.stages
            predicted = SamplingMemoryModel(cfg, num_frames=frames, height=height, width=width, dtype=torch.float32)
            rows = predicted.predict(offload, tiled)
            for row in rows:
                assert row.peak_bytes == pytest.approx(measured[row.stage].peak_bytes, rel=0.2), (offload, frames, row)
            assert max(r.peak_bytes for r in rows) == pytest.approx(video_generator.memory.peak_bytes, rel=0.2)
    # the fastest mode that fits a GPU: nothing offloaded when all fits, a slower mode below that, none below the least
    table = {(offload, tiled): gib for offload, tiled, gib in predicted.table()}
    assert predicted.fastest_fitting(1000.0)[:2] == ("none", False)
    offload, tiled, gib = predicted.fastest_fitting(0.99 * table["none", False] / 0.9)
    assert (offload, tiled) != ("none", False) and gib <= 0.99 * table["none", False]
    assert predicted.fastest_fitting(0.99 * min(table.values()) / 0.9) is None
