"""The ``train`` and ``deepspeed`` sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sat_video.common.constraints import at_least, between, each_one_of, one_of


@dataclass
class OptimizerConfig:
    """``train.optimizer``: AdamW (the reference SFT settings by default)."""

    lr: float = field(default=1e-5, metadata=at_least(0, exclusive=True))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = field(default=1e-8, metadata=at_least(0, exclusive=True))
    weight_decay: float = field(default=1e-4, metadata=at_least(0))


@dataclass
class ScheduleConfig:
    """``train.lr_schedule``: linear warm-up, then decay to ``min_lr`` (never below it, never negative)."""

    warmup_iters: int = field(default=0, metadata=at_least(0))
    decay_style: str = field(default="constant", metadata=one_of("constant", "linear", "cosine"))
    """``constant``, ``linear`` or ``cosine``."""
    decay_iters: int | None = field(default=None, metadata=at_least(1))
    """Iterations from the end of warm-up to ``min_lr``; ``null``: until ``train.train_iters``."""
    min_lr: float = field(default=0.0, metadata=at_least(0))


@dataclass
class ValidationConfig:
    """``train.validation``: sample fixed prompts while training (mp4 + contact sheet under ``<save>/samples``)."""

    interval: int = field(default=0, metadata=at_least(0))
    """Steps between validations; 0 turns them off."""
    prompts: list[str] = field(default_factory=list)
    steps: int = field(default=25, metadata=at_least(1))
    """Sampling steps (fewer than ``sample.steps`` to keep validation cheap)."""
    image: str | None = None
    """First frame for image-to-video models (required by them when validation is on)."""
    sizes: list[list[int]] = field(default_factory=list)
    """``[frames, height, width]`` in pixels to sample each prompt at (e.g. the training buckets), each into
    ``samples/<iteration>/<FxHxW>/``; empty: the training clip size, into ``samples/<iteration>/``."""


    weights: str = field(default="live", metadata=one_of("live", "ema", "both"))
    """Sample with the trained weights (``live``), their moving average (``ema``, needs ``train.ema.enabled``; into
    ``samples/<iteration>/ema/``) or ``both``."""


@dataclass
class EmaConfig:
    """``train.ema``: an exponential moving average of the trained weights, kept as optimizer state (SAT's
    ``FusedEmaAdam``), so ZeRO partitions it like the Adam moments (:mod:`sat_video.training.ema`)."""

    enabled: bool = False
    decay: float = field(default=0.9999, metadata=between(0, 1))
    """After each applied step ``ema = decay * ema + (1 - decay) * weights``: 0 follows the weights, 1 keeps the initial
    ones."""
    warmup: bool = False
    """Use ``min(decay, (1 + n) / (10 + n))`` at the n-th update (n from 0), so early weights fade out fast."""


@dataclass
class EvalConfig:
    """``train.eval``: a held-out loss, the same function of the weights at every evaluation and in every run
    (:mod:`sat_video.training.eval_loss`)."""

    interval: int = field(default=0, metadata=at_least(0))
    """Steps between evaluations; 0 turns them off."""
    sources: list[str] = field(default_factory=list)
    """Held-out data, in any form ``data.sources`` takes; clips are cut as the training data's (``data.buckets``
    included)."""
    timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    """Every clip is noised at each of these timesteps, with noise fixed per clip and timestep."""
    max_samples: int | None = field(default=None, metadata=at_least(1))
    """Evaluate only the first this many usable clips (in discovery order); ``null``: all."""
    seed: int = field(default=0, metadata=at_least(0))
    """Seeds the fixed noise and latent draws; keep it to compare runs."""


@dataclass
class StageConfig:
    """One entry of ``train.stages`` (:mod:`sat_video.training.progressive`)."""

    until: int = field(default=1, metadata=at_least(1))
    """The last iteration of this stage (the last stage's is ``train.train_iters``)."""
    set: dict[str, Any] = field(default_factory=dict)
    """``{dotted.key: value}`` applied to the run's config for this stage: data keys, ``train.micro_batch_size``,
    ``train.optimizer.lr``, ``train.lr_schedule.warmup_iters``."""


@dataclass
class TrainConfig:
    """``train``: the loop, its checkpoints and its logs."""

    save: str = "runs/default"
    """Run folder: checkpoints (SAT layout), ``metrics.jsonl``, TensorBoard logs, ``config.yaml``."""
    resume: str | None = None
    """``latest`` (the newest complete checkpoint in ``save``; an error if there is none), ``auto`` (``latest`` if
    there is one, else a fresh start that replaces what a run killed before its first checkpoint left: one
    command for a pre-emptible job), or a checkpoint folder to continue from."""
    resume_layout: str = field(default="strict", metadata=one_of("strict", "elastic"))
    """A checkpoint written with another number of data-parallel or sequence-parallel processes: ``strict`` refuses it
    before anything is loaded; ``elastic`` continues it through DeepSpeed's universal checkpoint, made once beside it
    (ZeRO-1/2, across the two): weights, optimizer state, LR schedule, iteration, RNG and the samples drawn this epoch
    carry over, not bit-identically (:mod:`sat_video.training.elastic_resume`)."""
    overwrite: bool = False
    """Allow starting a fresh run in a ``save`` folder that already holds a run (its checkpoints are
    deleted). Without it such a start is refused."""
    init_checkpoint: str | None = None
    """Weights to start from (an official SAT checkpoint, a run of ours, a ``.safetensors``); model weights
    only, nothing else is restored."""
    train_iters: int = field(default=1000, metadata=at_least(1))
    """Optimizer steps of the whole run."""
    micro_batch_size: int = field(default=1, metadata=at_least(1))
    """Samples per rank per forward."""
    gradient_accumulation_steps: int = field(default=1, metadata=at_least(1))
    grad_clip: float = field(default=0.1, metadata=at_least(0))
    """Global gradient-norm clip; 0 disables."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainable: list[str] = field(default_factory=lambda: ["*"])
    """Glob patterns over DiT parameter names; only matching parameters train (``mixins.adaln_layer.*``)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in backward instead of storing its activations."""
    checkpoint_keeps_attention: bool = True
    """With activation checkpointing, keep each block's attention-kernel output (``[B, N, D]`` plus softmax
    statistics) so that backward does not run the attention forward kernel again; ``false`` keeps only each
    block's input (least memory, most recomputation)."""
    offload_blocks: int = field(default=0, metadata=at_least(0))
    """Keep this many of the DiT's (frozen) transformer blocks in host memory and stream each to the device for its
    forward and its backward recomputation (LoRA only); 0 keeps every block on the device."""
    measure_memory: bool = False
    """On a CPU, record each logged window's peak memory in ``metrics.jsonl`` (``peak_memory_gb``: weights and states
    held plus the live-tensor peak of the step, :mod:`sat_video.training.step_memory`); counting every operator's
    outputs slows a step, so it is off unless asked. On CUDA ``peak_memory_gb`` is always recorded."""
    compile: bool = False
    """``torch.compile`` each transformer block (inductor) before training; the first steps compile (minutes
    at full size). ``tools/bench.py --compile`` measures what it gains on the machine at hand."""
    seed: int = field(default=42, metadata=at_least(0))
    """Model init is the same on every rank; data order, timesteps and noise differ per rank."""
    log_interval: int = field(default=1, metadata=at_least(1))
    """Steps between log lines (console, TensorBoard, ``metrics.jsonl``)."""
    save_interval: int = field(default=1000, metadata=at_least(1))
    """Steps between checkpoints; the last step is always saved."""
    keep_last: int | None = field(default=None, metadata=at_least(1))
    """Keep only this many newest checkpoints; ``null`` keeps all."""
    max_nonfinite_steps: int = field(default=5, metadata=at_least(1))
    """Skipped steps (non-finite loss or gradients) in a row that stop the run."""
    hang_timeout_s: float = field(default=1200.0, metadata=at_least(0))
    """A step or checkpoint that takes longer ends the run, with every thread's stack in the log and in
    ``<save>/hang-rank<r>.txt`` and a message naming the stage (exit status 3); 0 turns the watchdog off."""
    slow_stage_timeout_s: float = field(default=3600.0, metadata=at_least(0))
    """The same for start-up, the first step (compilation) and each validation."""
    collective_timeout_s: float = field(default=3600.0, metadata=at_least(1))
    """A collective that waits longer for the other ranks fails (gloo and NCCL) instead of blocking for ever."""
    lock_stale_s: float = field(default=300.0, metadata=at_least(60))
    """A run holds ``<save>/.lock`` from start to exit (refreshed every 30 s), and a second job started on ``save``
    meanwhile is refused (exit 2). A lock left by a job that is gone is taken over at start: at once on the host where
    it ran, from other hosts (shared storage) once it has not been refreshed for this long. At least 60 s: a slow
    refresh must not look stale. ``tools/precompute_latents.py`` locks its ``--out`` the same way."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"], metadata=each_one_of("tensorboard", "wandb", "none"))
    """Trackers that get the metrics, validation videos, the config and the bucket table: ``tensorboard`` (in
    ``<save>/tensorboard``), ``wandb`` (``pip install -e ".[wandb]"``; ``WANDB_MODE=offline`` writes under
    ``<save>/wandb``), ``none`` (``metrics.jsonl`` only) (:mod:`sat_video.training.trackers`)."""
    progress_bar: bool = True
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stages: list[StageConfig] = field(default_factory=list)
    """Progressive training in one run: ``[{until: <iteration>, set: {dotted.key: value}}, ...]`` switches data,
    batch size and LR at those iterations (:mod:`sat_video.training.progressive`); empty: one stage."""


@dataclass
class ParallelConfig:
    """``parallel``: how the processes of a job split the work besides data parallelism."""

    sequence_parallel_size: int = field(default=1, metadata=at_least(1))
    """S: each sample's video tokens are split over S processes (DeepSpeed-Ulysses); the W processes of a job form
    W / S data-parallel groups. S must divide W and the attention-head count."""


@dataclass
class DeepSpeedConfig:
    """``deepspeed``: the engine's settings; everything else DeepSpeed takes goes in ``extra``."""

    zero_stage: int = field(default=2, metadata=one_of(0, 1, 2, 3))
    """ZeRO stage 0, 1, 2 or 3."""
    precision: str = field(default="bf16", metadata=one_of("bf16", "fp16", "fp32"))
    """``bf16`` (5B models), ``fp16`` (2B was trained in fp16) or ``fp32``."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (ZeRO-2/3)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Merged last into the generated DeepSpeed config (e.g. ``{fp16: {initial_scale_power: 16}}``)."""
