"""A training run that records the trainable weights and Adam moments, gathered over the ZeRO partitions, right after it
starts or resumes and after iteration ``--record-at``: ``torchrun ... tests/training/elastic_rank.py --out states.pt
--record-at 2 --base ... keys`` (with the repository on ``PYTHONPATH``), or :func:`record_run` in a test's process."""

import argparse

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from sat_video.config.cli import add_config_arguments, config_from_arguments
from sat_video.training.callbacks import Callback
from sat_video.training.distributed import exit_process, init_distributed, shutdown
from sat_video.training.trainer import Trainer


def full_states(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    """Per trainable parameter: its fp32 master weight and Adam moments, whole (collective under ZeRO-1/2)."""
    # DeepSpeed links each parameter to its moments once, right after the first group's first step, when the later
    # groups have none yet (deepspeed 0.19.8): link them again for the read.
    zero = trainer.engine.optimizer
    for group, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
        for param in group:
            if param._hp_mapping is not None:
                param._hp_mapping.set_optim_state_fragment(flat, zero.optimizer.state[flat])
    states = {}
    for name, param in trainer.engine.module.named_parameters():
        if param.requires_grad:
            states[name] = {"fp32": safe_get_full_fp32_param(param).clone(),
                            **{key: safe_get_full_optimizer_state(param, key).clone() for key in ("exp_avg", "exp_avg_sq")}}
    return states


class Record(Callback):
    name = "record"

    def __init__(self, at: int):
        self.at, self.states = at, None

    def on_step_end(self, trainer, step) -> None:
        if step.iteration == self.at:
            self.states = full_states(trainer)


def record_run(cfg, out, record_at: int) -> None:
    """Train ``cfg`` as this rank; the main rank writes ``{"loaded": ..., "recorded": ...}`` to ``out``."""
    env = init_distributed()
    record = Record(record_at)
    trainer = Trainer(cfg, env, callbacks=[record])
    try:
        loaded = full_states(trainer) if trainer.state.iteration else None  # a fresh start has no moments yet
        trainer.run()
    finally:
        trainer.close()
    if env.is_main:
        torch.save({"loaded": loaded, "recorded": record.states}, out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    parser.add_argument("--out", required=True)
    parser.add_argument("--record-at", type=int, default=0)
    args = parser.parse_args()
    record_run(config_from_arguments(args), args.out, args.record_at)
    shutdown()
    exit_process(0)
