"""Held-out reconstruction quality every ``train.eval.interval`` steps: PSNR, SSIM and (with LPIPS weights) LPIPS of
``vae.eval_sources`` at their full size (never cropped), through the posterior mean, so that it is the same function of
the weights at every evaluation and in every run. The data-parallel ranks share the clips (rank ``r`` takes ``r, r + D,
...``); each decodes its clips once per run and keeps them in host memory. The main rank's first clip, input over
reconstruction, goes to ``<save>/samples/<iteration>/reconstruction.png`` and the trackers."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

from sat_video.common.errors import DataError
from sat_video.data.clips import ClipSpec, UnusableSample, load_clip
from sat_video.data.video_io import contact_sheet, write_png
from sat_video.diffusion.sampling import to_uint8_frames
from sat_video.training.distributed import DistributedEnv, all_reduce_sum
from sat_video.training.eval_loss import heldout_clips
from sat_video.vae_training.autoencoder import TrainableAutoencoder
from sat_video.vae_training.lpips import LPIPS
from sat_video.vae_training.quality import psnr, ssim

logger = logging.getLogger("sat_video.train")


class ReconstructionEval:
    """This rank's held-out clips and how to score them. ``skipped``: ``(path, reason)`` of the clips left out."""

    def __init__(self, cfg: DictConfig, env: DistributedEnv, data_rank: int, data_size: int, clip_spec: ClipSpec):
        vae = cfg.vae
        if not vae.eval_sources:
            raise DataError("train.eval.interval is set but vae.eval_sources is empty: name the held-out clips")
        clips, self.skipped = heldout_clips(cfg, list(vae.eval_sources), vae.eval_max_samples, clip_spec, "vae.eval_sources")
        self.env, self.strip_frames = env, int(vae.strip_frames)
        self.mine = clips[data_rank::data_size]
        self._videos: list[torch.Tensor] | None = None

    def _load(self) -> list[torch.Tensor]:
        videos = []
        for ref, spec in self.mine:
            try:
                videos.append(load_clip(ref, spec)[0])
            except UnusableSample as err:
                self.skipped.append((err.path, err.reason))
                logger.warning("held-out clip skipped: %s: %s", err.path, err.reason)
        return videos

    @torch.no_grad()
    def evaluate(self, model: TrainableAutoencoder, lpips: LPIPS | None,
                 autocast: Callable[[], contextlib.AbstractContextManager], strip_file: Path | None) -> dict:
        """``{"eval_psnr", "eval_ssim", "eval_latent_rms"[, "eval_lpips"], "eval_time_s", "eval_samples"}`` over all ranks'
        clips (collective); on the main rank, with ``strip_file``, its first clip's input-over-reconstruction sheet.
        ``eval_latent_rms``: the root mean square of the posterior means; after training the encoder, ``1 / rms`` is the
        ``scaling_factor`` (``model.first_stage.scale_factor``) that gives a DiT unit-scale latents."""
        started = time.perf_counter()
        if self._videos is None:
            self._videos = self._load()
        sums = torch.zeros(6, dtype=torch.float64)  # psnr, ssim, lpips, clips, latent elements, their sum of squares
        device = self.env.device
        was_training = model.training
        model.eval()
        try:
            for index, video in enumerate(self._videos):
                target = video[None].to(device)
                with autocast():
                    reconstruction = model(target, sample=False)
                out = reconstruction.video.float().clamp(-1.0, 1.0)
                sums[4] += reconstruction.mean.numel()
                sums[5] += float(reconstruction.mean.double().pow(2).sum())
                sums[0] += float(psnr(out, target).clamp(max=100.0).sum())  # an exact copy would make the mean inf
                sums[1] += float(ssim(out, target).sum())
                if lpips is not None:
                    frames = lambda clip: clip.transpose(1, 2).flatten(0, 1)  # noqa: E731 - every frame of the clip
                    sums[2] += float(lpips(frames(out), frames(target)).float().mean())
                sums[3] += 1
                if index == 0 and strip_file is not None:
                    sheet = contact_sheet([to_uint8_frames(target[0]), to_uint8_frames(out[0])], ["input", "reconstruction"],
                                          max_frames=self.strip_frames)
                    write_png(strip_file, sheet, overwrite=True)
        finally:
            model.train(was_training)
        totals = all_reduce_sum(sums.float()).double()
        if totals[3] == 0:
            raise DataError(f"vae.eval_sources: no held-out clip could be decoded (skipped: {self.skipped[:3]})")
        record = {"eval_psnr": float(totals[0] / totals[3]), "eval_ssim": float(totals[1] / totals[3]),
                  "eval_latent_rms": float((totals[5] / totals[4]).sqrt())}
        if lpips is not None:
            record["eval_lpips"] = float(totals[2] / totals[3])
        return {**record, "eval_time_s": time.perf_counter() - started, "eval_samples": int(totals[3])}
