#!/usr/bin/env python3
"""Encode a data set once (VAE latents + T5 embeddings) so that training skips video decoding, the VAE and T5.

    python tools/precompute_latents.py --base configs/cogvideox_5b.yaml configs/sft.yaml \
        data.sources=[/data/my_videos] --out /data/my_videos_latents
    torchrun --nproc_per_node 8 tools/precompute_latents.py --base ... --out ...   # ranks split the files

then train with ``data.latent_cache=/data/my_videos_latents``. The cache records the first stage, text encoder
and clip settings it was made with; training refuses a config that differs. Unusable files are skipped and
listed in the manifest. A second job on the same ``--out`` is refused while the first runs (the lock beside it,
``.<out>.lock``; ``train.lock_stale_s`` as for a run folder). Exit status: 0 done, 2 bad configuration, data or output
folder (one that exists without ``--overwrite``, or one another job is writing).
"""

import argparse
import logging
import sys
from pathlib import Path

import torch

from sat_video.common.errors import OutputExistsError
from sat_video.config.cli import add_config_arguments, config_from_arguments, run_tool
from sat_video.data.buckets import assign_buckets, parse_buckets
from sat_video.data.clips import ClipSpec, source_shape
from sat_video.data.sources import discover
from sat_video.model.config import DiTConfig
from sat_video.training.distributed import barrier, exit_process, init_distributed, shutdown
from sat_video.training.folder_lock import FolderLock, hold_folder_lock, lock_file_beside


def encode(cfg, out: Path, samples_per_shard: int, overwrite: bool) -> int:
    from tqdm import tqdm

    from sat_video.data.latent_cache import CacheWriter, ClipsToEncode, cache_settings, finish, staging_folder
    from sat_video.model.build import build_frozen_stages
    from sat_video.training.deepspeed_setup import frozen_stage_dtype

    env = init_distributed()
    try:
        # --out is renamed into place when complete, so its lock lies beside it; held across the final replace
        lock = FolderLock(lock_file_beside(out), f"--out {out}", cfg.train.lock_stale_s)
        with hold_folder_lock(lock, env.is_main):
            if out.exists() and not overwrite:
                raise OutputExistsError(f"{out} exists; choose another --out, or pass --overwrite to replace it")
            refs = discover(list(cfg.data.sources))
            spec = ClipSpec.from_config(cfg.data, cfg.model.dit)
            dit_config = DiTConfig.from_config(cfg)
            settings = cache_settings(cfg.model, cfg.data)
            dtype = frozen_stage_dtype(cfg.deepspeed.precision)
            stages = build_frozen_stages(cfg.model, tiled=cfg.data.vae_tiling).to(env.device, dtype)
            image_condition = dit_config.in_channels > dit_config.out_channels

            staging = staging_folder(out)
            if env.is_main:
                staging.mkdir(parents=True)
            barrier()
            writer = CacheWriter(staging, env.rank, samples_per_shard)
            mine = list(enumerate(refs))[env.rank::env.world_size]
            buckets = None
            if cfg.data.buckets:  # each clip at its bucket's size; those that fit none are listed as skipped
                choices = parse_buckets(cfg.data.buckets, dit_config.patch_size)
                assigned, skipped = assign_buckets([ref for _, ref in mine], choices, lambda ref: source_shape(ref, spec),
                                                   cfg.data.max_upscale, spec.min_frames)
                writer.skipped.extend(skipped)
                bucket_of = dict(assigned)
                mine = [(index, ref) for index, ref in mine if ref in bucket_of]
                buckets = [bucket_of[ref] for _, ref in mine]
            loader = torch.utils.data.DataLoader(ClipsToEncode(mine, spec, buckets), batch_size=None,
                                                 num_workers=cfg.data.num_workers)
            for item, (index, ref, video, caption, reason) in enumerate(
                    tqdm(loader, desc="encode", disable=not env.is_main, dynamic_ncols=True)):
                if reason is not None:
                    logging.getLogger("sat_video.data").warning("skipping %s: %s", ref.path, reason)
                    writer.skipped.append((str(ref.path), reason))
                    continue
                with torch.no_grad():
                    video = video[None].to(env.device, dtype)  # [1, 3, T, H, W]
                    mean, std = stages.encode_moments(video)
                    tensors = {"latent_mean": mean[0], "text": stages.encode_text([caption])[0]}
                if std is not None:
                    tensors["latent_std"] = std[0]
                if image_condition:
                    tensors["first_frame"] = video[0, :, :1]
                writer.add(index, ref, caption, tensors, bucket=buckets[item].name if buckets is not None else None)
            writer.write_part()
            barrier()
            if env.is_main:
                manifest = finish(staging, out, env.world_size, settings)
                samples, skipped = manifest["samples"], manifest["skipped"]
                print(f"precompute_latents: {len(samples)} samples in {out} ({len(skipped)} unusable file(s) skipped"
                      + (": " + ", ".join(path for path, _ in skipped[:3]) + ("..." if len(skipped) > 3 else "")
                         if skipped else "")
                      + f"); train with data.latent_cache={out}")
            barrier()
            return 0
    finally:
        shutdown()


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="cache folder to create")
    parser.add_argument("--samples-per-shard", type=int, default=256, help="samples per safetensors file")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out (only once the new cache is complete)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    if args.samples_per_shard < 1:
        parser.error(f"--samples-per-shard must be >= 1, found {args.samples_per_shard}")
    return encode(config_from_arguments(args), Path(args.out).expanduser().resolve(), args.samples_per_shard, args.overwrite)


def main(argv=None) -> int:
    return run_tool("precompute_latents", run, argv)


if __name__ == "__main__":
    exit_process(main())
