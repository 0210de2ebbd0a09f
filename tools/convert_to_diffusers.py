#!/usr/bin/env python3
"""Export a sat_video / SAT CogVideoX checkpoint to diffusers.

    python tools/convert_to_diffusers.py --base configs/cogvideox_5b.yaml --ckpt ckpts/transformer \
        --out exported/cogvideox-5b [--lora-adapter] [key=value ...]

Writes ``<out>/transformer`` (``CogVideoXTransformer3DModel.from_pretrained`` loads it) and
``<out>/scheduler`` (the matching ``CogVideoXDDIMScheduler``). LoRA weights (a LoRA run of ours, with
``configs/lora.yaml`` in ``--base``, or SAT LoRA weights in the checkpoint) are merged into the transformer;
with ``--lora-adapter`` the transformer is the base and the adapter goes to
``<out>/pytorch_lora_weights.safetensors`` in diffusers' LoRA format (``pipe.load_lora_weights(out)``). Refuses,
listing the keys, when the config and the checkpoint disagree. ``--weights ema`` exports the moving average of the
trained weights that a run with ``train.ema`` saved beside them (merged, or as the adapter with ``--lora-adapter``).
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

import sat_video
from sat_video.common.errors import ConversionError, OutputExistsError
from sat_video.config.cli import add_config_arguments, run_tool, split_config_arguments
from sat_video.formats.diffusers_format import LORA_WEIGHTS, write_diffusers_folder
from sat_video.formats.sat_checkpoint import WEIGHTS, dit_state_dict, load_dit_state, lora_mixins, read_state_dict
from sat_video.formats.sat_lora import has_sat_lora, lora_to_diffusers, merge_lora, sat_lora_config
from sat_video.model.config import DiTConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_with_lora(paths, overrides, state, args):
    """The model of the config; with ``--lora-adapter`` and SAT LoRA weights but no LoRA mixin in the config, one
    is added with the checkpoint's rank and targets (SAT stores no alpha: ``--lora-alpha``, default 1)."""
    cfg = sat_video.load_config(paths, overrides)
    with torch.device("meta"):
        model = sat_video.build_dit(cfg)
    if not args.lora_adapter or lora_mixins(model):
        return cfg, model
    if not has_sat_lora(state):
        raise ConversionError(f"--lora-adapter: {args.ckpt} holds no SAT LoRA weights and the config no lora mixin "
                              "(stack configs/lora.yaml as for the training run)")
    if "lora" in cfg.model.dit.mixins:
        raise ConversionError("--lora-adapter: the config already has a mixin named 'lora' that is not a LoRA mixin")
    entry = sat_lora_config(state, 1.0 if args.lora_alpha is None else args.lora_alpha)
    cfg = sat_video.load_config([*paths, {"model": {"dit": {"mixins": {"lora": entry}}}}], overrides)
    with torch.device("meta"):
        model = sat_video.build_dit(cfg)
    return cfg, model


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--ckpt", required=True, help="SAT run folder, iteration folder, .pt or .safetensors")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep the checkpoint's)")
    parser.add_argument("--weights", choices=WEIGHTS, default="live",
                        help="ema: the moving average of the trained weights a run with train.ema saved (default: live)")
    parser.add_argument("--lora-adapter", action="store_true",
                        help=f"write the transformer without LoRA and the adapter as <out>/{LORA_WEIGHTS} instead of merging")
    parser.add_argument("--lora-alpha", type=float,
                        help="alpha of SAT LoRA weights when the config has no lora mixin (default 1, SAT's; scale alpha / rank)")
    args = parser.parse_args(argv)
    adapter = None
    if Path(args.out).exists():  # before reading a checkpoint of many GB
        raise OutputExistsError(f"{args.out} already exists; choose a new --out (nothing was written)")
    paths, overrides = split_config_arguments(args)
    state = dit_state_dict(read_state_dict(args.ckpt, args.weights))
    cfg, model = build_with_lora(paths, overrides, state, args)
    load_dit_state(model, state, source=str(args.ckpt), lora_alpha=args.lora_alpha)
    state, dit_config = model.state_dict(), DiTConfig.from_config(cfg)
    lora = lora_mixins(model)
    if len(lora) > 1:
        raise ConversionError(
            f"diffusers holds one LoRA adapter per export; this model has {len(lora)} LoRA mixins: {', '.join(lora)}"
        )
    for name, mixin in lora.items():
        dit_config = dataclasses.replace(dit_config, mixins={n: e for n, e in dit_config.mixins.items() if n != name})
        if args.lora_adapter:
            adapter = lora_to_diffusers(state, name, mixin.scale)
            state = {k: v for k, v in state.items() if not k.startswith(f"mixins.{name}.")}
        else:
            state = merge_lora(state, name, mixin.scale)
    if args.dtype:
        state = {k: v.to(DTYPES[args.dtype]) for k, v in state.items()}
        if adapter is not None:
            adapter = {k: v.to(DTYPES[args.dtype]) for k, v in adapter.items()}
    write_diffusers_folder(
        state,
        dit_config,
        args.out,
        snr_shift_scale=cfg.model.diffusion.snr_shift_scale,
        num_train_timesteps=cfg.model.diffusion.num_train_timesteps,
        lora_adapter=adapter,
    )
    params = sum(v.numel() for v in state.values())
    print(f"wrote {args.out}/transformer ({params:,} parameters) and {args.out}/scheduler")
    for name, mixin in lora_mixins(model).items():
        if adapter is None:
            print(f"  LoRA mixin '{name}' (rank {mixin.config.rank}, alpha {mixin.config.alpha}) merged into the transformer")
        else:
            print(
                f"  and {args.out}/{LORA_WEIGHTS}: LoRA mixin '{name}' (rank {mixin.config.rank}, "
                f"{sum(v.numel() for v in adapter.values()):,} parameters, alpha / rank folded into lora_B)"
            )
    return 0


def main(argv=None) -> int:
    return run_tool("convert_to_diffusers", run, argv)


if __name__ == "__main__":
    sys.exit(main())
