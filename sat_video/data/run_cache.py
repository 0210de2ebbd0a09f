"""In-run latent cache: a clip is decoded and encoded once per run; later epochs train from what was kept.

What is kept per clip (at its bucket) is what :mod:`sat_video.data.latent_cache` stores: the VAE's posterior moments,
the T5 embedding and, for I2V, the first frame. Every step still samples its latents from the moments with the step's
generator, so training is unchanged (to float rounding) against encoding the clip again; only the cost goes.

Where entries live:

* in memory, up to ``data.cache_memory_gb`` per rank;
* then in ``<folder>/<key>.safetensors`` (atomic writes; the key is the sample's index, or a shard sample's key), up
  to ``data.cache_disk_gb`` for the folder. With several data-parallel ranks every entry is also written there: the
  sampler deals a clip to another rank in a later epoch, which then reads it instead of encoding it again (so the
  folder belongs on storage all ranks see, as the run folder).

The folder is named by a hash of everything the entries depend on (:func:`run_cache_settings`), so a resumed run with
the same data reuses what is on disk and a run with other settings never reads it. An entry that does not fit either
budget is not kept; that clip is encoded again when it comes back.

Data-loader workers skip decoding a clip the cache will hold by the time its batch is encoded: :meth:`RunLatentCache.planned`
marks those items as it passes the sampler's batches on (the sampler runs in the training process).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from sat_video.common.files import atomic_write
from sat_video.data.latent_cache import EncodedClip

logger = logging.getLogger("sat_video.data")

GIB = 2**30


def run_cache_settings(cache_settings: dict, sources: list[str], shards: list[str] = ()) -> dict:
    """What entries depend on: the latent cache's settings (first stage, text encoder, clip size, buckets) and the
    sources, whose order defines the sample indices the entries are keyed by (or the shards, whose URLs key theirs)."""
    settings = {**cache_settings, "data.sources": [str(Path(source).expanduser().resolve()) for source in sources]}
    if shards:
        settings["data.shards"] = list(shards)
    return settings


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class CacheCounts:
    """Since the last :meth:`RunLatentCache.take_counts`: samples served from memory, from disk, encoded, encoded in the
    training process because a planned entry was not there (``late``), and entries not kept (both budgets full)."""

    memory_hits: int = 0
    disk_hits: int = 0
    encoded: int = 0
    late: int = 0
    dropped: int = 0

    @property
    def hit_rate(self) -> float | None:
        served = self.memory_hits + self.disk_hits + self.encoded
        return (self.memory_hits + self.disk_hits) / served if served else None


class RunLatentCache:
    """The cache of one run (and one training stage) on one rank.

    Args:
        folder: spill folder, e.g. ``<run>/run_cache/<digest of the settings>``; created on first write.
        memory_bytes: budget of this rank's in-memory entries.
        disk_bytes: budget of the folder, shared by ``world_size`` ranks (each writes at most its share).
        world_size: data-parallel ranks; more than one writes every entry through to disk.
    """

    def __init__(self, folder: Path, memory_bytes: int, disk_bytes: int, world_size: int = 1):
        self.folder = Path(folder)
        self.memory_bytes, self.world_size = memory_bytes, world_size
        self.disk_share = disk_bytes // world_size
        self._memory: dict[int | str, EncodedClip] = {}
        self._pending: set[int | str] = set()  # planned as cached, not stored yet
        self._lock = threading.Lock()
        self.memory_used = 0
        self.disk_written = 0
        on_disk = list(self.folder.glob("*.safetensors")) if self.folder.is_dir() else []
        self.disk_found = sum(file.stat().st_size for file in on_disk)  # reused from before a resume
        self._on_disk = {int(file.stem) if file.stem.isdigit() else file.stem for file in on_disk}
        self.counts = CacheCounts()
        if on_disk:
            logger.info("run cache %s: reusing %d entries (%.2f GiB) written before", self.folder, len(on_disk),
                        self.disk_found / GIB)

    def _file(self, index: int | str) -> Path:
        return self.folder / f"{index}.safetensors"

    @property
    def _accepting(self) -> bool:
        return self.memory_used < self.memory_bytes or self.disk_written < self.disk_share

    def _stored(self, index: int | str) -> bool:
        return index in self._memory or index in self._on_disk or self._file(index).is_file()

    def planned(self, batch_sampler: Iterable[list[tuple]], key: Callable[[tuple], int | str] = itemgetter(0),
                pending: bool = True) -> PlannedBatches:
        """``batch_sampler`` (for ``DataLoader(batch_sampler=...)``) with a last element added to each item: whether the
        cache will hold it when its batch is encoded (stored now, or, with ``pending``, drawn earlier by this rank while
        the cache still accepts entries). Batches are encoded in order, so an earlier draw is stored first; a clip
        repeated within one batch is decoded each time. ``key``: an item's key (its first element, the sample index).
        Without ``pending`` a clip planned as cached is always there: for samples the encoder could not decode again
        (a shard sample's bytes stay with the worker)."""
        return PlannedBatches(self, batch_sampler, key, pending)

    def _plan(self, batches: Iterable[list[tuple]], key: Callable[[tuple], int | str],
              pending: bool) -> Iterator[list[tuple]]:
        for batch in batches:
            keys = [key(item) for item in batch]
            with self._lock:
                marked = [(*item, self._stored(k) or (pending and k in self._pending)) for item, k in zip(batch, keys)]
                if self._accepting and pending:
                    self._pending.update(keys)
            yield marked

    def get(self, index: int | str) -> EncodedClip | None:
        with self._lock:
            clip = self._memory.get(index)
            if clip is not None:
                self.counts.memory_hits += 1
                return clip
        file = self._file(index)
        if not file.is_file():
            return None
        with safe_open(str(file), framework="pt") as handle:
            meta = handle.metadata()
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        clip = EncodedClip(tensors["latent_mean"], tensors.get("latent_std"), tensors["text"], tensors.get("first_frame"),
                           meta["caption"], meta["path"], meta.get("bucket") or None)
        with self._lock:
            self.counts.disk_hits += 1
            self._on_disk.add(index)
            if self.memory_used + clip.nbytes <= self.memory_bytes and index not in self._memory:  # next time from memory
                self._memory[index] = clip
                self.memory_used += clip.nbytes
        return clip

    def put(self, index: int | str, clip: EncodedClip) -> None:
        """Keep a freshly encoded clip: in memory while it fits, on disk while the share fits (always on disk too with
        several ranks, for the others), else not at all."""
        size = clip.nbytes
        with self._lock:
            self.counts.encoded += 1
            self._pending.discard(index)
            if index in self._memory:
                return
            in_memory = self.memory_used + size <= self.memory_bytes
            if in_memory:
                self._memory[index] = clip
                self.memory_used += size
            to_disk = (self.world_size > 1 or not in_memory) and index not in self._on_disk
            to_disk = to_disk and self.disk_written + size <= self.disk_share
            if to_disk:
                self._on_disk.add(index)
                self.disk_written += size
            elif not in_memory:
                self.counts.dropped += 1
        if to_disk:
            metadata = {"caption": clip.caption, "path": clip.path, "bucket": clip.bucket or ""}
            tensors = {name: tensor.contiguous() for name, tensor in clip.tensors().items()}
            atomic_write(self._file(index), lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
                         suffix=".safetensors")

    def note_late(self) -> None:
        with self._lock:
            self.counts.late += 1

    def take_counts(self) -> CacheCounts:
        with self._lock:
            counts, self.counts = self.counts, CacheCounts()
        return counts

    def describe(self) -> str:
        return (f"{len(self._memory)} in memory ({self.memory_used / GIB:.3f} GiB of {self.memory_bytes / GIB:g}), "
                f"{(self.disk_written + self.disk_found) / GIB:.3f} GiB on disk in {self.folder}")


@dataclass
class PlannedBatches:
    """:meth:`RunLatentCache.planned`: an iterable a ``DataLoader`` can restart."""

    cache: RunLatentCache
    batch_sampler: Iterable[list[tuple]]
    key: Callable[[tuple], int | str]
    pending: bool

    def __iter__(self) -> Iterator[list[tuple]]:
        return self.cache._plan(self.batch_sampler, self.key, self.pending)
