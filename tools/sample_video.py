#!/usr/bin/env python3
"""Sample videos from a checkpoint.

    python tools/sample_video.py --base configs/cogvideox_5b.yaml --ckpt runs/my_sft --prompt "a red car" --out samples
    python tools/sample_video.py --base configs/cogvideox_5b_i2v.yaml --ckpt ... --prompts prompts.txt \
        --image first.png --out samples

Long videos across S processes (each denoising step split by sequence parallelism; the same video as one process):

    torchrun --nproc_per_node 2 tools/sample_video.py --base ... parallel.sequence_parallel_size=2 --ckpt ... --out ...

On a small GPU: keep only the running model on it (``--offload model``) or one block at a time (``--offload
sequential``), and decode in tiles (``--vae-tiling``). Predict the peak first, without sampling (seconds to a minute):

    python tools/sample_video.py --base configs/cogvideox_5b.yaml --estimate-memory --dtype bf16 --gpu-memory 24

Writes ``<out>/<i>_<prompt>.mp4`` (one per prompt) and ``<out>/contact_sheet.png``, and prints the peak memory of
each stage. The sampler, guidance, seed, offload and tiling come from the config's ``sample`` section; the flags below
override them. The VAE and T5 are the config's ``model.first_stage`` / ``model.text_encoder``. ``--weights ema``
samples with the moving average of the trained weights that a run with ``train.ema`` saved beside them.
"""

import argparse
import os
from pathlib import Path

import torch

import sat_video
from sat_video.common.errors import UsageError
from sat_video.config.cli import add_config_arguments, config_from_arguments, run_tool
from sat_video.data.clips import ClipSpec, load_image
from sat_video.diffusion.config import SCHEDULER_NAMES
from sat_video.diffusion.offload import OFFLOAD_MODES
from sat_video.diffusion.sampling import VideoGenerator, write_samples
from sat_video.formats.sat_checkpoint import WEIGHTS
from sat_video.model.build import build_frozen_stages
from sat_video.model.config import DiTConfig
from sat_video.model.storage_dtype import store_frozen_weights
from sat_video.training.distributed import exit_process, init_distributed, shutdown
from sat_video.training.sequence_parallel import SequenceParallelGroups

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def read_prompts(path: str) -> list[str]:
    """The non-empty lines of a prompts file."""
    try:
        prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--prompts {path}: cannot be read as UTF-8 text ({err})") from None
    if not prompts:
        raise UsageError(f"{path}: no prompt in the file")
    return prompts


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--ckpt", help="SAT run folder, iteration folder, .pt or .safetensors")
    parser.add_argument("--weights", choices=WEIGHTS, default="live",
                        help="ema: the moving average of the trained weights a run with train.ema saved (default: live)")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    prompts.add_argument("--prompts", help="a text file, one prompt per line")
    parser.add_argument("--image", help="first frame for image-to-video models")
    parser.add_argument("--out", help="output folder (existing files are never replaced)")
    parser.add_argument("--scheduler", choices=SCHEDULER_NAMES, help="default: sample.scheduler")
    parser.add_argument("--steps", type=int, help="default: sample.steps")
    parser.add_argument("--guidance-scale", type=float, help="default: sample.guidance_scale")
    parser.add_argument("--seed", type=int, help="default: sample.seed")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--offload", choices=OFFLOAD_MODES, help="default: sample.offload")
    parser.add_argument("--vae-tiling", action="store_true", default=None, help="decode in tiles (sample.vae_tiling)")
    parser.add_argument("--estimate-memory", action="store_true",
                        help="print the predicted peak memory per stage for this config, size, dtype, offload and "
                             "tiling (and a table of every mode), then exit without sampling")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB",
                        help="with --estimate-memory: name the fastest offload and tiling predicted to fit a GPU of "
                             "this many GiB")
    args = parser.parse_args(argv)
    if not args.estimate_memory and not (args.ckpt and args.out and (args.prompt or args.prompts)):
        parser.error("sampling needs --ckpt, --out and --prompt or --prompts (or ask only for --estimate-memory)")
    overrides = [
        f"sample.{key}={getattr(args, key)}"
        for key in ("scheduler", "steps", "guidance_scale", "seed", "offload", "vae_tiling")
        if getattr(args, key) is not None
    ]  # checked like any config value
    args.overrides = [*args.overrides, *overrides]
    cfg = config_from_arguments(args)
    dtype = DTYPES[args.dtype]
    dit = DiTConfig.from_config(cfg)
    spec = ClipSpec.from_config(cfg.data, cfg.model.dit)  # videos of the training clips' size and length
    if args.estimate_memory:
        print_memory_estimate(cfg, dit.num_frames, spec.height, spec.width, dtype, args.gpu_memory)
        return 0
    texts = args.prompt or read_prompts(args.prompts)
    split = sample(cfg, args.ckpt, texts, args.image, args.out, dtype, spec, dit.num_frames, args.weights)
    if split:  # after sample() has returned: its model holds the process groups, which must go first
        shutdown()
    return 0


