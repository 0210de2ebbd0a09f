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
from sat_video.common.errors import ConversionError, OutputExistsError
from sat_video.config.cli import add_config_arguments, run_tool, split_config_arguments
from sat_video.formats.diffusers_format import from_diffusers_config, from_diffusers_state_dict, read_diffusers_transformer
from sat_video.formats.sat_checkpoint import check_state_dict
from sat_video.model.config import DiTConfig


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusers", required=True, help="diffusers transformer folder (or pipeline folder)")
    parser.add_argument("--out", required=True, help="output checkpoint folder (must not exist)")
    add_config_arguments(parser, required=False)
    parser.add_argument("--iteration", type=int, default=1, help="iteration number to save under")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise OutputExistsError(f"{out} already exists; choose a new --out (nothing was written)")
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
    dit_config = DiTConfig.from_config(cfg)
    with torch.device("meta"):
        model = sat_video.build_dit(cfg)
    state = check_state_dict(model, from_diffusers_state_dict(hf_state, dit_config), args.diffusers)
    model.load_state_dict(state, assign=True)
    file = sat_video.save_checkpoint(model, out, args.iteration)
    OmegaConf.save(cfg, out / "config.yaml")
    print(f"wrote {file} and {out / 'config.yaml'}")
    return 0


def main(argv=None) -> int:
    return run_tool("convert_from_diffusers", run, argv)


if __name__ == "__main__":
    sys.exit(main())
