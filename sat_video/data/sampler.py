"""The order in which ranks draw batches, resumable at any ``(epoch, batch)`` position, and on another number of ranks
from the set of samples an epoch has already drawn."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Collection, Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch

from sat_video.common.errors import DataError

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

    An epoch continued on another number of ranks (``drawn``: its samples already drawn, an elastic resume) is planned
    from the same shuffled lists without those samples: the rest, the previous plan's leftover included, is dealt to the
    ranks as above, and a last batch per rank takes what is left of a kind when that is at least one sample per rank
    (the batches of that position are then smaller, and may differ by one sample between ranks). So no sample is drawn
    twice in that epoch, and only a rest of fewer samples than ranks is not drawn (a warning says so).

    A data set too small for one batch of either kind on every rank repeats each kind's shuffled list (both the
    same number of times) until the larger kind fills one (ranks then see overlapping samples). A kind with fewer than
    ``world_size * batch_size`` samples (after that repetition) gets no batch at all; a warning says so.

    With ``data.buckets`` the kinds are the samples' buckets (:attr:`sat_video.data.VideoDataset.kinds`): everything
    above holds per bucket, so no batch mixes buckets and all ranks draw the same bucket at every position. With
    ``weights`` (``data.bucket_weights``) each position draws its kind with those relative weights instead, cycling
    through that kind's batches of the epoch (the epoch keeps its number of positions).

    Args:
        kinds: what a batch must not mix, per sample: ``is_image`` (``[ref.is_image for ref in refs]``) or a bucket.
        batch_size: samples per batch (per rank).
        rank, world_size: this rank among the data-parallel ranks.
        seed: shuffling seed; must be the same on every rank.
        start: ``(epoch, batch index)`` of the first batch to yield; to resume after the batch at position
            ``(e, b)``, pass ``(e, b + 1)`` (past the end of an epoch moves on to the next one).
        weights: relative weight per kind; kinds not listed are never drawn.
        drawn: samples of epoch ``start[0]`` drawn before (by any rank); that epoch deals only the others, from
            ``start[1]`` of its new plan.
    """

    def __init__(self, kinds: Sequence[Hashable], batch_size: int, rank: int, world_size: int, seed: int,
                 start: tuple[int, int] = (0, 0), weights: Mapping[Hashable, float] | None = None,
                 drawn: Collection[int] = ()):
        if not kinds:
            raise ValueError("ClipBatchSampler needs at least one sample")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, found {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), found {rank}")
        if seed < 0 or min(start) < 0:
            raise ValueError(f"seed and start must be non-negative, found seed={seed}, start={start}")
        self.kinds = list(kinds)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start = (int(start[0]), int(start[1]))
        self.weights = dict(weights) if weights is not None else None
        self.drawn = frozenset(drawn)
        # A fixed order of kinds (images before videos), so that every rank makes the same draws.
        groups = sorted(set(self.kinds), key=lambda kind: (0, not kind) if isinstance(kind, bool) else (1, kind))
        self._by_kind = {group: [index for index, kind in enumerate(self.kinds) if kind == group] for group in groups}
        per_position = batch_size * world_size  # samples of one kind that one position takes from all ranks
        self._repeats = max(1, -(-per_position // max(map(len, self._by_kind.values()))))  # ceil: the tiny-data-set case
        for group, indices in self._by_kind.items():
            if len(indices) * self._repeats < per_position:
                name = ("image" if group else "video") if isinstance(group, bool) else f"bucket {group.name}"
                logger.warning("%d %s sample(s) cannot fill a batch of %d on each of %d ranks at the same step "
                               "(needs %d); no %s batch is drawn", len(indices), name, batch_size, world_size,
                               per_position, name)

    def epoch_batches(self, epoch: int, drawn: Collection[int] = ()) -> list[list[int]]:
        """This rank's batches (sample indices) of ``epoch``, in order; ``drawn``: samples of the epoch drawn before."""
        mixed_seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0])
        generator = torch.Generator().manual_seed(mixed_seed)
        per_position = self.batch_size * self.world_size
        batches: dict[Hashable, list[list[int]]] = {}
        for group, indices in self._by_kind.items():  # in the fixed order of kinds: the same draws on every rank
            shuffled = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()] * self._repeats
            if drawn:
                shuffled = [index for index in shuffled if index not in drawn]
            count = len(shuffled) // per_position
            mine = shuffled[self.rank:count * per_position:self.world_size]  # this rank's share of the full batches
            batches[group] = [mine[b * self.batch_size:(b + 1) * self.batch_size] for b in range(count)]
            rest = shuffled[count * per_position:]
            if drawn and len(rest) >= self.world_size:  # a continued epoch draws its rest: one smaller batch per rank
                batches[group].append(rest[self.rank::self.world_size])
            elif drawn and rest and self.rank == 0:
                logger.warning("%d sample(s) left in continued epoch %d cannot give each of %d ranks one; they are not "
                               "drawn this epoch", len(rest), epoch, self.world_size)
        sequence = [group for group, group_batches in batches.items() for _ in group_batches]
        if self.weights is None:
            order = [sequence[i] for i in torch.randperm(len(sequence), generator=generator).tolist()]
        else:
            drawn = [group for group in batches if batches[group] and self.weights.get(group, 0) > 0]
            if not drawn:
                raise DataError(f"no kind with a positive weight ({self.weights}) has a full batch of "
                                f"{self.batch_size} on each of {self.world_size} rank(s)")
            probabilities = torch.tensor([float(self.weights[group]) for group in drawn], dtype=torch.float64)
            picks = torch.multinomial(probabilities, len(sequence), replacement=True, generator=generator).tolist()
            order = [drawn[i] for i in picks]
        next_of_kind = {group: itertools.cycle(group_batches) for group, group_batches in batches.items() if group_batches}
        return [next(next_of_kind[group]) for group in order]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch, first = self.start
        drawn = self.drawn
        while True:
            batches = self.epoch_batches(epoch, drawn)
            for batch_index in range(first, len(batches)):
                yield [(index, epoch, batch_index) for index in batches[batch_index]]
            epoch, first, drawn = epoch + 1, 0, frozenset()
