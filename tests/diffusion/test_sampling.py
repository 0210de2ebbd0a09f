"""Sampling: our loop against diffusers' schedulers stepping the exported transformer, the tool end to end."""

import math
import re

import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXTransformer3DModel

import sat_video
from sat_video.diffusion.config import SampleConfig
from sat_video.diffusion.sampling import denoise, dynamic_guidance_scale
from sat_video.formats.diffusers_format import diffusers_rotary_embedding, write_diffusers_folder
from sat_video.model.config import DiTConfig
from tests.conftest import ROOT, randomize_, tiny_config
from tests.numerics import assert_close_rel


def diffusers_sample(transformer, scheduler, noise, text, steps, guidance_scale, rope, ofs=None, generator=None):
    """diffusers' CogVideoXPipeline denoising loop, with SAT's all-zero unconditional embedding."""
    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    embeds = torch.cat([torch.zeros_like(text), text])
    old_x0 = None
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        pred = transformer(hidden_states=model_input, encoder_hidden_states=embeds, timestep=t.expand(2), ofs=ofs,
                           image_rotary_emb=rope, return_dict=False)[0].float()
        scale = 1 + guidance_scale * ((1 - math.cos(math.pi * ((steps - t.item()) / steps) ** 5.0)) / 2)
        uncond, cond = pred.chunk(2)
        pred = uncond + scale * (cond - uncond)
        if isinstance(scheduler, CogVideoXDPMScheduler):
            latents, old_x0 = scheduler.step(pred, old_x0, t, scheduler.timesteps[i - 1] if i > 0 else None, latents,
                                             generator=generator, return_dict=False)
        else:
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return latents


