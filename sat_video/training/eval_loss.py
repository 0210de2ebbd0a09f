"""A held-out loss: ``train.eval.sources`` at fixed timesteps with fixed noise, so that it is the same function of the
weights at every evaluation, in every run and in every variant of an ablation.

Clip ``i`` (in discovery order, of those that fit ``data.buckets`` when it is set) is noised at each of
``train.eval.timesteps`` with noise drawn from a generator seeded by ``(train.eval.seed, i)``, without caption or image
dropout, one forward per clip and timestep (batch 1, so no batch mixes clips). The data-parallel ranks share the clips
(rank ``r`` takes ``r, r + D, ...``; a sequence-parallel group evaluates its clips together), each clip is decoded and
encoded once per run and kept in host memory, and every rank runs the same number of forwards (a rank out of clips
repeats one with weight 0), which ZeRO-3 needs.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from omegaconf import DictConfig

from sat_video.common.errors import DataError
from sat_video.data.buckets import assign_buckets, parse_buckets
from sat_video.data.clips import ClipSpec, UnusableSample, bucket_spec, load_clip, source_shape
from sat_video.data.latent_cache import CachedSample, EncodedClip, collate_cached
from sat_video.data.sources import SampleRef, discover
from sat_video.diffusion.conditioning import TrainingInputBuilder
from sat_video.diffusion.sampling import module_dtype
from sat_video.model.stages import FrozenStages
from sat_video.training.distributed import DistributedEnv, all_reduce_sum
from sat_video.training.sequence_parallel import ParallelLayout

logger = logging.getLogger("sat_video.train")


def heldout_clips(cfg: DictConfig, sources: list[str], max_samples: int | None, clip_spec: ClipSpec,
                  key: str) -> tuple[list[tuple[SampleRef, ClipSpec]], list[tuple[str, str]]]:
    """The first ``max_samples`` clips of ``sources`` in discovery order, each with how it is cut (its bucket's size with
    ``data.buckets``, from headers: every rank reads them all, held-out sets are small, and decides alike), and the
    ``(path, reason)`` of those that fit no bucket. ``key`` names the sources in errors."""
    refs = discover(sources)[:max_samples]
    skipped: list[tuple[str, str]] = []
    specs = [clip_spec] * len(refs)
    if cfg.data.buckets:
        buckets = parse_buckets(cfg.data.buckets, cfg.model.dit.patch_size)
        assigned, skipped = assign_buckets(refs, buckets, lambda ref: source_shape(ref, clip_spec), cfg.data.max_upscale,
                                           clip_spec.min_frames)
        refs, specs = [ref for ref, _ in assigned], [bucket_spec(clip_spec, bucket) for _, bucket in assigned]
    if not refs:
        raise DataError(f"{key} ({', '.join(sources)}): no usable clip"
                        + (f", e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""))
    return list(zip(refs, specs)), skipped


class EvalLoss:
    """The held-out clips of this rank and how to evaluate them. ``skipped``: ``(path, reason)`` of the clips left out
    (headers that fit no bucket at construction; files that fail to decode at the first evaluation)."""

    def __init__(self, cfg: DictConfig, layout: ParallelLayout, env: DistributedEnv, clip_spec: ClipSpec):
        evaluation = cfg.train.eval
        if not evaluation.sources:
            raise DataError("train.eval.interval is set but train.eval.sources is empty: name the held-out clips")
        self.timesteps = [int(t) for t in evaluation.timesteps]
        bad = [t for t in self.timesteps if not 0 <= t < cfg.model.diffusion.num_train_timesteps]
        if not self.timesteps or bad:
            raise DataError(f"train.eval.timesteps: expected timesteps in [0, {cfg.model.diffusion.num_train_timesteps}), "
                            f"found {list(evaluation.timesteps)}")
        self.seed, self.env, self.sequence_size = int(evaluation.seed), env, layout.sequence_size
        clips, self.skipped = heldout_clips(cfg, list(evaluation.sources), evaluation.max_samples, clip_spec,
                                            "train.eval.sources")
        self.size = len(clips)
        self.mine: list[tuple[int, SampleRef, ClipSpec]] = [
            (i, *clips[i]) for i in range(layout.data_rank, self.size, layout.data_size)]
        self.rounds = -(-self.size // layout.data_size)
        self._encoded: list[tuple[int, EncodedClip]] | None = None

    def _encode(self, stages: FrozenStages, image_condition: bool) -> list[tuple[int, EncodedClip]]:
        """This rank's clips through the frozen stages, once; a clip that fails to decode is left out and named."""
        encoded = []
        device, dtype = self.env.device, module_dtype(stages.first_stage)
        for index, ref, spec in self.mine:
            try:
                video, caption = load_clip(ref, spec)
            except UnusableSample as err:
                self.skipped.append((err.path, err.reason))
                logger.warning("held-out clip skipped: %s: %s", err.path, err.reason)
                continue
            with torch.no_grad():
                video = video[None].to(device, dtype)
                mean, std = stages.encode_moments(video)
                text = stages.encode_text([caption])
            encoded.append((index, EncodedClip(mean[0].cpu(), None if std is None else std[0].cpu(), text[0].cpu(),
                                               video[0, :, :1].cpu() if image_condition else None, caption, str(ref.path))))
        if all_reduce_sum(torch.tensor([float(not encoded)]))[0] > 0:  # every rank raises alike
            raise DataError(f"train.eval.sources: a data-parallel rank has no usable held-out clip ({self.size} clip(s) "
                            f"for {self.rounds} round(s)); give at least one usable clip per data-parallel rank")
        return encoded

    @torch.no_grad()
    def evaluate(self, loss_fn, inputs: TrainingInputBuilder, stages: FrozenStages, image_condition: bool) -> dict:
        """``{"eval_loss": mean, "eval_loss_t<t>": mean at t, ..., "eval_time_s", "eval_samples"}`` over all ranks'
        clips (collective). ``loss_fn(inputs, timesteps, noise)``: the per-sample diffusion loss (the engine's module,
        as validation samples with its DiT, outside the engine's training bookkeeping)."""
        started = time.perf_counter()
        if self._encoded is None:
            self._encoded = self._encode(stages, image_condition)
        sums = torch.zeros(len(self.timesteps) + 1, dtype=torch.float64)  # per timestep, then the clips counted
        for round_index in range(self.rounds):
            weight = 1.0 if round_index < len(self._encoded) else 0.0
            index, clip = self._encoded[min(round_index, len(self._encoded) - 1)]
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0]))
            batch = collate_cached([CachedSample(**vars(clip))]).to(self.env.device)
            clean = inputs.prepare_cached(batch, generator, dropout=False)
            for column, timestep in enumerate(self.timesteps):
                noise = torch.randn(clean.latents.shape, generator=generator)
                loss = loss_fn(clean, torch.tensor([timestep]), noise)
                sums[column] += weight * float(loss.float().sum())
            sums[-1] += weight
        totals = all_reduce_sum(sums.float()).double()
        per_timestep = (totals[:-1] / totals[-1]).tolist()  # each sequence group's ranks add its clips S times: no matter
        record = {"eval_loss": float(np.mean(per_timestep)),
                  **{f"eval_loss_t{t}": value for t, value in zip(self.timesteps, per_timestep)}}
        samples = round(totals[-1].item() / self.sequence_size)
        return {**record, "eval_time_s": time.perf_counter() - started, "eval_samples": samples}
