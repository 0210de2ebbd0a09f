"""The ``data`` section."""

from __future__ import annotations

from dataclasses import dataclass, field

from sat_video.common.constraints import at_least


@dataclass
class DataConfig:
    """``data``: where the clips are and how they are cut. Clip length is ``model.dit.num_frames``."""

    sources: list[str] = field(default_factory=list)
    """Folders in SAT's SFT layout (``videos/<name>.mp4`` + ``labels/<name>.txt``) and/or metadata files
    (``.jsonl`` lines ``{"path": ..., "caption": ...}`` or ``.csv`` with ``path,caption`` columns; relative
    paths are relative to the metadata file). ``.png`` / ``.jpg`` entries are one-frame samples."""
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
    num_workers: int = field(default=2, metadata=at_least(0))
    """Data-loader processes per rank (0 decodes in the training process)."""
    latent_cache: str | None = None
    """A folder written by ``tools/precompute_latents.py``: train from its latents and text embeddings instead
    of decoding ``sources`` (no video decoding, VAE or T5 per step; I2V still encodes its noisy first frame).
    The cache must have been made with this config's first stage, text encoder and clip settings."""
