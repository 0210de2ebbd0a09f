"""Predict sampling's peak memory per stage for a config, a video size, ``sample.offload`` and ``sample.vae_tiling``,
without running the sampler (``tools/sample_video.py --estimate-memory``).

Peak of a stage = the weights on the device during it + its activations.

* **Weights** come from parameter counts of the models built on the ``meta`` device, at the sampling dtype: all three
  models for ``none``; the stage's model for ``model``; for ``sequential`` its resident part plus the largest unit
  streamed in at once (:func:`~sat_video.diffusion.offload.streamed_units`, the split the sampler uses).
* **Activations** are measured, not modelled: each model runs once or twice at small sizes on the CPU in fp32 with
  its real widths (one DiT block, one T5 block: activations do not grow with depth under ``no_grad``), counted as
  :class:`~sat_video.common.live_tensors.LiveTensorBytes` counts them, and extrapolated linearly. Measured linearities:
  a DiT step grows with its video tokens; VAE decoding with the latent frame's area at any frame count (diffusers
  decodes 2 latent frames at a time and carries a cache), which is also why tiling bounds it by the tile's area.
  Activations at bf16 are taken as half of fp32's.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from sat_video.common.errors import UsageError
from sat_video.common.live_tensors import LiveTensorBytes
from sat_video.diffusion.config import SampleConfig
from sat_video.diffusion.memory import GIB
from sat_video.diffusion.offload import OFFLOAD_MODES, direct_weights, streamed_units
from sat_video.diffusion.sampling import denoise
from sat_video.model.build import build_dit
from sat_video.model.config import DiTConfig
from sat_video.model.stages import SPATIAL_COMPRESSION

T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
"""T5 v1.1 XXL's encoder (CogVideoX's text encoder), assumed when ``model.text_encoder.path`` names no folder."""
USABLE_SHARE = 0.9
"""Share of a GPU's memory a predicted peak may take: the rest is CUDA's context, cuDNN's workspaces and the caching
allocator's fragmentation, which the prediction leaves out."""
PROBE_AREAS = ((2, 2), (4, 4))
"""Latent ``h x w`` of the VAE probes (2 x 2 latents: 16 x 16 pixels)."""
PROBE_PATCHES = (4, 8)
"""Patches per side of the two DiT probes."""


@dataclass(frozen=True)
class ModelWeights:
    """Bytes of one model's weights at the sampling dtype: all of them, and what ``sequential`` holds at most."""

    total: int
    sequential: int


@dataclass(frozen=True)
class StagePrediction:
    stage: str
    weights_bytes: int
    activation_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes


def _bytes(tensors, itemsize: int) -> int:
    return sum(t.numel() * (itemsize if t.is_floating_point() else t.element_size()) for t in tensors)


def model_weights(module: nn.Module, itemsize: int) -> ModelWeights:
    """``module`` (on any device, ``meta`` included) weighed at ``itemsize`` bytes per float."""
    tensors = {id(t): t for m in module.modules() for t in direct_weights(m)}.values()  # a tied weight once
    units, resident = streamed_units(module)
    names = {id(m): name for name, m in module.named_modules()}

    def unit_bytes(members):
        return _bytes([t for m in members for t in direct_weights(m)], itemsize)

    # a unit's weights stay while its module runs, so units nested in another unit's module are in at once
    hooked = [(names[id(h)], unit_bytes(members)) for h, members in units]
    at_once = [size + sum(other for outer, other in hooked if outer != name and (outer == "" or name.startswith(outer + ".")))
               for name, size in hooked]
    return ModelWeights(_bytes(tensors, itemsize), unit_bytes(resident) + max(at_once, default=0))


def materialised(module: nn.Module) -> nn.Module:
    """A meta-built probe given real (arbitrary, finite) storage on the CPU: its numbers do not matter, only sizes."""
    module = module.to_empty(device="cpu").eval()
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point():
                tensor.fill_(0.01)
    return module


def _live_peak(run, *args) -> int:
    with torch.no_grad(), LiveTensorBytes() as tracker:
        run(*args)
    return tracker.peak


def _linear(points: list[tuple[float, int]], at: float) -> int:
    (x0, y0), (x1, y1) = points
    slope = (y1 - y0) / (x1 - x0)
    return max(0, round(y0 + slope * (at - x0)))


def _tiles(length: int, tile: int, overlap: int) -> list[int]:
    """Latent lengths of diffusers' tiles along one side (its loop: a tile every ``tile - overlap`` latents)."""
    if length <= tile:
        return [length]
    return [min(tile, length - start) for start in range(0, length, tile - overlap)]


