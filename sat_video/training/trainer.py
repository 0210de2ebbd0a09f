"""The training loop: DeepSpeed around the DiT's loss, complete checkpoints, exact resume, logs.

Separation of concerns (as torchtitan): the model and the frozen stages are built from the config
(:mod:`sat_video.model.build`), the training inputs and the loss define the step (:mod:`sat_video.diffusion`),
DeepSpeed owns parallelism and the optimizer update, and named parts own the rest: the data
(:mod:`~sat_video.training.data_pipeline`), checkpoints (:mod:`~sat_video.training.checkpoint`), metrics and logs
(:mod:`~sat_video.training.metrics`), validation (:mod:`~sat_video.training.validation`) and features plugged in as
callbacks (:mod:`~sat_video.training.callbacks`). This file builds them, orders them and counts.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from sat_video.common.errors import ConfigError, RunStopped
from sat_video.data.buckets import bucket_table
from sat_video.diffusion.conditioning import TrainingInputBuilder
from sat_video.diffusion.loss import DiffusionLoss
from sat_video.diffusion.schedule import NoiseSchedule, sample_timesteps, timestep_interval
from sat_video.formats.sat_checkpoint import load_checkpoint
from sat_video.model.build import build_dit, build_frozen_stages
from sat_video.model.config import DiTConfig
from sat_video.model.dit import DiffusionTransformer
from sat_video.model.storage_dtype import check_storage_dtype, store_frozen_weights
from sat_video.training import ema
from sat_video.training.block_offload import BlockOffload, check_block_offload
from sat_video.training.callbacks import Callback, StepEnd
from sat_video.training.checkpoint import Checkpoints, LoopState, RngState, saved_period
from sat_video.training.data_pipeline import DataPipeline
from sat_video.training.deepspeed_setup import deepspeed_config, frozen_stage_dtype
from sat_video.training.distributed import DistributedEnv, all_reduce_sum, init_distributed
from sat_video.training.elastic_resume import check_resume_layout
from sat_video.training.eval_loss import EvalLoss
from sat_video.training.job import open_run_folder, run_job
from sat_video.training.metrics import MetricsLog
from sat_video.training.optim import FiniteAdamW, parameter_groups, select_trainable
from sat_video.training.progressive import lr_lambda_by_period, plan_periods
from sat_video.training.run_folder import RunFolder
from sat_video.training.sequence_parallel import ParallelLayout, SequenceParallelGroups
from sat_video.training.step_memory import StepMemory
from sat_video.training.validation import Validation
from sat_video.training.watchdog import Watchdog

logger = logging.getLogger("sat_video.train")


class Trainer:
    """Builds everything a config describes and runs the loop. ``Trainer(cfg).run()``.

    ``env``: the process group joined (:func:`init_distributed` when not given). ``watchdog``: told each stage of the
    loop and each completed step, checkpoint and validation (:func:`train` gives one; without it nothing watches).
    ``callbacks``: features called after each step and saved with each checkpoint.
    """

    def __init__(self, cfg: DictConfig, env: DistributedEnv | None = None, watchdog: Watchdog | None = None,
                 callbacks: Sequence[Callback] = ()):
        self.cfg = cfg
        self.env = env or init_distributed(cfg.train.collective_timeout_s)
        self.run_folder = RunFolder(cfg.train.save)
        self.watchdog = watchdog or Watchdog(0, 0, self.run_folder.hang_file(self.env.rank))
        self.callbacks = list(callbacks)
        self.state = LoopState()
        self.metrics = MetricsLog(self.run_folder, cfg, self.env)  # a tracker not installed is refused here
        self.layout = ParallelLayout.of(self.env.rank, self.env.world_size, cfg.parallel.sequence_parallel_size)
        resume_from = open_run_folder(self.run_folder, cfg, self.env, self._check_resume)

        # Data first: a dataset without a usable sample fails before any model is built; a resumed run builds only
        # the data of the period it stopped in.
        self.periods = plan_periods(cfg)
        self.state.period = saved_period(resume_from)
        self.data = DataPipeline(cfg, self.env, self.layout, self.run_folder, self.state, self.metrics.profile, self.periods)

        # The same initial weights on every rank; afterwards each data-parallel group draws its own timesteps and
        # noise, the same on all ranks of a sequence-parallel group (they train on one sample together).
        torch.manual_seed(cfg.train.seed)
        dit = self._build_dit()
        data_rank = self.layout.data_rank
        torch.manual_seed(cfg.train.seed + 1 + data_rank)
        random.seed(cfg.train.seed + 1 + data_rank)
        self.generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + data_rank)

        # T5 overflows in fp16, so the frozen stages run in bf16 or fp32. From a latent cache, the VAE is needed
        # only for the I2V condition and validation videos, T5 only for validation prompts.
        dit_config = DiTConfig.from_config(cfg)
        self.image_condition = dit_config.in_channels > dit_config.out_channels
        # The held-out loss encodes its clips too.
        encoding = not self.data.cached or bool(cfg.train.validation.interval) or bool(cfg.train.eval.interval)
        frozen_dtype = frozen_stage_dtype(cfg.deepspeed.precision)
        self.frozen_stages = build_frozen_stages(
            cfg.model, first_stage=encoding or self.image_condition, text_encoder=encoding,
            tiled=cfg.data.vae_tiling).to(self.env.device, frozen_dtype)
        self.inputs = TrainingInputBuilder(dit_config, cfg.model.diffusion, self.frozen_stages,
                                           scale_factor=cfg.model.first_stage.scale_factor)
        self._build_engine(dit)
        self.metrics.memory = StepMemory(self.env.device, lambda: [self.engine.module, self.engine.optimizer,
                                                                   self.frozen_stages], cfg.train.measure_memory)
        try:
            self.validation = Validation(cfg, self.env, self.run_folder, self.frozen_stages, self.metrics)
            self.evaluation = EvalLoss(cfg, self.layout, self.env, self.data.clip_spec) if cfg.train.eval.interval else None
            ema_weights = None if self.average is None else lambda: ema.gather(self.engine, dit, keep=self.env.is_main)
            self.checkpoints = Checkpoints(self.run_folder, self.engine, self.optimizer, self.scheduler,
                                           {"rng": RngState(self.generator), "loop": self.state, **self._callback_parts()},
                                           self.layout, self.env, cfg.train.keep_last, ema_weights)
            if resume_from is not None:
                with self.block_offload.on_host():  # DeepSpeed loads into the parameters themselves
                    self.checkpoints.load(resume_from, self.elastic)
                ema.check_resumed(ema.base_optimizer(self.engine), self.average is not None, str(resume_from))
                if self.elastic is not None:
                    if self.elastic.saved.data_size != self.layout.data_size:  # else the same plan goes on as written
                        self.data.continue_epoch(self.elastic.saved.data_size)
                    if self.env.is_main:
                        logger.warning("%s", self.elastic.describe())
                if self.env.is_main:
                    self.metrics.truncate(self.state.iteration)
                    logger.info("resumed from %s at iteration %d", resume_from, self.state.iteration)
        except BaseException:
            self.close()  # nobody else can: the engine's hooks would keep it, and the process groups, alive
            raise

    # ------------------------------------------------------------------ construction

    def _check_resume(self, resume_from: Path | None) -> None:
        """What this config cannot resume or run with, decided before anything in the folder is written or loaded (every
        rank reads the same file and decides alike)."""
        train = self.cfg.train
        self.elastic = None if resume_from is None else check_resume_layout(
            train.resume_layout, resume_from, self.layout, self._deepspeed_config()["zero_optimization"]["stage"])
        ema.check_ema(train.ema, self._deepspeed_config()["zero_optimization"]["stage"], self.cfg.deepspeed.precision,
                      elastic=self.elastic is not None)
        if train.validation.weights != "live" and not train.ema.enabled:
            raise ConfigError(f"train.validation.weights={train.validation.weights} needs train.ema.enabled=true")

    def _build_dit(self) -> DiffusionTransformer:
        """The DiT with its initial weights, what trains, and how it runs (checkpointing, compile, split over
        ``self.sequence_groups`` when S > 1)."""
        train = self.cfg.train
        dit = build_dit(self.cfg)
        if train.init_checkpoint:
            load_checkpoint(dit, train.init_checkpoint)
        select_trainable(dit, list(train.trainable))
        check_storage_dtype(dit, self.cfg.model.dit.storage_dtype, list(train.trainable),  # SFT, ZeRO-3: refused
                            deepspeed_config(self.cfg.deepspeed, train)["zero_optimization"]["stage"])
        check_block_offload(dit, train.offload_blocks, activation_checkpointing=train.activation_checkpointing,
                            zero_stage=deepspeed_config(self.cfg.deepspeed, train)["zero_optimization"]["stage"],
                            compiled=train.compile)
        dit.activation_checkpointing = train.activation_checkpointing
        dit.checkpoint_keeps_attention = train.checkpoint_keeps_attention
        self.sequence_groups = None
        if self.layout.sequence_size > 1:
            self.sequence_groups = SequenceParallelGroups.initialize_sequence_parallel(self.layout.sequence_size)
            self.sequence_groups.add_to(dit)
            if self.env.is_main:
                logger.info("parallel layout: %s", self.layout.describe())
        if train.compile:
            dit.compile_blocks()
        return dit

    def _build_engine(self, dit: DiffusionTransformer) -> None:
        """The loss around ``dit``, the optimizer and its schedule, in DeepSpeed's engine."""
        import deepspeed

        cfg = self.cfg
        diffusion = cfg.model.diffusion
        world = self.layout.data_size if diffusion.interval_timesteps else 1
        data_rank = self.layout.data_rank if diffusion.interval_timesteps else 0
        self.interval = timestep_interval(data_rank, world, diffusion.num_train_timesteps)
        schedule = NoiseSchedule(diffusion.snr_shift_scale, diffusion.num_train_timesteps)
        diffusion_loss = DiffusionLoss(dit, schedule, ofs=diffusion.ofs)
        self.average = ema.ExponentialMovingAverage(cfg.train.ema) if cfg.train.ema.enabled else None
        self.optimizer = FiniteAdamW(parameter_groups(dit, cfg.train.optimizer.weight_decay), cfg.train.optimizer, self.average)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda_by_period(cfg, self.periods))
        self.engine, _, _, _ = deepspeed.initialize(
            model=diffusion_loss,  # the DiT with its loss: what DeepSpeed trains
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            config=self._deepspeed_config(),
            dist_init_required=False,
            mpu=self.sequence_groups,  # ZeRO then sums gradients over each sequence group and averages over D
        )
        store_frozen_weights(dit, cfg.model.dit.storage_dtype)  # after the engine cast the DiT to its dtype
        # once the engine has moved and cast the DiT: the offloaded blocks' frozen weights wait in host memory
        self.block_offload = BlockOffload(dit, cfg.train.offload_blocks, self.env.device)

    def _deepspeed_config(self) -> dict:
        config = deepspeed_config(self.cfg.deepspeed, self.cfg.train)
        return config if getattr(self, "elastic", None) is None else self.elastic.deepspeed_config(config)

    def _callback_parts(self) -> dict[str, Callback]:
        parts = {}
        for callback in self.callbacks:
            if callback.name in ("rng", "loop", *parts):
                raise ValueError(f"callback {type(callback).__name__}: the name '{callback.name}' is taken; the checkpoint "
                                 f"already holds: rng, loop, {', '.join(parts)}")
            parts[callback.name] = callback
        return parts

    # ------------------------------------------------------------------ the loop

    def run(self) -> LoopState:
        """Train until ``train.train_iters``; returns the final loop state."""
        train = self.cfg.train
        self.data.open(self.frozen_stages, self.image_condition)
        for table in sorted(self.run_folder.path.glob("buckets*.json")) if self.env.is_main else ():
            self.metrics.add_text(f"data/{table.stem}", bucket_table(json.loads(table.read_text())))
        start = self.state.iteration
        with self.metrics.progress(start):
            try:
                while self.state.iteration < train.train_iters:
                    self.data.enter_period_of(self.state.iteration + 1)
                    step = self._step(first=self.state.iteration == start)
                    if self.env.is_main and (step.iteration % train.log_interval == 0 or step.skipped):
                        grad_norm = self.engine.get_global_grad_norm()
                        global_batch = self.data.micro_batch_size * train.gradient_accumulation_steps * self.layout.data_size
                        fields = self.data.record_fields()
                        if self.average is not None:  # this rank's share (all of it without ZeRO)
                            fields["ema_memory_gb"] = ema.held_bytes(ema.base_optimizer(self.engine)) / 2**30
                        self.metrics.log(step.iteration, step.lr, float(grad_norm) if grad_norm is not None else None,
                                         global_batch, self.state.skipped_steps, fields)
                    self.watchdog.enter("callbacks")
                    for callback in self.callbacks:
                        callback.on_step_end(self, step)
                    if self.state.nonfinite_streak >= train.max_nonfinite_steps:
                        self.save()
                        raise RunStopped(
                            f"{self.state.nonfinite_streak} steps in a row had a non-finite loss or gradients "
                            f"(train.max_nonfinite_steps={train.max_nonfinite_steps}); stopped at iteration "
                            f"{self.state.iteration} and saved the last good weights to {self.run_folder.path}"
                        )
                    if train.validation.interval and step.iteration % train.validation.interval == 0:
                        self.validate()
                    if train.eval.interval and step.iteration % train.eval.interval == 0:
                        self.evaluate()
                    if step.iteration % train.save_interval == 0 or step.iteration == train.train_iters:
                        self.save()
            finally:
                self.data.close()
        self.watchdog.enter("collective (gathering skipped files)")
        self.data.report()
        return self.state

    def _step(self, first: bool) -> StepEnd:
        """One optimizer step over ``train.gradient_accumulation_steps`` micro-batches, counted."""
        step_start = time.perf_counter()
        lr = self.engine.get_lr()[0]
        self.optimizer.last_step_skipped = False
        with self.metrics.memory.measure():
            losses = torch.stack([self._micro_step(first) for _ in range(self.cfg.train.gradient_accumulation_steps)])
        # [sum of losses, non-finite micro-steps, micro-steps] over all ranks
        self.watchdog.enter("collective (loss all-reduce)")
        totals = all_reduce_sum(torch.tensor([losses.nan_to_num(0.0, 0.0, 0.0).sum().item(),
                                              float((~torch.isfinite(losses)).sum()), float(losses.numel())]))
        skipped = bool((not self.engine.was_step_applied()) or self.optimizer.last_step_skipped or totals[1] > 0)
        self.state.count_step(skipped)
        self.watchdog.completed(f"iteration {self.state.iteration}")
        if first:
            self.metrics.first_step_done()
        loss = None if skipped else (totals[0] / totals[2]).item()
        self.metrics.add_step(loss, time.perf_counter() - step_start)
        return StepEnd(self.state.iteration, loss, lr, skipped)

    def _micro_step(self, first: bool) -> torch.Tensor:
        self.watchdog.enter("data loading", slow=first)  # the first step also starts the loader workers and compiles
        batch = self.data.next_batch()
        self.watchdog.enter("forward/backward")
        with self.metrics.profile.phase("forward"):
            # latents sampled from the posterior moments here, with the step's generator, whoever encoded them
            inputs = self.inputs.prepare_cached(batch, self.generator)
            timesteps = sample_timesteps(inputs.latents.shape[0], self.interval, self.generator)
            noise = torch.randn(inputs.latents.shape, generator=self.generator)
            loss = self.engine(inputs, timesteps, noise).mean()
        with self.metrics.profile.phase("backward"):
            # The ranks of a sequence group compute the same loss and the gradients of their parts are summed: each
            # backpropagates its share (mixins/sequence_parallel.py).
            self.engine.backward(loss / self.layout.sequence_size)
        self.watchdog.enter("optimizer step")
        with self.metrics.profile.phase("optimizer"):
            self.engine.step()
        return loss.detach().float()

    def save(self) -> Path:
        """Write a complete checkpoint of the current iteration (collective: every rank must call it)."""
        self.watchdog.enter("saving checkpoint")
        with self.block_offload.on_host():  # DeepSpeed also saves the frozen parameters themselves
            final = self.checkpoints.save(self.state.iteration)
        self.watchdog.completed(f"checkpoint {self.state.iteration}")
        return final

    def validate(self) -> Path | None:
        """Sample ``train.validation.prompts`` with the current weights (:class:`Validation`); the folder on the main
        rank."""
        self.watchdog.enter("validation", slow=True)
        weights, dit, folder = self.cfg.train.validation.weights, self.engine.module.dit, None
        with self.data.paused():
            if weights in ("live", "both"):
                folder = self.validation.sample(dit, self.state.iteration, self.data.clip_spec)
            if weights in ("ema", "both"):
                with ema.swapped_in(self.engine):
                    folder = self.validation.sample(dit, self.state.iteration, self.data.clip_spec, weights="ema") or folder
        self.watchdog.completed(f"validation at iteration {self.state.iteration}")
        return folder

    def evaluate(self) -> dict[str, dict]:
        """The held-out loss (:class:`EvalLoss`) of the live weights and, with ``train.ema``, of their average; logged
        as one record, and returned (collective)."""
        self.watchdog.enter("held-out evaluation", slow=True)
        evaluate = lambda: self.evaluation.evaluate(self.engine.module, self.inputs, self.frozen_stages,  # noqa: E731
                                                    self.image_condition)
        with self.data.paused():
            results = {"live": evaluate()}
            if self.average is not None:
                with ema.swapped_in(self.engine):
                    results["ema"] = evaluate()
        self.state.note_skipped(self.evaluation.skipped)
        if self.env.is_main:
            self.metrics.log_evaluation(self.state.iteration, results)
        self.watchdog.completed(f"held-out evaluation at iteration {self.state.iteration}")
        return results

    def close(self) -> None:
        self.metrics.close()
        self.engine.destroy()  # removes its gradient hooks, which otherwise keep it (and its process groups) alive


def train(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> LoopState:
    """Run a whole DiT training job in this process (one rank of a ``torchrun`` job, or a single process), and leave no
    process group behind."""
    return run_job(cfg, lambda env, watchdog: Trainer(cfg, env, watchdog, callbacks))
