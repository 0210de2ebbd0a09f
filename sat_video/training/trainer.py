"""The training loop: DeepSpeed around the DiT's loss, complete checkpoints, exact resume, logs.

Separation of concerns (as torchtitan): the model and the frozen stages are built from the config
(:mod:`sat_video.model.build`), the training inputs and the loss define the step (:mod:`sat_video.diffusion`),
DeepSpeed owns parallelism and the optimizer update, and this file only orders them, counts, logs and saves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sat_video.common.errors import CheckpointError, DataError, RunStopped
from sat_video.common.files import atomic_write
from sat_video.data.buckets import Bucket, assign_buckets, bucket_table, parse_buckets
from sat_video.data.clips import ClipSpec, VideoDataset, collate, load_image, source_shape
from sat_video.data.latent_cache import LatentCache, cache_settings, collate_cached
from sat_video.data.run_cache import GIB, RunLatentCache, run_cache_settings, settings_digest
from sat_video.data.sampler import ClipBatchSampler
from sat_video.data.sources import discover
from sat_video.diffusion.conditioning import TrainingInputBuilder
from sat_video.diffusion.loss import DiffusionLoss
from sat_video.diffusion.sampling import VideoGenerator, module_dtype, write_samples
from sat_video.diffusion.schedule import NoiseSchedule, sample_timesteps, timestep_interval
from sat_video.formats.sat_checkpoint import MODEL_STATES, load_checkpoint
from sat_video.model.build import build_dit, build_frozen_stages
from sat_video.model.config import DiTConfig
from sat_video.training.batch_encoding import BatchEncoder, EncodeAhead
from sat_video.training.deepspeed_setup import deepspeed_config, frozen_stage_dtype
from sat_video.training.distributed import DistributedEnv, all_reduce_sum, barrier, gather_objects, init_distributed, shutdown
from sat_video.training.optim import FiniteAdamW, parameter_groups, select_trainable
from sat_video.training.progressive import TrainingStage, plan_stages, stage_of, staged_lr_lambda
from sat_video.training.run_folder import RunFolder, trainer_state_file
from sat_video.training.sequence_parallel import ParallelLayout, SequenceParallelGroups
from sat_video.training.step_profile import StepProfile
from sat_video.training.watchdog import Watchdog

logger = logging.getLogger("sat_video.train")

# Testing hook: seconds to sleep after a checkpoint is staged and before it is committed, so that a test
# can SIGKILL a run in the middle of saving.
PAUSE_BEFORE_COMMIT_ENV = "SAT_VIDEO_PAUSE_BEFORE_COMMIT"


@dataclass
class LoopState:
    """Everything besides DeepSpeed's own state that an exact resume needs, per rank."""

    iteration: int = 0
    data_position: tuple[int, int] = (0, 0)
    nonfinite_streak: int = 0
    skipped_steps: int = 0
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    stage: int = 0
    """Index of the ``train.stages`` entry ``data_position`` belongs to."""


