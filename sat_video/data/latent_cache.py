"""Latent and text-embedding cache: encode a data set once, then train without decoding video, the VAE or T5.

Layout of a cache folder (written by ``tools/precompute_latents.py``, read when ``data.latent_cache`` is set)::

    manifest.json                  settings the tensors depend on, and one entry per sample
    shard-<rank>-<k>.safetensors   per sample j: latent_mean.j [C, F, h, w], latent_std.j (posterior
                                   sampling only), text.j [L, D], first_frame.j [3, 1, H, W] (I2V only)

Latents are stored *before* ``model.first_stage.scale_factor`` and as posterior moments when the VAE samples
its posterior, so every training step still draws a fresh latent (with the step's generator, exactly as
encoding the clip would) and the scale factor may change without re-encoding. Image-to-video keeps the VAE
for the one-frame condition, whose pixel noise is drawn per step (as
:class:`~sat_video.diffusion.conditioning.TrainingInputBuilder` draws it).

A cache is written into a staging folder and renamed when complete, so an interrupted run leaves no cache
that looks usable.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors import safe_open
from safetensors.torch import save_file

from sat_video.common.errors import CacheError, UnusableSample
from sat_video.common.files import atomic_write
from sat_video.data.buckets import Bucket
from sat_video.data.clips import ClipSpec, bucket_spec, load_clip
from sat_video.data.config import DataConfig
from sat_video.data.sources import SampleRef

logger = logging.getLogger("sat_video.data")

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Settings that decide the cached tensors, by config key; a different value means re-encoding.
PATH_KEYS = ("model.first_stage.path", "model.text_encoder.path", "model.text_encoder.tokenizer_path")


def cache_settings(model: DictConfig, data: DataConfig) -> dict[str, Any]:
    """What the cached tensors depend on, by config key (clip size resolved as training resolves it), from the
    ``model`` and ``data`` sections.

    Raises:
        CacheError: ``data.random_start``, which cuts other clips every epoch than the one a cache keeps per file.
    """
    if data.random_start:
        raise CacheError("data.random_start cuts a different clip from each video every epoch; a latent cache holds one "
                         "clip per file: set data.random_start=false, or train from the videos without data.latent_cache")
    first_stage, text = model.first_stage, model.text_encoder
    spec = ClipSpec.from_config(data, model.dit)
    settings = {
        "model.first_stage.type": first_stage.type,
        "model.first_stage.path": _resolved(first_stage.path),
        "model.first_stage.sample_posterior": bool(first_stage.sample_posterior),
        "model.text_encoder.path": _resolved(text.path),
        "model.text_encoder.tokenizer_path": _resolved(text.tokenizer_path),
        "model.dit.text_length": int(model.dit.text_length),
        "model.dit.num_frames": spec.num_frames,
        "data.height": spec.height,
        "data.width": spec.width,
        "data.fps": float(spec.fps),
        "data.skip_frames": spec.skip_frames,
        "data.min_frames": spec.min_frames,
    }
    if data.buckets:  # clips are cut at their buckets' sizes
        settings["data.buckets"] = [list(map(int, bucket)) for bucket in data.buckets]
        settings["data.max_upscale"] = float(data.max_upscale)
    if data.vae_tiling:  # tiles change the latents near seams (only recorded when on: older caches stay valid)
        settings["data.vae_tiling"] = True
        settings["model.first_stage.tile_size"] = [int(side) for side in first_stage.tile_size]
        settings["model.first_stage.tile_overlap"] = [int(shared) for shared in first_stage.tile_overlap]
    if first_stage.path is None:  # a randomly initialised VAE is defined by its architecture and seed
        settings["model.first_stage.architecture"] = _plain(first_stage.architecture)
        settings["model.first_stage.init_seed"] = first_stage.init_seed
    return settings


def _resolved(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else None


def _plain(value):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


# ---------------------------------------------------------------------------------------------------- reading


TENSORS = ("latent_mean", "latent_std", "text", "first_frame")


@dataclass
class EncodedClip:
    """One clip as the frozen stages see it, what a cache keeps of it: posterior moments ``[C, F, h, w]`` (no ``std``
    for a deterministic first stage), text embedding ``[L, D]`` and, for I2V, the first frame ``[3, 1, H, W]``."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor | None
    text: torch.Tensor
    first_frame: torch.Tensor | None
    caption: str
    path: str
    bucket: str | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in TENSORS if getattr(self, name) is not None}

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors().values())

    def map_tensors(self, fn) -> EncodedClip:
        """The same clip (of the same class) with ``fn`` applied to each of its tensors."""
        return dataclasses.replace(self, **{name: fn(tensor) for name, tensor in self.tensors().items()})


@dataclass
class CachedSample(EncodedClip):
    """A clip read from the cache for the sampler's ``(epoch, batch index)``."""

    position: tuple[int, int] = (0, 0)


