"""VideoVAEMixin: the frozen CogVideoX 3D causal VAE, the first stage of the diffusion model.

It plugs into the frozen-stage catalogue (:mod:`sat_video.model.stages`) as ``model.first_stage.type: video_vae``
and provides ``encode_moments`` (clips to the posterior, before the DiT) and ``decode_latents`` (sampled latents to
clips, after it); :meth:`~sat_video.model.stages.FrozenStage.encode` / ``decode`` add the scale factor. The network
is diffusers' ``AutoencoderKLCogVideoX``, the same as SAT's
``vae_modules`` (8x8 spatial, 4x temporal compression, 16 latent channels, causal in time); weights
come from a diffusers folder or SAT's ``3d-vae.pt`` (keys renamed as diffusers'
``scripts/convert_cogvideox_to_diffusers.py`` does).
"""

from __future__ import annotations

import inspect
import math
import pickle
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from sat_video.common.errors import CheckpointError, ConfigError
from sat_video.model.config import FirstStageConfig
from sat_video.model.registry import register_stage
from sat_video.model.stages import SPATIAL_COMPRESSION, FrozenStage

if TYPE_CHECKING:
    from diffusers import AutoencoderKLCogVideoX

SAT_CHECKPOINT_SUFFIXES = (".pt", ".ckpt", ".safetensors")
SAT_ENGINE_PREFIX = "first_stage_model."
"""Prefix of the VAE inside a whole SAT diffusion-engine checkpoint."""
SAT_TRAINING_PREFIX = "loss."
"""SAT's VAE checkpoints also carry the training loss (discriminator, LPIPS, logvar)."""

# SAT -> diffusers substrings, applied in this order (diffusers' VAE_KEYS_RENAME_DICT). The decoder's
# up blocks are also renumbered: SAT counts them from the output end, diffusers from the input end.
SAT_TO_DIFFUSERS_RENAMES = (
    ("block.", "resnets."),
    ("down.", "down_blocks."),
    ("downsample", "downsamplers.0"),
    ("upsample", "upsamplers.0"),
    ("nin_shortcut", "conv_shortcut"),
    ("encoder.mid.block_1", "encoder.mid_block.resnets.0"),
    ("encoder.mid.block_2", "encoder.mid_block.resnets.1"),
    ("decoder.mid.block_1", "decoder.mid_block.resnets.0"),
    ("decoder.mid.block_2", "decoder.mid_block.resnets.1"),
)
# The inverse, written out: the mid blocks must be renamed before the generic ``resnets.`` -> ``block.``,
# and only the 1x1 shortcut (``conv_shortcut.weight``) was SAT's ``nin_shortcut``; a 3x3 causal
# ``conv_shortcut.conv.*`` has the same name in both.
DIFFUSERS_TO_SAT_RENAMES = (
    ("encoder.mid_block.resnets.0", "encoder.mid.block_1"),
    ("encoder.mid_block.resnets.1", "encoder.mid.block_2"),
    ("decoder.mid_block.resnets.0", "decoder.mid.block_1"),
    ("decoder.mid_block.resnets.1", "decoder.mid.block_2"),
    ("resnets.", "block."),
    ("down_blocks.", "down."),
    ("downsamplers.0", "downsample"),
    ("upsamplers.0", "upsample"),
    ("conv_shortcut.weight", "nin_shortcut.weight"),
    ("conv_shortcut.bias", "nin_shortcut.bias"),
)


def _renumber_decoder_up(state_dict: dict[str, torch.Tensor], old_prefix: str, new_prefix: str) -> dict[str, torch.Tensor]:
    """``decoder.<old_prefix>.<i>.*`` -> ``decoder.<new_prefix>.<n - 1 - i>.*`` (n: number of up blocks)."""
    head = f"decoder.{old_prefix}."
    indices = [int(key[len(head) :].split(".", 1)[0]) for key in state_dict if key.startswith(head)]
    num_blocks = max(indices, default=-1) + 1
    renamed = {}
    for key, value in state_dict.items():
        if key.startswith(head):
            index, rest = key[len(head) :].split(".", 1)
            key = f"decoder.{new_prefix}.{num_blocks - 1 - int(index)}.{rest}"
        renamed[key] = value
    return renamed


