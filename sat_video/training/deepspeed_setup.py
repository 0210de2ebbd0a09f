"""What DeepSpeed is given: its config dict from the ``deepspeed`` and ``train`` sections, and the dtype the frozen
stages run in under its precision."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from sat_video.training.config import DeepSpeedConfig, TrainConfig


def frozen_stage_dtype(precision: str) -> torch.dtype:
    """VAE and T5 run in bf16 under bf16 training (``deepspeed.precision``) and in fp32 otherwise (T5 overflows in fp16)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def deepspeed_config(ds: DeepSpeedConfig, train: TrainConfig) -> dict:
    """DeepSpeed's config dict from the ``deepspeed`` and ``train`` sections (values checked when loaded)."""
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    }
    return _deep_merge(config, OmegaConf.to_container(ds.extra, resolve=True))


def _deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        base[key] = _deep_merge(dict(base.get(key, {})), value) if isinstance(value, dict) else value
    return base
