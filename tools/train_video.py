#!/usr/bin/env python3
"""Train a video DiT with DeepSpeed, on one CPU process or many GPUs.

    torchrun --nproc_per_node 8 tools/train_video.py --base configs/cogvideox_5b.yaml configs/sft.yaml \
        data.sources=[/data/my_videos] train.save=runs/my_sft [key=value ...]
    python tools/train_video.py --base configs/cogvideox_2b.yaml configs/tiny.yaml configs/tiny_train.yaml ...

Split each sample's video tokens over S processes (long clips; W = D x S) with ``parallel.sequence_parallel_size=S``.
Continue a run exactly where it stopped with ``train.resume=latest``. Predict the peak memory per GPU first, without
training, and the fastest settings that fit a GPU (docs/memory.md):

    python tools/train_video.py --base configs/cogvideox_5b.yaml configs/sft.yaml configs/lora.yaml --estimate-memory \
        --gpus 8 --gpu-memory 24

Exit status: 0 done, 1 the run stopped (non-finite steps; a checkpoint was saved), 2 bad configuration, data, or
run folder, 3 the watchdog ended a run that made no progress (stacks in ``<save>/hang-rank<r>.txt``).
"""

import argparse

from sat_video.common.errors import UsageError
from sat_video.config.cli import add_config_arguments, config_from_arguments, run_tool
from sat_video.training.distributed import exit_process
from sat_video.training.trainer import train


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--estimate-memory", action="store_true",
                        help="print the predicted peak memory per GPU and its parts, then exit without training")
    parser.add_argument("--gpus", type=int, help="with --estimate-memory: processes of the job (default 1)")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB",
                        help="with --estimate-memory: name the fastest settings predicted to fit a GPU of this many GiB")
    args = parser.parse_args(argv)
    if not args.estimate_memory and (args.gpus is not None or args.gpu_memory is not None):
        raise UsageError("--gpus and --gpu-memory go with --estimate-memory (a run takes its size from torchrun)")
    cfg = config_from_arguments(args)
    if args.estimate_memory:
        from sat_video.training.memory_plan import report

        print(report(cfg, args.gpus or 1, args.gpu_memory))
        return 0
    state = train(cfg)
    print(f"train_video: finished {state.iteration} iterations; checkpoints in {cfg.train.save}")
    return 0


def main(argv=None) -> int:
    return run_tool("train_video", run, argv)


if __name__ == "__main__":
    exit_process(main())
