"""The ``model.diffusion`` and ``sample`` sections."""

from __future__ import annotations

from dataclasses import dataclass, field

from sat_video.common.constraints import at_least, between, one_of

SCHEDULER_NAMES = ("dpm", "ddim")
"""``sample.scheduler`` values: diffusers' ``CogVideoXDPMScheduler`` and ``CogVideoXDDIMScheduler``."""


@dataclass
class DiffusionConfig:
    """``model.diffusion``: the noise schedule the model was trained with (CogVideoX: scaled-linear betas
    0.00085..0.012, v-prediction, zero terminal SNR)."""

    snr_shift_scale: float = field(default=3.0, metadata=at_least(0, exclusive=True))
    """SNR shift ``s`` of the schedule: 3.0 for CogVideoX-2B, 1.0 for the 5B models."""
    num_train_timesteps: int = field(default=1000, metadata=at_least(1))
    """Number of DDPM steps."""
    interval_timesteps: bool = True
    """Each data-parallel rank draws timesteps only from its own interval of ``[0, 1000)`` (CogVideoX's
    explicit uniform sampling); ``false``: every rank draws from the whole range."""
    text_dropout: float = field(default=0.1, metadata=between(0, 1))
    """Share of samples trained with the all-zero text embedding (classifier-free guidance)."""
    image_noise_log_sigma: list[float] = field(default_factory=lambda: [-3.0, 0.5])
    """I2V: the first frame gets pixel noise ``sigma = exp(N(mean, std))`` before it is encoded."""
    image_dropout: float = field(default=0.05, metadata=between(0, 1))
    """I2V: share of samples whose whole image condition is zero."""
    ofs: float = 2.0
    """Value fed to the ofs embedding (CogVideoX 1.5 I2V)."""


@dataclass
class SampleConfig:
    """``sample``: how videos are generated (``tools/sample_video.py`` defaults and validation during training)."""

    scheduler: str = field(default="dpm", metadata=one_of(*SCHEDULER_NAMES))
    """``dpm``: ``CogVideoXDPMScheduler`` (DPM-Solver++ 2M, SAT's sampler); ``ddim``: ``CogVideoXDDIMScheduler``."""
    steps: int = field(default=50, metadata=at_least(1))
    guidance_scale: float = field(default=6.0, metadata=at_least(0))
    """Classifier-free guidance against the all-zero text embedding (as SAT); 1 disables guidance."""
    dynamic_cfg: bool = True
    """Scale guidance with the step as CogVideoX does (``1 + g (1 - cos(pi ((N - t) / N)^5)) / 2``)."""
    seed: int = field(default=42, metadata=at_least(0))
    """The noise of prompt ``i`` is drawn from a generator seeded with ``seed + i``."""
    fps: float | None = field(default=None, metadata=at_least(0, exclusive=True))
    """Frame rate of written videos; ``null``: ``data.fps``."""
    offload: str = field(default="none", metadata=one_of("none", "model", "sequential"))
    """Where weights wait while another model runs (``tools/sample_video.py``; the same videos in every mode):
    ``none`` keeps T5, the DiT and the VAE on the accelerator together; ``model`` brings each in only while it runs;
    ``sequential`` brings in one DiT block (one T5 / VAE layer) at a time, for the smallest GPUs."""
    vae_tiling: bool = False
    """Decode (and encode the I2V image) in overlapping spatial tiles of ``model.first_stage.tile_size``, blended
    (diffusers' tiling): far less VAE memory, slightly different pixels near tile seams. ``false``: SAT's exact
    decode."""
