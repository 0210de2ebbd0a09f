"""Typed configuration: YAML files merged left to right, then ``key=value`` overrides.

Every section maps to a dataclass; unknown keys and wrong types fail at load time with the file, the
full key and the closest valid key. Mixin parameters (``model.dit.mixins.<name>``) are validated
against the ``Config`` dataclass of the mixin class their ``type`` names.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


@dataclass
class DiTConfig:
    """``model.dit``: the shared sizes of the diffusion transformer and its mixins.

    Mixins read these sizes from the model rather than repeating them. Defaults are CogVideoX-2B's.
    """

    hidden_size: int = 1920
    """Width ``D`` of every token."""
    num_layers: int = 30
    """Number of transformer blocks."""
    num_attention_heads: int = 30
    """Attention heads; ``hidden_size / num_attention_heads`` is the head dim (64 in CogVideoX)."""
    in_channels: int = 16
    """Latent channels entering the patch embedding (32 for I2V: 16 noisy + 16 image condition)."""
    out_channels: int = 16
    """Latent channels predicted."""
    patch_size: int = 2
    """Spatial patch size ``p``."""
    patch_size_t: Optional[int] = None
    """Temporal patch size. ``null``: per-frame Conv2d patches (CogVideoX 1.0 layout); an integer:
    a Linear over ``patch_size_t x p x p`` tubes (CogVideoX 1.5 layout)."""
    latent_height: int = 60
    """Latent height the model was trained at (sizes learned tables; other sizes still run)."""
    latent_width: int = 90
    """Latent width the model was trained at."""
    num_frames: int = 49
    """Pixel frames of a training clip (SAT's and diffusers' convention); latent frames are
    ``(num_frames - 1) // temporal_compression_ratio + 1``."""
    temporal_compression_ratio: int = 4
    """Frames per latent frame of the VAE (after the first)."""
    text_length: int = 226
    """Text tokens per sample (T5 padded / truncated to this)."""
    text_hidden_size: int = 4096
    """Width of the text encoder's output (T5-XXL: 4096)."""
    time_embed_dim: int = 512
    """Width of the timestep embedding that drives the modulations."""
    ofs_embed_dim: Optional[int] = None
    """Width of the ofs embedding (CogVideoX 1.5 I2V); ``null`` for none. It is added to the timestep
    embedding, so it must equal ``time_embed_dim``."""
    mixins: Dict[str, Any] = field(default_factory=dict)
    """Mixins in the order they are added, ``<name>: {type: <registered type>, <param>: ...}``. The
    name is the state-dict prefix (``mixins.<name>.*``); ``<name>: null`` removes an inherited one, and a
    later file giving it another ``type`` replaces it (parameters are not carried over)."""
    mixin_modules: List[str] = field(default_factory=list)
    """Extra Python modules to import so that their ``@register_mixin`` classes can be named in ``type``."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // self.temporal_compression_ratio + 1

    def validate(self) -> None:
        problems = []
        for name in ("hidden_size", "num_layers", "num_attention_heads", "in_channels", "out_channels",
                     "patch_size", "latent_height", "latent_width", "num_frames", "temporal_compression_ratio",
                     "text_length", "text_hidden_size", "time_embed_dim"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, found {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})")
        if self.patch_size_t is not None and self.patch_size_t <= 0:
            problems.append(f"patch_size_t must be null or positive, found {self.patch_size_t}")
        if self.ofs_embed_dim is not None and self.ofs_embed_dim != self.time_embed_dim:
            problems.append(f"ofs_embed_dim ({self.ofs_embed_dim}) must equal time_embed_dim ({self.time_embed_dim}): the two embeddings are summed")
        for axis in ("latent_height", "latent_width"):
            if getattr(self, axis) % self.patch_size:
                problems.append(f"{axis} ({getattr(self, axis)}) must be divisible by patch_size ({self.patch_size})")
        if problems:
            raise ConfigError("model.dit: " + "; ".join(problems))


@dataclass
class DiffusionConfig:
    """``model.diffusion``: the noise schedule the model was trained with (CogVideoX: scaled-linear betas
    0.00085..0.012, v-prediction, zero terminal SNR)."""

    snr_shift_scale: float = 3.0
    """SNR shift ``s`` of the schedule: 3.0 for CogVideoX-2B, 1.0 for the 5B models."""
    num_train_timesteps: int = 1000
    """Number of DDPM steps."""
    interval_timesteps: bool = True
    """Each data-parallel rank draws timesteps only from its own interval of ``[0, 1000)`` (CogVideoX's
    explicit uniform sampling); ``false``: every rank draws from the whole range."""
    text_dropout: float = 0.1
    """Share of samples trained with the all-zero text embedding (classifier-free guidance)."""
    image_noise_log_sigma: List[float] = field(default_factory=lambda: [-3.0, 0.5])
    """I2V: the first frame gets pixel noise ``sigma = exp(N(mean, std))`` before it is encoded."""
    image_dropout: float = 0.05
    """I2V: share of samples whose whole image condition is zero."""
    ofs: float = 2.0
    """Value fed to the ofs embedding (CogVideoX 1.5 I2V)."""


@dataclass
class FirstStageConfig:
    """``model.first_stage``: the frozen first stage that maps pixels to latents and back."""

    type: str = "video_vae"
    """``video_vae``: CogVideoX's 3D causal VAE (``mixins/video_vae.py``). ``patch_pca``: a linear stand-in
    with the same compression, fitted to a dataset in seconds (``mixins/pca_first_stage.py``; the built-in
    demo uses it because no VAE can be trained on a CPU in minutes)."""
    path: Optional[str] = None
    """A diffusers ``AutoencoderKLCogVideoX`` folder (``config.json`` + weights) or SAT's ``3d-vae.pt``.
    ``null``: random weights from ``architecture`` and ``init_seed`` (tests and tiny runs only)."""
    architecture: Dict[str, Any] = field(default_factory=dict)
    """``AutoencoderKLCogVideoX`` arguments that differ from CogVideoX's VAE (used for SAT ``.pt`` files
    and random init; a diffusers folder brings its own ``config.json``)."""
    scale_factor: float = 1.15258426
    """Latents are multiplied by this after encoding: 1.15258426 for CogVideoX-2B, 0.7 for the 5B models."""
    sample_posterior: bool = True
    """Training encodes by sampling the posterior (as SAT); ``false`` takes its mean."""
    init_seed: int = 0
    """Seed of the random weights when ``path`` is null (the same on every rank)."""


@dataclass
class TextEncoderConfig:
    """``model.text_encoder``: the frozen T5 encoder; its output length and width are
    ``model.dit.text_length`` and ``model.dit.text_hidden_size``."""

    path: Optional[str] = None
    """Local folder with a ``T5EncoderModel`` (``config.json`` + weights) and its sentencepiece tokenizer
    (``spiece.model``), e.g. the ``text_encoder`` and ``tokenizer`` of CogVideoX-2b merged, or SAT's
    ``t5-v1_1-xxl`` folder."""
    tokenizer_path: Optional[str] = None
    """Tokenizer folder if it is not ``path``."""


@dataclass
class ModelConfig:
    dit: DiTConfig = field(default_factory=DiTConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    first_stage: FirstStageConfig = field(default_factory=FirstStageConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)


@dataclass
class DataConfig:
    """``data``: where the clips are and how they are cut. Clip length is ``model.dit.num_frames``."""

    sources: List[str] = field(default_factory=list)
    """Folders in SAT's SFT layout (``videos/<name>.mp4`` + ``labels/<name>.txt``) and/or metadata files
    (``.jsonl`` lines ``{"path": ..., "caption": ...}`` or ``.csv`` with ``path,caption`` columns; relative
    paths are relative to the metadata file). ``.png`` / ``.jpg`` entries are one-frame samples."""
    height: Optional[int] = None
    """Pixel height of a clip; ``null``: ``model.dit.latent_height`` x 8."""
    width: Optional[int] = None
    """Pixel width of a clip; ``null``: ``model.dit.latent_width`` x 8."""
    fps: float = 8.0
    """Frames are sampled at this rate (8 for CogVideoX 1.0, 16 for 1.5)."""
    skip_frames: int = 3
    """Frames skipped at each end of every video (fades, title cards)."""
    min_frames: Optional[int] = None
    """``null``: a video must provide a whole clip at ``fps``; otherwise videos with at least this many
    frames are accepted and the clip is padded by repeating its last frame (SAT's behaviour)."""
    num_workers: int = 2
    """Data-loader processes per rank (0 decodes in the training process)."""
    latent_cache: Optional[str] = None
    """A folder written by ``tools/precompute_latents.py``: train from its latents and text embeddings instead
    of decoding ``sources`` (no video decoding, VAE or T5 per step; I2V still encodes its noisy first frame).
    The cache must have been made with this config's first stage, text encoder and clip settings."""


@dataclass
class OptimizerConfig:
    """``train.optimizer``: AdamW (the reference SFT settings by default)."""

    lr: float = 1e-5
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 1e-4


@dataclass
class ScheduleConfig:
    """``train.lr_schedule``: linear warm-up, then decay to ``min_lr`` (never below it, never negative)."""

    warmup_iters: int = 0
    decay_style: str = "constant"
    """``constant``, ``linear`` or ``cosine``."""
    decay_iters: Optional[int] = None
    """Iterations from the end of warm-up to ``min_lr``; ``null``: until ``train.train_iters``."""
    min_lr: float = 0.0


@dataclass
class SampleConfig:
    """``sample``: how videos are generated (``tools/sample_video.py`` defaults and validation during training)."""

    scheduler: str = "dpm"
    """``dpm``: ``CogVideoXDPMScheduler`` (DPM-Solver++ 2M, SAT's sampler); ``ddim``: ``CogVideoXDDIMScheduler``."""
    steps: int = 50
    guidance_scale: float = 6.0
    """Classifier-free guidance against the all-zero text embedding (as SAT); 1 disables guidance."""
    dynamic_cfg: bool = True
    """Scale guidance with the step as CogVideoX does (``1 + g (1 - cos(pi ((N - t) / N)^5)) / 2``)."""
    seed: int = 42
    """The noise of prompt ``i`` is drawn from a generator seeded with ``seed + i``."""
    fps: Optional[float] = None
    """Frame rate of written videos; ``null``: ``data.fps``."""


@dataclass
class ValidationConfig:
    """``train.validation``: sample fixed prompts while training (mp4 + contact sheet under ``<save>/samples``)."""

    interval: int = 0
    """Steps between validations; 0 turns them off."""
    prompts: List[str] = field(default_factory=list)
    steps: int = 25
    """Sampling steps (fewer than ``sample.steps`` to keep validation cheap)."""
    image: Optional[str] = None
    """First frame for image-to-video models (required by them when validation is on)."""


@dataclass
class TrainConfig:
    """``train``: the loop, its checkpoints and its logs."""

    save: str = "runs/default"
    """Run folder: checkpoints (SAT layout), ``metrics.jsonl``, TensorBoard logs, ``config.yaml``."""
    resume: Optional[str] = None
    """``latest`` (the newest complete checkpoint in ``save``) or a checkpoint folder to continue from."""
    overwrite: bool = False
    """Allow starting a fresh run in a ``save`` folder that already holds a run (its checkpoints are
    deleted). Without it such a start is refused."""
    init_checkpoint: Optional[str] = None
    """Weights to start from (an official SAT checkpoint, a run of ours, a ``.safetensors``); model weights
    only, nothing else is restored."""
    train_iters: int = 1000
    """Optimizer steps of the whole run."""
    micro_batch_size: int = 1
    """Samples per rank per forward."""
    gradient_accumulation_steps: int = 1
    grad_clip: float = 0.1
    """Global gradient-norm clip; 0 disables."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainable: List[str] = field(default_factory=lambda: ["*"])
    """Glob patterns over DiT parameter names; only matching parameters train (``mixins.adaln_layer.*``)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in backward instead of storing its activations."""
    checkpoint_keeps_attention: bool = True
    """With activation checkpointing, keep each block's attention-kernel output (``[B, N, D]`` plus softmax
    statistics) so that backward does not run the attention forward kernel again; ``false`` keeps only each
    block's input (least memory, most recomputation)."""
    compile: bool = False
    """``torch.compile`` each transformer block (inductor) before training; the first steps compile (minutes
    at full size). ``tools/bench.py --compile`` measures what it gains on the machine at hand."""
    seed: int = 42
    """Model init is the same on every rank; data order, timesteps and noise differ per rank."""
    log_interval: int = 1
    """Steps between log lines (console, TensorBoard, ``metrics.jsonl``)."""
    save_interval: int = 1000
    """Steps between checkpoints; the last step is always saved."""
    keep_last: Optional[int] = None
    """Keep only this many newest checkpoints; ``null`` keeps all."""
    max_nonfinite_steps: int = 5
    """Skipped steps (non-finite loss or gradients) in a row that stop the run."""
    tensorboard: bool = True
    progress_bar: bool = True
    validation: ValidationConfig = field(default_factory=ValidationConfig)


