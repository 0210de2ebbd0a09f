"""The VAE training loop (``tools/train_vae.py``): the parts of :mod:`sat_video.training` around a GAN of two DeepSpeed
engines, the VAE and its 3D discriminator.

From the DiT's loop it takes the run folder, its lock and ``train.resume``, the data pipeline (pixels instead of
latents), complete checkpoints with exact resume, the metrics log and trackers, the watchdog and the non-finite step
rules. A step: the VAE reconstructs a (randomly cropped) batch, its loss (:mod:`~sat_video.vae_training.losses`) goes
through the VAE's engine; from ``vae.loss.disc_start`` on, the discriminator then judges the batch against its
reconstructions through its own engine, with its own AdamW. Weights and optimizers stay fp32; ``deepspeed.precision:
bf16`` runs the forward passes under bf16 autocast, so a frozen encoder is never rounded.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.func import functional_call

from mixins.video_vae import SAT_CHECKPOINT_SUFFIXES
from sat_video.common.errors import ConfigError, RunStopped
from sat_video.training.checkpoint import Checkpoints, LoopState, RngState, saved_period
from sat_video.training.config import OptimizerConfig
from sat_video.training.data_pipeline import DataPipeline
from sat_video.training.deepspeed_setup import deepspeed_config
from sat_video.training.distributed import DistributedEnv, all_reduce_sum, init_distributed
from sat_video.training.job import open_run_folder, run_job
from sat_video.training.metrics import MetricsLog
from sat_video.training.optim import FiniteAdamW, parameter_groups
from sat_video.training.progressive import lr_lambda_by_period, plan_periods
from sat_video.training.run_folder import RunFolder
from sat_video.training.sequence_parallel import ParallelLayout
from sat_video.training.step_memory import StepMemory
from sat_video.training.watchdog import Watchdog
from sat_video.vae_training.autoencoder import TrainableAutoencoder, load_autoencoder, save_diffusers_folder
from sat_video.vae_training.discriminator import VideoDiscriminator, discriminator_from_state_dict
from sat_video.vae_training.evaluation import ReconstructionEval
from sat_video.vae_training.losses import VaeLoss
from sat_video.vae_training.lpips import LPIPS, LPIPS_FILES_HINT, lpips_from_files, lpips_from_state_dict

logger = logging.getLogger("sat_video.train")

VAE_FOLDER = "vae"
"""``<save>/<iteration>/vae/``: the trained VAE as a diffusers folder."""
DISCRIMINATOR = "discriminator"
"""``<save>/<iteration>/discriminator/``: its DeepSpeed engine (weights, AdamW, LR schedule)."""


def check_vae_run(cfg: DictConfig) -> None:
    """What a VAE run cannot do, each refused with the key to change, before anything is read or written."""
    train, data, vae = cfg.train, cfg.data, cfg.vae
    refusals = [
        (cfg.parallel.sequence_parallel_size > 1, "parallel.sequence_parallel_size > 1: a VAE trains on whole clips per rank"),
        (cfg.deepspeed.zero_stage == 3, "deepspeed.zero_stage=3: the adaptive GAN weight needs the decoder's last layer "
                                        "whole on every rank; use ZeRO 0-2 (the VAE's weights are a few hundred MB)"),
        (cfg.deepspeed.precision == "fp16", "deepspeed.precision=fp16: use bf16 (autocast over fp32 weights) or fp32"),
        (bool(data.latent_cache) or data.cache_latents, "data.latent_cache / data.cache_latents: a VAE trains on pixels; "
                                                        "set data.cache_latents=false and leave data.latent_cache null"),
        (train.resume_layout == "elastic", "train.resume_layout=elastic: resume a VAE run on the layout that wrote it"),
        (bool(train.validation.interval), "train.validation: a VAE run shows input and reconstruction at each "
                                          "train.eval.interval (vae.eval_sources) instead"),
        (train.ema.enabled, "train.ema: not kept for the VAE"),
        (list(train.trainable) != ["*"], "train.trainable: choose what trains with vae.trainable (decoder | all)"),
        (train.activation_checkpointing, "train.activation_checkpointing: use vae.gradient_checkpointing"),
        (bool(train.init_checkpoint), "train.init_checkpoint: the VAE starts from model.first_stage.path"),
        (train.offload_blocks > 0 or train.compile, "train.offload_blocks / train.compile: DiT blocks only"),
        (cfg.model.first_stage.type != "video_vae", f"model.first_stage.type={cfg.model.first_stage.type}: "
                                                    "tools/train_vae.py trains the video_vae first stage"),
    ]
    for refused, reason in refusals:
        if refused:
            raise ConfigError(f"tools/train_vae.py: {reason}")
    if vae.crop is not None:
        crop = list(vae.crop)
        if len(crop) != 2 or any(side <= 0 or side % 8 for side in crop):
            raise ConfigError(f"vae.crop: expected [height, width], positive multiples of 8, found {crop}")
        sizes = [[b[1], b[2]] for b in data.buckets] or [[data.height, data.width]]
        small = [size for size in sizes if None not in size and (size[0] < crop[0] or size[1] < crop[1])]
        if small:
            raise ConfigError(f"vae.crop {crop} is larger than the clips it is cut from ({small[0][0]}x{small[0][1]}; "
                              "data.height/width or data.buckets)")
    if vae.loss.adversarial_weight > 0 and data.buckets and vae.crop is None:
        raise ConfigError("vae.loss.adversarial_weight > 0 with data.buckets needs vae.crop: the discriminator's last "
                          "layer is sized to one clip size")
    if vae.loss.adversarial_weight > 0 and len({b[0] for b in data.buckets}) > 1:
        raise ConfigError("vae.loss.adversarial_weight > 0: the discriminator takes one clip length, but data.buckets "
                          f"has several ({sorted({b[0] for b in data.buckets})})")
    lpips_files = [vae.lpips.vgg16, vae.lpips.heads]
    if any(lpips_files) and not all(lpips_files):
        raise ConfigError("vae.lpips: set both vgg16 and heads (or neither). " + LPIPS_FILES_HINT)
    first_stage = cfg.model.first_stage.path
    from_sat = first_stage is not None and Path(first_stage).suffix in SAT_CHECKPOINT_SUFFIXES
    if vae.loss.perceptual_weight > 0 and not any(lpips_files) and not from_sat:
        raise ConfigError(f"vae.loss.perceptual_weight={vae.loss.perceptual_weight} needs LPIPS weights and none were given. "
                          f"{LPIPS_FILES_HINT} Set vae.lpips.vgg16 and vae.lpips.heads to them, start from a SAT VAE file "
                          "that carries loss.perceptual_model.*, or train without it: vae.loss.perceptual_weight=0")


def build_lpips(cfg: DictConfig, loss_state: dict[str, torch.Tensor]) -> LPIPS | None:
    """From ``vae.lpips``'s files, else from a SAT VAE file's ``loss.*``; ``None`` when neither has it and the loss does
    not need it (then no ``eval_lpips`` either)."""
    files = cfg.vae.lpips
    if files.vgg16:
        return lpips_from_files(files.vgg16, files.heads)
    network = lpips_from_state_dict(loss_state, source=str(cfg.model.first_stage.path))
    if network is None and cfg.vae.loss.perceptual_weight > 0:
        raise ConfigError(f"vae.loss.perceptual_weight={cfg.vae.loss.perceptual_weight} needs LPIPS weights: "
                          f"{cfg.model.first_stage.path} carries no loss.perceptual_model.* and vae.lpips names no files. "
                          f"{LPIPS_FILES_HINT} Set vae.lpips.vgg16 and vae.lpips.heads to them, or train without it: "
                          "vae.loss.perceptual_weight=0")
    return network


class VaeTrainer:
    """Builds a VAE run from its config and runs it. ``VaeTrainer(cfg).run()``; :func:`train_vae` for a whole job."""

    def __init__(self, cfg: DictConfig, env: DistributedEnv | None = None, watchdog: Watchdog | None = None):
        check_vae_run(cfg)
        self.cfg = cfg
        self.env = env or init_distributed(cfg.train.collective_timeout_s)
        self.run_folder = RunFolder(cfg.train.save)
        self.watchdog = watchdog or Watchdog(0, 0, self.run_folder.hang_file(self.env.rank))
        self.state = LoopState()
        self.metrics = MetricsLog(self.run_folder, cfg, self.env)
        self.layout = ParallelLayout.of(self.env.rank, self.env.world_size, 1)
        resume_from = open_run_folder(self.run_folder, cfg, self.env)
        self.periods = plan_periods(cfg)
        self.state.period = saved_period(resume_from)
        self.data = DataPipeline(cfg, self.env, self.layout, self.run_folder, self.state, self.metrics.profile, self.periods)

        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        vae, loss_state = load_autoencoder(cfg.model.first_stage)
        self.model = TrainableAutoencoder(vae, cfg.vae.trainable, cfg.vae.gradient_checkpointing)
        self.lpips = build_lpips(cfg, loss_state)
        if self.lpips is not None:
            self.lpips = self.lpips.to(self.env.device)
        discriminator = self._build_discriminator(loss_state)
        torch.manual_seed(cfg.train.seed + 1 + self.env.rank)
        random.seed(cfg.train.seed + 1 + self.env.rank)
        self.generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + self.env.rank)
        self.loss = VaeLoss(cfg.vae.loss, cfg.vae.trainable, self.lpips)
        self.autocast = lambda: torch.autocast(self.env.device.type, torch.bfloat16,  # noqa: E731
                                               enabled=cfg.deepspeed.precision == "bf16")
        self._build_engines(discriminator)
        self.metrics.memory = StepMemory(self.env.device, lambda: [self.engine.module, self.engine.optimizer,
                                                                   *self._companions().values()], cfg.train.measure_memory)
        self._window: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # name: [sum over applied steps, steps]
        try:
            clip_spec = self.data.clip_spec
            self.evaluation = (ReconstructionEval(cfg, self.env, self.layout.data_rank, self.layout.data_size, clip_spec)
                               if cfg.train.eval.interval else None)
            self.checkpoints = Checkpoints(self.run_folder, self.engine, self.optimizer, self.scheduler,
                                           {"rng": RngState(self.generator), "loop": self.state}, self.layout, self.env,
                                           cfg.train.keep_last, companions=self._companions(), exports=self._export)
            if resume_from is not None:
                self.checkpoints.load(resume_from)
                if self.env.is_main:
                    self.metrics.truncate(self.state.iteration)
                    logger.info("resumed from %s at iteration %d", resume_from, self.state.iteration)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ construction

    def training_size(self) -> tuple[int, int, int]:
        """``(frames, height, width)`` of what the VAE and the discriminator see while training."""
        spec = self.data.clip_spec
        height, width = self.cfg.vae.crop if self.cfg.vae.crop is not None else (spec.height, spec.width)
        frames = self.cfg.data.buckets[0][0] if self.cfg.data.buckets else spec.num_frames
        return int(frames), int(height), int(width)

    def _build_discriminator(self, loss_state: dict[str, torch.Tensor]) -> VideoDiscriminator | None:
        loss, settings = self.cfg.vae.loss, self.cfg.vae.discriminator
        if loss.adversarial_weight == 0:
            return None
        frames, height, width = self.training_size()
        kwargs = dict(dim=settings.dim, image_size=(height, width), frame_num=frames, max_dim=settings.max_dim,
                      first_frame=settings.first_frame)
        try:
            VideoDiscriminator(**kwargs, channels=3).to("meta")  # shapes only: a size it cannot take is a config error
        except ValueError as err:
            raise ConfigError(f"vae.discriminator at the training size {frames}x{height}x{width} (vae.crop, data, "
                              f"model.dit.num_frames): {err}") from None
        warm = discriminator_from_state_dict(loss_state, **kwargs)
        if warm is not None and self.env.is_main:
            logger.info("discriminator warm-started from %s (loss.discr_3d.*)", self.cfg.model.first_stage.path)
        return warm if warm is not None else VideoDiscriminator(**kwargs)

    def _deepspeed_config(self) -> dict:
        """The run's DeepSpeed config with fp32 weights: bf16 is autocast here."""
        config = deepspeed_config(self.cfg.deepspeed, self.cfg.train)
        config["bf16"], config["fp16"] = {"enabled": False}, {"enabled": False}
        return config

    def _build_engines(self, discriminator: VideoDiscriminator | None) -> None:
        import deepspeed

        cfg = self.cfg
        self.optimizer = FiniteAdamW(parameter_groups(self.model, cfg.train.optimizer.weight_decay), cfg.train.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda_by_period(cfg, self.periods))
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimizer, lr_scheduler=self.scheduler,
                                                    config=self._deepspeed_config(), dist_init_required=False)
        self.disc_engine = self.disc_optimizer = None
        if discriminator is not None:
            settings = cfg.vae.discriminator
            optimizer_cfg = OptimizerConfig(lr=settings.lr, betas=list(settings.betas), weight_decay=settings.weight_decay)
            self.disc_optimizer = FiniteAdamW(parameter_groups(discriminator, settings.weight_decay), optimizer_cfg)
            constant = torch.optim.lr_scheduler.LambdaLR(self.disc_optimizer, lambda step: 1.0)
            self.disc_engine, _, _, _ = deepspeed.initialize(model=discriminator, optimizer=self.disc_optimizer,
                                                             lr_scheduler=constant, config=self._deepspeed_config(),
                                                             dist_init_required=False)

    def _companions(self) -> dict:
        return {} if self.disc_engine is None else {DISCRIMINATOR: self.disc_engine}

    def _export(self, staging: Path) -> None:
        """Into each checkpoint: the VAE as a diffusers folder (ZeRO 0-2 keep whole fp32 weights on every rank)."""
        save_diffusers_folder(self.model.vae, staging / VAE_FOLDER)

    # ------------------------------------------------------------------ the loop

    def run(self) -> LoopState:
        train = self.cfg.train
        self.data.open(None)
        if self.env.is_main:
            frames, height, width = self.training_size()
            logger.info("training the VAE (%s) on %dx%dx%d clips%s", self.cfg.vae.trainable, frames, height, width,
                        f", GAN from iteration {self.cfg.vae.loss.disc_start}" if self.disc_engine is not None else "")
        start = self.state.iteration
        with self.metrics.progress(start):
            try:
                while self.state.iteration < train.train_iters:
                    self.data.enter_period_of(self.state.iteration + 1)
                    iteration, skipped = self._step(first=self.state.iteration == start)
                    if self.env.is_main and (iteration % train.log_interval == 0 or skipped):
                        self._log(iteration)
                    if self.state.nonfinite_streak >= train.max_nonfinite_steps:
                        self.save()
                        raise RunStopped(f"{self.state.nonfinite_streak} steps in a row had a non-finite loss or gradients "
                                         f"(train.max_nonfinite_steps={train.max_nonfinite_steps}); stopped at iteration "
                                         f"{iteration} and saved the last good weights to {self.run_folder.path}")
                    if train.eval.interval and iteration % train.eval.interval == 0:
                        self.evaluate()
                    if iteration % train.save_interval == 0 or iteration == train.train_iters:
                        self.save()
            finally:
                self.data.close()
        self.watchdog.enter("collective (gathering skipped files)")
        self.data.report()
        return self.state

    def _step(self, first: bool) -> tuple[int, bool]:
        step_start = time.perf_counter()
        self.optimizer.last_step_skipped = False
        if self.disc_optimizer is not None:
            self.disc_optimizer.last_step_skipped = False
        gan = self.disc_engine is not None and self.loss.gan_active(self.state.iteration + 1)
        with self.metrics.memory.measure():
            parts = [self._micro_step(first, gan) for _ in range(self.cfg.train.gradient_accumulation_steps)]
        names = sorted(parts[0])
        values = torch.tensor([[part[name] for name in names] for part in parts], dtype=torch.float64)
        self.watchdog.enter("collective (loss all-reduce)")
        # [sum of each part, non-finite micro-steps, micro-steps] over all ranks
        totals = all_reduce_sum(torch.cat([values.nan_to_num(0.0, 0.0, 0.0).sum(0),
                                           torch.tensor([float((~torch.isfinite(values)).any(1).sum()), len(parts)],
                                                        dtype=torch.float64)]).float()).double()
        applied = self.engine.was_step_applied() and not self.optimizer.last_step_skipped
        if gan:
            applied = applied and self.disc_engine.was_step_applied() and not self.disc_optimizer.last_step_skipped
        skipped = not applied or totals[-2] > 0
        self.state.count_step(skipped)
        self.watchdog.completed(f"iteration {self.state.iteration}")
        if first:
            self.metrics.first_step_done()
        if not skipped:
            means = {name: float(totals[i] / totals[-1]) for i, name in enumerate(names)}
            for name, value in means.items():  # the GAN's parts join the window at disc_start
                self._window[name][0] += value
                self._window[name][1] += 1
        self.metrics.add_step(None if skipped else means["loss"], time.perf_counter() - step_start)
        return self.state.iteration, skipped

    def _crop(self, video: torch.Tensor) -> torch.Tensor:
        """A random ``vae.crop`` of each clip (drawn with the step's generator), or the clips whole."""
        if self.cfg.vae.crop is None:
            return video
        height, width = self.cfg.vae.crop
        tops = torch.randint(0, video.shape[3] - height + 1, (video.shape[0],), generator=self.generator).tolist()
        lefts = torch.randint(0, video.shape[4] - width + 1, (video.shape[0],), generator=self.generator).tolist()
        return torch.stack([clip[:, :, top:top + height, left:left + width] for clip, top, left in zip(video, tops, lefts)])

    def _micro_step(self, first: bool, gan: bool) -> dict[str, float]:
        self.watchdog.enter("data loading", slow=first)
        batch = self.data.next_batch()
        video = self._crop(batch.video).to(self.env.device)
        self.watchdog.enter("forward/backward")
        judge = None
        if gan:  # the generator's GAN term backpropagates into the clip, not into the discriminator's weights
            module = self.disc_engine.module
            frozen = {name: tensor.detach() for name, tensor in (*module.named_parameters(), *module.named_buffers())}
            judge = lambda clip: functional_call(module, frozen, (clip,))  # noqa: E731
        # The modules are called directly, not through the engines' forward: DeepSpeed hooks an engine's outputs so that
        # any backward through them (the adaptive weight's and R1's autograd.grad too) runs its gradient reduction.
        with self.metrics.profile.phase("forward"), self.autocast():
            out = self.engine.module(video, self.generator)
            loss = self.loss.generator(out, video, self.generator, self.model.last_layer, judge)
        with self.metrics.profile.phase("backward"):
            self.engine.backward(loss.total)
        self.watchdog.enter("optimizer step")
        with self.metrics.profile.phase("optimizer"):
            self.engine.step()
        parts = {"loss": float(loss.total), "pixel_loss": loss.pixel}
        if self.loss.cfg.perceptual_weight > 0:
            parts["perceptual_loss"] = loss.perceptual
        if self.loss.kl_weight > 0:
            parts["kl_loss"] = loss.kl
        if gan:
            parts.update(gan_loss=loss.gan, adaptive_weight=loss.adaptive_weight)
            self.watchdog.enter("discriminator step")
            with self.metrics.profile.phase("discriminator"):
                with self.autocast():
                    judged = self.loss.discriminator(self.disc_engine.module, video, out.video.detach())
                self.disc_engine.backward(judged.total)
                self.disc_engine.step()
            parts.update(disc_loss=float(judged.total), disc_hinge=judged.hinge, r1_penalty=judged.r1,
                         logits_real=judged.logits_real, logits_fake=judged.logits_fake)
        return parts

    def _log(self, iteration: int) -> None:
        fields = {name: total / steps for name, (total, steps) in self._window.items() if name != "loss"}
        if self.disc_engine is not None:
            fields["disc_lr"] = self.disc_engine.get_lr()[0]
        fields.update(self.data.record_fields())
        grad_norm = self.engine.get_global_grad_norm()
        global_batch = self.data.micro_batch_size * self.cfg.train.gradient_accumulation_steps * self.layout.data_size
        self.metrics.log(iteration, self.engine.get_lr()[0], float(grad_norm) if grad_norm is not None else None,
                         global_batch, self.state.skipped_steps, fields)
        self._window.clear()

    def save(self) -> Path:
        """A complete checkpoint (collective): both engines, every rank's loop and RNG state, and ``vae/``."""
        self.watchdog.enter("saving checkpoint")
        final = self.checkpoints.save(self.state.iteration)
        self.watchdog.completed(f"checkpoint {self.state.iteration}")
        return final

    def evaluate(self) -> dict:
        """Held-out PSNR, SSIM and LPIPS, logged as one record, with the input-over-reconstruction sheet (collective)."""
        self.watchdog.enter("held-out evaluation", slow=True)
        iteration = self.state.iteration
        strip = self.run_folder.path / "samples" / str(iteration) / "reconstruction.png" if self.env.is_main else None
        if strip is not None:
            strip.parent.mkdir(parents=True, exist_ok=True)
        with self.data.paused():
            results = self.evaluation.evaluate(self.engine.module, self.lpips, self.autocast, strip)
        self.state.note_skipped(self.evaluation.skipped)
        if self.env.is_main:
            self.metrics.log_evaluation(iteration, {"live": results})
            self.metrics.add_image("eval/reconstruction", strip, iteration)
        self.watchdog.completed(f"held-out evaluation at iteration {iteration}")
        return results

    def close(self) -> None:
        self.metrics.close()
        for engine in (getattr(self, "engine", None), getattr(self, "disc_engine", None)):
            if engine is not None:
                engine.destroy()


def train_vae(cfg: DictConfig) -> LoopState:
    """Run a whole VAE training job in this process (one rank of a ``torchrun`` job, or a single process)."""
    return run_job(cfg, lambda env, watchdog: VaeTrainer(cfg, env, watchdog))
