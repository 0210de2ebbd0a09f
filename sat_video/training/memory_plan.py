"""Predict a training run's peak memory per GPU for a config, without training (``tools/train_video.py --estimate-memory``),
and name the fastest settings that fit a GPU.

Peak per GPU = the largest of three phases, each over what stays on the device (DiT weights, optimizer states, frozen
stages' weights):

* **backward**: + the gradient buffers + the activations (:mod:`sat_video.training.memory_probes`, measured at the real
  width and extrapolated to the largest bucket's tokens, micro-batch, checkpointing and sequence-parallel degree);
* **optimizer step**: + the fp32 gradient partition and AdamW's temporaries;
* **encoding** (clips not from a latent cache): + the VAE encode or T5, whichever is larger; with ``data.prefetch`` the
  next batch is encoded while the DiT trains, so its activations add to the backward phase instead.

Weights and optimizer states follow what DeepSpeed allocates (checked against ``deepspeed/runtime/zero/stage_1_and_2.py``,
``stage3.py`` and ``fp16/unfused_optimizer.py``): under bf16/fp16 the module is cast to the compute dtype (frozen
parameters too), the trainable parameters get an fp32 master copy and two fp32 Adam moments (and with ``train.ema`` an
fp32 average, :mod:`~sat_video.training.ema`), partitioned over the
data-parallel group from ZeRO-1 on; ZeRO-1/2 allocate ``reduce_bucket_size`` elements of gradient bucket in the compute
dtype (twice with ``overlap_comm``) whatever the model's size; ZeRO-2 keeps each rank's gradient partition, ZeRO-1 every
gradient; ZeRO-3 partitions every parameter (frozen ones too) except those under ``stage3_param_persistence_threshold``
and gathers a block's worth plus ``stage3_prefetch_bucket_size`` at a time. Frozen parameters are not in the optimizer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sat_video.common.constraints import divisors
from sat_video.common.errors import UsageError
from sat_video.data.buckets import parse_buckets
from sat_video.diffusion.memory import GIB
from sat_video.diffusion.memory_estimate import USABLE_SHARE, SamplingMemoryModel
from sat_video.diffusion.offload import direct_weights
from sat_video.model.build import build_dit
from sat_video.model.config import DiTConfig
from sat_video.model.stages import SPATIAL_COMPRESSION
from sat_video.model.transformer import MLP, SelfAttention
from sat_video.training.deepspeed_setup import deepspeed_config, frozen_stage_dtype
from sat_video.training.memory_probes import TrainingProbes
from sat_video.training.optim import select_trainable

COMPUTE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# DeepSpeed's defaults (deepspeed/runtime/zero/config.py) for what deepspeed.extra may change
DEEPSPEED_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5}
PARAM_OFFLOAD_KEY = "deepspeed.extra.zero_optimization.offload_param.device"
STREAMED_BLOCKS_ON_DEVICE = 2
"""``train.offload_blocks``: the block computing and the next one, prefetched (CUDA)."""


@dataclass(frozen=True)
class Settings:
    """The knobs the planner turns, in the order it turns them."""

    activation_checkpointing: bool
    checkpoint_keeps_attention: bool
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    sequence_parallel_size: int
    vae_tiling: bool = False
    prefetch: int = 1

    @classmethod
    def of(cls, cfg: DictConfig) -> Settings:
        offload_param = OmegaConf.select(cfg, PARAM_OFFLOAD_KEY.removesuffix(".device"), default=None) or {}
        return cls(cfg.train.activation_checkpointing, cfg.train.checkpoint_keeps_attention, cfg.deepspeed.zero_stage,
                   cfg.deepspeed.offload_optimizer, offload_param.get("device", "none") == "cpu",
                   cfg.parallel.sequence_parallel_size, cfg.data.vae_tiling, cfg.data.prefetch)

    def overrides(self, configured: Settings) -> str:
        """The config overrides that turn ``configured`` into these settings (empty: none)."""
        keys = {"activation_checkpointing": "train.activation_checkpointing",
                "checkpoint_keeps_attention": "train.checkpoint_keeps_attention", "zero_stage": "deepspeed.zero_stage",
                "offload_optimizer": "deepspeed.offload_optimizer", "sequence_parallel_size": "parallel.sequence_parallel_size",
                "vae_tiling": "data.vae_tiling", "prefetch": "data.prefetch"}
        words = []
        for field, key in keys.items():
            value = getattr(self, field)
            if value != getattr(configured, field):
                words.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
        if self.offload_params != configured.offload_params:
            words.append(f"{PARAM_OFFLOAD_KEY}={'cpu' if self.offload_params else 'none'}")
        return " ".join(words)


@dataclass(frozen=True)
class Term:
    name: str
    nbytes: float
    detail: str


@dataclass(frozen=True)
class Prediction:
    """One setting's predicted peak per GPU, its parts and what it keeps in host memory."""

    settings: Settings
    terms: list[Term]
    peak_bytes: float
    peak_phase: str
    host_bytes: float

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


