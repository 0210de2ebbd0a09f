"""Validation while training: ``train.validation.prompts`` sampled with the current weights into
``<save>/samples/<iteration>`` (their moving average into ``samples/<iteration>/ema``), and each video and contact sheet
to the trackers."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from sat_video.data.buckets import Bucket
from sat_video.data.clips import ClipSpec, load_image
from sat_video.diffusion.sampling import VideoGenerator, write_samples
from sat_video.model.dit import DiffusionTransformer
from sat_video.model.stages import FrozenStages
from sat_video.training.distributed import DistributedEnv
from sat_video.training.metrics import MetricsLog
from sat_video.training.run_folder import RunFolder

logger = logging.getLogger("sat_video.train")


class Validation:
    """Every rank samples (ZeRO-3 needs all of them for a forward); the main rank writes. Sampling draws from its own
    seeded generators, so validation never changes what training draws."""

    def __init__(self, cfg: DictConfig, env: DistributedEnv, run_folder: RunFolder, frozen_stages: FrozenStages,
                 metrics: MetricsLog):
        self.cfg, self.env, self.run_folder, self.frozen_stages, self.metrics = cfg, env, run_folder, frozen_stages, metrics

    def sample(self, dit: DiffusionTransformer, iteration: int, clip_spec: ClipSpec, weights: str = "") -> Path | None:
        """Sample with ``dit`` at each ``train.validation.sizes`` (none: the frames of the DiT and the size of
        ``clip_spec``, the training clips'); the samples' folder on the main rank, ``None`` elsewhere. ``weights``: which
        weights ``dit`` holds when not the live ones (``ema``): names the subfolder and the trackers' tags."""
        started = time.perf_counter()
        cfg, dit_config = self.cfg, dit.dit_config
        validation = cfg.train.validation
        sizes = [tuple(size) for size in validation.sizes] or [(dit_config.num_frames, clip_spec.height, clip_spec.width)]
        video_generator = VideoGenerator(  # the engine's DiT as it is: under ZeRO-3 each block is gathered as it runs
            dit,
            self.frozen_stages,
            snr_shift_scale=cfg.model.diffusion.snr_shift_scale,
            num_train_timesteps=cfg.model.diffusion.num_train_timesteps,
            ofs=cfg.model.diffusion.ofs,
            device=self.env.device,
        )
        folder = self.run_folder.path / "samples" / str(iteration) / weights
        tag = "validation" + (f"_{weights}" if weights else "")
        fps = cfg.sample.fps or cfg.data.fps
        for frames, height, width in sizes:
            image = load_image(validation.image, height, width) if validation.image else None
            videos = video_generator.generate(list(validation.prompts), cfg.sample, num_frames=frames, height=height,
                                        width=width, image=image, steps=validation.steps)
            if self.env.is_main:  # one folder per size when several are asked for
                size = Bucket(frames, height, width).name if validation.sizes else ""
                written = write_samples(folder / size, videos, fps, overwrite=True)
                self.metrics.add_image(f"{tag}/contact_sheet{size and f'_{size}'}", written[-1], iteration)
                for file, video in zip(written, videos):
                    self.metrics.add_video(f"{tag}/{file.stem}{size and f'_{size}'}", file, video.frames.numpy(), fps,
                                           iteration)
        if not self.env.is_main:
            return None
        logger.info("validation%s at iteration %d took %.1f s; samples in %s\n%s", f" ({weights} weights)" if weights else "",
                    iteration, time.perf_counter() - started, folder, video_generator.memory.describe())
        return folder