@dataclass
class CachedBatch:
    """What the data loader yields when training from a cache (the counterpart of :class:`sat_video.data.Batch`).

    Args:
        latent_mean, latent_std: posterior moments ``[B, C, F, h, w]`` before the scale factor; no ``std``
            when the first stage is deterministic.
        text: T5 embeddings ``[B, L, D]``.
        first_frame: I2V only, the clip's first frame ``[B, 3, 1, H, W]`` in ``[-1, 1]``.
        position: ``(epoch, batch index)``, as for raw clips.
        bucket: the bucket its clips were cut for (``"FxHxW"``), ``None`` without ``data.buckets``.
    """

    latent_mean: torch.Tensor
    latent_std: torch.Tensor | None
    text: torch.Tensor
    first_frame: torch.Tensor | None
    captions: list[str]
    paths: list[str]
    position: tuple[int, int]
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    bucket: str | None = None

    def _map_tensors(self, fn) -> CachedBatch:
        return dataclasses.replace(
            self,
            **{
                name: None if getattr(self, name) is None else fn(getattr(self, name))
                for name in TENSORS
            },
        )

    def pin_memory(self) -> CachedBatch:
        """Called by ``DataLoader(pin_memory=True)``."""
        return self._map_tensors(torch.Tensor.pin_memory)

    def to(self, device: torch.device) -> CachedBatch:
        return self._map_tensors(lambda tensor: tensor.to(device, non_blocking=True))


