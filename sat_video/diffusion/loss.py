"""The trainable part of the diffusion model: the DiT under SAT's ``model.diffusion_model`` name, and the v-prediction loss."""

from __future__ import annotations

import torch
from torch import nn

from sat_video.diffusion.conditioning import TrainingInputs
from sat_video.diffusion.schedule import NoiseSchedule


class DiffusionLoss(nn.Module):
    """The module DeepSpeed trains: the DiT under ``model.diffusion_model`` (SAT's state-dict prefix) and its loss.

    ``forward(inputs, timesteps, noise)`` noises the clean latents on the schedule and returns the per-sample
    v-prediction MSE ``[B]`` in float32. (SAT calls the object that holds the DiT, the VAE and T5 its "diffusion
    engine"; here the frozen stages stay outside, in :class:`~sat_video.model.stages.FrozenStages`, and "engine"
    only ever means DeepSpeed's.)
    """

    def __init__(self, dit: nn.Module, schedule: NoiseSchedule, ofs: float | None = None):
        super().__init__()
        self.model = nn.ModuleDict({"diffusion_model": dit})
        self.schedule = schedule
        self.ofs = ofs if dit.dit_config.ofs_embed_dim else None

    @property
    def dit(self) -> nn.Module:
        return self.model["diffusion_model"]

    def forward(self, inputs: TrainingInputs, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x0 = inputs.latents.float()
        noise = noise.to(x0.device, torch.float32)
        noisy = self.schedule.add_noise(x0, noise, timesteps)
        target = self.schedule.velocity(x0, noise, timesteps)
        if inputs.image_latents is not None:
            noisy = torch.cat([noisy, inputs.image_latents.float()], dim=2)
        dtype = next(self.dit.parameters()).dtype
        prediction = self.dit(noisy.to(dtype), timesteps.to(x0.device), inputs.text.to(dtype), ofs=self.ofs)
        return (prediction.float() - target).pow(2).flatten(1).mean(dim=1)
