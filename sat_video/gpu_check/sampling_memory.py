"""Section 4: sampling's measured peak per stage (``max_memory_allocated``) against ``--estimate-memory``'s prediction
(:class:`~sat_video.diffusion.memory_estimate.SamplingMemoryModel`), for 5B at full size with random weights, 2
denoising steps with guidance, in each offload mode, the VAE decode exact and tiled."""

from __future__ import annotations

import time

import torch

from sat_video.gpu_check.check import Check
from sat_video.gpu_check.report import gib

PROMPT = "a red circle moving left"
TOLERANCE = 0.20
"""A prediction further off than this (relative to the measurement) is marked."""


def _text_encoder(check: Check, dit_config, device: torch.device, folder):
    """T5 v1.1 XXL's encoder with random weights (``folder``'s tiny one under ``--quick``) and ``folder``'s tokenizer."""
    import sentencepiece
    from transformers import T5Config, T5EncoderModel

    from mixins.t5_encoder import TOKENIZER_FILE, T5TextEncoder
    from sat_video.diffusion.memory_estimate import T5_XXL

    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(folder / TOKENIZER_FILE))
    config = T5Config.from_pretrained(folder) if check.quick else T5Config(**T5_XXL)
    with torch.device(device):
        transformer = T5EncoderModel(config).to(torch.bfloat16).eval()
    return T5TextEncoder(transformer, tokenizer, dit_config.text_length)


def run(check: Check) -> None:
    from sat_video.diffusion.config import SampleConfig
    from sat_video.diffusion.memory_estimate import SamplingMemoryModel
    from sat_video.diffusion.sampling import VideoGenerator
    from sat_video.fixtures.tiny_t5 import make_tiny_t5
    from sat_video.model.build import TEXT_ENCODER_NAME, build_dit, build_frozen_stages
    from sat_video.model.config import DiTConfig

    device, report = check.torch_device, check.report
    frames, height, width = check.sizes.sampling_clip
    t5_folder = make_tiny_t5([PROMPT], check.workdir / "sampling_t5", d_model=check.config(check.sizes.sampling_variant)
                             .model.dit.text_hidden_size)
    # --quick: the tiny T5 and VAE of the training configs (the estimate reads the T5 folder's config); else T5 XXL's shape
    keys = [f"model.text_encoder.path={t5_folder}"] if check.quick else []
    cfg = check.config(check.sizes.sampling_variant, "model.first_stage.path=null", *keys, training=True)
    dit_config = DiTConfig.from_config(cfg)
    started = time.perf_counter()
    estimate = SamplingMemoryModel(cfg, num_frames=frames, height=height, width=width, dtype=torch.bfloat16, guided=True)
    predictions = {(offload, tiled): {row.stage: row.peak_bytes for row in estimate.predict(offload, tiled)}
                   for offload in ("none", "model", "sequential") for tiled in (False, True)}
    report.text("", f"`{check.sizes.sampling_variant}` at {frames}x{height}x{width}, bf16, random weights (T5 v1.1 XXL's "
                f"encoder shape), 2 steps with guidance. The estimate's probes took {time.perf_counter() - started:.0f} s "
                "on the CPU. Off by more than 20% is marked.")
    report.table(["offload", "VAE tiling", "stage", "measured (GiB)", "predicted (GiB)", "predicted / measured", "seconds"])
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device is fast; the host copies are what offloading streams from
        dit = build_dit(cfg).to(torch.bfloat16).eval()
    dit = dit.cpu()
    stages = build_frozen_stages(cfg.model, text_encoder=False).to(torch.bfloat16)
    text_encoder = _text_encoder(check, dit_config, device, t5_folder)
    stages.add_stage(TEXT_ENCODER_NAME, text_encoder.cpu())
    settings = SampleConfig(steps=2, guidance_scale=6.0)
    for offload in ("sequential", "model", "none"):  # "none" moves every model for good, so it goes last
        generator = VideoGenerator(dit, stages, snr_shift_scale=cfg.model.diffusion.snr_shift_scale, device=device,
                                   offload=offload)
        videos = generator.generate([PROMPT], settings, num_frames=frames, height=height, width=width)
        latents = videos[0].latents[None].to(device, torch.bfloat16).permute(0, 2, 1, 3, 4)
        with torch.no_grad(), generator.memory.measure("VAE decode, tiled"), generator.placement.running("first_stage"), \
                stages.tiling(True):
            stages.decode(latents)
        del latents, videos
        for stage in generator.memory.stages.values():
            tiled = stage.stage.endswith("tiled")
            name = stage.stage.removesuffix(", tiled")
            predicted = predictions[offload, tiled][name]
            ratio = predicted / stage.peak_bytes if stage.peak_bytes else float("inf")
            mark = "" if abs(ratio - 1) <= TOLERANCE else " **off**"
            report.row(offload, "on" if tiled else "off", name, gib(stage.peak_bytes), gib(predicted), f"{ratio:.2f}{mark}",
                       f"{stage.seconds:.1f}")
        generator.placement.close()
        del generator
        if device.type == "cuda":
            torch.cuda.empty_cache()
