"""Section *Data at scale: shards vs folder sources*: the start-up of ``tools/train_video.py`` (process start to the end of
the first step, ``startup_s``) with ``data.buckets`` on 1k to 100k samples from shards and from a folder source, how fast
``tools/make_shards.py`` writes, decoding throughput per core of shard samples against the same files from a folder, and
the projection to 10M samples on 64 ranks. Regenerates alone: ``tools/bench.py --only shards``.

Samples are copies of one tiny clip: a folder source is a ``.jsonl`` of hard links to it (each a file of its own to
probe, no disk used), and the shards of N samples are hard links of one shard written by ``make_shards`` with an
``index.json`` listing N / ``per_shard`` of them."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sat_video.benchmarks.markdown import met, regenerate_alone, table
from sat_video.benchmarks.measure import median

if TYPE_CHECKING:
    from sat_video.benchmarks.context import Bench

STANDALONE = "shards"
BUCKETS = "data.buckets=[[9,64,64]]"
"""Every sample's bucket (the clip is 64 x 64, 16 frames at 8 fps): the folder path reads each file's header for it."""
FLAT = 1.2
"""Target: shard start-up at the most samples within this factor of the fewest."""


@dataclass(frozen=True)
class ShardScale:
    """Sample counts timed from shards (``samples``) and from a folder source (``folder``), samples per shard, the clip
    sizes (frames, height, width) decoded per core and how many clips of each, and the projection's scale (its index
    is planned for real, without tars)."""

    samples: tuple[int, ...]
    folder: tuple[int, ...]
    per_shard: int
    decode_sizes: tuple[tuple[int, int, int], ...]
    decode_clips: int
    projected_samples: int = 10_000_000
    projected_ranks: int = 64
    projected_per_shard: int = 1_000


def run(bench: Bench) -> dict:
    """``startup``: per sample count, seconds from shards and from folders; ``write``, ``decode``, ``projection``."""
    from sat_video.benchmarks.training_steps import train_assets
    from sat_video.fixtures.synthetic import make_moving_shapes

    scale: ShardScale = bench.preset.shards
    root = bench.workdir / "shard_bench"
    [(clip, caption)] = make_moving_shapes(root / "one", 1, num_frames=16, height=64, width=64, fps=8, seed=0)
    real, write = _real_shard(root, _folder_source(root, clip, caption, scale.per_shard), scale.per_shard)
    assets = train_assets(bench)
    startup: dict[int, dict[str, float]] = {}
    for count in sorted({*scale.samples, *scale.folder}):
        startup[count] = {}
        if count in scale.samples:
            shards = _shard_set(root, real, count // scale.per_shard)
            pattern = f"{shards}/{{000000..{count // scale.per_shard - 1:06d}}}.tar"
            startup[count]["shards"] = _startup(bench, assets, ["data.sources=[]", f"data.shards=['{pattern}']"])
        if count in scale.folder:
            source = _folder_source(root, clip, caption, count)
            startup[count]["folder"] = _startup(bench, assets, [f"data.sources=[{source}]"])
        print(f"shards: start-up with {count} samples: {startup[count]}", flush=True)
    return {"startup": startup, "write": write, "decode": [_decode(root, size, scale.decode_clips)
                                                           for size in scale.decode_sizes],
            "projection": _projection(root, real, scale), "per_shard": scale.per_shard,
            "command": bench.command_alone(STANDALONE)}


def _folder_source(root: Path, clip: Path, caption: str, count: int) -> Path:
    """A ``.jsonl`` of ``count`` hard links to ``clip`` (made once, shared by the smaller counts)."""
    folder = root / "links"
    folder.mkdir(exist_ok=True)
    for i in range(count):
        if not (folder / f"{i:07d}.mp4").exists():
            os.link(clip, folder / f"{i:07d}.mp4")
    path = root / f"folder-{count}.jsonl"
    path.write_text("".join(json.dumps({"path": f"links/{i:07d}.mp4", "caption": caption}) + "\n" for i in range(count)))
    return path


def _real_shard(root: Path, source: Path, per_shard: int) -> tuple[Path, dict]:
    """One shard of the ``per_shard`` samples of ``source`` written by ``make_shards`` in one process, and how fast."""
    from sat_video.data.shard_writer import ShardSettings, make_shards

    out = root / "real"
    started = time.perf_counter()
    make_shards([str(source)], out, ShardSettings(samples_per_shard=per_shard), workers=1)
    seconds = time.perf_counter() - started
    print(f"shards: make_shards wrote {per_shard} samples in {seconds:.1f} s", flush=True)
    return out, {"files": per_shard, "seconds": seconds}


def _shard_set(root: Path, real: Path, shards: int) -> Path:
    """A folder of ``shards`` hard links to the real shard, and the index listing them."""
    from sat_video.data.shard_writer import PARTS, PLAN, shard_file_name, write_index

    out = root / f"shards-{shards}"
    (out / PARTS).mkdir(parents=True)
    part = json.loads((real / PARTS / f"{shard_file_name(0)}.json").read_text())
    names = [shard_file_name(number) for number in range(shards)]
    for name in names:
        os.link(real / shard_file_name(0), out / name)
        (out / PARTS / f"{name}.json").write_text(json.dumps({**part, "name": name}))
    write_index(out, names, json.loads((real / PLAN).read_text())["made_from"])
    return out


def _startup(bench: Bench, assets, data_keys: list[str]) -> float:
    from sat_video.benchmarks.training_steps import run_program
    from sat_video.training.metrics import read_metrics

    save = bench.workdir / f"startup-{len(list(bench.workdir.glob('startup-*')))}"
    run_program([*bench.commands.train, "--base", *map(str, assets.base), f"model.text_encoder.path={assets.t5}",
                 f"train.save={save}", "train.report_to=[none]", "train.train_iters=1", "train.save_interval=1",
                 "train.micro_batch_size=1", BUCKETS, *data_keys])
    first = read_metrics(save)[0]
    shutil.rmtree(save)
    return first["startup_s"]


def _decode(root: Path, size: tuple[int, int, int], clips: int) -> dict:
    """Clips per second on one core: shard samples (scratch file, header, decode, resize) and the same files in a folder."""
    from sat_video.data.buckets import Bucket
    from sat_video.data.clips import ClipSpec, VideoDataset
    from sat_video.data.shard_dataset import ShardDataset
    from sat_video.data.shard_index import KindRule, load_shard_infos
    from sat_video.data.shard_stream import RankStream, ShardPlan
    from sat_video.data.shard_writer import ShardSettings, make_shards
    from sat_video.data.sources import discover
    from sat_video.fixtures.synthetic import make_moving_shapes

    frames, height, width = size
    folder = root / f"decode-{frames}x{height}x{width}"
    make_moving_shapes(folder / "clips", clips, num_frames=frames + 6, height=height, width=width, fps=8, seed=1)
    make_shards([str(folder / "clips")], folder / "shards", ShardSettings(samples_per_shard=clips))
    spec = ClipSpec(frames, height, width, fps=8, skip_frames=3)
    bucket = Bucket(frames, height, width)
    infos = load_shard_infos([str(folder / "shards" / "000000.tar")], 60.0)
    stream = RankStream(ShardPlan(infos, KindRule(spec, [bucket], 1.0), 1, 1, 0), 0, 0, 1, 60.0, [])
    samples = [stream.take(bucket.name, 1)[0] for _ in range(clips)]
    fresh = folder / "fresh"  # new paths: make_shards' header reads are cached per path in this process
    shutil.copytree(folder / "clips", fresh, copy_function=os.link)
    shards = ShardDataset(spec, {bucket.name: bucket}, 0)
    files = VideoDataset(discover([fresh]), spec, [bucket] * clips)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shards.__getitems__([(samples[0], 0, 0)])  # warm-up: imports, the decoder's first open
        times = {"shards": [], "folder": []}
        for i in range(clips):
            started = time.perf_counter()
            shards.__getitems__([(samples[i], 0, i)])
            times["shards"].append(time.perf_counter() - started)
            started = time.perf_counter()
            files[(i, 0, i)]
            times["folder"].append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    row = {"size": size, "clips": clips, **{kind: 1 / median(seconds) for kind, seconds in times.items()}}
    print(f"shards: decoding {frames}x{height}x{width}: {row['shards']:.2f} clips/s per core from shards, "
          f"{row['folder']:.2f} from files", flush=True)
    return row


def _projection(root: Path, real: Path, scale: ShardScale) -> dict:
    """What a run on ``projected_samples`` in shards of ``projected_per_shard`` reads and plans at start on each of
    ``projected_ranks`` ranks, timed: the index of that many shards, and the first epoch's plan."""
    from sat_video.data.buckets import Bucket
    from sat_video.data.clips import ClipSpec
    from sat_video.data.shard_index import KindRule, load_shard_infos
    from sat_video.data.shard_reader import expand_shards
    from sat_video.data.shard_stream import ShardPlan

    per_shard = scale.projected_per_shard
    shards = scale.projected_samples // per_shard
    index = json.loads((real / "index.json").read_text())
    real_entry = index["shards"][0]
    entry = {**real_entry, "samples": per_shard, "shapes": [[*row[:-1], per_shard] for row in real_entry["shapes"]]}
    index["shards"] = [{**entry, "name": f"{number:06d}.tar"} for number in range(shards)]
    folder = root / "projected"
    folder.mkdir()
    (folder / "index.json").write_text(json.dumps(index))  # the tars themselves are not read at start
    started = time.perf_counter()
    infos = load_shard_infos(expand_shards([f"{folder}/{{000000..{shards - 1:06d}}}.tar"]), 60.0)
    plan = ShardPlan(infos, KindRule(ClipSpec(9, 64, 64, fps=8, skip_frames=3), [Bucket(9, 64, 64)], 1.0), 1,
                     scale.projected_ranks, 0)
    seconds = time.perf_counter() - started
    print(f"shards: index and plan of {shards} shards for {scale.projected_ranks} ranks: {seconds:.2f} s", flush=True)
    return {"samples": scale.projected_samples, "ranks": scale.projected_ranks, "shards": shards,
            "index_bytes": (folder / "index.json").stat().st_size, "plan_s": seconds,
            "steps": len(plan.epoch(0).sequence)}