def _memory_stats(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"memory_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "memory_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"cpu_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``; ``None`` elsewhere). Under torchrun that is the worker,
    started a second or two after the command."""
    try:
        started_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime_s - started_ticks / os.sysconf("SC_CLK_TCK")


def _rng_state(generator: torch.Generator) -> dict:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Builds everything a config describes and runs the loop. ``Trainer(cfg).run()``.

    ``watchdog``: told each stage of the loop and each completed step, checkpoint and validation (:func:`train`
    gives one; without it nothing watches).
    """

    def __init__(self, cfg: DictConfig, env: DistributedEnv | None = None, watchdog: Watchdog | None = None):
        self.cfg = cfg
        self.env = env or init_distributed(cfg.train.collective_timeout_s)
        self.run_folder = RunFolder(cfg.train.save)
        self.watchdog = watchdog or Watchdog(0, 0, self.run_folder.hang_file(self.env.rank))
        self.state = LoopState()
        self._writer = None
        self._startup_s: float | None = None
        self._bucket: str | None = None
        self._batches: EncodeAhead | None = None
        self.run_cache: RunLatentCache | None = None
        self._build()
        self.profile = StepProfile(self.env.device)

    # ------------------------------------------------------------------ construction

    def _build(self) -> None:
        import deepspeed

        cfg, env = self.cfg, self.env
        train = cfg.train
        dit_config = DiTConfig.from_config(cfg)
        sequence_parallel = cfg.parallel.sequence_parallel_size
        self.layout = ParallelLayout.of(env.rank, env.world_size, sequence_parallel)
        resume_from = self.run_folder.resolve_resume(train.resume)
        if env.is_main:
            if resume_from is None:
                # auto found no complete checkpoint: what a run killed before its first save left is replaced
                self.run_folder.start_fresh(train.overwrite or train.resume == "auto")
            else:
                self.run_folder.remove_partial()
            if train.resume == "auto":
                logger.info("train.resume=auto: %s", f"resuming from {resume_from}" if resume_from else
                            f"starting fresh in {self.run_folder.path} (no complete checkpoint there)")
            atomic_write(self.run_folder.path / "config.yaml", lambda tmp: OmegaConf.save(cfg, tmp))
        barrier()

        # Data first: a dataset without a usable sample fails before any model is built.
        self.training_stages = plan_stages(cfg)
        self.cached = bool(cfg.data.latent_cache)
        self._build_data(self.training_stages[self._saved_stage(resume_from)])

        # The same initial weights on every rank; afterwards each data-parallel group draws its own timesteps and
        # noise, the same on all ranks of a sequence-parallel group (they train on one sample together).
        torch.manual_seed(train.seed)
        dit = build_dit(cfg)
        if train.init_checkpoint:
            load_checkpoint(dit, train.init_checkpoint)
        select_trainable(dit, list(train.trainable))
        dit.activation_checkpointing = train.activation_checkpointing
        dit.checkpoint_keeps_attention = train.checkpoint_keeps_attention
        self.sequence_groups = None
        if sequence_parallel > 1:
            self.sequence_groups = SequenceParallelGroups.initialize_sequence_parallel(sequence_parallel)
            self.sequence_groups.add_to(dit)
            if env.is_main:
                logger.info("parallel layout: %s", self.layout.describe())
        if train.compile:
            dit.compile_blocks()
        data_rank = self.layout.data_rank
        torch.manual_seed(train.seed + 1 + data_rank)
        random.seed(train.seed + 1 + data_rank)
        self.generator = torch.Generator().manual_seed(train.seed * 1_000_003 + data_rank)

        # T5 overflows in fp16, so the frozen stages run in bf16 or fp32. From a latent cache, the VAE is needed
        # only for the I2V condition and validation videos, T5 only for validation prompts.
        frozen_dtype = frozen_stage_dtype(cfg.deepspeed.precision)
        sampling = bool(train.validation.interval)
        self.stages = build_frozen_stages(
            cfg.model, first_stage=not self.cached or sampling or dit_config.in_channels > dit_config.out_channels,
            text_encoder=not self.cached or sampling, tiled=cfg.data.vae_tiling).to(env.device, frozen_dtype)
        self.inputs = TrainingInputBuilder(dit_config, cfg.model.diffusion, self.stages,
                                           scale_factor=cfg.model.first_stage.scale_factor)

        diffusion = cfg.model.diffusion
        schedule = NoiseSchedule(diffusion.snr_shift_scale, diffusion.num_train_timesteps)
        world = self.layout.data_size if diffusion.interval_timesteps else 1
        self.interval = timestep_interval(data_rank if diffusion.interval_timesteps else 0, world, diffusion.num_train_timesteps)
        module = DiffusionLoss(dit, schedule, ofs=diffusion.ofs)
        self.optimizer = FiniteAdamW(parameter_groups(dit, train.optimizer.weight_decay), train.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, staged_lr_lambda(cfg, self.training_stages)
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=module,
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            config=deepspeed_config(cfg.deepspeed, cfg.train),
            dist_init_required=False,
            mpu=self.sequence_groups,  # ZeRO then sums gradients over each sequence group and averages over D
        )

        if resume_from is not None:
            self._load(resume_from)

    def _build_data(self, stage: TrainingStage) -> None:
        """The data set, clip settings and sampler kinds of ``stage`` (collective with ``data.buckets``)."""
        cfg = stage.cfg
        self.stage = stage
        self.clip_spec = ClipSpec.from_config(cfg.data, cfg.model.dit)
        if self.cached:
            self.dataset = LatentCache(cfg.data.latent_cache)
            self.dataset.check_compatible(cfg.model, cfg.data)
            self.kinds, self.collate = self.dataset.kinds, collate_cached
            self.state.skipped_files.extend(item for item in self.dataset.skipped if item not in self.state.skipped_files)
            return
        refs = discover(list(cfg.data.sources))
        buckets = self._assign_buckets(refs, cfg) if cfg.data.buckets else None
        if buckets is not None:
            refs = [ref for ref, _ in buckets]
            if not refs:
                reasons = "; ".join(f"{path}: {reason}" for path, reason in self.state.skipped_files[:3])
                raise DataError(f"no clip fits data.buckets, e.g. {reasons}")
        self.dataset = VideoDataset(refs, self.clip_spec, None if buckets is None else [b for _, b in buckets], cfg.train.seed)
        self.dataset.first_usable()
        self.kinds, self.collate = self.dataset.kinds, collate
        self.run_cache = self._run_cache(cfg)

    def _run_cache(self, cfg: DictConfig) -> RunLatentCache | None:
        """The in-run latent cache of a stage's data, when it is on and exact."""
        data = cfg.data
        if not data.cache_latents:
            return None
        if data.random_start:
            if self.env.is_main:
                logger.info("in-run latent cache off: data.random_start cuts a different clip from each video every epoch")
            return None
        settings = run_cache_settings(cache_settings(cfg.model, data), list(data.sources))
        root = Path(data.cache_dir) if data.cache_dir else self.run_folder.path / "run_cache"
        cache = RunLatentCache(root / settings_digest(settings), int(data.cache_memory_gb * GIB), int(data.cache_disk_gb * GIB),
                               self.layout.data_size)
        if self.env.is_main:
            logger.info("in-run latent cache: up to %g GiB in memory per rank, then up to %g GiB in %s",
                        data.cache_memory_gb, data.cache_disk_gb, cache.folder)
        return cache

    def _assign_buckets(self, refs: list, cfg: DictConfig) -> list:
        """Each clip's bucket, from headers only; the ranks share the files. Writes ``buckets.json`` and logs the table;
        clips that fit no bucket join the skipped files."""
        env = self.env
        buckets = parse_buckets(cfg.data.buckets, cfg.model.dit.patch_size)
        mine = list(range(env.rank, len(refs), env.world_size))
        assigned, skipped = assign_buckets([refs[i] for i in mine], buckets, lambda ref: source_shape(ref, self.clip_spec),
                                           cfg.data.max_upscale, self.clip_spec.min_frames)
        bucket_of = {str(ref.path): bucket for ref, bucket in assigned}
        merged_buckets, merged_skipped = {}, set()
        for part_buckets, part_skipped in gather_objects((bucket_of, skipped)):
            merged_buckets.update(part_buckets)
            merged_skipped.update(map(tuple, part_skipped))
        # in skipped_files.txt at the end of the run
        self.state.skipped_files.extend(item for item in sorted(merged_skipped) if item not in self.state.skipped_files)
        result = [(ref, merged_buckets[str(ref.path)]) for ref in refs if str(ref.path) in merged_buckets]
        table = {b.name: [str(ref.path) for ref, rb in result if rb == b] for b in sorted(buckets)}
        if env.is_main:
            name = "buckets.json" if len(self.training_stages) == 1 else f"buckets-stage{self.stage.index}.json"
            atomic_write(self.run_folder.path / name, lambda tmp: tmp.write_text(json.dumps(table, indent=1)))
            logger.info("clips per bucket (%d fit none):\n%s", len(merged_skipped), bucket_table(table))
        return result

    # ------------------------------------------------------------------ checkpoints

    def _saved_stage(self, folder: Path | None) -> int:
        """The stage a checkpoint was written in, read before the data is built so that only its data is; 0 for a fresh
        start (a missing state file is reported by :meth:`_load`)."""
        state_file = trainer_state_file(folder, self.env.rank) if folder is not None else None
        if state_file is None or not state_file.is_file():
            return 0
        return torch.load(state_file, map_location="cpu", weights_only=True)["loop"].get("stage", 0)

    def _load(self, folder: Path) -> None:
        state_file = trainer_state_file(folder, self.env.rank)
        if not state_file.is_file():
            raise CheckpointError(
                f"{state_file} is missing: {folder} was written by a run with another number of processes "
                f"(resuming needs the same number of processes, now {self.env.world_size})"
            )
        path, _ = self.engine.load_checkpoint(
            str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {folder}")
        # The optimizer state carries the LR of the saved step; take it from the schedule of this config, which
        # may extend the run (a larger train.train_iters) or change its decay.
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_lr()):
            group["lr"] = lr
        saved = torch.load(state_file, map_location="cpu", weights_only=True)
        loop = saved["loop"]
        self.layout.check_resumable(loop.get("layout"), folder)
        _set_rng_state(saved["rng"], self.generator)
        self.state = LoopState(
            iteration=loop["iteration"],
            data_position=tuple(loop["data_position"]),
            nonfinite_streak=loop["nonfinite_streak"],
            skipped_steps=loop["skipped_steps"],
            skipped_files=[tuple(item) for item in loop["skipped_files"]],
            stage=loop.get("stage", 0),
        )
        if self.env.is_main:
            self._truncate_metrics(self.state.iteration)
            logger.info("resumed from %s at iteration %d", folder, self.state.iteration)

    def save(self) -> Path:
        """Write a complete checkpoint of the current iteration (collective: every rank must call it)."""
        iteration = self.state.iteration
        self.watchdog.enter("saving checkpoint")
        staging = self.run_folder.staging(iteration)
        if self.env.is_main:
            staging.parent.mkdir(parents=True, exist_ok=True)
        barrier()
        self.engine.save_checkpoint(
            str(self.run_folder.path), tag=staging.name, client_state={"iteration": iteration}, save_latest=False
        )
        if self.engine.zero_optimization_partition_weights():
            # ZeRO-3 writes only partitions; gather the whole DiT into SAT's file so every loader can read it.
            module = self.engine._zero3_consolidated_16bit_state_dict()
            if self.env.is_main:
                torch.save({"module": module, "iteration": iteration}, staging / MODEL_STATES)
        loop = {
            "iteration": iteration,
            "data_position": list(self.state.data_position),
            "nonfinite_streak": self.state.nonfinite_streak,
            "skipped_steps": self.state.skipped_steps,
            "skipped_files": [list(item) for item in self.state.skipped_files],
            "layout": [self.layout.data_size, self.layout.sequence_size],
            "stage": self.state.stage,
        }
        torch.save({"rng": _rng_state(self.generator), "loop": loop}, trainer_state_file(staging, self.env.rank))
        barrier()
        final = self.run_folder.path / str(iteration)
        if self.env.is_main:
            pause = float(os.environ.get(PAUSE_BEFORE_COMMIT_ENV, 0))
            if pause:
                time.sleep(pause)
            self.run_folder.commit(iteration, self.cfg.train.keep_last)
            logger.info("saved checkpoint %s", final)
        barrier()
        self.watchdog.completed(f"checkpoint {iteration}")
        return final

    # ------------------------------------------------------------------ logging

    def _truncate_metrics(self, iteration: int) -> None:
        """Drop metric lines a killed run wrote after the checkpoint we resume from."""
        file = self.run_folder.path / "metrics.jsonl"
        if file.is_file():
            kept = [line for line in file.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= iteration]
            atomic_write(file, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))

    def _log(self, record: dict) -> None:
        with open(self.run_folder.path / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(f"train/{key}", value, record["step"])
            writer.flush()

    def _tensorboard(self):
        if self.cfg.train.tensorboard and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_folder.path / "tensorboard"))
        return self._writer

    # ------------------------------------------------------------------ the loop

    def _loader(self) -> EncodeAhead:
        """Batches of the current stage from ``state.data_position`` on, encoded ``data.prefetch`` ahead."""
        if self._batches is not None:
            self._batches.close()
        sampler = ClipBatchSampler(
            self.kinds,
            self.stage.cfg.train.micro_batch_size,
            self.layout.data_rank,
            self.layout.data_size,
            self.cfg.train.seed,
            start=self.state.data_position,
            weights=self._bucket_weights(),
        )
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=sampler if self.run_cache is None else self.run_cache.planned(sampler),
            num_workers=self.cfg.data.num_workers,
            collate_fn=self.collate,
            pin_memory=self.env.device.type == "cuda",
            persistent_workers=self.cfg.data.num_workers > 0,
        )
        if self.cached:
            encode = lambda batch: batch.to(self.env.device)  # noqa: E731 - already encoded
        else:
            dit_config = self.engine.module.dit.dit_config
            encode = BatchEncoder(self.stages, self.dataset, self.run_cache, self.env.device,
                                  module_dtype(self.stages.first_stage), dit_config.in_channels > dit_config.out_channels)
        self._batches = EncodeAhead(iter(loader), encode, self.cfg.data.prefetch, self.env.device)
        return self._batches

    def _bucket_weights(self) -> dict | None:
        weights = self.stage.cfg.data.bucket_weights
        return {Bucket.from_name(name): float(w) for name, w in weights.items()} if weights else None

    def _enter_stage(self, stage: TrainingStage):
        """Switch to ``stage`` at its first iteration: its data from the start, a new loader."""
        self.state.stage, self.state.data_position = stage.index, (0, 0)
        self._build_data(stage)
        if self.env.is_main:
            logger.info("stage %d from iteration %d: %s", stage.index, stage.start + 1,
                        ", ".join(f"{k}={v}" for k, v in self.cfg.train.stages[stage.index].set.items()) or "run config")
        return self._loader()

    def _micro_step(self, batches: EncodeAhead, first: bool) -> torch.Tensor:
        self.watchdog.enter("data loading", slow=first)  # the first step also starts the loader workers and compiles
        waited = time.perf_counter()
        encoded = next(batches)
        self.profile.add("data_wait", time.perf_counter() - waited)
        self.profile.add("encode", encoded.encode_s)
        batch = encoded.batch
        self.watchdog.enter("forward/backward")
        self.state.data_position = (batch.position[0], batch.position[1] + 1)
        self._bucket = batch.bucket
        self.state.skipped_files.extend(item for item in batch.skipped if item not in self.state.skipped_files)
        with self.profile.phase("forward"):
            # latents sampled from the posterior moments here, with the step's generator, whoever encoded them
            inputs = self.inputs.prepare_cached(batch, self.generator)
            timesteps = sample_timesteps(inputs.latents.shape[0], self.interval, self.generator)
            noise = torch.randn(inputs.latents.shape, generator=self.generator)
            loss = self.engine(inputs, timesteps, noise).mean()
        with self.profile.phase("backward"):
            # The ranks of a sequence group compute the same loss and the gradients of their parts are summed: each
            # backpropagates its share (mixins/sequence_parallel.py).
            self.engine.backward(loss / self.layout.sequence_size)
        self.watchdog.enter("optimizer step")
        with self.profile.phase("optimizer"):
            self.engine.step()
        return loss.detach().float()

    def run(self) -> LoopState:
        """Train until ``train.train_iters``; returns the final loop state."""
        env, train = self.env, self.cfg.train
        batches = self._loader()
        progress = None
        if env.is_main and train.progress_bar:
            from tqdm import tqdm

            progress = tqdm(total=train.train_iters, initial=self.state.iteration, desc="train", dynamic_ncols=True)
        window = {"loss": 0.0, "steps": 0, "time": 0.0}
        try:
            start = self.state.iteration
            while self.state.iteration < train.train_iters:
                if self.state.iteration >= self.stage.until:
                    batches = self._enter_stage(stage_of(self.training_stages, self.state.iteration + 1))
                global_batch = self.stage.cfg.train.micro_batch_size * train.gradient_accumulation_steps * self.layout.data_size
                step_start = time.perf_counter()
                lr = self.engine.get_lr()[0]
                self.optimizer.last_step_skipped = False
                first = self.state.iteration == start
                losses = torch.stack([self._micro_step(batches, first) for _ in range(train.gradient_accumulation_steps)])
                # [sum of losses, non-finite micro-steps, micro-steps] over all ranks
                self.watchdog.enter("collective (loss all-reduce)")
                totals = all_reduce_sum(
                    torch.tensor(
                        [
                            losses.nan_to_num(0.0, 0.0, 0.0).sum().item(),
                            float((~torch.isfinite(losses)).sum()),
                            float(losses.numel()),
                        ]
                    )
                )
                skipped = (not self.engine.was_step_applied()) or self.optimizer.last_step_skipped or totals[1] > 0
                self.state.iteration += 1
                self.watchdog.completed(f"iteration {self.state.iteration}")
                if first:
                    self._startup_s = _process_age_s()
                    if self._startup_s is not None and env.is_main:
                        logger.info("first step done %.1f s after the process started", self._startup_s)
                elapsed = time.perf_counter() - step_start
                if skipped:
                    self.state.skipped_steps += 1
                    self.state.nonfinite_streak += 1
                    logger.warning(
                        "iteration %d: non-finite loss or gradients, step skipped (%d in a row)",
                        self.state.iteration,
                        self.state.nonfinite_streak,
                    )
                else:
                    self.state.nonfinite_streak = 0
                    window["loss"] += (totals[0] / totals[2]).item()
                    window["steps"] += 1
                window["time"] += elapsed
                if progress is not None:
                    progress.update(1)
                if env.is_main and (self.state.iteration % train.log_interval == 0 or skipped):
                    self._log_window(window, global_batch, lr)
                if self.state.nonfinite_streak >= train.max_nonfinite_steps:
                    self.save()
                    raise RunStopped(
                        f"{self.state.nonfinite_streak} steps in a row had a non-finite loss or gradients "
                        f"(train.max_nonfinite_steps={train.max_nonfinite_steps}); stopped at iteration "
                        f"{self.state.iteration} and saved the last good weights to {self.run_folder.path}"
                    )
                if train.validation.interval and self.state.iteration % train.validation.interval == 0:
                    self.validate()
                if self.state.iteration % train.save_interval == 0 or self.state.iteration == train.train_iters:
                    self.save()
        finally:
            if progress is not None:
                progress.close()
            if self._batches is not None:
                self._batches.close()
        if self.run_cache is not None and env.is_main:
            logger.info("in-run latent cache at the end: %s", self.run_cache.describe())
        self._report_skipped_files()
        return self.state

    def _log_window(self, window: dict, global_batch: int, lr: float) -> None:
        steps = max(window["steps"], 1)
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "step": self.state.iteration,
            "loss": window["loss"] / steps if window["steps"] else float("nan"),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "samples_per_s": global_batch * steps / max(window["time"], 1e-9),
            "step_time_s": window["time"] / steps,
            "skipped_steps": self.state.skipped_steps,
            **_memory_stats(self.env.device),
            **self.profile.take(steps),
            "epoch": self.state.data_position[0],
        }
        if self.run_cache is not None:
            counts = self.run_cache.take_counts()
            record["cache_hit_rate"] = counts.hit_rate
            record["cache_memory_gb"] = self.run_cache.memory_used / GIB
            if counts.late or counts.dropped:
                logger.warning("in-run latent cache: %d clip(s) decoded late in the step, %d not kept (budgets full: "
                               "data.cache_memory_gb, data.cache_disk_gb)", counts.late, counts.dropped)
        if self._bucket is not None:  # of the window's last step
            record["bucket"] = self._bucket
        if self._startup_s is not None:  # once: in the first record after this process's first step
            record["startup_s"], self._startup_s = self._startup_s, None
        self._log(record)
        logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        window.update(loss=0.0, steps=0, time=0.0)

    def validate(self) -> Path | None:
        """Sample ``train.validation.prompts`` with the current weights into ``<save>/samples/<iteration>``.

        Every rank samples (ZeRO-3 needs all of them for a forward); the main rank writes. Sampling draws from
        its own seeded generators, so validation never changes what training draws.
        """
        self.watchdog.enter("validation", slow=True)
        with self._batches.paused() if self._batches is not None else contextlib.nullcontext():
            return self._validate()

    def _validate(self) -> Path | None:
        started = time.perf_counter()
        cfg, dit_config = self.cfg, self.engine.module.dit.dit_config
        validation = cfg.train.validation
        sizes = [tuple(size) for size in validation.sizes] or [(dit_config.num_frames, self.clip_spec.height,
                                                                 self.clip_spec.width)]
        generator = VideoGenerator(  # the engine's DiT as it is: under ZeRO-3 each block is gathered as it runs
            self.engine.module.dit,
            self.stages,
            snr_shift_scale=cfg.model.diffusion.snr_shift_scale,
            num_train_timesteps=cfg.model.diffusion.num_train_timesteps,
            ofs=cfg.model.diffusion.ofs,
            device=self.env.device,
        )
        folder = self.run_folder.path / "samples" / str(self.state.iteration)
        for frames, height, width in sizes:
            image = load_image(validation.image, height, width) if validation.image else None
            videos = generator.generate(list(validation.prompts), cfg.sample, num_frames=frames, height=height,
                                        width=width, image=image, steps=validation.steps)
            if self.env.is_main:  # one folder per size when several are asked for
                size = Bucket(frames, height, width).name if validation.sizes else ""
                written = write_samples(folder / size, videos, cfg.sample.fps or cfg.data.fps, overwrite=True)
                self._log_sheet(written[-1], size and f"_{size}")
        self.watchdog.completed(f"validation at iteration {self.state.iteration}")
        if not self.env.is_main:
            return None
        logger.info("validation at iteration %d took %.1f s; samples in %s\n%s", self.state.iteration,
                    time.perf_counter() - started, folder, generator.memory.describe())
        return folder

    def _log_sheet(self, sheet_file: Path, suffix: str) -> None:
        writer = self._tensorboard()
        if writer is not None:
            from PIL import Image

            sheet = np.asarray(Image.open(sheet_file).convert("RGB"))
            writer.add_image(f"validation/contact_sheet{suffix}", sheet, self.state.iteration, dataformats="HWC")
            writer.flush()

    def _report_skipped_files(self) -> None:
        self.watchdog.enter("collective (gathering skipped files)")
        merged = sorted({item for items in gather_objects(self.state.skipped_files) for item in items})
        if not self.env.is_main:
            return
        report = self.run_folder.path / "skipped_files.txt"
        if merged:
            lines = [f"{path}\t{reason}" for path, reason in merged]
            atomic_write(report, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
            logger.warning("skipped %d unusable file(s) (list in %s):\n  %s", len(merged), report, "\n  ".join(lines))
        else:
            logger.info("no unusable files met")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.engine.destroy()  # removes its gradient hooks, which otherwise keep it (and its process groups) alive


def train(cfg: DictConfig) -> LoopState:
    """Run a whole training job in this process (one rank of a ``torchrun`` job, or a single process)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    rank = int(os.environ.get("RANK", 0))  # the watchdog also watches joining the process group
    watch = Watchdog(cfg.train.hang_timeout_s, cfg.train.slow_stage_timeout_s, RunFolder(cfg.train.save).hang_file(rank), rank)
    with watch:
        env = init_distributed(cfg.train.collective_timeout_s)
        if not env.is_main:
            logging.getLogger("sat_video").setLevel(logging.WARNING)
        try:
            trainer = Trainer(cfg, env, watch)
            try:
                return trainer.run()
            finally:
                trainer.close()
                del trainer  # its engine and model hold the process groups, which shutdown() must see go
        finally:
            shutdown()
