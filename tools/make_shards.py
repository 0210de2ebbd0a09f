#!/usr/bin/env python3
"""Write WebDataset tar shards from SAT SFT folders, ``.jsonl`` or ``.csv`` files, to train from with ``data.shards``.

    python tools/make_shards.py /data/my_videos /data/more.csv --out /data/shards --samples-per-shard 1000 --workers 16
    torchrun --nproc_per_node 8 tools/train_video.py --base ... "data.shards=['/data/shards/{000000..000041}.tar']"

Each shard holds per sample the file (``<key>.mp4``, ``.png``, ...) and ``<key>.json`` (caption, width, height,
frames, fps, duration, source path); ``index.json`` describes every shard, ``skipped_files.txt`` lists each file left
out and why (checked as training checks files, hostile headers included). Run it again on an interrupted output to
finish it: shards already written are kept. An output of other sources or settings is refused. docs/data.md.
Exit status: 0 done, 2 a source cannot be read or the output holds something else.
"""

import argparse
import logging
import sys

from sat_video.config.cli import run_tool
from sat_video.data.config import DEFAULT_MAX_SOURCE_PIXELS
from sat_video.data.shard_writer import ShardSettings, default_workers, make_shards


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="folders in SAT's SFT layout, .jsonl or .csv files (as data.sources)")
    parser.add_argument("--out", required=True, help="folder of the shards (created; an interrupted one is finished)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="source files per shard (default 1000)")
    parser.add_argument("--max-shard-bytes", type=float, default=None,
                        help="also cut a shard before its files pass this many bytes (e.g. 1e9)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="processes writing shards (default: cores)")
    parser.add_argument("--max-source-pixels", type=int, default=DEFAULT_MAX_SOURCE_PIXELS,
                        help="skip files declaring larger frames (data.max_source_pixels)")
    args = parser.parse_args(argv)
    for name in ("samples_per_shard", "workers", "max_source_pixels"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, found {getattr(args, name)}")
    if args.max_shard_bytes is not None and args.max_shard_bytes <= 0:
        parser.error(f"--max-shard-bytes must be positive, found {args.max_shard_bytes:g}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    settings = ShardSettings(args.samples_per_shard, None if args.max_shard_bytes is None else int(args.max_shard_bytes),
                             args.max_source_pixels)
    index = make_shards(args.sources, args.out, settings, args.workers)
    last = len(index["shards"]) - 1
    print(f"make_shards: {index['samples']} sample(s) in {len(index['shards'])} shard(s) in {args.out} "
          f"({index['skipped']} file(s) skipped, listed in skipped_files.txt); train with "
          f"\"data.shards=['{args.out}/{{000000..{last:06d}}}.tar']\"")
    return 0


def main(argv=None) -> int:
    return run_tool("make_shards", run, argv)


if __name__ == "__main__":
    sys.exit(main())