class SamplingMemoryModel:
    """Sampling memory of ``cfg``'s models at ``num_frames x height x width``: probes run when it is built (seconds to
    a minute at full widths on a CPU), then :meth:`predict` answers for any offload and tiling mode.

    Args:
        cfg: a loaded config (``model`` and ``sample`` sections; ``model.first_stage.type`` must be ``video_vae``).
        dtype: the sampling dtype (weights and activations).
        guided: classifier-free guidance doubles the DiT's batch (default: ``sample.guidance_scale > 1``).
    """

    def __init__(self, cfg: DictConfig, *, num_frames: int, height: int, width: int, dtype: torch.dtype = torch.bfloat16,
                 guided: bool | None = None):
        if cfg.model.first_stage.type != "video_vae":
            raise UsageError(f"the memory estimate covers the video_vae first stage, not {cfg.model.first_stage.type}")
        self.cfg, self.dtype = cfg, dtype
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        self.dit_config = DiTConfig.from_config(cfg)
        self.num_frames, self.height, self.width = num_frames, height, width
        self.latent_h, self.latent_w = height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION
        self.latent_frames = self.dit_config.latent_frames_of(num_frames)
        self.guided = cfg.sample.guidance_scale > 1 if guided is None else guided
        self.image_to_video = self.dit_config.in_channels > self.dit_config.out_channels
        self._activation_scale = self.itemsize / 4  # probes run in fp32
        first_stage = cfg.model.first_stage
        self.tile = [side // SPATIAL_COMPRESSION for side in first_stage.tile_size]
        self.overlap = [shared // SPATIAL_COMPRESSION for shared in first_stage.tile_overlap]

    @functools.cached_property
    def weights(self) -> dict[str, ModelWeights]:
        with torch.device("meta"):
            dit, t5, vae = build_dit(self.dit_config), self._t5(self._t5_config()), self._vae()
        return {"dit": model_weights(dit, self.itemsize), "text_encoder": model_weights(t5, self.itemsize),
                "first_stage": model_weights(vae, self.itemsize)}

    # ------------------------------------------------------------------ models

    def _t5_config(self, **changes):
        from transformers import T5Config

        path = self.cfg.model.text_encoder.path
        if path is not None and Path(path).expanduser().is_dir():
            config = T5Config.from_pretrained(Path(path).expanduser(), local_files_only=True)
        else:
            config = T5Config(**T5_XXL)
        for key, value in changes.items():
            setattr(config, key, value)
        return config

    @staticmethod
    def _t5(config):
        from transformers import T5EncoderModel

        return T5EncoderModel(config)

    def _vae(self):
        from mixins.video_vae import VideoVAEMixin

        return VideoVAEMixin.network(self.cfg.model.first_stage.architecture)

    # ------------------------------------------------------------------ probes

    @functools.cached_property
    def t5_activation(self) -> int:
        with torch.device("meta"):
            t5 = self._t5(self._t5_config(num_layers=1))
        t5 = materialised(t5)
        ids = torch.ones(1, self.dit_config.text_length, dtype=torch.long)
        return round(_live_peak(functools.partial(t5, input_ids=ids)) * self._activation_scale)

    @functools.cached_property
    def dit_activation(self) -> int:
        dit_config = self.dit_config
        patch, patch_t = dit_config.patch_size, dit_config.patch_size_t or 1
        frames = dit_config.temporal_compression_ratio * (patch_t - 1) + 1  # one temporal patch: latent frames = patch_t
        target = dit_config.token_grid(self.num_frames, self.latent_h, self.latent_w).num_tokens
        settings = SampleConfig(steps=2, guidance_scale=self.cfg.sample.guidance_scale if self.guided else 1.0)
        points = []
        for side in PROBE_PATCHES:
            probe_config = dataclasses.replace(dit_config, num_layers=1, num_frames=frames, latent_height=side * patch,
                                               latent_width=side * patch)
            with torch.device("meta"):
                dit = build_dit(probe_config)
            dit = materialised(dit)
            latent = torch.zeros(1, patch_t, dit_config.out_channels, side * patch, side * patch)
            image = torch.zeros_like(latent) if self.image_to_video else None
            text = torch.zeros(1, dit_config.text_length, dit_config.text_hidden_size)
            ofs = self.cfg.model.diffusion.ofs if dit_config.ofs_embed_dim else None
            run = functools.partial(denoise, dit, latent, text, settings, snr_shift_scale=1.0, image_latents=image, ofs=ofs,
                                    generator=torch.Generator().manual_seed(0))
            peak = _live_peak(run)
            points.append((side * side, peak))
        return round(_linear(points, target) * self._activation_scale)

    @functools.cached_property
    def _vae_points(self) -> dict[str, list[tuple[int, int]]]:
        """``(latent area, live peak)`` of the two VAE probes, decoding and (I2V) encoding one image."""
        from mixins.video_vae import VideoVAEMixin

        first_stage = self.cfg.model.first_stage
        with torch.device("meta"):
            vae = self._vae()
        stage = VideoVAEMixin(materialised(vae), first_stage.scale_factor)
        decode, encode = [], []
        for h, w in PROBE_AREAS:
            latents = torch.zeros(1, vae.config.latent_channels, self.latent_frames, h, w)
            decode.append((h * w, _live_peak(stage.decode, latents)))
            if self.image_to_video:
                image = torch.zeros(1, 3, 1, h * SPATIAL_COMPRESSION, w * SPATIAL_COMPRESSION)
                encode.append((h * w, _live_peak(stage.encode, image)))
        return {"decode": decode, "encode": encode}

    # ------------------------------------------------------------------ predictions

    def _vae_activation(self, points, frames: int, tiled: bool) -> int:
        """Activations of a VAE pass over latents ``frames x latent_h x latent_w``; tiled: each tile's pass plus the
        decoded tiles and the blended result held together (diffusers keeps every tile until it blends)."""
        if not tiled:
            return round(_linear(points, self.latent_h * self.latent_w) * self._activation_scale)
        rows = _tiles(self.latent_h, self.tile[0], self.overlap[0])
        cols = _tiles(self.latent_w, self.tile[1], self.overlap[1])
        one_tile = _linear(points, max(rows) * max(cols))
        pixel_frames = 1 + self.dit_config.temporal_compression_ratio * (frames - 1)
        pixels = 3 * pixel_frames * SPATIAL_COMPRESSION**2 * 4  # fp32 bytes of RGB per latent pixel
        held = pixels * (sum(rows) * sum(cols) + self.latent_h * self.latent_w)
        return round((one_tile + held) * self._activation_scale)

    def decode_activation(self, tiled: bool) -> int:
        """Bytes the VAE decode of the whole video allocates (the VAE's probes alone)."""
        return self._vae_activation(self._vae_points["decode"], self.latent_frames, tiled)

    def predict(self, offload: str = "none", vae_tiling: bool = False) -> list[StagePrediction]:
        """Per stage, in the order the sampler runs them."""
        if offload not in OFFLOAD_MODES:
            raise UsageError(f"offload: expected one of {', '.join(OFFLOAD_MODES)}, found {offload!r}")
        stages = [("T5", "text_encoder", self.t5_activation)]
        if self.image_to_video:
            stages.append(("VAE encode", "first_stage", self._vae_activation(self._vae_points["encode"], 1, vae_tiling)))
        stages.append(("DiT steps", "dit", self.dit_activation))
        stages.append(("VAE decode", "first_stage", self.decode_activation(vae_tiling)))
        everything = sum(weights.total for weights in self.weights.values())
        predictions = []
        for stage, model, activation in stages:
            weights = {"none": everything, "model": self.weights[model].total,
                       "sequential": self.weights[model].sequential}[offload]
            predictions.append(StagePrediction(stage, weights, activation))
        return predictions

    def describe(self, offload: str, vae_tiling: bool) -> str:
        rows = self.predict(offload, vae_tiling)
        dtype = str(self.dtype).removeprefix("torch.")
        lines = [f"predicted peak memory, {self.num_frames}x{self.height}x{self.width}, {dtype}, offload {offload}, "
                 f"VAE tiling {'on' if vae_tiling else 'off'}:"]
        lines += [f"  {row.stage:<12} {row.peak_bytes / GIB:8.2f} GiB  (weights {row.weights_bytes / GIB:.2f}, "
                  f"activations {row.activation_bytes / GIB:.2f})" for row in rows]
        lines.append(f"  {'peak':<12} {max(row.peak_bytes for row in rows) / GIB:8.2f} GiB")
        return "\n".join(lines)

    def table(self) -> list[tuple[str, bool, float]]:
        """``(offload, tiling, peak GiB)`` for every mode, fastest first (less offload first, then untiled: tiles
        overlap, so a tiled decode computes more)."""
        return [(offload, tiled, max(row.peak_bytes for row in self.predict(offload, tiled)) / GIB)
                for offload in OFFLOAD_MODES for tiled in (False, True)]

    def fastest_fitting(self, memory_gib: float, usable: float = USABLE_SHARE) -> tuple[str, bool, float] | None:
        """The fastest ``(offload, tiling, peak GiB)`` whose predicted peak fits in ``usable`` of ``memory_gib``, or
        ``None`` when no mode does."""
        return next(((offload, tiled, gib) for offload, tiled, gib in self.table() if gib <= usable * memory_gib), None)

