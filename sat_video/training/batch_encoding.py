"""Decoded batches -> encoded batches (posterior moments, text embeddings), through the in-run latent cache, ahead of
the DiT step.

:class:`BatchEncoder` runs the frozen stages on the clips of a batch that the run's cache does not hold and keeps what
they give (:mod:`sat_video.data.run_cache`). It computes no latents: the training step samples them from the moments
with its own generator, so encoding may run ahead, in another thread, without changing a single draw.

:class:`EncodeAhead` runs it ``data.prefetch`` batches ahead of the step: in a background thread, on a side CUDA stream
on GPU, so the VAE of the next batch overlaps the DiT of this one. On CPU the thread computes on one core
(:func:`serial_openmp_in_this_thread`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sat_video.data.clips import Batch, VideoDataset
from sat_video.data.latent_cache import CachedBatch, CachedSample, EncodedClip, collate_cached
from sat_video.data.run_cache import RunLatentCache
from sat_video.model.stages import FrozenStages


@dataclass
class EncodedBatch:
    """A batch ready for :meth:`~sat_video.diffusion.conditioning.TrainingInputBuilder.prepare_cached`, with the seconds
    its encoding took (wherever it ran)."""

    batch: CachedBatch
    encode_s: float


class BatchEncoder:
    """Encodes what the cache lacks, keeps it there, and assembles the batch on ``device``.

    Args:
        stages: the frozen stages (first stage and text encoder).
        dataset: decodes a clip planned as cached whose entry is missing (not kept: both budgets were full).
        cache: the run's cache; ``None`` encodes every clip.
        image_condition: I2V, which also needs each clip's first frame.
    """

    def __init__(self, stages: FrozenStages, dataset: VideoDataset, cache: RunLatentCache | None, device: torch.device,
                 dtype: torch.dtype, image_condition: bool):
        self.stages, self.dataset, self.cache = stages, dataset, cache
        self.device, self.dtype, self.image_condition = device, dtype, image_condition

    @torch.no_grad()
    def __call__(self, batch: Batch) -> CachedBatch:
        clips: list[EncodedClip | None] = [None] * len(batch.indices)
        videos = list(batch.video.unbind(0)) if batch.video is not None else []
        captions = [caption for caption, cached in zip(batch.captions, batch.from_cache) if not cached]
        paths = [path for path, cached in zip(batch.paths, batch.from_cache) if not cached]
        fresh = [i for i, cached in enumerate(batch.from_cache) if not cached]
        for i, (index, cached) in enumerate(zip(batch.indices, batch.from_cache)):
            if not cached:
                continue
            clips[i] = self.cache.get(index) if self.cache is not None else None
            if clips[i] is None:  # planned as cached but not kept: decode it here
                sample = self.dataset[(index, *batch.position)]
                videos.append(sample.video)
                captions.append(sample.caption)
                paths.append(sample.path)
                fresh.append(i)
                self.cache.note_late()
        if fresh:
            video = torch.stack(videos).to(self.device, self.dtype, non_blocking=True)
            mean, std = self.stages.encode_moments(video)
            text = self.stages.encode_text(captions)
            for j, i in enumerate(fresh):
                clips[i] = EncodedClip(mean[j], None if std is None else std[j], text[j],
                                       video[j, :, :1] if self.image_condition else None, captions[j], paths[j], batch.bucket)
                if self.cache is not None:
                    self.cache.put(batch.indices[i], _to_host(clips[i]))
        on_device = [CachedSample(**vars(clip.map_tensors(lambda t: t.to(self.device, non_blocking=True))),
                                  position=batch.position) for clip in clips]
        return dataclasses.replace(collate_cached(on_device), skipped=batch.skipped)


def _to_host(clip: EncodedClip) -> EncodedClip:
    """A copy in host memory that shares no storage with the batch (a kept slice would keep the whole batch alive)."""
    return clip.map_tensors(lambda tensor: tensor.to("cpu", copy=True))


OPENMP_RUNTIMES = ("libgomp", "libiomp5", "libomp")


def serial_openmp_in_this_thread() -> None:
    """Run this thread's CPU ops on one OpenMP thread; other threads keep theirs.

    Why: a second thread with its own OpenMP team makes more OpenMP threads than cores, and libgomp then stops
    spin-waiting between parallel regions in every team, the training thread's included. Measured on 2 cores: the tiny
    DiT's step took 1.8x as long with an idle encoding thread that had once run the VAE on a team of its own, and as
    long as without the thread when that thread computes serially. OpenMP's thread count is per thread, but torch sets
    a thread's own at its first parallel op, so that op runs first. Linux only (the loaded runtime is found in
    ``/proc/self/maps``); elsewhere nothing changes.
    """
    torch.ones(2).add_(1)  # torch's per-thread OpenMP setup happens here, before ours
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return
    loaded = {line.split()[-1] for line in maps.splitlines() if any(f"/{name}" in line for name in OPENMP_RUNTIMES)}
    for library in sorted(loaded):
        runtime = ctypes.CDLL(library)  # the loaded one: dlopen of a loaded path returns it
        if hasattr(runtime, "omp_set_num_threads"):
            runtime.omp_set_num_threads(1)


class EncodeAhead:
    """Iterator of :class:`EncodedBatch`: ``encode`` applied to each of ``batches``, ``depth`` batches ahead.

    ``depth`` 0 encodes when the batch is asked for. Otherwise a daemon thread encodes into a queue of ``depth``; an
    exception there is raised by the :func:`next` that would have returned its batch. On CUDA the thread works on a side
    stream and each batch carries an event the training stream waits for.
    """

    def __init__(self, batches: Iterator, encode: Callable[[object], CachedBatch], depth: int, device: torch.device):
        self.batches, self.encode, self.device = batches, encode, device
        self.depth = depth
        self._stop = threading.Event()
        self._encoding = threading.Lock()  # held while the thread runs the frozen stages
        if depth:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._work, name="sat_video-encode-ahead", daemon=True)
            self._thread.start()

    def _encode_next(self) -> EncodedBatch:
        raw = next(self.batches)
        with self._encoding:
            started = time.perf_counter()
            batch = self.encode(raw)
        return EncodedBatch(batch, time.perf_counter() - started)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No encoding while inside: validation uses the same frozen stages (and switches VAE tiling)."""
        with self._encoding:
            yield

    def _work(self) -> None:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if stream is not None:
            torch.cuda.set_device(self.device)
        else:
            serial_openmp_in_this_thread()
        while not self._stop.is_set():
            try:
                if stream is None:
                    item = (self._encode_next(), None)
                else:
                    with torch.cuda.stream(stream):
                        encoded = self._encode_next()
                        ready = torch.cuda.Event()
                        ready.record(stream)
                    item = (encoded, ready)
            except BaseException as err:  # noqa: BLE001 - handed to the training thread, raised there
                item = (err, None)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[0], BaseException):
                return

    def __iter__(self) -> EncodeAhead:
        return self

    def __next__(self) -> EncodedBatch:
        if not self.depth:
            return self._encode_next()
        item, ready = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if ready is not None:  # the training stream waits for the side stream, and owns the tensors from here on
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for tensor in (item.batch.latent_mean, item.batch.latent_std, item.batch.text, item.batch.first_frame):
                if tensor is not None:
                    tensor.record_stream(current)
        return item

    def close(self) -> None:
        """Stop the thread (it finishes the batch it is encoding); safe to call more than once."""
        self._stop.set()
        if self.depth and self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=60)