def sat_vae_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a SAT VAE state dict (``encoder.*``, ``decoder.*``; no prefix) to ``AutoencoderKLCogVideoX``'s names.

    ``loss.*`` entries (the VAE's training loss) are dropped; tensors are not copied.
    """
    renamed = {}
    for key, value in state_dict.items():
        if key.startswith(SAT_TRAINING_PREFIX):
            continue
        for old, new in SAT_TO_DIFFUSERS_RENAMES:
            key = key.replace(old, new)
        renamed[key] = value
    return _renumber_decoder_up(renamed, "up", "up_blocks")


def diffusers_vae_to_sat(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`sat_vae_to_diffusers`: ``AutoencoderKLCogVideoX`` names to SAT's ``3d-vae.pt`` names."""
    renamed = {}
    for key, value in _renumber_decoder_up(state_dict, "up_blocks", "up").items():
        for old, new in DIFFUSERS_TO_SAT_RENAMES:
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


def overlap_factor(tile: int, overlap: int) -> float:
    """diffusers' ``tile_overlap_factor`` for tiles of ``tile`` pixels sharing ``overlap`` pixels (multiples of 8).

    diffusers steps ``int(tile / 8 * (1 - factor))`` latents between tiles and crops each to ``tile - int(tile *
    factor)`` pixels; the two agree only if both products land on whole numbers, which ``overlap / tile`` in floating
    point can miss by a few ulps (a seam of duplicated or missing pixels). The nearest float that lands is taken.
    """
    latents, shared = tile // SPATIAL_COMPRESSION, overlap // SPATIAL_COMPRESSION
    exact = overlap / tile
    for ulps in sorted(range(-64, 65), key=abs):
        factor = exact + ulps * math.ulp(exact)
        if int(latents * (1 - factor)) == latents - shared and int(tile * factor) == overlap:
            return factor
    raise ValueError(f"diffusers' tiling cannot blend {overlap} of {tile} pixels exactly; choose another overlap")


def _autoencoder_class() -> type[AutoencoderKLCogVideoX]:
    # Imported when a VAE is built, not when this stage registers: diffusers' model code takes seconds to import.
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX


def _plain(value: Any) -> Any:
    """OmegaConf nodes and tuples as plain dicts / lists, so configs compare equal to ``config.json`` values."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _checked_architecture(architecture: Any) -> dict[str, Any]:
    architecture = _plain(architecture) or {}
    valid = [name for name in inspect.signature(_autoencoder_class().__init__).parameters if name != "self"]
    unknown = [key for key in architecture if key not in valid]
    if unknown:
        raise ConfigError(
            f"model.first_stage.architecture: unknown AutoencoderKLCogVideoX argument(s) {', '.join(unknown)} "
            f"(valid: {', '.join(valid)})"
        )
    return architecture


def read_sat_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """SAT's VAE file as saved (its names, ``loss.*`` included), unnested, or the VAE's part of a whole engine file."""
    if path.suffix == ".safetensors":
        state_dict = safetensors.torch.load_file(path)
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"{path}: not a plain tensor checkpoint (torch.load with weights_only=True refused it): {err}"
            ) from None
        # SAT's 3d-vae.pt nests it under "state_dict"; a DeepSpeed engine checkpoint under "module".
        for nesting in ("state_dict", "module"):
            if isinstance(state_dict, dict) and isinstance(state_dict.get(nesting), dict):
                state_dict = state_dict[nesting]
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state_dict).__name__}")
    # A whole engine checkpoint also holds the DiT and T5: keep only the VAE.
    first_stage = {key[len(SAT_ENGINE_PREFIX) :]: value for key, value in state_dict.items() if key.startswith(SAT_ENGINE_PREFIX)}
    return first_stage or state_dict


def _load_sat_checkpoint(path: Path, architecture: dict[str, Any]) -> AutoencoderKLCogVideoX:
    state_dict = sat_vae_to_diffusers(read_sat_state_dict(path))
    with torch.device("meta"):
        vae = _autoencoder_class()(**architecture)
    expected = {key: tuple(value.shape) for key, value in vae.state_dict().items()}
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} (expected {expected[key]})"
        for key in sorted(expected.keys() & state_dict.keys())
        if tuple(state_dict[key].shape) != expected[key]
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{label} ({len(items)}): {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
            for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
            if items
        ]
        raise CheckpointError(
            f"{path} does not match AutoencoderKLCogVideoX with model.first_stage.architecture {architecture} "
            f"(keys after renaming SAT names to diffusers names): " + "; ".join(problems)
        )
    vae.load_state_dict(state_dict, strict=True, assign=True)
    return vae.float()  # as from_pretrained gives it; the engine casts it


def _load_diffusers_folder(path: Path, architecture: dict[str, Any]) -> AutoencoderKLCogVideoX:
    vae = _autoencoder_class().from_pretrained(path, local_files_only=True)
    for key, value in architecture.items():
        found = _plain(vae.config[key])
        if found != value:
            raise ConfigError(f"model.first_stage.architecture.{key} is {value!r} but {path / 'config.json'} has {found!r}")
    return vae


@register_stage("video_vae")
class VideoVAEMixin(FrozenStage):
    """Frozen 3D causal VAE: clips in ``[-1, 1]`` to scaled latents and back.

    Args:
        vae (`AutoencoderKLCogVideoX`): the network; its tiling is turned off and its encoder set to whole clips.
        scale_factor (`float`): latents are multiplied by it after encoding and divided before decoding
            (1.15258426 for CogVideoX-2B, 0.7 for the 5B models).
        sample_posterior (`bool`, defaults to `True`): encode by sampling the posterior (SAT's training);
            ``False`` takes its mean.
        tile_size (`tuple[int, int]`): ``(height, width)`` pixels of a tile when tiling is on (:meth:`set_tiling`).
        tile_overlap (`tuple[int, int]`): pixels neighbouring tiles share and blend, ``(height, width)``.
    """

    def __init__(self, vae: AutoencoderKLCogVideoX, scale_factor: float, sample_posterior: bool = True,
                 tile_size: tuple[int, int] = (240, 360), tile_overlap: tuple[int, int] = (40, 72)):
        super().__init__()
        # diffusers encodes 8 frames at a time (the causal conv cache carries across chunks), which is not
        # SAT's whole-clip encode for more than 9 frames: a chunk longer than any clip makes it one pass.
        vae.num_sample_frames_batch_size = sys.maxsize
        vae.disable_tiling()
        self.vae = vae
        self.scale_factor = scale_factor
        self.sample_posterior = sample_posterior
        self.tile_size, self.tile_overlap = tuple(tile_size), tuple(tile_overlap)

    @staticmethod
    def network(architecture: Any) -> AutoencoderKLCogVideoX:
        """An ``AutoencoderKLCogVideoX`` of ``model.first_stage.architecture`` (checked), randomly initialised (or
        shapes only, under ``torch.device("meta")``)."""
        return _autoencoder_class()(**_checked_architecture(architecture))

    @classmethod
    def from_config(cls, cfg: FirstStageConfig) -> VideoVAEMixin:
        """Build ``model.first_stage``: random weights (``path: null``), a diffusers folder, or SAT's ``.pt``.

        Random weights come from ``init_seed`` alone (the same on every rank; the global RNG is untouched).
        """
        architecture = _checked_architecture(cfg.architecture)
        if cfg.path is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.init_seed)
                vae = cls.network(architecture)
            return cls(vae, cfg.scale_factor, cfg.sample_posterior, cfg.tile_size, cfg.tile_overlap)
        path = Path(cfg.path).expanduser()
        if path.is_dir():
            vae = _load_diffusers_folder(path, architecture)
            if vae.config.scaling_factor != cfg.scale_factor:
                warnings.warn(
                    f"model.first_stage.scale_factor is {cfg.scale_factor} but {path / 'config.json'} has scaling_factor "
                    f"{vae.config.scaling_factor}; latents use model.first_stage.scale_factor",
                    stacklevel=2,
                )
        elif path.is_file() and path.suffix in SAT_CHECKPOINT_SUFFIXES:
            vae = _load_sat_checkpoint(path, architecture)
        elif path.is_file():
            raise ConfigError(
                f"model.first_stage.path: {path} is neither a diffusers folder nor a SAT checkpoint "
                f"({', '.join(SAT_CHECKPOINT_SUFFIXES)})"
            )
        else:
            raise ConfigError(f"model.first_stage.path: not found: {path}")
        return cls(vae, cfg.scale_factor, cfg.sample_posterior, cfg.tile_size, cfg.tile_overlap)

    def set_tiling(self, enabled: bool) -> None:
        """diffusers' spatial tiling (each tile whole in time, neighbours blended linearly over the overlap), or
        SAT's exact whole-frame passes."""
        self.tiling = enabled
        if not enabled:
            self.vae.disable_tiling()
            return
        height, width = self.tile_size
        self.vae.enable_tiling(tile_sample_min_height=height, tile_sample_min_width=width)
        # set directly: enable_tiling takes a zero overlap for "keep the default"
        self.vae.tile_overlap_factor_height, self.vae.tile_overlap_factor_width = (
            overlap_factor(side, shared) for side, shared in zip(self.tile_size, self.tile_overlap))

    @torch.no_grad()
    def encode_moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The posterior ``(mean, std)`` of ``video``, unscaled; ``std`` is ``None`` when ``sample_posterior`` is off
        (the mode is then the latent). :func:`~sat_video.model.stages.latents_from_moments` turns them into what
        :meth:`encode` returns, draw for draw, which is what the latent cache stores and trains from."""
        config = self.vae.config
        spatial = 2 ** (len(config.block_out_channels) - 1)
        if video.ndim != 5 or video.shape[1] != config.in_channels:
            raise ValueError(
                f"VideoVAEMixin.encode: expected video [B, {config.in_channels}, T, H, W], found {list(video.shape)}"
            )
        frames, height, width = video.shape[2:]
        if (frames - 1) % config.temporal_compression_ratio or height % spatial or width % spatial:
            raise ValueError(
                f"VideoVAEMixin.encode: frames must be 1 + {config.temporal_compression_ratio}k and height, width "
                f"multiples of {spatial}, found {frames} frames of {height}x{width}"
            )
        posterior = self.vae.encode(video.to(self.vae.dtype)).latent_dist
        return (posterior.mean, posterior.std) if self.sample_posterior else (posterior.mode(), None)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode unscaled latents ``[B, 16, F, h, w]`` to clips ``[B, 3, 1 + 4(F - 1), 8h, 8w]`` in ``[-1, 1]``.

        diffusers decodes 2 latent frames at a time (3 first when ``F`` is odd), carrying the causal conv
        cache across chunks: the chunks of SAT's ``decode_first_stage`` for up to 21 latent frames.
        """
        video = self.vae.decode(latents.to(self.vae.dtype)).sample
        return video.clamp(-1.0, 1.0)
