#!/usr/bin/env python3
"""Benchmark sat_video against diffusers on this machine and write benchmarks/RESULTS.md.

    python tools/bench.py                       # default sizes, fp32 and bf16
    python tools/bench.py --sizes tiny --out /tmp/bench.md    # seconds; what the CI test runs
    python tools/bench.py --compile --dtypes fp32   # also torch.compile'd blocks; 10 minutes on a 2-core AVX2 CPU

Sections (one module each in ``sat_video/benchmarks/``, in the order of ``report.SECTIONS``; DiT figures are medians
over interleaved repetitions after warm-up):

* GEMM peak: square matmuls per dtype, the yardstick for achieved FLOP/s.
* DiT forward + backward: sat_video and diffusers' ``CogVideoXTransformer3DModel`` with identical weights
  (exported by ``sat_video.formats.diffusers_format``), alternating in one process, fp32 and bf16 autocast.
* Where the time goes: one profiled step per implementation.
* Activation checkpointing on vs off (sat_video): step time and activation memory.
* The full training step through ``tools/train_video.py`` (trainer, DeepSpeed, engine) from raw video and from
  the latent cache of ``tools/precompute_latents.py``.
* Mixed sizes: training steps on clips of three aspect ratios, at one size vs with a bucket per aspect ratio.
* Data loading: clips/s through ``VideoDataset`` (decord) and the DataLoader with 0..N workers.
* Sequence parallelism: the DiT step in one process vs split over two (torchrun, DeepSpeed-Ulysses), per-rank
  activation memory and the share of the step spent in collectives.
* Sampling memory: VAE decode exact vs tiled (time, peak, PSNR, the estimate), and the predicted full-size peak of
  each model per offload and tiling mode.
* Fine-tuning (``trainers``): ``tools/train_video.py`` against diffusers' ``examples/cogvideo/train_cogvideox_lora.py``
  (LoRA, same tiny model, VAE, T5 and clips), first-epoch and later-epoch step time, start-up, peak RSS, where a step's
  time goes.
* fp8-stored frozen weights (``fp8_storage``): a LoRA step with ``model.dit.storage_dtype`` vs the compute dtype: time,
  weight bytes, output error; the published models' weight bytes.
* Block offload while training (``block_streaming``): a LoRA step with ``train.offload_blocks`` K = 0, half, all: time
  and the weights left on the device, against ``offloaded_bytes``' prediction.
* Training memory (``training_memory``): the planner (``--estimate-memory``) against the measured peak of real tiny
  runs, LoRA and SFT, ZeRO-2 and ZeRO-3, three clip sizes (12 runs of ``tools/train_video.py``, about 2 minutes).
* Moving average of the weights (``ema``): a full fine-tuning step with and without ``train.ema``, and the share of
  the average rank 0 holds in a ZeRO-2 run of ``tools/train_video.py`` on two processes.
* Data at scale (``shards``): start-up of ``tools/train_video.py`` on 1k to 100k samples from shards and from folder
  sources, ``tools/make_shards.py``'s speed, decoding per core at 480x720 and 768x1360, the projection to 10M samples on
  64 ranks (several minutes: the folder sources at 10k samples read 10k headers).
* VAE training (``vae``): a training step of ``tools/train_vae.py``'s VAE at CogVideoX's architecture (random weights)
  on small clips, decoder and all, gradient checkpointing off and on: step time, peak memory, and the peak predicted at
  the recipe's 17x256x256 crops and at whole 49x480x720 clips (about 9 minutes on an idle 2-core CPU).

The sections named in parentheses also regenerate alone: ``--only NAME [NAME ...]`` runs just those and replaces them
inside an existing ``--out`` (a section it lacks goes where the report's order puts it), leaving the rest as it was;
each shows the command that regenerates it:

    python tools/bench.py --only trainers --trainer-steps 24 --trainer-rounds 2
    python tools/bench.py --only fp8_storage block_streaming training_memory ema --dtypes fp32
    python tools/bench.py --only vae
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from sat_video.benchmarks import fine_tuning, training_memory, vae_training
from sat_video.benchmarks.context import Bench, Commands, measure, standalone
from sat_video.benchmarks.presets import DTYPES, PRESETS, Preset
from sat_video.benchmarks.report import SECTIONS, assemble, update
from sat_video.benchmarks.trainer_comparison import DIFFUSERS_SCRIPT_ENV, ComparisonSetup, diffusers_script
from sat_video.config.cli import run_tool

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "RESULTS.md"
STANDALONE = {name: section for section in SECTIONS if (name := standalone(section))}
"""``--only`` name -> section."""
COMMANDS = Commands(
    train=(sys.executable, str(ROOT / "tools" / "train_video.py")),
    precompute=(sys.executable, str(ROOT / "tools" / "precompute_latents.py")),
    diffusers=(sys.executable, str(ROOT / "benchmarks" / "diffusers_lora" / "run_timed.py")),
)
"""The programs the sections time in fresh processes; they live in this checkout, above the library."""


def main(argv=None) -> int:
    return run_tool("bench", run, argv)


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", choices=sorted(PRESETS), default="default", help="tiny: seconds, for CI")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the markdown goes")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all logical cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time sat_video with every block torch.compile'd")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                        help="precisions of the DiT sections (a CPU without bf16 instructions emulates bf16 matmuls "
                             "at a fraction of a GFLOP/s: measure fp32 only there)")
    parser.add_argument("--only", nargs="+", choices=list(STANDALONE), metavar="NAME",
                        help=f"run only these sections ({', '.join(STANDALONE)}) and replace them inside --out (which "
                             "keeps everything else)")
    parser.add_argument("--trainer-steps", type=int, help="optimizer steps per fine-tuning run (default: the preset's)")
    parser.add_argument("--trainer-rounds", type=int, help="runs of each fine-tuning row (default: the preset's)")
    parser.add_argument("--diffusers-script", type=Path,
                        help=f"diffusers' train_cogvideox_lora.py for the fine-tuning section (default: ${DIFFUSERS_SCRIPT_ENV})")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "tools/bench.py", *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.sizes]
    sections = tuple(s for s in SECTIONS if standalone(s) in args.only) if args.only else SECTIONS
    trainers = _trainer_setup(args, preset) if fine_tuning in sections and (args.only or preset.trainers) else None
    if trainers is not None:
        diffusers_script(args.diffusers_script)  # the section comes late: a missing script fails now, not in an hour
    alone_commands = {name: shlex.join(["python", "tools/bench.py", "--only", name, *_alone_arguments(args, name)])
                      for name in STANDALONE}
    with tempfile.TemporaryDirectory(prefix="sat_video_bench_") as workdir:
        bench = Bench(preset=preset, device=torch.device(args.device), dtypes={label: DTYPES[label] for label in args.dtypes},
                      threads=args.threads, configs=ROOT / "configs", workdir=Path(workdir), commands=COMMANDS,
                      compile_blocks=args.compile, trainers=trainers, diffusers_script=args.diffusers_script,
                      alone_commands=alone_commands)
        measure(sections, bench)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.only:
        old = args.out.read_text() if args.out.exists() else ""
        args.out.write_text(update(old, bench.results))
        print(f"wrote the sections {', '.join(args.only)} of {args.out}")
    else:
        args.out.write_text(assemble(sections, bench.results, command) + "\n")
        print(f"wrote {args.out}")
    return 0


def _trainer_setup(args, preset: Preset) -> ComparisonSetup:
    """The preset's fine-tuning comparison (a small one where the preset has none) with this run's threads, steps
    and rounds."""
    setup = preset.trainers or ComparisonSetup(clips=4, steps=4, rounds=1)
    return replace(setup, threads=args.threads, steps=args.trainer_steps or setup.steps,
                   rounds=args.trainer_rounds or setup.rounds)


def _alone_arguments(args, name: str) -> list[str]:
    """The arguments of this run, other than their defaults, that the section ``name`` depends on."""
    given = {"--sizes": args.sizes, "--threads": args.threads}
    if name == fine_tuning.STANDALONE:
        given |= {"--trainer-steps": args.trainer_steps, "--trainer-rounds": args.trainer_rounds,
                  "--diffusers-script": args.diffusers_script}
    elif name == vae_training.STANDALONE:  # its device; always fp32
        given |= {"--device": args.device}
    elif name != training_memory.STANDALONE:  # the DiT sections' device and precisions (training runs on the CPU, fp32)
        given |= {"--device": args.device, "--dtypes": args.dtypes}
    given["--out"] = args.out
    defaults = {"--sizes": "default", "--threads": os.cpu_count(), "--out": DEFAULT_OUT,
                "--device": "cuda" if torch.cuda.is_available() else "cpu", "--dtypes": list(DTYPES)}
    parts = []
    for flag, value in given.items():
        if value not in (None, defaults.get(flag)):
            parts += [flag, *map(str, value if isinstance(value, list) else [value])]
    return parts


if __name__ == "__main__":
    sys.exit(main())