@dataclass(frozen=True)
class ParameterCounts:
    """The DiT's parameters as the run trains them (sizes from a ``meta`` build)."""

    total: int
    trainable: int
    stored_bytes: int
    """All parameters and buffers at their storage bytes (fp8 frozen block linears under ``model.dit.storage_dtype``)."""
    block_frozen_bytes: int
    """Frozen bytes of the largest block group (what ``train.offload_blocks`` moves per block)."""
    block_params: int
    """Parameters of the largest block group (what ZeRO-3 gathers at once)."""
    persistent: int
    """Parameters ZeRO-3 keeps whole on every rank (those under ``stage3_param_persistence_threshold``)."""
    largest_upcast: int
    """Elements of the largest fp8-stored linear (one is upcast at a time), 0 without ``storage_dtype``."""


def _fp8_weights(dit: nn.Module) -> set[int]:
    """The weights ``model.dit.storage_dtype`` stores in fp8 when frozen (:mod:`sat_video.model.storage_dtype`): those of
    the attention and MLP linears, not their biases."""
    return {id(linear.weight) for module in dit.modules() if isinstance(module, (SelfAttention, MLP))
            for linear in module.children() if isinstance(linear, nn.Linear)}


class TrainingMemoryPlan:
    """Training memory of ``cfg`` on ``gpus`` GPUs at its largest bucket; probes run on first use (seconds to a minute at
    full widths on a CPU) and serve every :meth:`predict`.

    Args:
        cfg: a loaded config.
        gpus: processes of the job (W = D x S).
    """

    def __init__(self, cfg: DictConfig, gpus: int = 1, probes: TrainingProbes | None = None):
        if gpus < 1:
            raise UsageError(f"--gpus must be at least 1, found {gpus}")
        self.cfg, self.gpus = cfg, gpus
        self.dit_config = DiTConfig.from_config(cfg)
        self.configured = Settings.of(cfg)
        if gpus % self.configured.sequence_parallel_size:
            raise UsageError(f"parallel.sequence_parallel_size={self.configured.sequence_parallel_size} must divide --gpus "
                             f"{gpus}")
        self.compute_bytes = COMPUTE_BYTES[cfg.deepspeed.precision]
        self.frozen_dtype = frozen_stage_dtype(cfg.deepspeed.precision)
        self.probes = probes or TrainingProbes(cfg)
        self.frames, self.height, self.width = self.largest_bucket()
        self.grid = self.dit_config.token_grid(self.frames, self.height // SPATIAL_COMPRESSION, self.width // SPATIAL_COMPRESSION)
        zero = deepspeed_config(cfg.deepspeed, cfg.train)["zero_optimization"]
        self.zero_settings = {key: float(zero.get(key, default)) for key, default in DEEPSPEED_DEFAULTS.items()}
        self.overlap_comm = zero.get("overlap_comm")  # None: DeepSpeed's default, on for ZeRO-3 only

    def largest_bucket(self) -> tuple[int, int, int]:
        """``(frames, height, width)`` of the clip size with the most tokens (``data.buckets``, or the one clip size)."""
        data, dit = self.cfg.data, self.dit_config
        if data.buckets:
            sizes = [(b.frames, b.height, b.width) for b in parse_buckets(data.buckets, dit.patch_size)]
        else:
            sizes = [(dit.num_frames, data.height or dit.latent_height * SPATIAL_COMPRESSION,
                      data.width or dit.latent_width * SPATIAL_COMPRESSION)]
        return max(sizes, key=lambda s: dit.token_grid(s[0], s[1] // SPATIAL_COMPRESSION, s[2] // SPATIAL_COMPRESSION).num_tokens)

    # ------------------------------------------------------------------ sizes

    @functools.cached_property
    def parameters(self) -> ParameterCounts:
        with torch.device("meta"):
            dit = build_dit(self.dit_config)
        select_trainable(dit, list(self.cfg.train.trainable))
        groups = dit.block_groups()
        fp8 = self.dit_config.storage_dtype is not None
        fp8_weights = _fp8_weights(dit) if fp8 else set()
        threshold = self.zero_settings["stage3_param_persistence_threshold"]

        def stored(module: nn.Module, tensor: torch.Tensor) -> int:
            if not tensor.is_floating_point():
                return tensor.numel() * tensor.element_size()
            frozen_fp8 = id(tensor) in fp8_weights and not tensor.requires_grad
            return tensor.numel() * (1 if frozen_fp8 else self.compute_bytes)

        seen, stored_bytes = set(), 0
        for module in dit.modules():
            for tensor in direct_weights(module):
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    stored_bytes += stored(module, tensor)
        block_frozen = [sum(stored(m, p) for member in members for m in member.modules() for p in direct_weights(m)
                            if not p.requires_grad) for _, members in groups]
        block_params = [sum(p.numel() for member in members for p in member.parameters()) for _, members in groups]
        params = list(dit.parameters())
        upcast = [p.numel() for p in params if id(p) in fp8_weights and not p.requires_grad]
        return ParameterCounts(total=sum(p.numel() for p in params), trainable=sum(p.numel() for p in params if p.requires_grad),
                               stored_bytes=stored_bytes, block_frozen_bytes=max(block_frozen, default=0),
                               block_params=max(block_params, default=0),
                               persistent=sum(p.numel() for p in params if p.numel() < threshold),
                               largest_upcast=max(upcast, default=0))

    @functools.cached_property
    def _frozen_model(self) -> SamplingMemoryModel:
        return SamplingMemoryModel(self.cfg, num_frames=self.frames, height=self.height, width=self.width,
                                   dtype=self.frozen_dtype, guided=False)

    @property
    def frozen_on_device(self) -> tuple[bool, bool]:
        """``(VAE, T5)`` kept on the device for the run, as the trainer decides."""
        cached = bool(self.cfg.data.latent_cache)
        sampling = bool(self.cfg.train.validation.interval)
        image = self.dit_config.in_channels > self.dit_config.out_channels
        return (not cached or sampling or image), (not cached or sampling)

    def _tokens(self, sequence_parallel: int) -> tuple[int, int]:
        """``(all tokens, this rank's tokens)`` of one micro-batch."""
        batch, text, video = self.cfg.train.micro_batch_size, self.dit_config.text_length, self.grid.num_tokens
        return batch * (text + video), batch * (text + math.ceil(video / sequence_parallel))

    # ------------------------------------------------------------------ terms

    def _weights(self, s: Settings, data_parallel: int) -> tuple[Term, float]:
        counts, c = self.parameters, self.compute_bytes
        offloaded = min(self.cfg.train.offload_blocks, self.dit_config.num_layers)
        resident = counts.stored_bytes - offloaded * counts.block_frozen_bytes
        host = offloaded * counts.block_frozen_bytes
        window = min(offloaded, STREAMED_BLOCKS_ON_DEVICE) * counts.block_frozen_bytes
        notes = [f"{counts.total / 1e9:.2f} B parameters, {self.cfg.deepspeed.precision}"]
        if self.dit_config.storage_dtype:
            notes.append(f"frozen block linears in {self.dit_config.storage_dtype}")
        if offloaded:
            notes.append(f"{offloaded} frozen blocks in host memory, {min(offloaded, STREAMED_BLOCKS_ON_DEVICE)} streamed in")
        if s.zero_stage == 3:
            persistent = counts.persistent * c
            # a block and the prefetch bucket's worth after it, never more than the partitioned parameters themselves
            gathered = min(counts.block_params + self.zero_settings["stage3_prefetch_bucket_size"],
                           counts.total - counts.persistent) * c
            partition = (resident - persistent) / data_parallel
            if s.offload_params:
                host += partition
                device = persistent + gathered + window
                notes.append("ZeRO-3 partitions in host memory (offload_param), a block + prefetch gathered")
            else:
                device = partition + persistent + gathered + window
                notes.append(f"ZeRO-3: 1/{data_parallel} each, a block + prefetch gathered")
        else:
            device = resident + window
            notes.append("replicated" if data_parallel > 1 else "whole")
        device += counts.largest_upcast * c  # one fp8 linear upcast at a time
        return Term("weights", device, "; ".join(notes)), host

    def _optimizer(self, s: Settings, data_parallel: int) -> tuple[float, float, float, float, str]:
        """``(states, gradient buffers in backward, gradients at the step, host bytes, detail)``."""
        trainable, c = self.parameters.trainable, self.compute_bytes
        shards = data_parallel if s.zero_stage >= 1 else 1
        master = 4 * trainable / shards if (c < 4 or s.zero_stage >= 1) else 0.0  # ZeRO-1/2 clone even fp32 params
        moments = (12 if self.cfg.train.ema.enabled else 8) * trainable / shards  # + the average, as optimizer state
        fp32_grads = 4 * trainable / shards  # the step's fp32 gradient partition
        adam_temp = 4 * trainable / shards  # AdamW's denominator
        bucket = 0.0
        if s.zero_stage >= 1:
            overlap = self.overlap_comm if self.overlap_comm is not None else s.zero_stage == 3
            bucket = self.zero_settings["reduce_bucket_size"] * c * (2 if overlap else 1)
        held = {0: c * trainable, 1: c * trainable, 2: c * trainable / shards, 3: c * trainable / shards}[s.zero_stage]
        if s.offload_optimizer and s.zero_stage in (2, 3):
            host = master + moments + fp32_grads + (held if s.zero_stage == 2 else 0)
            held = held if s.zero_stage == 3 else 0.0
            return 0.0, bucket + held, held, host, "fp32 master, Adam moments and fp32 gradients in host memory"
        average = " + EMA" if self.cfg.train.ema.enabled else ""
        detail = (f"fp32 master + 2 Adam moments{average} of {trainable / 1e6:.1f} M trainable"
                  + (f", 1/{shards} each" if shards > 1 else ""))
        return master + moments, bucket + held, held + fp32_grads + adam_temp, 0.0, detail

    def _activations(self, s: Settings) -> tuple[float, str]:
        mode = ("keep_attention" if s.checkpoint_keeps_attention else "recompute_attention") if s.activation_checkpointing \
            else "none"
        tokens, per_rank = self._tokens(s.sequence_parallel_size)
        fp32 = self.probes.dit[mode].bytes(self.dit_config.num_layers, tokens, per_rank)
        how = {"none": "no checkpointing", "keep_attention": "checkpointing, attention kept",
               "recompute_attention": "checkpointing, attention recomputed"}[mode]
        return fp32 * self.compute_bytes / 4, (f"{self.dit_config.num_layers} blocks, {how}, {per_rank:,} tokens per rank "
                                               f"(micro-batch {self.cfg.train.micro_batch_size})")

    @functools.cache  # noqa: B019 - a plan lives as long as its report
    def _frozen(self, tiled: bool) -> tuple[float, float, str]:
        """``(weights on the device, encode activations, detail)`` of the VAE and T5."""
        vae, t5 = self.frozen_on_device
        weights = self._frozen_model.weights
        on_device = (weights["first_stage"].total if vae else 0) + (weights["text_encoder"].total if t5 else 0)
        itemsize = torch.empty(0, dtype=self.frozen_dtype).element_size()
        batch = self.cfg.train.micro_batch_size
        encode, parts = 0.0, []
        if not self.cfg.data.latent_cache:
            area = (self.height // SPATIAL_COMPRESSION) * (self.width // SPATIAL_COMPRESSION)
            if tiled:
                tile = [side // SPATIAL_COMPRESSION for side in self.cfg.model.first_stage.tile_size]
                area = min(area, tile[0] * tile[1])
            clip = 3 * self.frames * self.height * self.width * itemsize
            vae_encode = batch * (self.probes.vae_encode(self.frames).at(area) * itemsize / 4 + clip)
            t5_encode = batch * self._frozen_model.t5_activation
            encode = max(vae_encode, t5_encode)
            parts.append(f"encode {max(vae_encode, t5_encode) / GIB:.2f} GiB ({'VAE, tiled' if tiled else 'VAE'} "
                         f"{vae_encode / GIB:.2f}, T5 {t5_encode / GIB:.2f})")
        loaded = [name for name, on in (("VAE", vae), ("T5", t5)) if on]
        detail = f"{' + '.join(loaded) or 'none'} on the device ({on_device / GIB:.2f} GiB)" + "".join(f"; {p}" for p in parts)
        return on_device, encode, detail

    # ------------------------------------------------------------------ predictions

    def predict(self, s: Settings | None = None) -> Prediction:
        s = s or self.configured
        data_parallel = self.gpus // s.sequence_parallel_size
        weights, host = self._weights(s, data_parallel)
        states, grad_buffers, step_grads, optimizer_host, optimizer_detail = self._optimizer(s, data_parallel)
        activations, activation_detail = self._activations(s)
        frozen, encode, frozen_detail = self._frozen(s.vae_tiling)
        steady = weights.nbytes + states + frozen
        concurrent = encode if s.prefetch > 0 else 0.0
        phases = {"backward": steady + grad_buffers + activations + concurrent, "optimizer step": steady + step_grads,
                  "encoding": steady + encode}
        phase = max(phases, key=phases.get)
        grad_detail = f"buckets and ZeRO-{s.zero_stage} partitions in backward; {step_grads / GIB:.2f} GiB at the step"
        terms = [weights, Term("gradients", grad_buffers, grad_detail), Term("optimizer states", states, optimizer_detail),
                 Term("activations", activations, activation_detail),
                 Term("frozen stages", frozen + concurrent, frozen_detail + (", concurrent (data.prefetch)" if concurrent
                                                                           else ""))]
        return Prediction(s, terms, phases[phase], phase, host + optimizer_host)

    def ladder(self) -> Iterator[Settings]:
        """Settings from the fastest to the leanest, each adding one measure to the one before: as configured, activation
        checkpointing (keeping attention, then not), ZeRO-3, optimizer offload, parameter offload, then sequence
        parallelism over each degree ``--gpus`` and the head count allow."""
        s = self.configured
        yield s
        steps = [dict(activation_checkpointing=True), dict(checkpoint_keeps_attention=False), dict(zero_stage=3),
                 dict(offload_optimizer=True), dict(offload_params=True)]
        if self.dit_config.storage_dtype or self.cfg.train.offload_blocks:  # both refuse ZeRO-3 (and so its offload)
            steps = [step for step in steps if "zero_stage" not in step and "offload_params" not in step]
        for change in steps:
            changed = dataclasses.replace(s, **change)
            if changed != s:
                s = changed
                yield s
        heads = self.dit_config.num_attention_heads
        for degree in divisors(self.gpus):
            if degree > s.sequence_parallel_size and heads % degree == 0:
                yield dataclasses.replace(s, sequence_parallel_size=degree)

    def ladders(self) -> Iterator[Settings]:
        """:meth:`ladder`, then (where clips are encoded during the run) the same again with the VAE encoding in tiles,
        then also not ahead of the step (``data.prefetch=0``: encode and DiT no longer overlap, the step waits)."""
        yield from self.ladder()
        if not self.cfg.data.latent_cache:
            for change in (dict(vae_tiling=True), dict(vae_tiling=True, prefetch=0)):
                for s in self.ladder():
                    changed = dataclasses.replace(s, **change)
                    if changed != s:
                        yield changed

    def fastest_fitting(self, memory_gib: float, usable: float = USABLE_SHARE) -> tuple[Prediction | None, Prediction]:
        """``(the first prediction of :meth:`ladders` within usable x memory, or None; the smallest prediction)``."""
        predictions = [self.predict(s) for s in dict.fromkeys(self.ladders())]
        fits = next((p for p in predictions if p.peak_bytes <= usable * memory_gib * GIB), None)
        return fits, min(predictions, key=lambda p: p.peak_bytes)

    def describe(self, prediction: Prediction | None = None) -> str:
        p = prediction or self.predict()
        s = p.settings
        data_parallel = self.gpus // s.sequence_parallel_size
        lines = [f"predicted peak memory per GPU: {self.frames}x{self.height}x{self.width} (largest bucket), micro-batch "
                 f"{self.cfg.train.micro_batch_size}, {self.cfg.deepspeed.precision}, ZeRO-{s.zero_stage}, {self.gpus} "
                 f"GPU(s) = {data_parallel} data-parallel x {s.sequence_parallel_size} sequence-parallel:"]
        lines += [f"  {t.name:<17} {t.nbytes / GIB:8.2f} GiB  ({t.detail})" for t in p.terms]
        lines.append(f"  {'peak':<17} {p.peak_gib:8.2f} GiB  (in the {p.peak_phase} phase)")
        host = p.host_bytes + (self.cfg.data.cache_memory_gb * GIB if self.cfg.data.cache_latents and not
                               self.cfg.data.latent_cache else 0)
        lines.append(f"  host memory per rank: {host / GIB:.2f} GiB (offloaded states and blocks, the in-run latent cache "
                     f"up to data.cache_memory_gb)")
        return "\n".join(lines)


def report(cfg: DictConfig, gpus: int = 1, gpu_memory_gib: float | None = None) -> str:
    """What ``tools/train_video.py --estimate-memory`` prints: the configured run's peak and its parts, then (given a GPU's
    memory) every setting on the ladder and the fastest that fits, with its overrides."""
    plan = TrainingMemoryPlan(cfg, gpus)
    lines = [plan.describe()]
    if gpu_memory_gib is None:
        return "\n".join(lines)
    budget = USABLE_SHARE * gpu_memory_gib
    lines.append(f"settings tried, fastest first (peak per GPU, budget {USABLE_SHARE:.0%} of {gpu_memory_gib:g} GiB = "
                 f"{budget:.2f} GiB):")
    for s in dict.fromkeys(plan.ladders()):
        p = plan.predict(s)
        lines.append(f"  {p.peak_gib:8.2f} GiB  {'fits' if p.peak_gib <= budget else '    '}  "
                     f"{s.overrides(plan.configured) or '(as configured)'}")
    fits, smallest = plan.fastest_fitting(gpu_memory_gib)
    if fits is None:
        lines.append(f"nothing tried fits: the closest is {smallest.peak_gib:.2f} GiB, {smallest.peak_gib - budget:.2f} GiB "
                     f"over the budget, with: {smallest.settings.overrides(plan.configured) or '(as configured)'}")
        lines.append("  (also lowering: train.micro_batch_size, the largest bucket, data.latent_cache for VAE and T5, "
                     "model.dit.storage_dtype and train.offload_blocks for LoRA)")
    else:
        overrides = fits.settings.overrides(plan.configured)
        lines.append(f"fastest predicted to fit ({fits.peak_gib:.2f} GiB): {overrides or 'as configured, no override'}")
    return "\n".join(lines)


TABLE_MODELS = {"2B": "cogvideox_2b.yaml", "5B": "cogvideox_5b.yaml", "1.5-5B": "cogvideox1.5_5b.yaml"}
TABLE_SIZES = ((49, 480, 720), (81, 768, 1360))
TABLE_GPUS = (1, 2, 8)


PUBLISHED_SETUP = ("data.latent_cache=precomputed", "train.micro_batch_size=1")
"""How the published figures were taken: latents and text embeddings precomputed (no VAE or T5 on the GPU), batch 1.
The cache folder is only named: the planner reads no data."""


def markdown_table(load_config: Callable[[list, list], DictConfig], configs_dir: Path,
                   overrides: Sequence[str] = ()) -> str:
    """docs/memory.md's tables: predicted peak per GPU (GiB) of each model with ``sft.yaml`` (+ ``lora.yaml``) and
    ``overrides`` (e.g. :data:`PUBLISHED_SETUP`), at each size, on 1, 2 and 8 GPUs (``load_config``:
    :func:`sat_video.load_config`, from the layer above)."""
    rows = ["| model | recipe | frames x H x W | 1 GPU | 2 GPUs | 8 GPUs |", "|---|---|---|---|---|---|"]
    for model, file in TABLE_MODELS.items():
        for recipe in ("LoRA", "SFT"):
            files = [configs_dir / file, configs_dir / "sft.yaml", *([configs_dir / "lora.yaml"] if recipe == "LoRA" else [])]
            probes = None
            for frames, height, width in TABLE_SIZES:
                cfg = load_config(files, [f"model.dit.num_frames={frames}", f"data.height={height}", f"data.width={width}",
                                          *overrides])
                probes = probes or TrainingProbes(cfg)  # activations per token do not depend on the size
                peaks = [TrainingMemoryPlan(cfg, gpus, probes).predict().peak_gib for gpus in TABLE_GPUS]
                rows.append(f"| {model} | {recipe} | {frames}x{height}x{width} | " + " | ".join(f"{p:.1f}" for p in peaks) + " |")
    return "\n".join(rows)