def render(result: dict) -> list[str]:
    startup, projection = result["startup"], result["projection"]
    counts = sorted(map(int, startup))
    shard_counts = [n for n in counts if "shards" in startup[n]]
    folder_counts = [n for n in counts if "folder" in startup[n]]
    smallest, largest = shard_counts[0], shard_counts[-1]
    growth = startup[largest]["shards"] / startup[smallest]["shards"]
    lines = [
        "## Data at scale: shards vs folder sources",
        "",
        regenerate_alone(result["command"]),
        "",
        f"Start-up of `tools/train_video.py` (one process, `{BUCKETS}`, the tiny training config): seconds from process "
        "start to the end of the first step (`startup_s`). Samples are copies of one 16-frame 64x64 clip: the folder "
        f"source is a `.jsonl` of hard links (each probed as a file of its own), the shards ({result['per_shard']} samples "
        "each) hard links of one shard written by `tools/make_shards.py`.",
        "",
        table(["samples", "from shards (s)", "from a folder source (s)"],
              [[f"{n:,}", f"{startup[n]['shards']:.1f}" if "shards" in startup[n] else "-",
                f"{startup[n]['folder']:.1f}" if "folder" in startup[n] else "-"] for n in counts]),
        "",
        f"Shard start-up at {largest:,} samples is {growth:.2f}x that at {smallest:,} "
        f"(target: at most {FLAT}x: {met(growth <= FLAT)}).",
    ]
    if len(folder_counts) > 1:
        low, high = folder_counts[0], folder_counts[-1]
        per_file = (startup[high]["folder"] - startup[low]["folder"]) / (high - low)
        projected = startup[low]["folder"] + per_file * (largest - low)
        samples, ranks = projection["samples"], projection["ranks"]
        folder_s = samples * per_file / ranks
        shard_s = startup[smallest]["shards"] + projection["plan_s"]
        lines += [
            "",
            f"Folder sources pay per file: ({startup[high]['folder']:.1f} - {startup[low]['folder']:.1f}) s / "
            f"({high:,} - {low:,}) files = {per_file * 1000:.1f} ms per file on one process (its header read in a separate "
            f"process, then decord's index). At {largest:,} samples that is {startup[low]['folder']:.1f} + "
            f"{per_file * 1000:.1f} ms x {largest - low:,} = {projected:.0f} s (projected, not run).",
            "",
            f"**Projection: {samples:,} samples on {ranks} ranks.** Folder sources: the ranks share the header reads, "
            f"{samples:,} x {per_file * 1000:.1f} ms / {ranks} = {folder_s:,.0f} s ({folder_s / 60:.0f} min) before the "
            f"first step. Shards: each rank reads only `index.json` ({projection['shards']:,} shards, "
            f"{projection['index_bytes'] / 2**20:.1f} MiB) and plans its epoch; measured here for that index and "
            f"{ranks} ranks: {projection['plan_s']:.2f} s, so start-up is about the {smallest:,}-sample figure plus that: "
            f"{startup[smallest]['shards']:.1f} + {projection['plan_s']:.2f} = {shard_s:.1f} s "
            f"({projection['steps']:,} steps in the first epoch at a micro-batch of 1).",
        ]
    write = result["write"]
    lines += [
        "",
        f"`tools/make_shards.py` on one process: {write['files']:,} files in {write['seconds']:.1f} s "
        f"({write['files'] / write['seconds']:.0f} files/s; `--workers` runs shards in parallel).",
        "",
        "Decoding per core (one process, one torch thread): a shard sample goes to a scratch file, its header is read in "
        "a separate process and checked against its json, then it is decoded and resized as a file of a folder is.",
        "",
        table(["clip (frames x height x width)", "clips", "from shards (clips/s per core)", "from files (clips/s per core)"],
              [["x".join(map(str, row["size"])), row["clips"], f"{row['shards']:.2f}", f"{row['folder']:.2f}"]
               for row in result["decode"]]),
    ]
    return lines
