"""Writing WebDataset shards from any source training reads (``tools/make_shards.py``; docs/data.md).

An output folder holds::

    000000.tar ...        per sample <key>.<mp4|png|...> (the file's bytes) and <key>.json (caption, width, height,
                          frames, fps, duration, source), keys in source order
    index.json            each shard's samples, bytes and shape summary (:mod:`sat_video.data.shard_index`)
    skipped_files.txt     every file left out, with the reason
    make_shards.json      what the folder is made from (sources, their digest, settings) and which files each shard takes
    .parts/<shard>.json   each finished shard's summary and skipped files (index.json is assembled from these)

Files are checked as training checks them (:func:`sat_video.data.clips.source_metadata`: headers in a separate process
with a time limit, hostile headers, the first frame's decoded size); the rules that depend on a run's clip size (too
short, fits no bucket) are applied by the run, from the json. Shards are cut by source files (``samples_per_shard``) or
their bytes (``max_shard_bytes``) before any file is read, so each shard is one independent task for a pool of
processes, written under a temporary name and renamed when whole: re-running on an interrupted output writes only the
shards that are missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from webdataset.writer import TarWriter

from sat_video.common.errors import OutputExistsError, UnusableSample
from sat_video.common.files import atomic_write
from sat_video.data.clips import source_metadata
from sat_video.data.config import DEFAULT_MAX_SOURCE_PIXELS
from sat_video.data.shard_index import INDEX_FORMAT, INDEX_VERSION
from sat_video.data.shard_reader import INDEX
from sat_video.data.sources import SampleRef, discover

logger = logging.getLogger("sat_video.data")

PLAN = "make_shards.json"
PARTS = ".parts"
SKIPPED = "skipped_files.txt"


@dataclass(frozen=True)
class ShardSettings:
    """How sources are cut into shards: at most ``samples_per_shard`` files, and at most ``max_shard_bytes`` of them
    (``None``: no limit; a larger file gets a shard of its own); files declaring more pixels are skipped."""

    samples_per_shard: int = 1000
    max_shard_bytes: int | None = None
    max_source_pixels: int = DEFAULT_MAX_SOURCE_PIXELS


def shard_file_name(number: int) -> str:
    return f"{number:06d}.tar"


def _digest(refs: Sequence[SampleRef]) -> str:
    lines = (f"{ref.path}\t{ref.caption_file}\t{ref.caption}\t{ref.is_image}" for ref in refs)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _cut(refs: Sequence[SampleRef], settings: ShardSettings) -> list[list[int]]:
    """``[start, end)`` of the refs each shard takes."""
    groups, start, size = [], 0, 0
    for i, ref in enumerate(refs):
        try:
            nbytes = ref.path.stat().st_size
        except OSError:
            nbytes = 0  # skipped when its shard is written, with the reason
        full = i - start >= settings.samples_per_shard
        too_big = settings.max_shard_bytes is not None and i > start and size + nbytes > settings.max_shard_bytes
        if full or too_big:
            groups.append([start, i])
            start, size = i, 0
        size += nbytes
    groups.append([start, len(refs)])
    return groups


def _made_from(sources: Sequence[str], refs: Sequence[SampleRef], settings: ShardSettings) -> dict:
    return {"sources": [str(Path(source).expanduser().resolve()) for source in sources], "files": len(refs),
            "digest": _digest(refs), "settings": dataclasses.asdict(settings)}


def _plan(out: Path, made_from: dict, refs: Sequence[SampleRef], settings: ShardSettings) -> list[list[int]]:
    """The shards' groups: those of an earlier, interrupted run on ``out`` (which must be of the same sources and
    settings), or new ones."""
    plan_file = out / PLAN
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())
        if plan["made_from"] != made_from:
            old, new = plan["made_from"], made_from
            changed = [key for key in new if old.get(key) != new[key]]
            details = "; ".join(f"{key}: then {old.get(key)!r}, now {new[key]!r}" for key in changed if key != "digest")
            raise OutputExistsError(f"{out} holds shards of other sources or settings ({details or 'the files differ'}); "
                                    f"choose another output folder, or delete it to start again")
        return plan["groups"]
    if out.exists() and any(out.iterdir()):
        raise OutputExistsError(f"{out} exists and holds files that tools/make_shards.py did not write (no {PLAN}); "
                                f"choose another output folder")
    groups = _cut(refs, settings)
    atomic_write(plan_file, lambda tmp: tmp.write_text(json.dumps({"made_from": made_from, "groups": groups})))
    return groups


def _write_shard(task: tuple[Path, int, int, list[SampleRef], int]) -> dict:
    """Write shard ``number`` (keys from ``first_key``); returns its part: summary and skipped files."""
    out, number, first_key, refs, max_pixels = task
    name = shard_file_name(number)
    part = {"name": name, "samples": 0, "bytes": 0, "shapes": [], "skipped": []}
    shapes: Counter = Counter()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle, TarWriter(handle, encoder=False) as writer:
            for offset, ref in enumerate(refs):
                try:
                    meta = source_metadata(ref, max_pixels)
                    data = ref.path.read_bytes()
                except UnusableSample as err:
                    part["skipped"].append([err.path, err.reason])
                    continue
                except OSError as err:
                    part["skipped"].append([str(ref.path), f"cannot be read ({err.strerror or err})"])
                    continue
                meta["source"] = str(ref.path)
                writer.write({"__key__": f"{first_key + offset:09d}", ref.path.suffix.lower()[1:]: data,
                              "json": json.dumps(meta).encode()})
                shapes[(int(ref.is_image), meta["width"], meta["height"], meta["frames"], meta["fps"] or 0)] += 1
                part["samples"] += 1
        part["bytes"] = tmp.stat().st_size
        part["shapes"] = [[*shape, count] for shape, count in sorted(shapes.items())]
        # the part before the shard's rename: a shard that exists is always described
        atomic_write(out / PARTS / f"{name}.json", lambda part_tmp: part_tmp.write_text(json.dumps(part)))

    atomic_write(out / name, write, suffix=".tar")
    return part


def make_shards(sources: Sequence[str], out: str | Path, settings: ShardSettings = ShardSettings(),
                workers: int = 1) -> dict:
    """Write the samples of ``sources`` (any form ``data.sources`` takes) as shards into ``out``; returns the index.

    Re-run on an interrupted ``out`` it writes only the missing shards.

    Raises:
        DataError: a source that cannot be read (:func:`sat_video.data.sources.discover`).
        OutputExistsError: ``out`` holds shards of other sources or settings, or files this did not write.
    """
    out = Path(out)
    refs = discover(sources)
    made_from = _made_from(sources, refs, settings)
    groups = _plan(out, made_from, refs, settings)
    names = [shard_file_name(number) for number in range(len(groups))]
    todo = [(out, number, start, refs[start:end], settings.max_source_pixels) for number, (start, end) in enumerate(groups)
            if not ((out / names[number]).is_file() and (out / PARTS / f"{names[number]}.json").is_file())]
    for _, number, *_ in todo:  # temporaries of a run killed while writing (atomic_write names them .<name>.*)
        for stale in out.glob(f".{names[number]}.*"):
            stale.unlink()
    if len(todo) < len(groups):
        logger.info("%s: %d of %d shard(s) already written; writing the other %d", out, len(groups) - len(todo),
                    len(groups), len(todo))
    if workers > 1 and len(todo) > 1:
        # fork: the workers start without importing torch again; nothing here has started a thread
        with multiprocessing.get_context("fork").Pool(min(workers, len(todo))) as pool:
            for part in pool.imap_unordered(_write_shard, todo):
                _log_part(part, out)
    else:
        for task in todo:
            _log_part(_write_shard(task), out)
    return write_index(out, names, made_from)


def _log_part(part: dict, out: Path) -> None:
    logger.info("%s: %d sample(s), %d skipped", out / part["name"], part["samples"], len(part["skipped"]))


def write_index(out: Path, names: list[str], made_from: dict) -> dict:
    """Assemble ``index.json`` and ``skipped_files.txt`` from the parts of the shards ``names``; returns the index."""
    parts = [json.loads((out / PARTS / f"{name}.json").read_text()) for name in names]
    shapes: Counter = Counter()
    for part in parts:
        for *shape, count in part["shapes"]:
            shapes[tuple(shape)] += count
    skipped = sorted((path, reason) for part in parts for path, reason in part["skipped"])
    index = {
        "format": INDEX_FORMAT, "version": INDEX_VERSION,
        "samples": sum(part["samples"] for part in parts), "skipped": len(skipped),
        "bytes": sum(part["bytes"] for part in parts),
        "shards": [{key: part[key] for key in ("name", "samples", "bytes", "shapes")} for part in parts],
        "shapes": [[*shape, count] for shape, count in sorted(shapes.items())],
        "made_from": made_from,
    }
    atomic_write(out / SKIPPED, lambda tmp: tmp.write_text("".join(f"{path}\t{reason}\n" for path, reason in skipped)))
    atomic_write(out / INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=1)))
    return index


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
