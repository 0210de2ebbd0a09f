"""The ``model.dit``, ``model.first_stage`` and ``model.text_encoder`` sections: what the model layer builds from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sat_video.common.constraints import at_least, check_fields, one_of
from sat_video.common.errors import ConfigError
from sat_video.model.context import TokenGrid


@dataclass
class DiTConfig:
    """``model.dit``: the shared sizes of the diffusion transformer and its mixins.

    Mixins read these sizes from the model rather than repeating them. Defaults are CogVideoX-2B's.
    """

    hidden_size: int = field(default=1920, metadata=at_least(1))
    """Width ``D`` of every token."""
    num_layers: int = field(default=30, metadata=at_least(1))
    """Number of transformer blocks."""
    num_attention_heads: int = field(default=30, metadata=at_least(1))
    """Attention heads; ``hidden_size / num_attention_heads`` is the head dim (64 in CogVideoX)."""
    in_channels: int = field(default=16, metadata=at_least(1))
    """Latent channels entering the patch embedding (32 for I2V: 16 noisy + 16 image condition)."""
    out_channels: int = field(default=16, metadata=at_least(1))
    """Latent channels predicted."""
    patch_size: int = field(default=2, metadata=at_least(1))
    """Spatial patch size ``p``."""
    patch_size_t: int | None = field(default=None, metadata=at_least(1))
    """Temporal patch size. ``null``: per-frame Conv2d patches (CogVideoX 1.0 layout); an integer:
    a Linear over ``patch_size_t x p x p`` tubes (CogVideoX 1.5 layout)."""
    latent_height: int = field(default=60, metadata=at_least(1))
    """Latent height the model was trained at (sizes learned tables; other sizes still run)."""
    latent_width: int = field(default=90, metadata=at_least(1))
    """Latent width the model was trained at."""
    num_frames: int = field(default=49, metadata=at_least(1))
    """Pixel frames of a training clip (SAT's and diffusers' convention); latent frames are
    ``(num_frames - 1) // temporal_compression_ratio + 1``."""
    temporal_compression_ratio: int = field(default=4, metadata=at_least(1))
    """Frames per latent frame of the VAE (after the first)."""
    text_length: int = field(default=226, metadata=at_least(1))
    """Text tokens per sample (T5 padded / truncated to this)."""
    text_hidden_size: int = field(default=4096, metadata=at_least(1))
    """Width of the text encoder's output (T5-XXL: 4096)."""
    time_embed_dim: int = field(default=512, metadata=at_least(1))
    """Width of the timestep embedding that drives the modulations."""
    ofs_embed_dim: int | None = field(default=None, metadata=at_least(1))
    """Width of the ofs embedding (CogVideoX 1.5 I2V); ``null`` for none. It is added to the timestep
    embedding, so it must equal ``time_embed_dim``."""
    mixins: dict[str, Any] = field(default_factory=dict)
    """Mixins in the order they are added, ``<name>: {type: <registered type>, <param>: ...}``. The
    name is the state-dict prefix (``mixins.<name>.*``); ``<name>: null`` removes an inherited one, and a
    later file giving it another ``type`` replaces it (parameters are not carried over)."""
    mixin_modules: list[str] = field(default_factory=list)
    """Extra Python modules to import so that their ``@register_mixin`` classes can be named in ``type``."""
    storage_dtype: str | None = field(default=None, metadata=one_of("float8_e4m3fn", "float8_e5m2"))
    """``float8_e4m3fn`` or ``float8_e5m2``: the frozen base weights are stored in fp8 and upcast layer by layer to the
    compute dtype just before use (LoRA only); ``null``: stored in the compute dtype."""

    @classmethod
    def from_config(cls, cfg: DictConfig | DiTConfig) -> DiTConfig:
        """The ``model.dit`` section as a :class:`DiTConfig`, from a loaded config, the section itself, or an instance."""
        if isinstance(cfg, DiTConfig):
            return cfg
        node = cfg.model.dit if "model" in cfg else cfg
        return OmegaConf.to_object(node)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def latent_frames(self) -> int:
        """Latent frames of a training clip (``num_frames`` pixel frames)."""
        return self.latent_frames_of(self.num_frames)

    def latent_frames_of(self, num_frames: int) -> int:
        """Latent frames of a clip of ``num_frames`` pixel frames: the first frame, then one per
        ``temporal_compression_ratio`` frames (CogVideoX 1.5's leading padding frames not included)."""
        return (num_frames - 1) // self.temporal_compression_ratio + 1

    def latent_token_grid(self, latent_frames: int, latent_height: int, latent_width: int) -> TokenGrid:
        """The token grid of latents ``latent_frames x latent_height x latent_width``: the one rule for every site.

        Frames round up to whole temporal patches, as CogVideoX 1.5 pads leading latent frames to a whole patch
        (:func:`~sat_video.diffusion.conditioning.leading_pad_frames`), so a clip's grid counts its padding frames.
        """
        patch_t = self.patch_size_t or 1
        return TokenGrid(-(-latent_frames // patch_t), latent_height // self.patch_size, latent_width // self.patch_size)

    def token_grid(self, num_frames: int, latent_height: int, latent_width: int) -> TokenGrid:
        """The token grid of a clip of ``num_frames`` pixel frames at this latent size (padding frames included)."""
        return self.latent_token_grid(self.latent_frames_of(num_frames), latent_height, latent_width)

    def validate(self) -> None:
        """Field constraints and the rules between sizes (:func:`load_config` runs this; so does :func:`build_dit` for
        a ``DiTConfig`` made in code)."""
        check_fields(self, "model.dit")
        problems = []
        if (self.num_frames - 1) % self.temporal_compression_ratio:
            problems.append(
                f"num_frames must be 1 + {self.temporal_compression_ratio}k (1, 5, 9, ..., 49), found {self.num_frames}"
            )
        if self.in_channels not in (self.out_channels, 2 * self.out_channels):
            problems.append(f"in_channels ({self.in_channels}) must equal out_channels ({self.out_channels}) for "
                            "text-to-video or twice it for image-to-video")
        if self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.ofs_embed_dim is not None and self.ofs_embed_dim != self.time_embed_dim:
            problems.append(
                f"ofs_embed_dim ({self.ofs_embed_dim}) must equal time_embed_dim ({self.time_embed_dim}): "
                "the two embeddings are summed"
            )
        for axis in ("latent_height", "latent_width"):
            if getattr(self, axis) % self.patch_size:
                problems.append(f"{axis} ({getattr(self, axis)}) must be divisible by patch_size ({self.patch_size})")
        if problems:
            raise ConfigError("model.dit: " + "; ".join(problems))


@dataclass
class FirstStageConfig:
    """``model.first_stage``: the frozen first stage that maps pixels to latents and back."""

    type: str = "video_vae"
    """``video_vae``: CogVideoX's 3D causal VAE (``mixins/video_vae.py``). ``patch_pca``: a linear stand-in
    with the same compression, fitted to a dataset in seconds (``mixins/pca_first_stage.py``; the built-in
    demo uses it because no VAE can be trained on a CPU in minutes)."""
    path: str | None = None
    """A diffusers ``AutoencoderKLCogVideoX`` folder (``config.json`` + weights) or SAT's ``3d-vae.pt``.
    ``null``: random weights from ``architecture`` and ``init_seed`` (tests and tiny runs only)."""
    architecture: dict[str, Any] = field(default_factory=dict)
    """``AutoencoderKLCogVideoX`` arguments that differ from CogVideoX's VAE (used for SAT ``.pt`` files
    and random init; a diffusers folder brings its own ``config.json``)."""
    scale_factor: float = field(default=1.15258426, metadata=at_least(0, exclusive=True))
    """Latents are multiplied by this after encoding: 1.15258426 for CogVideoX-2B, 0.7 for the 5B models."""
    sample_posterior: bool = True
    """Training encodes by sampling the posterior (as SAT); ``false`` takes its mean."""
    init_seed: int = field(default=0, metadata=at_least(0))
    """Seed of the random weights when ``path`` is null (the same on every rank)."""
    tile_size: list[int] = field(default_factory=lambda: [240, 360])
    """Tiles of ``[height, width]`` pixels when tiling is on (``sample.vae_tiling``, ``data.vae_tiling``); diffusers'
    default for 480x720 videos. Larger tiles blend fewer seams and need more memory."""
    tile_overlap: list[int] = field(default_factory=lambda: [40, 72])
    """Pixels, ``[height, width]``, that neighbouring tiles share and blend linearly (multiples of 8; diffusers'
    defaults: 1/6 and 1/5 of the default tile)."""


@dataclass
class TextEncoderConfig:
    """``model.text_encoder``: the frozen T5 encoder; its output length and width are
    ``model.dit.text_length`` and ``model.dit.text_hidden_size``."""

    type: str = "t5"
    """Registered text-encoder stage: ``t5`` (``mixins/t5_encoder.py``), or one a module under
    ``model.dit.mixin_modules`` registers with ``@register_stage``."""
    path: str | None = None
    """Local folder with a ``T5EncoderModel`` (``config.json`` + weights) and its sentencepiece tokenizer
    (``spiece.model``), e.g. the ``text_encoder`` and ``tokenizer`` of CogVideoX-2b merged, or SAT's
    ``t5-v1_1-xxl`` folder."""
    tokenizer_path: str | None = None
    """Tokenizer folder if it is not ``path``."""
