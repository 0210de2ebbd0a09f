"""A VAE run's checkpoint in SAT's ``3d-vae.pt`` layout (``tools/train_vae.py --export-sat``): the VAE from the checkpoint's
``vae/`` folder under SAT's names, the discriminator as ``loss.discr_3d.*`` and, when the run had LPIPS weights, LPIPS as
``loss.perceptual_model.*`` (the names of CogVideo's ``VideoAutoencoderLoss``), so that SAT, ``model.first_stage.path``
and a later ``tools/train_vae.py`` run (warm-starting both from ``loss.*``) read it."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from sat_video.common.errors import CheckpointError, OutputExistsError
from sat_video.formats.sat_checkpoint import MODEL_STATES
from sat_video.vae_training.autoencoder import save_sat_vae
from sat_video.vae_training.lpips import lpips_from_files
from sat_video.vae_training.trainer import DISCRIMINATOR, VAE_FOLDER

DISCRIMINATOR_KEY, LPIPS_KEY = "discr_3d.", "perceptual_model."
"""Prefixes of the two networks inside SAT's ``loss.`` (CogVideo's ``VideoAutoencoderLoss`` attribute names)."""


def export_sat(checkpoint: Path, out: Path, overwrite: bool = False) -> Path:
    """Write ``checkpoint`` (``<save>/<iteration>``) to ``out`` in SAT's layout; returns ``out``."""
    from diffusers import AutoencoderKLCogVideoX

    checkpoint = Path(checkpoint)
    if not (checkpoint / VAE_FOLDER).is_dir():
        raise CheckpointError(f"{checkpoint}: no {VAE_FOLDER}/ folder; expected a checkpoint of tools/train_vae.py, "
                              "<save>/<iteration>")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists (pass --overwrite to replace it)")
    vae = AutoencoderKLCogVideoX.from_pretrained(checkpoint / VAE_FOLDER, local_files_only=True)
    loss_state = {}
    discriminator_file = checkpoint / DISCRIMINATOR / MODEL_STATES
    if discriminator_file.is_file():
        module = torch.load(discriminator_file, map_location="cpu", weights_only=False)["module"]
        loss_state.update({DISCRIMINATOR_KEY + key: value for key, value in module.items()})
    config_file = checkpoint.parent / "config.yaml"
    lpips = OmegaConf.load(config_file).vae.lpips if config_file.is_file() else None
    if lpips is not None and lpips.vgg16 and lpips.heads:
        network = lpips_from_files(lpips.vgg16, lpips.heads)
        loss_state.update({LPIPS_KEY + key: value for key, value in network.state_dict().items()})
    save_sat_vae(vae, out, loss_state)
    return out
