#!/usr/bin/env python3
"""Sample videos from a checkpoint.

    python tools/sample_video.py --base configs/cogvideox_5b.yaml --ckpt runs/my_sft --prompt "a red car" --out samples
    python tools/sample_video.py --base configs/cogvideox_5b_i2v.yaml --ckpt ... --prompts prompts.txt --image first.png --out samples

Writes ``<out>/<i>_<prompt>.mp4`` (one per prompt) and ``<out>/contact_sheet.png``. The sampler, guidance and
seed come from the config's ``sample`` section; the flags below override them. The VAE and T5 are the config's
``model.first_stage`` / ``model.text_encoder``.
"""

import argparse
import sys
from pathlib import Path

import torch

import sat_video
from sat_video.build import build_first_stage
from sat_video.cli import add_config_arguments, config_from_arguments
from sat_video.data import ClipSpec, UnusableSample, load_image
from sat_video.sampling import VideoGenerator, write_samples
from sat_video.text_encoder import T5TextEncoder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--ckpt", required=True, help="SAT run folder, iteration folder, .pt or .safetensors")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    prompts.add_argument("--prompts", help="a text file, one prompt per line")
    parser.add_argument("--image", help="first frame for image-to-video models")
    parser.add_argument("--out", required=True, help="output folder (existing files are never replaced)")
    parser.add_argument("--scheduler", choices=["dpm", "ddim"], help="default: sample.scheduler")
    parser.add_argument("--steps", type=int, help="default: sample.steps")
    parser.add_argument("--guidance-scale", type=float, help="default: sample.guidance_scale")
    parser.add_argument("--seed", type=int, help="default: sample.seed")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_arguments(args)
        for key in ("scheduler", "steps", "guidance_scale", "seed"):
            if getattr(args, key) is not None:
                cfg.sample[key] = getattr(args, key)
        texts = args.prompt or [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        if not texts:
            raise ValueError(f"{args.prompts}: no prompt in the file")
        dtype = DTYPES[args.dtype]
        dims = sat_video.config.dit_config(cfg)
        with torch.device("meta"):
            dit = sat_video.build_dit(cfg)
        sat_video.load_checkpoint(dit, args.ckpt)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dit = dit.to(device, dtype).eval()
        text_encoder = T5TextEncoder.from_config(cfg.model.text_encoder, dims.text_length, dims.text_hidden_size).to(device, dtype)
        first_stage = build_first_stage(cfg).to(device, dtype)
        spec = ClipSpec.from_config(cfg)  # videos of the training clips' size and length
        height, width = spec.height, spec.width
        image = load_image(args.image, height, width) if args.image else None
        generator = VideoGenerator(dit, text_encoder, first_stage, snr_shift_scale=cfg.model.diffusion.snr_shift_scale,
                                   num_train_timesteps=cfg.model.diffusion.num_train_timesteps, ofs=cfg.model.diffusion.ofs)
        videos = generator.generate(texts, cfg.sample, num_frames=dims.num_frames, height=height, width=width, image=image,
                                    progress=True)
        written = write_samples(args.out, videos, cfg.sample.fps or cfg.data.fps)
    except (sat_video.ConfigError, sat_video.CheckpointError, UnusableSample, FileExistsError, FileNotFoundError,
            ValueError) as err:
        print(f"sample_video: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(["sample_video: wrote", *(f"  {path}" for path in written)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
