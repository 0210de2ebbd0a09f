"""An exponential moving average of the trained weights, kept as optimizer state as SAT's ``FusedEmaAdam`` keeps it.

The optimizer that DeepSpeed steps holds the fp32 master weights: whole parameters with ZeRO-0 in fp32, else this rank's
flat partition of them. :meth:`ExponentialMovingAverage.update` keeps ``state[master]["ema"]`` beside Adam's moments, so
the average covers exactly what trains (LoRA factors under LoRA, every trainable weight under SFT), ZeRO-1/2/3 partition
it like the moments (no rank holds a whole extra copy), and DeepSpeed writes and reads it with the optimizer's state.

To use the average, :func:`swapped_in` puts it into the master weights and lets DeepSpeed copy the masters into the
model, as after a step; afterwards the masters are restored from host memory and copied back the same way, which
leaves the model bit-identical to before. :func:`gather` reads it whole, parameter by parameter, for the
``ema_model_states.pt`` file a checkpoint carries for sampling and export (:data:`EMA_STATES`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from sat_video.common.errors import CheckpointError, ConfigError
from sat_video.formats.sat_checkpoint import SAT_PREFIX
from sat_video.training.config import EmaConfig

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

logger = logging.getLogger("sat_video.train")

KEY = "ema"
"""The optimizer-state key of the average (SAT's ``FusedEmaAdam`` names it the same)."""


class ExponentialMovingAverage:
    """The update rule and the checkpoint part ``ema`` (its settings, so that a resume can tell whether the run that
    wrote a checkpoint kept an average)."""

    name = "ema"

    def __init__(self, cfg: EmaConfig):
        self.decay, self.warmup = float(cfg.decay), bool(cfg.warmup)

    def decay_at(self, updates_before: int) -> float:
        """The decay of the update that follows ``updates_before`` updates."""
        if self.warmup:
            return min(self.decay, (1 + updates_before) / (10 + updates_before))
        return self.decay

    @torch.no_grad()
    def update(self, optimizer: torch.optim.Optimizer, initial: dict[torch.Tensor, torch.Tensor]) -> None:
        """After an applied step of ``optimizer``: fold its masters into their averages. ``initial``: the masters as they
        were before this step, for those that have no average yet (it starts at the weights before the first update)."""
        for group in optimizer.param_groups:
            for master in group["params"]:
                state = optimizer.state[master]
                if KEY not in state:
                    if master not in initial:
                        continue  # no gradient has reached it yet (torch's Adam skips it too)
                    state[KEY] = initial[master]
                decay = self.decay_at(int(state["step"]) - 1)  # Adam's count already includes this step
                state[KEY].lerp_(master.detach().to(state[KEY].dtype), 1.0 - decay)

    @staticmethod
    def starting(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, torch.Tensor]:
        """Before a step: copies of the masters that it updates and that have no average yet (only the first step
        copies anything)."""
        return {master: master.detach().clone() for group in optimizer.param_groups for master in group["params"]
                if master.grad is not None and KEY not in optimizer.state[master]}

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["decay"], state["warmup"]) != (self.decay, self.warmup):
            logger.warning("train.ema: decay %g, warmup %s from here on (the checkpoint's run used %g, %s)", self.decay,
                           self.warmup, state["decay"], state["warmup"])


def check_ema(cfg: EmaConfig, zero_stage: int, precision: str, elastic: bool) -> None:
    """What the average cannot go with, refused before anything is built."""
    if not cfg.enabled:
        return
    if zero_stage == 0 and precision == "fp16":
        raise ConfigError("train.ema needs ZeRO-1/2/3, or ZeRO-0 in bf16 or fp32: DeepSpeed's fp16 optimizer for "
                          "deepspeed.zero_stage=0 gives no way to copy the average into the weights")
    if elastic:
        raise ConfigError("train.ema with train.resume_layout=elastic: DeepSpeed's universal checkpoint carries the "
                          "weights and Adam's moments but not the average; resume on the layout that wrote the "
                          "checkpoint, or start a new run from its weights with train.init_checkpoint")


