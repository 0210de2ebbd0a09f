"""Short runs, one after another in one process group, that record the trainable weights (whole fp32 masters) before the
first step and after each, and the gathered moving average at the end: ``torchrun ... tests/training/ema_rank.py --out
ema.pt --stages 2 3 --decays 0 0.5 1 --base ... keys`` (with the repository on ``PYTHONPATH``). The main rank writes
``{(stage, decay): {"weights": [before, after 1, ...], "ema": {...}, "held_bytes": ..., "trained_bytes": ...}}``."""

import argparse

import torch
from deepspeed.utils import safe_get_full_fp32_param

from sat_video.config.cli import add_config_arguments, config_from_arguments
from sat_video.config.loader import load_config
from sat_video.formats.sat_checkpoint import SAT_PREFIX
from sat_video.training import ema
from sat_video.training.callbacks import Callback
from sat_video.training.distributed import exit_process, init_distributed, shutdown
from sat_video.training.trainer import Trainer


def masters(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The whole fp32 master of every trainable parameter (collective under ZeRO)."""
    return {SAT_PREFIX + name: safe_get_full_fp32_param(param).clone().cpu()
            for name, param in trainer.engine.module.dit.named_parameters() if param.requires_grad}


class RecordWeights(Callback):
    name = "record_weights"

    def __init__(self):
        self.weights = []

    def on_step_end(self, trainer, step) -> None:
        self.weights.append(masters(trainer))


def record(cfg, env) -> dict:
    recorder = RecordWeights()
    trainer = Trainer(cfg, env, callbacks=[recorder])
    try:
        before = masters(trainer)
        trainer.run()
        average = ema.gather(trainer.engine, trainer.engine.module.dit, keep=True)
        held = ema.held_bytes(ema.base_optimizer(trainer.engine))
    finally:
        trainer.close()
    return {"weights": [before, *recorder.weights], "ema": average, "held_bytes": held,
            "trained_bytes": sum(value.numel() * 4 for value in before.values())}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", type=int, nargs="+", required=True)
    parser.add_argument("--decays", type=float, nargs="+", required=True)
    args = parser.parse_args()
    cfg = config_from_arguments(args)
    env = init_distributed()
    results = {}
    for stage in args.stages:
        for decay in args.decays:
            run = load_config([cfg], [f"deepspeed.zero_stage={stage}", f"train.ema.decay={decay}",
                                      f"train.save={cfg.train.save}/zero{stage}-{decay}"])
            results[(stage, decay)] = record(run, env)
    if env.is_main:
        torch.save(results, args.out)
    shutdown()
    exit_process(0)
