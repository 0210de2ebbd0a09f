"""AdamW parameter groups, a step that refuses non-finite gradients, and the LR schedule."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from sat_video.common.constraints import check_fields
from sat_video.common.errors import ConfigError
from sat_video.training.config import OptimizerConfig, ScheduleConfig
from sat_video.training.ema import ExponentialMovingAverage


def select_trainable(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Freeze every parameter whose name matches none of the glob ``patterns``; returns the trainable names.

    Raises:
        ValueError: a pattern matches nothing (a typo would otherwise silently freeze the whole model).
    """
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ConfigError(f"train.trainable: pattern '{pattern}' matches no parameter (e.g. {names[:3]})")
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns))
        if param.requires_grad:
            trainable.append(name)
    return trainable


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and norm scales are exempt (as SAT and most DiT recipes).

    Empty groups are left out (LoRA trains matrices only): DeepSpeed drops them, and the LR scheduler, built
    with the optimizer's groups, would then no longer match its groups."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


class FiniteAdamW(torch.optim.AdamW):
    """AdamW that leaves weights and moments untouched when any gradient is not finite, and with ``ema`` also keeps a
    moving average of the weights it updates (:mod:`sat_video.training.ema`), untouched by a skipped step too.

    DeepSpeed's ZeRO and bf16 optimizers already skip such steps before calling this one; this check covers
    the remaining path (ZeRO-0 in fp32), where DeepSpeed would apply NaN updates.
    """

    def __init__(self, params: Iterable, cfg: OptimizerConfig, ema: ExponentialMovingAverage | None = None):
        super().__init__(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
        self.ema = ema
        self.last_step_skipped = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        finite = all(torch.isfinite(g).all() for g in grads) if grads else True
        self.last_step_skipped = not finite
        if not finite:
            return None
        starting = self.ema.starting(self) if self.ema is not None else {}
        loss = super().step(closure)
        if self.ema is not None:
            self.ema.update(self, starting)
        return loss


def check_schedule(schedule: ScheduleConfig, base_lr: float) -> None:
    """The ``train.lr_schedule`` section's own values, and ``min_lr`` within ``[0, train.optimizer.lr]``."""
    check_fields(schedule, "train.lr_schedule")
    if base_lr <= 0 or not 0 <= schedule.min_lr <= base_lr:
        raise ConfigError(f"train.lr_schedule.min_lr ({schedule.min_lr}) must lie in [0, train.optimizer.lr ({base_lr})]")


def lr_lambda(schedule: ScheduleConfig, base_lr: float, train_iters: int):
    """Multiplier of ``base_lr`` at step ``it``: linear warm-up, then constant / linear / cosine decay to
    ``min_lr``; clamped so it never goes below ``min_lr`` (SAT's linear decay could go negative)."""
    check_schedule(schedule, base_lr)
    warmup = schedule.warmup_iters
    decay = schedule.decay_iters if schedule.decay_iters is not None else max(train_iters - warmup, 1)
    floor = schedule.min_lr / base_lr

    def multiplier(it: int) -> float:
        if it < warmup:
            return (it + 1) / warmup
        if schedule.decay_style == "constant":
            return 1.0
        progress = min((it - warmup) / max(decay, 1), 1.0)
        shape = 1.0 - progress if schedule.decay_style == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(floor, floor + (1.0 - floor) * shape)

    return multiplier
