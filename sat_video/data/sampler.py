"""The order in which ranks draw batches, resumable at any ``(epoch, batch)`` position."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)


class ClipBatchSampler:
    """Infinite batch sampler (``DataLoader(batch_sampler=...)``) yielding ``[(index, epoch, batch index), ...]``.

    Epoch ``e`` is planned with one generator seeded by ``(seed, e)``, identically on every rank and without
    communication:

    1. the image indices and the video indices are shuffled separately;
    2. each kind's shuffled list is dealt to the ranks (rank ``r`` takes ``shuffled[r::world_size]``) and every
       rank cuts its share, in order, into full batches; every rank keeps the same number of batches of that
       kind, ``n // (world_size * batch_size)`` for ``n`` samples of the kind, so within an epoch no sample is
       on two ranks, and the leftover (fewer than ``world_size * batch_size`` samples of each kind, a different
       set each epoch) is not drawn;
    3. the sequence of kinds of the epoch's positions (one entry per image batch and per video batch) is
       shuffled, and batch ``b`` of every rank is that rank's next batch of kind ``sequence[b]``.

    So every batch holds only images or only videos, every rank has the same number of batches, and at every
    ``(epoch, batch)`` position all ranks draw the same kind: ranks never disagree on which parameters a step
    reaches (an image step leaves temporal parameters without a sample, which DeepSpeed ZeRO-2 cannot reduce
    when only some ranks do that). Image and video steps are interleaved in random order, on average in
    proportion to their numbers of batches, and the order changes every epoch.

    A data set too small for one batch of either kind on every rank repeats each kind's shuffled list (both the
    same number of times) until the larger kind fills one (ranks then see overlapping samples). A kind with fewer than
    ``world_size * batch_size`` samples (after that repetition) gets no batch at all; a warning says so.

    Args:
        kinds: ``is_image`` of every sample (``[ref.is_image for ref in refs]``).
        batch_size: samples per batch (per rank).
        rank, world_size: this rank among the data-parallel ranks.
        seed: shuffling seed; must be the same on every rank.
        start: ``(epoch, batch index)`` of the first batch to yield; to resume after the batch at position
            ``(e, b)``, pass ``(e, b + 1)`` (past the end of an epoch moves on to the next one).
    """

    def __init__(self, kinds: Sequence[bool], batch_size: int, rank: int, world_size: int, seed: int,
                 start: tuple[int, int] = (0, 0)):
        if not kinds:
            raise ValueError("ClipBatchSampler needs at least one sample")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, found {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), found {rank}")
        if seed < 0 or min(start) < 0:
            raise ValueError(f"seed and start must be non-negative, found seed={seed}, start={start}")
        self.kinds = [bool(kind) for kind in kinds]
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start = (int(start[0]), int(start[1]))
        self._by_kind = {is_image: [index for index, kind in enumerate(self.kinds) if kind == is_image]
                         for is_image in (True, False)}
        per_position = batch_size * world_size  # samples of one kind that one position takes from all ranks
        self._repeats = max(1, -(-per_position // max(map(len, self._by_kind.values()))))  # ceil: the tiny-data-set case
        for is_image, indices in self._by_kind.items():
            if indices and len(indices) * self._repeats < per_position:
                name = "image" if is_image else "video"
                logger.warning("%d %s sample(s) cannot fill a batch of %d on each of %d ranks at the same step "
                               "(needs %d); no %s batch is drawn", len(indices), name, batch_size, world_size,
                               per_position, name)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches (sample indices) of ``epoch``, in order."""
        mixed_seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0])
        generator = torch.Generator().manual_seed(mixed_seed)
        per_position = self.batch_size * self.world_size
        batches: dict[bool, list[list[int]]] = {}
        for is_image in (True, False):  # images first, then videos: a fixed order of draws from the generator
            indices = self._by_kind[is_image]
            shuffled = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()] * self._repeats
            count = len(shuffled) // per_position
            mine = shuffled[self.rank:count * per_position:self.world_size]  # this rank's share of the full batches
            batches[is_image] = [mine[b * self.batch_size:(b + 1) * self.batch_size] for b in range(count)]
        sequence = [True] * len(batches[True]) + [False] * len(batches[False])
        next_of_kind = {is_image: iter(kind_batches) for is_image, kind_batches in batches.items()}
        return [next(next_of_kind[sequence[i]]) for i in torch.randperm(len(sequence), generator=generator).tolist()]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch, first = self.start
        while True:
            batches = self.epoch_batches(epoch)
            for batch_index in range(first, len(batches)):
                yield [(index, epoch, batch_index) for index in batches[batch_index]]
            epoch, first = epoch + 1, 0