def sample(cfg, ckpt: str, texts: list[str], image_path: str | None, out: str, dtype: torch.dtype, spec: ClipSpec,
           num_frames: int, weights: str = "live") -> bool:
    """Write the videos of ``texts``; ``True`` when they were split over this job's processes."""
    with torch.device("meta"):
        model = sat_video.build_dit(cfg)
    sat_video.load_checkpoint(model, ckpt, weights=weights)
    env = join_sequence_group(model, cfg.parallel.sequence_parallel_size)
    device = env.device if env else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(dtype).eval()  # the video generator places the weights as sample.offload says
    store_frozen_weights(model.requires_grad_(False), cfg.model.dit.storage_dtype)  # fp8 weights, upcast per layer
    stages = build_frozen_stages(cfg.model).to(dtype)
    image = load_image(image_path, spec.height, spec.width) if image_path else None
    video_generator = VideoGenerator(
        model,
        stages,
        snr_shift_scale=cfg.model.diffusion.snr_shift_scale,
        num_train_timesteps=cfg.model.diffusion.num_train_timesteps,
        ofs=cfg.model.diffusion.ofs,
        device=device,
        offload=cfg.sample.offload,
    )
    videos = video_generator.generate(
        texts, cfg.sample, num_frames=num_frames, height=spec.height, width=spec.width, image=image, progress=True
    )
    if env is None or env.is_main:  # every rank holds the same videos
        written = write_samples(out, videos, cfg.sample.fps or cfg.data.fps)
        print("\n".join(["sample_video: wrote", *(f"  {path}" for path in written)]))
        print(f"offload {cfg.sample.offload}, VAE tiling {'on' if cfg.sample.vae_tiling else 'off'}; "
              + video_generator.memory.describe())
    return env is not None


def print_memory_estimate(cfg, num_frames: int, height: int, width: int, dtype: torch.dtype,
                          gpu_memory_gib: float | None = None) -> None:
    """The predicted peak of every stage at the config's offload and tiling, then the peak of every mode, then (given a
    GPU's memory) the fastest mode that fits it."""
    from sat_video.diffusion.memory_estimate import USABLE_SHARE, SamplingMemoryModel

    estimate = SamplingMemoryModel(cfg, num_frames=num_frames, height=height, width=width, dtype=dtype)
    print(estimate.describe(cfg.sample.offload, cfg.sample.vae_tiling))
    print("peak by mode (GiB):\n  offload      tiling off  tiling on")
    peaks = dict(((offload, tiled), gib) for offload, tiled, gib in estimate.table())
    for offload in OFFLOAD_MODES:
        print(f"  {offload:<12} {peaks[offload, False]:10.2f} {peaks[offload, True]:10.2f}")
    if gpu_memory_gib is None:
        return
    fits = estimate.fastest_fitting(gpu_memory_gib)
    budget = f"{USABLE_SHARE:.0%} of {gpu_memory_gib:g} GiB (the rest for CUDA's own use)"
    if fits is None:
        print(f"no mode is predicted to fit in {budget}: the smallest peak is {min(peaks.values()):.2f} GiB; "
              "sample fewer frames or a smaller size")
    else:
        offload, tiled, gib = fits
        print(f"fastest mode predicted to fit in {budget}: --offload {offload}{' --vae-tiling' if tiled else ''} "
              f"({gib:.2f} GiB)")


def join_sequence_group(model, sequence_parallel_size: int):
    """Under torchrun, make ``model`` run split over the job's processes and return this process's place (``None``:
    one process, nothing to join)."""
    processes = int(os.environ.get("WORLD_SIZE", 1))
    if processes == 1 and sequence_parallel_size == 1:
        return None
    if processes != sequence_parallel_size:
        raise UsageError(
            f"sample_video splits each denoising step over its processes: start it with torchrun --nproc_per_node "
            f"{sequence_parallel_size} for parallel.sequence_parallel_size={sequence_parallel_size} (found {processes} "
            "process(es))"
        )
    env = init_distributed()
    SequenceParallelGroups.initialize_sequence_parallel(sequence_parallel_size).add_to(model)
    return env


def main(argv=None) -> int:
    return run_tool("sample_video", run, argv)


if __name__ == "__main__":
    exit_process(main())