@dataclass
class DeepSpeedConfig:
    """``deepspeed``: the engine's settings; everything else DeepSpeed takes goes in ``extra``."""

    zero_stage: int = 2
    """ZeRO stage 0, 1, 2 or 3."""
    precision: str = "bf16"
    """``bf16`` (5B models), ``fp16`` (2B was trained in fp16) or ``fp32``."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (ZeRO-2/3)."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Merged last into the generated DeepSpeed config (e.g. ``{fp16: {initial_scale_power: 16}}``)."""


@dataclass
class Config:
    """The root of every config file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


def _closest(key: str, choices: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def _check_known_keys(data: Any, schema: type, path: str, source: str) -> None:
    """Walk a plain mapping against dataclass ``schema``; open ``Dict`` fields are left to later checks."""
    if not isinstance(data, dict):
        return
    fields = typing.get_type_hints(schema)
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            where = f"'{path}'" if path else "the top level"
            raise ConfigError(
                f"{source}: unknown key '{full}'{_closest(str(key), list(fields))} "
                f"(valid keys under {where}: {', '.join(fields)})"
            )
        if dataclasses.is_dataclass(fields[key]):
            _check_known_keys(value, fields[key], full, source)


def _dotlist_to_nested(overrides: Sequence[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))


def _drop_retyped_mixins(cfg: DictConfig, data: dict, source: str) -> None:
    """A layer that gives a mixin another ``type`` replaces the entry instead of merging parameters into it."""
    model = data.get("model") or {}
    dit = model.get("dit") or {} if isinstance(model, dict) else {}
    incoming = dit.get("mixins") or {} if isinstance(dit, dict) else {}
    if not isinstance(incoming, dict):
        raise ConfigError(f"{source}: model.dit.mixins: expected a mapping of mixin name -> {{type: ..., ...}}, "
                          f"found {type(incoming).__name__} {incoming!r}")
    current = cfg.model.dit.mixins
    for name, entry in incoming.items():
        if isinstance(entry, dict) and "type" in entry and current.get(name) is not None and current[name].get("type") != entry["type"]:
            current[name] = None


def _validate_mixins(dit: DictConfig) -> None:
    from .registry import UnknownMixinError, resolve_mixin_class

    for name in list(dit.mixins.keys()):
        entry = dit.mixins[name]
        where = f"model.dit.mixins.{name}"
        if entry is None:
            del dit.mixins[name]
            continue
        if not isinstance(entry, DictConfig) or "type" not in entry:
            raise ConfigError(f"{where}: expected a mapping with a 'type' key, found {OmegaConf.to_container(entry) if isinstance(entry, DictConfig) else entry!r}")
        if not str(name).isidentifier():
            raise ConfigError(f"{where}: mixin names must be Python identifiers")
        params = {k: v for k, v in OmegaConf.to_container(entry, resolve=True).items() if k != "type"}
        try:
            cls = resolve_mixin_class(entry.type, dit.mixin_modules)
        except UnknownMixinError as err:
            raise ConfigError(f"{where}.type: {err}") from None
        valid = [f.name for f in dataclasses.fields(cls.Config)]
        for key in params:
            if key not in valid:
                raise ConfigError(
                    f"unknown key '{where}.{key}' for mixin type '{entry.type}'{_closest(key, valid)} "
                    f"(valid: {', '.join(valid) or 'none'})"
                )
        try:
            typed = OmegaConf.merge(OmegaConf.structured(cls.Config), params)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{where}: {err.msg if hasattr(err, 'msg') else err}") from None
        dit.mixins[name] = {"type": entry.type, **OmegaConf.to_container(typed)}


def read_yaml(path: str | Path, *, what: str = "config file", error: type[ConfigError] = ConfigError):
    """The plain data of a YAML file; ``error`` names the file when it is missing or does not parse."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:  # yaml errors carry the line and column
        raise error(f"{path}: cannot parse YAML: {err}") from None