@pytest.mark.parametrize("variant", ["cogvideox_2b", "cogvideox_5b"])
@pytest.mark.parametrize("scheduler_name", ["ddim", "dpm"])
def test_sampling_matches_diffusers(variant, scheduler_name, tmp_path):
    cfg = tiny_config(variant)
    torch.manual_seed(0)
    model = randomize_(sat_video.build_dit(cfg), std=0.05).eval()
    shift = cfg.model.diffusion.snr_shift_scale
    write_diffusers_folder(model.state_dict(), DiTConfig.from_config(cfg), tmp_path / "hf", snr_shift_scale=shift)
    transformer = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "hf" / "transformer").eval()
    scheduler_cls = CogVideoXDPMScheduler if scheduler_name == "dpm" else CogVideoXDDIMScheduler
    scheduler = scheduler_cls.from_pretrained(tmp_path / "hf" / "scheduler")

    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 4, 16, 8, 8, generator=generator)
    text = torch.randn(1, 8, 32, generator=generator)
    settings = SampleConfig(scheduler=scheduler_name, steps=8, guidance_scale=6.0, dynamic_cfg=True)
    ours = denoise(model, noise, text, settings, snr_shift_scale=shift, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        theirs = diffusers_sample(
            transformer,
            scheduler,
            noise,
            text,
            8,
            6.0,
            diffusers_rotary_embedding(DiTConfig.from_config(cfg), 4, 8, 8),
            generator=torch.Generator().manual_seed(7),
        )
    diff = (ours - theirs).abs().max().item()
    print(f"{variant} {scheduler_name}: max |sat_video - diffusers| final latents = {diff:.2e} (max {ours.abs().max():.2f})")
    assert_close_rel(ours, theirs, rtol=1e-4, what="8 steps, each through the whole DiT")


@torch.no_grad()
def test_a_batch_samples_what_each_of_its_prompts_samples_alone():
    """VideoGenerator.generate(batch_size=N) denoises N prompts together, each drawing DPM noise from its own generator."""
    cfg = tiny_config("cogvideox_5b")
    torch.manual_seed(0)
    model = randomize_(sat_video.build_dit(cfg), std=0.05).eval()
    settings = SampleConfig(scheduler="dpm", steps=4, guidance_scale=6.0)
    noise, text = torch.randn(3, 4, 16, 8, 8), torch.randn(3, 8, 32)
    shift = cfg.model.diffusion.snr_shift_scale
    alone = [denoise(model, noise[i : i + 1], text[i : i + 1], settings, snr_shift_scale=shift,
                     generator=[torch.Generator().manual_seed(i)]) for i in range(3)]
    together = denoise(model, noise, text, settings, snr_shift_scale=shift,
                       generator=[torch.Generator().manual_seed(i) for i in range(3)])
    assert_close_rel(together, torch.cat(alone), rtol=1e-4, what="4 steps at another batch size")
    assert not torch.allclose(alone[0], denoise(model, noise[:1], text[:1], settings, snr_shift_scale=shift,
                                                generator=[torch.Generator().manual_seed(5)]), atol=1e-3)


def test_dynamic_guidance_follows_cogvideox():
    # t is the DDPM timestep, as in diffusers' pipelines: large t (early steps) -> 1 + g
    assert dynamic_guidance_scale(6.0, 999, 50) == pytest.approx(1 + 6.0 * (1 - math.cos(math.pi * ((50 - 999) / 50) ** 5)) / 2)
    assert dynamic_guidance_scale(6.0, 50, 50) == pytest.approx(1.0)


def test_sample_video_tool_writes_videos_and_a_contact_sheet(train_assets, tmp_path, capsys):
    from tools.sample_video import main

    cfg = tiny_config("cogvideox_2b")
    torch.manual_seed(0)
    sat_video.save_checkpoint(sat_video.build_dit(cfg), tmp_path / "ckpt", 1)
    # 9 frames -> 3 latent frames: diffusers' VAE decodes an odd latent count to 1 + 4k frames (49 -> 13 -> 49)
    base = [
        "--base",
        *(str(ROOT / "configs" / n) for n in ("cogvideox_2b.yaml", "tiny.yaml", "tiny_train.yaml")),
        f"model.text_encoder.path={train_assets / 't5'}",
        "model.dit.num_frames=9",
    ]
    args = [
        *base,
        "--ckpt",
        str(tmp_path / "ckpt"),
        "--prompt",
        "a red circle moving left",
        "--prompt",
        "a blue square",
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "4",
        "--offload",
        "sequential",
        "--vae-tiling",
    ]
    assert main([*base, "model.first_stage.tile_size=[32,32]", "model.first_stage.tile_overlap=[8,8]",
                 "--estimate-memory", "--gpu-memory", "0.1"]) == 0
    estimate = capsys.readouterr().out
    assert "predicted peak memory, 9x64x64, float32, offload none, VAE tiling off:" in estimate
    peaks = {(mode, tiled): float(gib) for mode, *row in re.findall(r"^  (none|model|sequential) +([\d.]+) +([\d.]+)$",
                                                                    estimate, re.M) for tiled, gib in zip((False, True), row)}
    assert len(peaks) == 6 and peaks["sequential", True] < peaks["none", False]
    assert "fastest mode predicted to fit in 90% of 0.1 GiB (the rest for CUDA's own use): --offload none (" in estimate
    assert main(args) == 0
    report = capsys.readouterr().out
    assert "offload sequential, VAE tiling on; peak memory per stage" in report
    assert re.search(r"^  DiT steps +[\d.]+ GiB", report, re.M)
    import decord

    videos = sorted((tmp_path / "out").glob("*.mp4"))
    assert [v.name for v in videos] == ["000_a_red_circle_moving_left.mp4", "001_a_blue_square.mp4"]
    reader = decord.VideoReader(str(videos[0]))
    assert len(reader) == 9 and reader[0].shape == (64, 64, 3)
    from PIL import Image

    sheet = np.asarray(Image.open(tmp_path / "out" / "contact_sheet.png"))
    assert sheet.shape[1] >= 8 * 64 and sheet.shape[0] >= 2 * 64
    assert main(args) == 2  # never overwrites what is there
    capsys.readouterr()
    args[args.index("--out") + 1] = str(tmp_path / "ema")
    assert main([*args, "--weights", "ema"]) == 2  # a checkpoint of a run without train.ema
    assert "holds no moving average of the weights (ema_model_states.pt)" in capsys.readouterr().err


def test_i2v_sampling_needs_an_image(train_assets, tmp_path):
    from tools.sample_video import main

    cfg = tiny_config("cogvideox_5b_i2v")
    torch.manual_seed(0)
    sat_video.save_checkpoint(sat_video.build_dit(cfg), tmp_path / "ckpt", 1)
    base = [
        "--base",
        *(str(ROOT / "configs" / n) for n in ("cogvideox_5b_i2v.yaml", "tiny.yaml", "tiny_train.yaml")),
        f"model.text_encoder.path={train_assets / 't5'}",
        "--ckpt",
        str(tmp_path / "ckpt"),
        "--prompt",
        "x",
        "--steps",
        "2",
    ]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    from PIL import Image

    Image.fromarray(np.full((80, 100, 3), 200, np.uint8)).save(tmp_path / "first.png")
    assert main([*base, "--out", str(tmp_path / "b"), "--image", str(tmp_path / "first.png")]) == 0
    assert len(list((tmp_path / "b").glob("*.mp4"))) == 1
