"""The CogVideoX noise schedule, v-prediction loss and per-rank timestep intervals (CogVideoX paper, section 3;
SAT's ``sgm`` diffusion code).

The schedule equals diffusers' ``CogVideoXDDIMScheduler(rescale_betas_zero_snr=True, snr_shift_scale=s)``
(``tests/test_diffusion.py`` checks ``alphas_cumprod`` for s = 1 and 3).
"""

from __future__ import annotations

from typing import Any

import torch

BETA_START, BETA_END = 0.00085, 0.012
"""CogVideoX's scaled-linear betas: ``linspace(sqrt(BETA_START), sqrt(BETA_END))**2``."""


class NoiseSchedule:
    """Scaled-linear betas, SNR shift ``s``, then rescaled to zero terminal SNR; computed in float64.

    ``alphas_cumprod[t]`` is ``abar_t``; ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.
    """

    def __init__(
        self, snr_shift_scale: float, num_train_timesteps: int = 1000, beta_start: float = BETA_START, beta_end: float = BETA_END
    ):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        abar = torch.cumprod(1.0 - betas, dim=0)
        abar = abar / (snr_shift_scale + (1.0 - snr_shift_scale) * abar)
        sqrt_abar = abar.sqrt()
        first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
        sqrt_abar = (sqrt_abar - last) * first / (first - last)
        self.num_train_timesteps = num_train_timesteps
        self.alphas_cumprod = sqrt_abar**2
        self.sqrt_alphas_cumprod = sqrt_abar
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()

    def _coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (-1,) + (1,) * (like.ndim - 1)
        t = timesteps.cpu().long()
        a = self.sqrt_alphas_cumprod[t].to(like.device, torch.float32).view(shape)
        s = self.sqrt_one_minus_alphas_cumprod[t].to(like.device, torch.float32).view(shape)
        return a, s

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(timesteps, x0)
        return a * x0 + s * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target ``sqrt(abar) eps - sqrt(1 - abar) x0``. Plain MSE on it equals SAT's x0 loss
        weighted by ``1 / (1 - abar)``."""
        a, s = self._coefficients(timesteps, x0)
        return a * noise - s * x0


def timestep_interval(rank: int, world_size: int, num_train_timesteps: int = 1000) -> tuple[int, int]:
    """``[low, high)`` of the timesteps data-parallel ``rank`` draws from (explicit uniform sampling).

    The steps are cut into ``G`` equal intervals, ``G`` the largest divisor of ``num_train_timesteps`` not
    above ``world_size``; rank ``r`` takes interval ``r mod G``, so every optimizer step covers the whole range.
    """
    groups = max(g for g in range(1, world_size + 1) if num_train_timesteps % g == 0)
    width = num_train_timesteps // groups
    low = (rank % groups) * width
    return low, low + width


def sample_timesteps(batch: int, interval: tuple[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
    low, high = interval
    return torch.randint(low, high, (batch,), generator=generator)


def scheduler_config(snr_shift_scale: float, num_train_timesteps: int = 1000) -> dict[str, Any]:
    """Keyword arguments of the diffusers scheduler with this schedule (``CogVideoXDDIMScheduler`` / ``CogVideoXDPMScheduler``);
    ``tests/diffusion/test_schedule.py`` checks that its ``alphas_cumprod`` equal :class:`NoiseSchedule`'s."""
    return {
        "num_train_timesteps": num_train_timesteps,
        "beta_start": BETA_START,
        "beta_end": BETA_END,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": True,
        "snr_shift_scale": float(snr_shift_scale),
    }
