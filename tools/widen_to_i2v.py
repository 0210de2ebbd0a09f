#!/usr/bin/env python3
"""Widen a text-to-video checkpoint into an image-to-video starting point.

    python tools/widen_to_i2v.py --base configs/cogvideox_5b.yaml --ckpt ckpts/5b --out ckpts/5b-i2v-init \
        [--in-channels 32] [key=value ...]

The target model is the base config with ``model.dit.in_channels`` set to ``--in-channels`` plus the
overrides (e.g. ``model.dit.mixins.pos_embed.learned_table=true`` for the 5B-I2V layout). The patch
embedding gets zero weights for the new channels; parameters the T2V checkpoint lacks entirely keep the
target's own initialisation (the learned table starts at zero) and are listed. Writes a SAT checkpoint
and ``<out>/config.yaml``.
"""

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

import sat_video
from sat_video.common.errors import OutputExistsError
from sat_video.config.cli import add_config_arguments, run_tool, split_config_arguments
from sat_video.formats.i2v import widen_patch_embedding
from sat_video.formats.sat_checkpoint import check_state_dict
from sat_video.model.build import build_mixin
from sat_video.model.config import DiTConfig


def _fresh_mixin_weights(cfg, keys: list[str]) -> dict[str, torch.Tensor]:
    """Initial values for ``keys`` that the T2V checkpoint lacks, from freshly built copies of their mixins."""
    dit_config = DiTConfig.from_config(cfg)
    owners = {key.split(".")[1] for key in keys if key.startswith("mixins.")}
    if any(not key.startswith("mixins.") for key in keys):
        raise sat_video.CheckpointError(f"the T2V checkpoint lacks non-mixin weights of the target model: {keys}")
    weights = {}
    for name in owners:
        mixin_state = build_mixin(dit_config, dit_config.mixins[name]).state_dict()
        weights.update({f"mixins.{name}.{k}": v for k, v in mixin_state.items() if f"mixins.{name}.{k}" in keys})
    return weights


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--ckpt", required=True, help="the T2V checkpoint")
    parser.add_argument("--out", required=True, help="output checkpoint folder (must not exist)")
    parser.add_argument("--in-channels", type=int, default=32, help="input channels of the I2V model (default 32)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise OutputExistsError(f"{out} already exists; choose a new --out (nothing was written)")
    paths, overrides = split_config_arguments(args)  # the overrides shape the I2V model only
    source_cfg = sat_video.load_config(paths)
    with torch.device("meta"):
        source = sat_video.build_dit(source_cfg)
    sat_video.load_checkpoint(source, args.ckpt)  # validates the T2V checkpoint against its config
    target_cfg = sat_video.load_config(paths, [f"model.dit.in_channels={args.in_channels}", *overrides])
    with torch.device("meta"):  # no second full-size copy in memory
        target = sat_video.build_dit(target_cfg)
    patch_embed = next(n for n, e in DiTConfig.from_config(source_cfg).mixins.items() if e["type"] == "image_patch_embed")
    state = widen_patch_embedding(source.state_dict(), DiTConfig.from_config(source_cfg), args.in_channels, patch_embed)
    fresh = [k for k in target.state_dict() if k not in state]
    state.update(_fresh_mixin_weights(target_cfg, fresh))
    target.load_state_dict(check_state_dict(target, state, args.ckpt), assign=True)
    file = sat_video.save_checkpoint(target, out, 0)
    OmegaConf.save(target_cfg, out / "config.yaml")
    print(f"wrote {file} and {out / 'config.yaml'}")
    for key in fresh:
        print(f"  initialised fresh (not in the T2V checkpoint): {key}")
    return 0


def main(argv=None) -> int:
    return run_tool("widen_to_i2v", run, argv)


if __name__ == "__main__":
    sys.exit(main())
