"""Decoding shard samples in loader workers: the same checks and cuts as a file from a folder.

A sample's bytes go to a scratch file (in ``/dev/shm`` where there is one) and through
:func:`sat_video.data.clips.load_clip`, so a shard sample meets every rule a folder's file does (its header read in a
separate process with a time limit, hostile headers, decoded size) and is cut the same way, at the bucket its json
gave it. A video whose header displays another size than its json declares is refused: its bucket was chosen for the
json's size.

A sample that fails is named ``<shard>:<key>`` in the batch's skipped files and its place taken by another sample of the
same batch (same bucket, so the batch still stacks): the sampler cannot hand the worker a replacement, and the batch must
keep its size on every rank. A batch none of whose samples loads stops the run, naming them.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sat_video.common.errors import DataError, UnusableSample
from sat_video.data.buckets import Bucket
from sat_video.data.clips import ClipSpec, Sample, bucket_spec, load_clip
from sat_video.data.shard_stream import ShardSample
from sat_video.data.sources import SampleRef
from sat_video.data.video_probe import probe_video

SCRATCH = "/dev/shm"
"""Memory-backed scratch files where the system has it; the default temporary folder otherwise."""


def _scratch_folder() -> str | None:
    path = Path(SCRATCH)
    return SCRATCH if path.is_dir() and path.stat().st_mode & 0o002 else None


class ShardDataset(torch.utils.data.Dataset):
    """Decodes the items of :class:`~sat_video.data.shard_stream.ShardBatchSampler`, a batch at a time.

    Args:
        spec: how clips are cut (without buckets).
        buckets: ``{kind: bucket}`` with ``data.buckets``; ``None`` cuts every clip at ``spec``.
        seed: with ``spec.random_start``, where a sample's clip starts in epoch ``e`` is drawn from ``(seed, e, key)``.
    """

    def __init__(self, spec: ClipSpec, buckets: dict[str, Bucket] | None, seed: int):
        self.spec, self.buckets, self.seed = spec, buckets, seed

    def _decode(self, sample: ShardSample, epoch: int) -> torch.Tensor:
        bucket = self.buckets[sample.kind] if self.buckets is not None else None
        spec = bucket_spec(self.spec, bucket) if bucket is not None else self.spec
        rng = None
        if spec.random_start:
            rng = np.random.default_rng([self.seed, epoch, int(hashlib.sha256(sample.key.encode()).hexdigest()[:15], 16)])
        with tempfile.NamedTemporaryFile(suffix=f".{sample.ext}", dir=_scratch_folder()) as handle:
            handle.write(sample.data)
            handle.flush()
            path = Path(handle.name)
            try:
                if not sample.is_image:
                    declared = probe_video(path)
                    if (declared.width, declared.height) != (sample.width, sample.height):
                        raise UnusableSample(path, f"its header displays {declared.width}x{declared.height} but its json "
                                                   f"declares {sample.width}x{sample.height}; refused rather than cut at "
                                                   f"a bucket chosen for the other size")
                return load_clip(SampleRef(path, sample.caption, None, sample.is_image), spec, rng)[0]
            except UnusableSample as err:
                raise UnusableSample(sample.name, err.reason.replace(path.name, sample.name)) from None

    def __getitems__(self, items: Sequence[tuple]) -> list[Sample]:
        """``[(ShardSample, epoch, batch index[, from cache]), ...]`` -> one :class:`Sample` each (the DataLoader's
        batched fetch); a sample planned as cached is not decoded (:meth:`RunLatentCache.planned`)."""
        samples: list[Sample | None] = []
        failures: list[tuple[str, str]] = []
        for sample, epoch, batch_index, *from_cache in items:
            bucket = self.buckets[sample.kind].name if self.buckets is not None else None
            if from_cache and from_cache[0]:
                samples.append(Sample(None, "", "", (epoch, batch_index), (), bucket, sample.key))
                continue
            try:
                video = self._decode(sample, epoch)
            except UnusableSample as err:
                failures.append((err.path, err.reason))
                samples.append(None)
                continue
            samples.append(Sample(video, sample.caption, sample.name, (epoch, batch_index), (), bucket, sample.key))
        usable = [sample for sample in samples if sample is not None]
        if not usable:
            raise DataError("no sample of a batch could be loaded: " + "; ".join(f"{name}: {why}" for name, why in failures))
        samples = [sample if sample is not None else usable[0] for sample in samples]
        samples[0] = Sample(**{**vars(samples[0]), "skipped": tuple(failures)})
        return samples
