"""The ``vae`` section: what ``tools/train_vae.py`` trains of the VAE and with which losses.

The rest of a VAE run comes from the sections a DiT run uses: the network and its starting weights from
``model.first_stage`` (``path``: a diffusers folder, SAT's ``3d-vae.pt``, or null for random weights of
``architecture``), the clips from ``data`` (clip length ``model.dit.num_frames``), the loop, optimizer, checkpoints,
held-out interval (``train.eval.interval``) and trackers from ``train``, ZeRO and precision from ``deepspeed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sat_video.common.constraints import at_least, between, one_of


@dataclass
class LpipsConfig:
    """``vae.lpips``: the perceptual loss network's weights, read from local files (nothing is downloaded)."""

    vgg16: str | None = None
    """torchvision's ImageNet ``vgg16`` state dict (``vgg16-397923af.pth``)."""
    heads: str | None = None
    """The ``lpips`` package's linear heads, ``lpips/weights/v0.1/vgg.pth``."""


@dataclass
class VaeLossConfig:
    """``vae.loss``: each term's weight. Every term is a mean over its elements, so weights do not depend on clip size."""

    pixel: str = field(default="l2", metadata=one_of("l1", "l2"))
    """The pixel reconstruction loss: ``l2`` (CogVideoX's VAE) or ``l1`` (taming, Open-Sora)."""
    pixel_weight: float = field(default=1.0, metadata=at_least(0))
    perceptual_weight: float = field(default=1.0, metadata=at_least(0))
    """LPIPS on ``perceptual_frames`` random frames of each clip (CogVideo's ``VideoAutoencoderLoss`` takes one); its
    weights come from ``vae.lpips`` or from the ``loss.perceptual_model.*`` keys of a SAT ``model.first_stage.path``."""
    perceptual_frames: int = field(default=1, metadata=at_least(1))
    kl_weight: float = field(default=1e-6, metadata=at_least(0))
    """The posterior's KL divergence to N(0, I), per latent element (``vae.trainable: all`` only)."""
    adversarial_weight: float = field(default=0.0, metadata=at_least(0))
    """The generator's hinge loss against the 3D discriminator, times the adaptive weight; 0 trains no discriminator."""
    disc_start: int = field(default=0, metadata=at_least(0))
    """The first iteration (1-based) with the GAN terms: before it the discriminator neither trains nor judges."""
    adaptive_weight: bool = True
    """Scale the GAN term by ``||grad rec|| / (||grad gan|| + 1e-4)`` at the decoder's last layer, clamped to
    ``[0, 1e4]`` (taming, sgm); ``false``: by 1."""
    r1_weight: float = field(default=0.0, metadata=at_least(0))
    """gamma of the R1 penalty ``gamma / 2 * E ||grad_x D(x)||^2`` on real clips; 0 turns it off."""


@dataclass
class DiscriminatorConfig:
    """``vae.discriminator``: CogVideo's 3D discriminator (:mod:`sat_video.vae_training.discriminator`) and its own
    AdamW. Its input size is the training crop (``vae.crop``, else the data's clip size)."""

    dim: int = field(default=32, metadata=at_least(1))
    max_dim: int = field(default=512, metadata=at_least(1))
    first_frame: bool = True
    """Causal in time, for 1 + 4k frames (``Discriminator3DWithfirstframe``); false: frames must halve evenly."""
    lr: float = field(default=1e-4, metadata=at_least(0, exclusive=True))
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = field(default=0.0, metadata=at_least(0))


@dataclass
class VaeTrainingConfig:
    """``vae``: what trains, the losses, the crops and the held-out clips of ``tools/train_vae.py``."""

    trainable: str = field(default="decoder", metadata=one_of("decoder", "all"))
    """``decoder``: the decoder (and a post-quant layer) only; the encoder and its quant layer stay bit-identical, so a
    DiT's latents stay valid. ``all``: the whole VAE, with the KL term."""
    crop: list[int] | None = None
    """``[height, width]``: train on random crops of this size of each clip (evaluation runs at the full size); null:
    whole clips. Multiples of 8."""
    gradient_checkpointing: bool = False
    """Recompute each VAE block in backward (diffusers' checkpointing): less activation memory, about a third more
    compute."""
    eval_sources: list[str] = field(default_factory=list)
    """Held-out clips (any ``data.sources`` form) for PSNR, SSIM and LPIPS every ``train.eval.interval`` steps."""
    eval_max_samples: int | None = field(default=None, metadata=at_least(1))
    strip_frames: int = field(default=4, metadata=between(1, 64))
    """Frames per clip in the input-over-reconstruction strip each evaluation sends to the trackers."""
    lpips: LpipsConfig = field(default_factory=LpipsConfig)
    loss: VaeLossConfig = field(default_factory=VaeLossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
