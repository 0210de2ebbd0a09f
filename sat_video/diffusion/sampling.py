"""Generate videos: diffusers' CogVideoX schedulers stepped over our DiT, classifier-free guidance against the
all-zero text embedding (SAT's unconditional input), then the first stage decodes.

The loop is diffusers' ``CogVideoXPipeline`` loop (same scheduler calls, same dynamic guidance), so an export
sampled by diffusers from the same noise and embeddings gives the same latents (``tests/test_sampling.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from sat_video.common.errors import OutputExistsError, UsageError
from sat_video.diffusion.conditioning import leading_pad_frames
from sat_video.diffusion.config import SCHEDULER_NAMES, SampleConfig
from sat_video.diffusion.memory import MemoryMonitor
from sat_video.diffusion.offload import WeightPlacement
from sat_video.diffusion.schedule import scheduler_config
from sat_video.model.stages import SPATIAL_COMPRESSION, FrozenStages


def make_scheduler(name: str, snr_shift_scale: float, num_train_timesteps: int = 1000):
    """The diffusers scheduler ``sample.scheduler`` names (checked when the config is loaded) on the model's schedule."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler  # here: importing diffusers takes seconds

    schedulers = dict(zip(SCHEDULER_NAMES, (CogVideoXDPMScheduler, CogVideoXDDIMScheduler)))
    return schedulers[name].from_config(scheduler_config(snr_shift_scale, num_train_timesteps))


def dynamic_guidance_scale(guidance_scale: float, timestep: int, steps: int) -> float:
    """CogVideoX's schedule of the guidance scale over the DDPM timestep ``t`` (as in diffusers' pipelines)."""
    return 1 + guidance_scale * (1 - math.cos(math.pi * ((steps - timestep) / steps) ** 5.0)) / 2