class LatentCache(torch.utils.data.Dataset):
    """A cache folder as a dataset, indexed like :class:`sat_video.data.VideoDataset` by the
    ``(index, epoch, batch index)`` items of :class:`sat_video.data.ClipBatchSampler`.

    Args:
        folder: written by ``tools/precompute_latents.py``.
    Raises:
        CacheError: no manifest, an unknown format, or shard files that are missing.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest_file = self.folder / MANIFEST
        if not manifest_file.is_file():
            partial = sorted(self.folder.parent.glob(f".{self.folder.name}.partial-*")) if self.folder.parent.is_dir() else []
            hint = f" (an unfinished cache is in {partial[0]}; run tools/precompute_latents.py again)" if partial else ""
            raise CacheError(
                f"data.latent_cache: {manifest_file} not found; is {self.folder} a folder written by "
                f"tools/precompute_latents.py?{hint}"
            )
        try:
            manifest = json.loads(manifest_file.read_text())
            version, self.settings, self.samples = manifest["format_version"], manifest["settings"], manifest["samples"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CacheError(f"{manifest_file} is not a latent-cache manifest ({type(err).__name__}: {err})") from None
        if version != FORMAT_VERSION:
            raise CacheError(
                f"{manifest_file}: format_version {version}, this sat_video reads {FORMAT_VERSION}; re-run precompute"
            )
        self.skipped = [tuple(item) for item in manifest.get("skipped", [])]
        if not self.samples:
            raise CacheError(f"{manifest_file} lists no samples (all {len(self.skipped)} source files were unusable)")
        missing = sorted({entry["shard"] for entry in self.samples if not (self.folder / entry["shard"]).is_file()})
        if missing:
            raise CacheError(f"{self.folder}: shard files listed in {MANIFEST} are missing: {', '.join(missing[:3])}")
        self._open: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def kinds(self) -> list:
        """What a batch must not mix, per sample, for :class:`sat_video.data.ClipBatchSampler`: its bucket (a cache made
        with ``data.buckets``) or whether it is an image, as :attr:`sat_video.data.VideoDataset.kinds`."""
        if all("bucket" in entry for entry in self.samples):
            return [Bucket.from_name(entry["bucket"]) for entry in self.samples]
        return [bool(entry["is_image"]) for entry in self.samples]

    def check_compatible(self, model: DictConfig, data: DataConfig) -> None:
        """Refuse a cache made with settings other than those of the ``model`` and ``data`` sections (first stage,
        text encoder, clip size).

        Paths that differ only log a warning: the same weights may simply have moved.
        """
        wanted = cache_settings(model, data)
        conflicts = []
        for key, value in wanted.items():
            cached = self.settings.get(key)
            if cached == value:
                continue
            if key in PATH_KEYS:
                logger.warning("data.latent_cache %s was made with %s = %s; this config has %s", self.folder, key, cached, value)
            else:
                conflicts.append(f"{key}: cache {cached!r}, config {value!r}")
        if conflicts:
            raise CacheError(
                f"data.latent_cache {self.folder} was made with other settings; re-run "
                f"tools/precompute_latents.py with this config, or change it back: " + "; ".join(conflicts)
            )

    def _tensor(self, shard: str, name: str) -> torch.Tensor:
        handle = self._open.get(shard)
        if handle is None:  # opened lazily so that each data-loader worker has its own handles
            handle = self._open[shard] = safe_open(str(self.folder / shard), framework="pt")
        return handle.get_tensor(name)

    def __getitem__(self, item: tuple[int, int, int]) -> CachedSample:
        index, epoch, batch_index = item
        entry = self.samples[index]
        shard, key = entry["shard"], entry["key"]
        optional = lambda name: self._tensor(shard, f"{name}.{key}") if name in entry["tensors"] else None  # noqa: E731
        return CachedSample(
            latent_mean=self._tensor(shard, f"latent_mean.{key}"),
            latent_std=optional("latent_std"),
            text=self._tensor(shard, f"text.{key}"),
            first_frame=optional("first_frame"),
            caption=entry["caption"],
            path=entry["path"],
            position=(epoch, batch_index),
            bucket=entry.get("bucket"),
        )

    def __getstate__(self):  # safetensors handles do not pickle; workers reopen their own
        return {**self.__dict__, "_open": {}}


def collate_cached(samples: list[CachedSample]) -> CachedBatch:
    """Stack the samples of one batch (``DataLoader(collate_fn=collate_cached)``)."""
    stack = lambda name: None if getattr(samples[0], name) is None else torch.stack([getattr(s, name) for s in samples])  # noqa: E731
    return CachedBatch(
        latent_mean=stack("latent_mean"),
        latent_std=stack("latent_std"),
        text=stack("text"),
        first_frame=stack("first_frame"),
        captions=[s.caption for s in samples],
        paths=[s.path for s in samples],
        position=samples[0].position,
        bucket=samples[0].bucket,
    )


# ---------------------------------------------------------------------------------------------------- writing


class ClipsToEncode(torch.utils.data.Dataset):
    """Decodes this rank's files in data-loader workers; an unusable file becomes its reason.

    Args:
        refs: ``(index in the data set, ref)``.
        spec: how clips are cut; with ``buckets`` (one per ref), at each ref's bucket size instead.
    """

    def __init__(self, refs: list[tuple[int, SampleRef]], spec: ClipSpec, buckets: list[Bucket] | None = None):
        self.refs, self.spec, self.buckets = refs, spec, buckets

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, item: int):
        index, ref = self.refs[item]
        bucket = self.buckets[item] if self.buckets is not None else None
        spec = self.spec if bucket is None else bucket_spec(self.spec, bucket)
        try:
            video, caption = load_clip(ref, spec)
            return index, ref, video, caption, None
        except UnusableSample as err:
            return index, ref, None, None, err.reason


class CacheWriter:
    """Writes one rank's samples into shards of the staging folder, then its part of the manifest."""

    def __init__(self, staging: Path, rank: int, samples_per_shard: int):
        self.staging, self.rank, self.samples_per_shard = staging, rank, samples_per_shard
        self.entries: list[dict] = []
        self.skipped: list[tuple[str, str]] = []
        self._tensors: dict[str, torch.Tensor] = {}
        self._count, self._shard_index = 0, 0

    @property
    def _shard_name(self) -> str:
        return f"shard-{self.rank:03d}-{self._shard_index:05d}.safetensors"

    def add(self, index: int, ref: SampleRef, caption: str, tensors: dict[str, torch.Tensor], bucket: str | None = None) -> None:
        key = self._count
        for name, tensor in tensors.items():
            self._tensors[f"{name}.{key}"] = tensor.detach().cpu().contiguous()
        self.entries.append(
            {
                "index": index,
                "path": str(ref.path),
                "caption": caption,
                "is_image": ref.is_image,
                "shard": self._shard_name,
                "key": key,
                "tensors": sorted(tensors),
                "latent_shape": list(tensors["latent_mean"].shape),
                **({"bucket": bucket} if bucket is not None else {}),
            }
        )
        self._count += 1
        if self._count == self.samples_per_shard:
            self.flush()

    def flush(self) -> None:
        if self._tensors:
            save_file(self._tensors, str(self.staging / self._shard_name))
            self._tensors, self._count, self._shard_index = {}, 0, self._shard_index + 1

    def write_part(self) -> None:
        self.flush()
        part = {"entries": self.entries, "skipped": self.skipped}
        atomic_write(self.staging / f"part-{self.rank:03d}.json", lambda tmp: tmp.write_text(json.dumps(part)))


def staging_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.partial-{os.environ.get('TORCHELASTIC_RUN_ID', os.getpid())}"


def finish(staging: Path, out: Path, world_size: int, settings: dict) -> dict:
    """Merge the ranks' manifest parts (samples in data-set order) and move the folder into place."""
    entries, skipped = [], []
    for rank in range(world_size):
        part_file = staging / f"part-{rank:03d}.json"
        part = json.loads(part_file.read_text())
        entries.extend(part["entries"])
        skipped.extend(part["skipped"])
        part_file.unlink()
    entries.sort(key=lambda entry: entry.pop("index"))
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": settings,
        "samples": entries,
        "skipped": sorted(map(list, skipped)),
    }
    atomic_write(staging / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    if out.exists():  # only reached with --overwrite; the new cache is complete before the old one goes
        shutil.rmtree(out)
    staging.rename(out)
    return manifest