def load_config(paths: Union[str, Path, dict, Sequence[Union[str, Path, dict]]], overrides: Sequence[str] = ()) -> DictConfig:
    """Load YAML files merged left to right, then apply ``key=value`` overrides.

    Args:
        paths: one path or a list; an item may also be a mapping (an in-memory config layer).
        overrides: dotted ``key=value`` strings, applied last (``model.dit.num_layers=4``).
    Returns:
        A typed, resolved ``DictConfig`` following :class:`Config` (read ``cfg.model.dit.hidden_size``).
    Raises:
        ConfigError: unknown key (with the closest valid one), wrong type, or inconsistent sizes.
    """
    if isinstance(paths, (str, Path, dict, DictConfig)):
        paths = [paths]
    cfg = OmegaConf.structured(Config)
    layers = []
    for path in paths:
        if isinstance(path, (dict, DictConfig)):
            layers.append(("in-memory config", OmegaConf.to_container(OmegaConf.create(path))))
            continue
        layers.append((str(path), read_yaml(path) or {}))
    if overrides:
        layers.append(("command-line override", _dotlist_to_nested(overrides)))
    for source, data in layers:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, found {type(data).__name__}")
        _check_known_keys(data, Config, "", source)
        _drop_retyped_mixins(cfg, data, source)
        try:
            cfg = OmegaConf.merge(cfg, data)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{source}: {err.msg if hasattr(err, 'msg') else err} (key '{err.full_key}')") from None
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve interpolation at '{err.full_key}': {err.msg}") from None
    _validate_mixins(cfg.model.dit)
    dit_config(cfg).validate()
    return cfg


def dit_config(cfg: Union[DictConfig, DiTConfig]) -> DiTConfig:
    """The ``model.dit`` section of a loaded config as a :class:`DiTConfig` instance."""
    if isinstance(cfg, DiTConfig):
        return cfg
    node = cfg.model.dit if "model" in cfg else cfg
    return OmegaConf.to_object(node)
