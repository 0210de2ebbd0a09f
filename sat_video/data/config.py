"""The ``data`` section."""

from __future__ import annotations

from dataclasses import dataclass, field

from sat_video.common.constraints import at_least

DEFAULT_MAX_SOURCE_PIXELS = 4096 * 4096
"""Covers 4K UHD and DCI 4K; one 49-frame clip decoded at this size is about 2.5 GB of uint8."""


@dataclass
class DataConfig:
    """``data``: where the clips are and how they are cut. Clip length is ``model.dit.num_frames``."""

    sources: list[str] = field(default_factory=list)
    """Folders in SAT's SFT layout (``videos/<name>.mp4`` + ``labels/<name>.txt``) and/or metadata files
    (``.jsonl`` lines ``{"path": ..., "caption": ...}`` or ``.csv`` with ``path,caption`` columns; relative
    paths are relative to the metadata file). ``.png`` / ``.jpg`` entries are one-frame samples."""
    shards: list[str] = field(default_factory=list)
    """WebDataset tar shards written by ``tools/make_shards.py``, streamed instead of ``sources`` (docs/data.md): local
    paths or ``pipe:<command>`` (the shard on the command's stdout), with brace patterns (``/d/{000000..000999}.tar``).
    ``index.json`` is read from beside the shards (for ``pipe:``, the same command naming ``index.json`` instead of the
    shard): buckets come from its per-shard summaries, so nothing is probed at start. Each data-parallel rank streams its
    own shards. Not with ``sources`` or ``latent_cache`` in the same run (or stage)."""
    shuffle_buffer: int = field(default=256, metadata=at_least(0))
    """With ``shards``: samples a rank holds to shuffle its stream across shard boundaries (0 or 1: in shard order).
    The shards' order is reshuffled every epoch from ``train.seed`` in any case."""
    shard_timeout_s: float = field(default=60.0, metadata=at_least(0, exclusive=True))
    """With ``shards``: a shard (a ``pipe:`` command above all) that gives no bytes for this long ends with a warning
    naming it, like a truncated one, instead of hanging the run."""
    require_captions: bool = True
    """``false``: a clip without a caption (no label file, an empty one) is used with an empty caption; for runs that
    need none (``tools/train_vae.py``)."""
    height: int | None = field(default=None, metadata=at_least(1))
    """Pixel height of a clip; ``null``: ``model.dit.latent_height`` x 8."""
    width: int | None = field(default=None, metadata=at_least(1))
    """Pixel width of a clip; ``null``: ``model.dit.latent_width`` x 8."""
    fps: float = field(default=8.0, metadata=at_least(0, exclusive=True))
    """Frames are sampled at this rate (8 for CogVideoX 1.0, 16 for 1.5)."""
    skip_frames: int = field(default=3, metadata=at_least(0))
    """Frames skipped at each end of every video (fades, title cards)."""
    min_frames: int | None = field(default=None, metadata=at_least(1))
    """``null``: a video must provide a whole clip at ``fps``; otherwise videos with at least this many
    frames are accepted and the clip is padded by repeating its last frame (SAT's behaviour)."""
    max_source_pixels: int = field(default=DEFAULT_MAX_SOURCE_PIXELS, metadata=at_least(1))
    """Videos and images whose header declares larger frames are skipped (and named in ``skipped_files.txt``)
    before anything is decoded. Headers are also checked for absurd frame rates, durations and frame counts
    (:mod:`sat_video.data.video_probe`)."""
    buckets: list[list[int]] = field(default_factory=list)
    """``[frames, height, width]`` clip sizes in pixels (frames 4k+1, 1 for images; sides multiples of 8 x
    ``model.dit.patch_size``). Each clip is cut at the bucket that fits it (:mod:`sat_video.data.buckets`) and a batch
    holds one bucket. Empty: every clip at ``model.dit.num_frames`` x ``data.height`` x ``data.width``."""
    bucket_weights: dict[str, float] = field(default_factory=dict)
    """``{"FxHxW": weight}``: draw each batch's bucket with these relative weights (buckets left out: never) instead
    of in proportion to the buckets' batches."""
    max_upscale: float = field(default=1.0, metadata=at_least(1))
    """A clip goes to a bucket only if covering it needs at most this upscaling (1: never upscale)."""
    num_workers: int = field(default=2, metadata=at_least(0))
    """Data-loader processes per rank (0 decodes in the training process)."""
    vae_tiling: bool = False
    """Encode training clips (and ``tools/precompute_latents.py``'s) in overlapping spatial tiles of
    ``model.first_stage.tile_size`` (diffusers' tiling): less VAE memory for large clips, slightly different latents
    near tile seams than SAT's exact encode. Clips no larger than a tile are encoded whole either way."""
    random_start: bool = False
    """Each time a video is drawn, its clip starts at a random frame (of those leaving room for the whole clip after
    ``skip_frames``) instead of right after ``skip_frames``: more distinct clips from long videos. The start is drawn from
    ``train.seed``, the epoch and the sample, so a resumed run cuts the same clips. Clips then differ between epochs, so
    the in-run latent cache (``cache_latents``) is off with it, and a ``latent_cache`` cannot be used."""
    cache_latents: bool = True
    """Keep each clip's VAE posterior moments and T5 embedding the first time the run encodes it, and train later epochs
    from them (:mod:`sat_video.data.run_cache`): no video decoding, VAE or T5 for clips seen before, and the same
    losses. Off with ``random_start`` (clips change every epoch). Turn it off when memory and disk are both short."""
    cache_memory_gb: float = field(default=4.0, metadata=at_least(0))
    """In-run cache entries kept in memory, per rank; the rest go to ``cache_dir``."""
    cache_disk_gb: float = field(default=100.0, metadata=at_least(0))
    """In-run cache entries on disk, for all ranks together; entries fitting neither budget are encoded again when
    their clip returns."""
    cache_dir: str | None = None
    """Where in-run cache entries spill; ``null``: ``<train.save>/run_cache``. With several data-parallel ranks every
    entry is written there (ranks read each other's), so it belongs on storage they all see."""
    prefetch: int = field(default=1, metadata=at_least(0))
    """Batches encoded (VAE, T5) ahead of the DiT step, in a background thread (on a side CUDA stream on GPU) while
    the DiT trains; 0 encodes in the training step. Loader workers (``num_workers``) decode ahead in any case."""
    latent_cache: str | None = None
    """A folder written by ``tools/precompute_latents.py``: train from its latents and text embeddings instead
    of decoding ``sources`` (no video decoding, VAE or T5 per step; I2V still encodes its noisy first frame).
    The cache must have been made with this config's first stage, text encoder and clip settings."""
