#!/usr/bin/env python3
"""Train or fine-tune CogVideoX's 3D causal VAE: pixel L1/L2 + LPIPS + KL + a 3D discriminator (docs/vae.md).

    torchrun --nproc_per_node 8 tools/train_vae.py --base configs/vae/cogvideox_vae.yaml configs/vae/decoder_17x256.yaml \
        model.first_stage.path=CogVideoX-2b/vae data.sources=[/data/clips] vae.eval_sources=[/data/heldout] \
        vae.lpips.vgg16=vgg16-397923af.pth vae.lpips.heads=lpips_vgg.pth train.save=runs/my_vae
    python tools/train_vae.py --base configs/vae/cogvideox_vae.yaml configs/vae/tiny.yaml ...

Every checkpoint ``<save>/<iteration>/`` holds ``vae/``, a diffusers folder that ``AutoencoderKLCogVideoX.from_pretrained``
and ``model.first_stage.path`` read as they are. ``--export-sat <save>/<iteration> OUT.pt`` writes one in SAT's
``3d-vae.pt`` layout instead of training. Exit status as tools/train_video.py: 0 done, 1 stopped (non-finite steps),
2 bad configuration, data or run folder, 3 the watchdog ended a run that made no progress.
"""

import argparse
from pathlib import Path

from sat_video.common.errors import UsageError
from sat_video.config.cli import add_config_arguments, config_from_arguments, run_tool
from sat_video.training.distributed import exit_process


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, required=False)
    parser.add_argument("--export-sat", nargs=2, metavar=("CHECKPOINT", "OUT"),
                        help="write a checkpoint of this tool in SAT's 3d-vae.pt layout (with loss.* for a warm start)")
    parser.add_argument("--overwrite", action="store_true", help="with --export-sat: replace OUT")
    args = parser.parse_args(argv)
    if args.export_sat:
        if args.base or args.overrides:
            raise UsageError("--export-sat takes no config: it reads the checkpoint and its run's config.yaml")
        from sat_video.vae_training.export import export_sat

        out = export_sat(Path(args.export_sat[0]), Path(args.export_sat[1]), args.overwrite)
        print(f"train_vae: wrote {out}")
        return 0
    if not args.base:
        raise UsageError("--base is required (e.g. --base configs/vae/cogvideox_vae.yaml)")
    cfg = config_from_arguments(args)
    from sat_video.vae_training.trainer import train_vae

    state = train_vae(cfg)
    print(f"train_vae: finished {state.iteration} iterations; checkpoints (each with vae/) in {cfg.train.save}")
    return 0


def main(argv=None) -> int:
    return run_tool("train_vae", run, argv)


if __name__ == "__main__":
    exit_process(main())
