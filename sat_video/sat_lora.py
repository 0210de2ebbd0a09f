"""Merge SAT LoRA weights into plain linear weights.

SAT's LoRA wraps a linear as ``<name>.original.{weight,bias}`` plus ``<name>.matrix_A.{i}`` ``[r, in]``
and ``<name>.matrix_B.{i}`` ``[out / parts, r]``, one pair per output partition (three for the fused
``query_key_value``: q, k, v). The update is ``W[part i] += (alpha / r) * B_i @ A_i``; SAT's alpha is 1.
"""

from __future__ import annotations

import re

import torch

_LORA_KEY = re.compile(r"^(?P<base>.+)\.(?:original\.(?:weight|bias)|matrix_[AB]\.\d+)$")


def has_sat_lora(state_dict: dict) -> bool:
    return any(".matrix_A." in key for key in state_dict)


def merge_sat_lora(state_dict: dict[str, torch.Tensor], alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """Return a copy of ``state_dict`` with every SAT LoRA-wrapped linear merged into ``<name>.weight``."""
    merged = dict(state_dict)
    bases = sorted({m["base"] for key in state_dict if (m := _LORA_KEY.match(key))})
    for base in bases:
        if f"{base}.original.weight" not in merged:
            raise KeyError(f"LoRA matrices for '{base}' but no '{base}.original.weight' in the checkpoint")
        weight = merged.pop(f"{base}.original.weight").clone()
        bias = merged.pop(f"{base}.original.bias", None)
        parts = sum(1 for key in state_dict if key.startswith(f"{base}.matrix_A."))
        rows = weight.shape[0] // max(parts, 1)
        for i in range(parts):
            lora_a, lora_b = merged.pop(f"{base}.matrix_A.{i}"), merged.pop(f"{base}.matrix_B.{i}")
            if lora_a.shape[1] != weight.shape[1] or lora_b.shape != (rows, lora_a.shape[0]):
                raise ValueError(
                    f"LoRA '{base}' part {i}: matrix_A {tuple(lora_a.shape)} / matrix_B {tuple(lora_b.shape)} "
                    f"do not fit weight {tuple(weight.shape)} split in {parts}"
                )
            delta = (alpha / lora_a.shape[0]) * (lora_b.double() @ lora_a.double())
            part = slice(i * rows, (i + 1) * rows)
            weight[part] = (weight[part].double() + delta).to(weight.dtype)
        merged[f"{base}.weight"] = weight
        if bias is not None:
            merged[f"{base}.bias"] = bias
    return merged
