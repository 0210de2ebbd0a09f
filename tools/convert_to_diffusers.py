#!/usr/bin/env python3
"""Export a sat_video / SAT CogVideoX checkpoint to diffusers.

    python tools/convert_to_diffusers.py --base configs/cogvideox_5b.yaml --ckpt ckpts/transformer \
        --out exported/cogvideox-5b [key=value ...]

Writes ``<out>/transformer`` (``CogVideoXTransformer3DModel.from_pretrained`` loads it) and
``<out>/scheduler`` (the matching ``CogVideoXDDIMScheduler``). SAT LoRA weights in the checkpoint are
merged. Refuses, listing the keys, when the config and the checkpoint disagree.
"""

import argparse
import sys

import torch

import sat_video
from sat_video.cli import add_config_arguments, config_from_arguments
from sat_video.diffusers_export import ConversionError, write_diffusers_folder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--ckpt", required=True, help="SAT run folder, iteration folder, .pt or .safetensors")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep the checkpoint's)")
    parser.add_argument("--lora-alpha", type=float, default=1.0, help="SAT LoRA alpha; merge scale is alpha / rank")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_arguments(args)
        with torch.device("meta"):
            model = sat_video.build_dit(cfg)
        sat_video.load_checkpoint(model, args.ckpt, lora_alpha=args.lora_alpha)
        state = model.state_dict()
        if args.dtype:
            state = {k: v.to(DTYPES[args.dtype]) for k, v in state.items()}
        write_diffusers_folder(
            state, sat_video.config.dit_config(cfg), args.out,
            snr_shift_scale=cfg.model.diffusion.snr_shift_scale,
            num_train_timesteps=cfg.model.diffusion.num_train_timesteps,
        )
    except (sat_video.ConfigError, sat_video.CheckpointError, ConversionError, FileExistsError) as err:
        print(f"convert_to_diffusers: error: {err}", file=sys.stderr)
        return 2
    params = sum(v.numel() for v in state.values())
    print(f"wrote {args.out}/transformer ({params:,} parameters) and {args.out}/scheduler")
    return 0


if __name__ == "__main__":
    sys.exit(main())
