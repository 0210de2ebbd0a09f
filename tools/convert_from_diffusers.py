#!/usr/bin/env python3
"""Turn a diffusers CogVideoX transformer into a sat_video checkpoint (SAT layout) plus its config.

    python tools/convert_from_diffusers.py --diffusers exported/cogvideox-5b --out ckpts/from-hf \
        [--base configs/cogvideox_5b.yaml ...] [key=value ...]

Writes ``<out>/latest``, ``<out>/<iteration>/mp_rank_00_model_states.pt`` and ``<out>/config.yaml``.
The config is derived from the diffusers ``config.json``; with ``--base`` the given configs are used
instead and must describe the same model (the differing keys are listed otherwise).
"""

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

import sat_video
from sat_video.cli import add_config_arguments, split_config_arguments
from sat_video.config import dit_config
from sat_video.diffusers_export import (
    ConversionError,
    from_diffusers_config,
    from_diffusers_state_dict,
    read_diffusers_transformer,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusers", required=True, help="diffusers transformer folder (or pipeline folder)")
    parser.add_argument("--out", required=True, help="output checkpoint folder (must not exist)")
    add_config_arguments(parser, required=False)
    parser.add_argument("--iteration", type=int, default=1, help="iteration number to save under")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists():
            raise FileExistsError(f"{out} already exists; choose a new --out (nothing was written)")
        hf_config, hf_state = read_diffusers_transformer(args.diffusers)
        paths, overrides = split_config_arguments(args)
        derived = sat_video.load_config([{"model": {"dit": from_diffusers_config(hf_config)}}], overrides)
        cfg = derived
        if paths:
            cfg = sat_video.load_config(paths, overrides)
            mine, theirs = OmegaConf.to_container(cfg.model.dit), OmegaConf.to_container(derived.model.dit)
            differ = {k: (mine.get(k), theirs.get(k)) for k in set(mine) | set(theirs)
                      if k != "mixin_modules" and mine.get(k) != theirs.get(k)}
            if differ:
                raise ConversionError(f"--base configs and {args.diffusers} describe different models (base vs diffusers): {differ}")
        dims = dit_config(cfg)
        with torch.device("meta"):
            model = sat_video.build_dit(cfg)
        state = sat_video.checkpoint.check_state_dict(model, from_diffusers_state_dict(hf_state, dims), args.diffusers)
        model.load_state_dict(state, assign=True)
        file = sat_video.save_checkpoint(model, out, args.iteration)
        OmegaConf.save(cfg, out / "config.yaml")
    except (sat_video.ConfigError, sat_video.CheckpointError, ConversionError, FileExistsError) as err:
        print(f"convert_from_diffusers: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {file} and {out / 'config.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