@torch.no_grad()
def denoise(
    dit: nn.Module,
    noise: torch.Tensor,
    text: torch.Tensor,
    settings: SampleConfig,
    *,
    snr_shift_scale: float,
    num_train_timesteps: int = 1000,
    steps: int | None = None,
    image_latents: torch.Tensor | None = None,
    ofs: float | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run the sampler from ``noise`` ``[B, T, C, H, W]`` with text embeddings ``[B, L, D]``; returns latents.

    ``image_latents`` (I2V, same shape as ``noise``) are concatenated on channels at every step. The DPM
    scheduler is stochastic and draws from ``generator`` (a list: one per sample of the batch).
    """
    from diffusers import CogVideoXDPMScheduler  # loaded already by make_scheduler

    scheduler = make_scheduler(settings.scheduler, snr_shift_scale, num_train_timesteps)
    steps = steps or settings.steps
    scheduler.set_timesteps(steps, device=noise.device)
    dtype = module_dtype(dit)
    guided = settings.guidance_scale > 1
    context = torch.cat([torch.zeros_like(text), text]) if guided else text
    if image_latents is not None and guided:
        image_latents = torch.cat([image_latents, image_latents])
    latents = noise.float() * scheduler.init_noise_sigma
    previous_x0 = None
    timesteps = scheduler.timesteps
    iterator = timesteps
    if progress:
        from tqdm import tqdm

        iterator = tqdm(timesteps, desc="sample", leave=False)
    for i, t in enumerate(iterator):
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]) if guided else latents, t)
        if image_latents is not None:
            model_input = torch.cat([model_input, image_latents.float()], dim=2)
        prediction = dit(model_input.to(dtype), t.expand(model_input.shape[0]), context.to(dtype), ofs=ofs).float()
        if guided:
            scale = (
                dynamic_guidance_scale(settings.guidance_scale, t.item(), steps)
                if settings.dynamic_cfg
                else settings.guidance_scale
            )
            uncond, cond = prediction.chunk(2)
            prediction = uncond + scale * (cond - uncond)
        if isinstance(scheduler, CogVideoXDPMScheduler):
            latents, previous_x0 = scheduler.step(
                prediction, previous_x0, t, timesteps[i - 1] if i > 0 else None, latents, generator=generator, return_dict=False
            )
        else:
            latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
    return latents


def module_dtype(module: nn.Module) -> torch.dtype:
    """Floating dtype of a module's weights (parameters or, for fitted stages, buffers)."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """``[3, T, H, W]`` in [-1, 1] -> uint8 ``[T, H, W, 3]``."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu()


@dataclass
class GeneratedVideo:
    prompt: str
    frames: torch.Tensor
    """uint8 ``[T, H, W, 3]``."""
    latents: torch.Tensor
    """``[T, C, h, w]`` as the DiT produced them (before decoding, after removing 1.5's padding frame)."""


class VideoGenerator:
    """Prompts (and an image for I2V) -> videos, with the frozen stages of training.

    Args:
        dit: the trained DiT, in its sampling dtype.
        stages: the frozen stages: a text encoder and a first stage (which encodes the I2V image and decodes).
        snr_shift_scale: the schedule the model was trained with (``model.diffusion.snr_shift_scale``).
        ofs: fed to models with an ofs embedding (CogVideoX 1.5 I2V).
        device: where the models compute (default: where the DiT's weights are).
        offload: ``sample.offload``: where weights wait while another model runs (:mod:`~sat_video.diffusion.offload`).
            The generator moves the models as that mode says, now and while it runs; every mode gives the same videos.

    After :meth:`generate`, ``memory`` holds the peak memory of each stage (:class:`~sat_video.diffusion.memory.MemoryMonitor`).
    """

    def __init__(self, dit: nn.Module, stages: FrozenStages, *, snr_shift_scale: float, num_train_timesteps: int = 1000,
                 ofs: float = 2.0, device: torch.device | str | None = None, offload: str = "none"):
        self.dit, self.stages = dit, stages
        self.snr_shift_scale, self.num_train_timesteps = snr_shift_scale, num_train_timesteps
        self.ofs = ofs if dit.dit_config.ofs_embed_dim else None
        self.device = torch.device(device) if device is not None else next(dit.parameters()).device
        self.placement = WeightPlacement(offload, self.device)
        for name, module in (("text_encoder", stages.text_encoder), ("first_stage", stages.first_stage), ("dit", dit)):
            if module is not None:
                self.placement.add(name, module)
        self.memory = MemoryMonitor(self.device, lambda: self.placement.loaded_bytes)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        """``(frames, pad, C, h, w)``: latent frames incl. ``pad`` leading frames for 1.5's temporal patches."""
        dit_config = self.dit.dit_config
        frames = dit_config.latent_frames_of(num_frames)
        pad = leading_pad_frames(frames, dit_config)
        return frames + pad, pad, dit_config.out_channels, height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION

    @contextmanager
    def _stage(self, report_as: str, model: str) -> Iterator[None]:
        with self.memory.measure(report_as), self.placement.running(model):
            yield

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        settings: SampleConfig,
        *,
        num_frames: int,
        height: int,
        width: int,
        image: torch.Tensor | None = None,
        steps: int | None = None,
        batch_size: int = 1,
        progress: bool = False,
    ) -> list[GeneratedVideo]:
        """One video per prompt; the noise of prompt ``i`` comes from a generator seeded ``settings.seed + i``.

        ``batch_size`` prompts are denoised together (faster on small models; every prompt keeps its own
        generator, so a video does not depend on the batching beyond float rounding).

        ``image``: ``[3, H, W]`` in [-1, 1], required by I2V models (``in_channels > out_channels``). Each model runs
        once for all prompts (T5, then the DiT, then the VAE), so offloading moves each model once.
        """
        dit_config = self.dit.dit_config
        if (dit_config.in_channels > dit_config.out_channels) != (image is not None):
            raise UsageError("an image-to-video model needs an image (--image), a text-to-video model takes none")
        frames, pad, channels, h, w = self.latent_shape(num_frames, height, width)
        device, vae_dtype = self.device, module_dtype(self.stages.first_stage)
        with self._stage("T5", "text_encoder"):  # once per prompt; the unconditional embedding is zeros, not T5's
            texts = [self.stages.encode_text([prompt]).to(device) for prompt in prompts]
        image_latents = None
        if image is not None:  # the clean encoded image, then zero latents (as training and diffusers' I2V pipeline)
            with self._stage("VAE encode", "first_stage"), self.stages.tiling(settings.vae_tiling):
                encoded = self.stages.encode(image[None, :, None].to(device, vae_dtype))
            encoded = encoded.permute(0, 2, 1, 3, 4).float()  # [1, 1, C, h, w]
            image_latents = torch.cat([encoded, torch.zeros(1, frames - 1, channels, h, w, device=device)], dim=1)
        latents = []
        with self._stage("DiT steps", "dit"):
            for start in range(0, len(texts), batch_size):
                chunk = range(start, min(start + batch_size, len(texts)))
                generators = [torch.Generator().manual_seed(settings.seed + index) for index in chunk]
                noise = torch.cat([torch.randn(1, frames, channels, h, w, generator=g) for g in generators]).to(device)
                batch = denoise(
                    self.dit,
                    noise,
                    torch.cat([texts[index] for index in chunk]),
                    settings,
                    snr_shift_scale=self.snr_shift_scale,
                    num_train_timesteps=self.num_train_timesteps,
                    steps=steps,
                    image_latents=None if image_latents is None else image_latents.expand(len(chunk), -1, -1, -1, -1),
                    ofs=self.ofs,
                    generator=generators,
                    progress=progress,
                )
                latents += batch[:, pad:].split(1)
        results = []
        with self._stage("VAE decode", "first_stage"), self.stages.tiling(settings.vae_tiling):
            for prompt, latent in zip(prompts, latents):
                video = self.stages.decode(latent.permute(0, 2, 1, 3, 4).to(vae_dtype))[0]
                results.append(GeneratedVideo(prompt, to_uint8_frames(video), latent[0].cpu()))
        return results


def _slug(text: str, limit: int = 40) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower())[:limit].strip("_") or "video"


def write_samples(out_dir, videos: Sequence[GeneratedVideo], fps: float, *, overwrite: bool = False) -> list:
    """``<out_dir>/<i>_<prompt>.mp4`` per video and ``<out_dir>/contact_sheet.png``; returns the written paths.

    Existing files are never replaced unless ``overwrite``; the check runs before anything is written.
    """
    from pathlib import Path

    from sat_video.data.video_io import contact_sheet, write_mp4, write_png

    out_dir = Path(out_dir)
    targets = [out_dir / f"{index:03d}_{_slug(video.prompt)}.mp4" for index, video in enumerate(videos)]
    sheet = out_dir / "contact_sheet.png"
    existing = [str(path) for path in (*targets, sheet) if path.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"would overwrite {', '.join(existing)}; choose another output folder")
    for path, video in zip(targets, videos):
        write_mp4(path, video.frames, fps, overwrite=overwrite)
    write_png(sheet, contact_sheet([v.frames for v in videos], [v.prompt for v in videos]), overwrite=overwrite)
    return [*targets, sheet]
