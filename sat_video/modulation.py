"""AdaLN modulation, shared by the block modulation and the final layer."""

import torch


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with ``shift`` / ``scale`` of shape ``[B, 1, D]`` broadcast over tokens."""
    return torch.addcmul(shift, x, 1 + scale)
