#!/usr/bin/env python3
"""Train a video DiT with DeepSpeed, on one CPU process or many GPUs.

    torchrun --nproc_per_node 8 tools/train_video.py --base configs/cogvideox_5b.yaml configs/sft.yaml \
        data.sources=[/data/my_videos] train.save=runs/my_sft [key=value ...]
    python tools/train_video.py --base configs/cogvideox_2b.yaml configs/tiny.yaml configs/tiny_train.yaml ...

Split each sample's video tokens over S processes (long clips; W = D x S) with ``parallel.sequence_parallel_size=S``.
Continue a run exactly where it stopped with ``train.resume=latest``. Exit status: 0 done, 1 the run
stopped (non-finite steps; a checkpoint was saved), 2 bad configuration, data, or run folder, 3 the watchdog
ended a run that made no progress (stacks in ``<save>/hang-rank<r>.txt``).
"""

import argparse

from sat_video.config.cli import add_config_arguments, config_from_arguments, run_tool
from sat_video.training.distributed import exit_process
from sat_video.training.trainer import train


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    cfg = config_from_arguments(parser.parse_args(argv))
    state = train(cfg)
    print(f"train_video: finished {state.iteration} iterations; checkpoints in {cfg.train.save}")
    return 0


def main(argv=None) -> int:
    return run_tool("train_video", run, argv)


if __name__ == "__main__":
    exit_process(main())