def with_state(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, dict]:
    """Every master that has optimizer state, with it. From the state, not the groups: between its steps ZeRO-3 leaves
    the groups empty (it hands the optimizer one partition at a time)."""
    return {master: state for master, state in optimizer.state.items() if state}


def held_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The bytes of average this rank holds."""
    return sum(state[KEY].numel() * state[KEY].element_size() for state in with_state(optimizer).values() if KEY in state)


def check_resumed(optimizer: torch.optim.Optimizer, enabled: bool, folder: str) -> None:
    """After a resume from ``folder``: with ``train.ema`` on, every master the optimizer has state for must have brought
    its average; with it off, averages the checkpoint carried are dropped (they would go stale)."""
    states = with_state(optimizer).values()
    if enabled and any(KEY not in state for state in states):
        raise CheckpointError(f"{folder}: train.ema is on, but the run that wrote this checkpoint kept no average of the "
                              "weights (train.ema off); resume it with train.ema.enabled=false, or start a new run from its "
                              f"weights with train.init_checkpoint={folder}")
    if not enabled and any(KEY in state for state in states):
        for state in states:
            state.pop(KEY, None)
        logger.warning("%s: the checkpoint carries an average of the weights, which train.ema off drops", folder)


def _copy_masters_into_model(engine: DeepSpeedEngine) -> None:
    """What DeepSpeed does after a step: each master (partition) into the model's weights, gathered over the ranks."""
    wrapper = engine.optimizer
    if wrapper is base_optimizer(engine):  # ZeRO-0 in fp32: the optimizer's masters are the model's weights themselves
        return
    if hasattr(wrapper, "update_lp_params"):  # ZeRO-1/2, and ZeRO-0 with bf16
        wrapper.update_lp_params()
    elif hasattr(wrapper, "fp32_partitioned_groups_flat"):  # ZeRO-3: each rank's partitions only
        for sub_group in range(len(wrapper.fp32_partitioned_groups_flat)):
            wrapper._reassign_or_swap_out_partitioned_parameters(sub_group)
    else:  # ZeRO-0 with fp16 (refused by check_ema before the engine is built)
        raise NotImplementedError(f"train.ema: cannot copy the average into the weights under {type(wrapper).__name__}")


def base_optimizer(engine: DeepSpeedEngine) -> torch.optim.Optimizer:
    """The optimizer whose state holds the masters (ours, inside DeepSpeed's wrapper)."""
    wrapper = engine.optimizer
    return getattr(wrapper, "optimizer", wrapper)


@contextlib.contextmanager
def swapped_in(engine: DeepSpeedEngine) -> Iterator[None]:
    """The model runs with the averaged weights inside (collective under ZeRO: every rank enters it)."""
    optimizer = base_optimizer(engine)
    live = {}
    with torch.no_grad():
        for master, state in with_state(optimizer).items():
            if KEY in state:
                live[master] = master.detach().to("cpu", copy=True)
                master.copy_(state[KEY])
        _copy_masters_into_model(engine)
    try:
        yield
    finally:
        with torch.no_grad():
            for master, weights in live.items():
                master.copy_(weights)
            _copy_masters_into_model(engine)


def gather(engine: DeepSpeedEngine, model: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """The average of every trained parameter of ``model``, whole, in the model's dtype and SAT's key names, in host
    memory where ``keep`` (collective: every rank calls it, one parameter at a time; the others get ``{}``). Parameters
    that train but have no average yet (no step has reached them) keep their weights."""
    from deepspeed.utils import safe_get_full_fp32_param

    result = {}
    with swapped_in(engine):
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            whole = safe_get_full_fp32_param(param)  # the masters now hold the average; None: ZeRO-0 in fp32
            if keep:
                value = param.detach() if whole is None else whole
                dtype = getattr(param, "ds_tensor", param).dtype  # ZeRO-3's param.data is an empty placeholder
                result[SAT_PREFIX + name] = value.to("cpu", dtype).clone()
    return result
