"""The order in which ranks draw batches from shards: every rank streams its own shards, all ranks draw the same bucket
at every step, and a run resumes at any batch exactly.

Epoch ``e`` is planned from ``(seed, e)`` and the shards' index alone, identically on every rank and without
communication (:meth:`ShardPlan.epoch`):

1. the shards are shuffled and dealt to the ranks (rank ``r`` of ``D`` takes ``order[r::D]``);
2. from the index, each rank's samples per kind (bucket) are known; kind ``k`` gets ``min over ranks of count // B``
   batches (``B`` samples per rank), so every rank can fill every one;
3. the sequence of kinds of the epoch's batches is shuffled. Batch ``b`` of every rank is of kind ``sequence[b]``: ranks
   never disagree on which parameters a step reaches (what ZeRO-2 needs, as :class:`~sat_video.data.sampler.ClipBatchSampler`
   guarantees for folders).

A rank then reads its shards in that order (:class:`RankStream`), through a shuffle buffer of ``data.shuffle_buffer``
samples (draws from a counter-based generator of ``(seed, e, r)``), into one queue per kind; batch ``b`` takes the next
``B`` samples of the queue of ``sequence[b]``, reading on until it has them. What a rank reads beyond the epoch's batches
(fewer than ``B`` per kind, plus the difference between ranks) is not drawn that epoch, as a folder epoch's leftover.

Exact resume: after each batch the stream's state is a few numbers and the positions ``(shard, member)`` of the samples
it holds (:meth:`RankStream.state`), which the checkpoint keeps; resuming re-reads those samples and skips to the cursor,
so the resumed run draws what the uninterrupted one would, mid-shard and across epochs.

Faults: a bad sample (no json, no video, a json without its fields, a shape that fits no kind) is skipped and named
``<shard>:<key>``; a shard that cannot be read to its end (cut short, corrupt, a ``pipe:`` command that fails or stalls
past ``data.shard_timeout_s``) ends with a warning naming it. Either can leave a kind's queue short of the plan at the
end of an epoch: the rank then repeats the last sample it drew of that kind (with a warning), so ranks stay in step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from sat_video.common.errors import DataError, UnusableSample
from sat_video.data.shard_index import KindRule, SampleShape, ShardInfo
from sat_video.data.shard_reader import ShardReadError, read_samples
from sat_video.data.sources import IMAGE_SUFFIXES, VIDEO_SUFFIXES

logger = logging.getLogger("sat_video.data")

MEDIA = {suffix[1:]: suffix in IMAGE_SUFFIXES for suffix in VIDEO_SUFFIXES + IMAGE_SUFFIXES}
"""Member extension -> whether it is an image."""


@dataclass(frozen=True)
class ShardSample:
    """One sample of a shard, as the batch sampler hands it to a loader worker (:mod:`sat_video.data.shard_dataset`).

    ``key`` names it in the run's latent cache; ``name`` (``<shard>:<key>``) in messages; ``origin`` is ``(shard
    position in the rank's epoch, member number in the shard)``; ``width`` x ``height`` are what its json declares."""

    key: str
    name: str
    origin: tuple[int, int]
    kind: str
    caption: str
    ext: str
    data: bytes
    width: int
    height: int
    is_image: bool


@dataclass(frozen=True)
class EpochPlan:
    """Which shards each rank reads in an epoch, in order, and the kind of each batch."""

    rank_shards: list[list[int]]
    sequence: list[str]


class ShardPlan:
    """The shards of a run (or stage) and their samples per kind, from the index; plans epochs the same on every rank.

    Raises:
        DataError: fewer shards than data-parallel ranks, or too few samples of any kind for one batch on every rank.
    """

    def __init__(self, infos: list[ShardInfo], rule: KindRule, batch_size: int, world_size: int, seed: int):
        if len(infos) < world_size:
            raise DataError(f"data.shards: {len(infos)} shard(s) for {world_size} data-parallel ranks; each rank streams "
                            f"its own shards: write at least {world_size} (tools/make_shards.py --samples-per-shard)")
        self.infos, self.rule = infos, rule
        self.batch_size, self.world_size, self.seed = batch_size, world_size, seed
        self.counts = [rule.counts(info) for info in infos]
        self._epochs: dict[int, EpochPlan] = {}
        if not self.epoch(0).sequence:
            totals = sum(self.counts, Counter())
            unusable = totals.pop(None, 0)
            raise DataError(f"data.shards: too few samples for a batch of {batch_size} of one kind on each of {world_size} "
                            f"rank(s): {dict(totals) or 'none usable'} ({unusable} of no kind at this config: too short, "
                            f"too large or fitting no bucket)")

    def totals(self) -> Counter:
        """Samples per kind in all the shards (``None``: of no kind)."""
        return sum(self.counts, Counter())

    def epoch(self, epoch: int) -> EpochPlan:
        if epoch not in self._epochs:
            self._epochs = {epoch: self._plan(epoch)}  # epochs are met in order: keep one
        return self._epochs[epoch]

    def _plan(self, epoch: int) -> EpochPlan:
        generator = np.random.default_rng([self.seed, epoch])
        order = generator.permutation(len(self.infos)).tolist()
        rank_shards = [order[rank::self.world_size] for rank in range(self.world_size)]
        per_rank = [sum((self.counts[shard] for shard in shards), Counter()) for shards in rank_shards]
        kinds = sorted({kind for counts in per_rank for kind in counts if kind is not None})
        batches = {kind: min(counts[kind] for counts in per_rank) // self.batch_size for kind in kinds}
        sequence = [kind for kind in kinds for _ in range(batches[kind])]
        return EpochPlan(rank_shards, [sequence[i] for i in generator.permutation(len(sequence)).tolist()])


def cache_key(url: str, key: str) -> str:
    """A sample's key in the run's latent cache: a file name, never all digits (those are folder samples' indices)."""
    return "s" + hashlib.sha256(f"{url}\0{key}".encode()).hexdigest()[:24]


class RankStream:
    """One rank's samples of one epoch: its shards in order, through the shuffle buffer, into one queue per kind.

    ``skipped`` collects ``(name, reason)`` of the bad samples and shards met. ``state``: from :meth:`state` of the
    same epoch, to continue where that stream was.
    """

    def __init__(self, plan: ShardPlan, epoch: int, rank: int, buffer_size: int, timeout_s: float,
                 skipped: list[tuple[str, str]], state: dict | None = None):
        self.plan, self.epoch, self.rank = plan, epoch, rank
        self.buffer_size, self.timeout_s, self.skipped = max(1, buffer_size), timeout_s, skipped
        self.shards = [plan.infos[i] for i in plan.epoch(epoch).rank_shards[rank]]
        self.shard, self.member, self.draws = 0, 0, 0  # cursor: the next shard to read and members read from it
        self.buffer: list[ShardSample] = []
        self.queues: dict[str, deque[ShardSample]] = {}
        self.last: dict[str, ShardSample] = {}
        self._reader: Iterator[dict] | None = None
        self._bitgen = np.random.PCG64(np.random.SeedSequence([plan.seed, epoch, rank]))
        if state:
            self._restore(state)
        self._uniform = np.random.Generator(self._bitgen)

    # -------------------------------------------------------------------------------------------- reading

    def _sample(self, position: int, member: int, group: dict) -> ShardSample | None:
        """The sample of a shard's member group, or ``None`` (named in ``skipped``) when it is unusable."""
        url, key = self.shards[position].url, group.get("__key__", "?")
        name = f"{url}:{key}"
        try:
            media = [ext for ext in group if ext in MEDIA]
            if "json" not in group or len(media) != 1:
                found = ", ".join(sorted(ext for ext in group if not ext.startswith("__")))
                raise UnusableSample(name, f"expected one video or image member and one json member, found: {found}")
            try:
                meta = json.loads(group["json"])
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise UnusableSample(name, f"its json does not parse ({err})") from None
            caption = meta.get("caption") if isinstance(meta, dict) else None
            if not isinstance(caption, str) or not caption.strip():
                raise UnusableSample(name, f"its json's 'caption' must be a non-empty string, found {caption!r}")
            shape = SampleShape.from_metadata(meta, MEDIA[media[0]], name)
            kind = self.plan.rule.of(shape, name)
        except UnusableSample as err:
            logger.warning("skipping %s: %s", err.path, err.reason)
            self.skipped.append((err.path, err.reason))
            return None
        return ShardSample(cache_key(url, key), name, (position, member), kind, caption.strip(), media[0],
                           group[media[0]], shape.width, shape.height, shape.is_image)

    def _groups(self, position: int, skip: int = 0) -> Iterator[dict]:
        """The member groups of shard ``position``, from member ``skip`` on."""
        groups = read_samples(self.shards[position].url, self.timeout_s)
        for _ in range(skip):
            next(groups, None)
        return groups

    def _raw(self) -> ShardSample | None:
        """The next usable sample in shard order; ``None`` at the end of the epoch's shards."""
        while self.shard < len(self.shards):
            info = self.shards[self.shard]
            try:
                if self._reader is None:
                    self._reader = self._groups(self.shard, self.member)
                group = next(self._reader, None)
            except ShardReadError as err:
                self._end_shard(info, f"{err.reason}; the rest of the shard is skipped this epoch")
                continue
            if group is None:
                if self.member < info.samples:
                    self._end_shard(info, f"ended after {self.member} of the {info.samples} samples its index lists "
                                          f"(truncated?)")
                else:
                    self._end_shard(info, None)
                continue
            self.member += 1
            sample = self._sample(self.shard, self.member - 1, group)
            if sample is not None:
                return sample
        return None

    def _end_shard(self, info: ShardInfo, problem: str | None) -> None:
        if problem is not None:
            logger.warning("shard %s: %s", info.url, problem)
            self.skipped.append((info.url, problem))
        self._reader = None
        self.shard, self.member = self.shard + 1, 0

    def _shuffled(self) -> ShardSample | None:
        while len(self.buffer) < self.buffer_size:
            sample = self._raw()
            if sample is None:
                break
            self.buffer.append(sample)
        if len(self.buffer) > 1:
            self.draws += 1
            j = int(self._uniform.random() * len(self.buffer))  # one 64-bit draw: a resume advances by the count
            self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop() if self.buffer else None

    def take(self, kind: str, count: int) -> list[ShardSample]:
        """The next ``count`` samples of ``kind``; repeats the last one drawn when the rank's shards have run out of it."""
        queue = self.queues.setdefault(kind, deque())
        while len(queue) < count:
            sample = self._shuffled()
            if sample is None:
                break
            self.queues.setdefault(sample.kind, deque()).append(sample)
        batch = [queue.popleft() for _ in range(min(count, len(queue)))]
        if len(batch) < count:
            spare = batch[-1] if batch else self.last.get(kind)
            if spare is None:
                raise DataError(f"data.shards: rank {self.rank} has no sample of {kind} left in epoch {self.epoch} "
                                f"(its shards lost samples the index lists: see the warnings above)")
            logger.warning("rank %d: no %s sample left in epoch %d (samples lost to bad shards); repeating %s", self.rank,
                           kind, self.epoch, spare.name)
            batch += [spare] * (count - len(batch))
        self.last[kind] = batch[-1]
        return batch

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    # ---------------------------------------------------------------------------------------------- state

    def state(self) -> dict:
        """Where the stream is: plain types, for the checkpoint."""
        return {"epoch": self.epoch, "shard": self.shard, "member": self.member, "draws": self.draws,
                "buffer": [list(s.origin) for s in self.buffer],
                "queues": {kind: [list(s.origin) for s in queue] for kind, queue in self.queues.items() if queue},
                "last": {kind: list(s.origin) for kind, s in self.last.items()}}

    def _restore(self, state: dict) -> None:
        """Re-read the samples ``state`` holds and continue from its cursor."""
        self.shard, self.member, self.draws = state["shard"], state["member"], state["draws"]
        self._bitgen.advance(self.draws)
        wanted = {tuple(origin) for origin in [*state["buffer"], *state["last"].values(),
                                               *(o for queue in state["queues"].values() for o in queue)]}
        found: dict[tuple[int, int], ShardSample] = {}
        for position in sorted({position for position, _ in wanted}):
            members = sorted(member for p, member in wanted if p == position)
            try:
                groups = self._groups(position)
                for member in range(members[-1] + 1):
                    group = next(groups, None)
                    if group is not None and member in members:
                        found[(position, member)] = self._sample(position, member, group)
                groups.close()
            except ShardReadError as err:
                raise DataError(f"cannot resume the data stream exactly: {err}") from None
        missing = [origin for origin in wanted if found.get(origin) is None]
        if missing:
            position, member = min(missing)
            raise DataError(f"cannot resume the data stream exactly: member {member} of {self.shards[position].url} was "
                            f"read before the checkpoint but is missing or unusable now (was the shard changed?)")
        self.buffer = [found[tuple(origin)] for origin in state["buffer"]]
        self.queues = {kind: deque(found[tuple(o)] for o in origins) for kind, origins in state["queues"].items()}
        self.last = {kind: found[tuple(origin)] for kind, origin in state["last"].items()}


class ShardBatchSampler:
    """Infinite batch sampler (``DataLoader(batch_sampler=...)``) yielding ``[(ShardSample, epoch, batch index), ...]``,
    the shards' counterpart of :class:`~sat_video.data.sampler.ClipBatchSampler` (plan in the module docstring).

    It runs in the training process (the loader's thread), which reads this rank's shards; loader workers decode.
    :meth:`state_after` gives the stream's state after a batch, for the checkpoint of the step that consumed it.

    Args:
        start: ``(epoch, batch index)`` of the first batch to yield.
        state: the stream's state before ``start`` (:meth:`state_after` of the batch before it); needed to resume
            anywhere but at the start of an epoch.
    """

    def __init__(self, plan: ShardPlan, rank: int, buffer_size: int, timeout_s: float,
                 start: tuple[int, int] = (0, 0), state: dict | None = None):
        self.plan, self.rank, self.buffer_size, self.timeout_s = plan, rank, buffer_size, timeout_s
        self.start = (int(start[0]), int(start[1]))
        if self.start[1] and (not state or (state.get("epoch"), state.get("batch")) != self.start):
            raise DataError(f"cannot resume in the middle of epoch {self.start[0]} of data.shards: the checkpoint holds no "
                            f"shard stream state for batch {self.start[1]} (was it written by a run on data.sources?)")
        self._resume_state = state if self.start[1] else None
        self.skipped: list[tuple[str, str]] = []
        self._snapshots: dict[tuple[int, int], dict] = {}
        self._lock = threading.Lock()  # the loader's thread adds snapshots, the training thread takes them

    def __iter__(self) -> Iterator[list[tuple[ShardSample, int, int]]]:
        epoch, first = self.start
        state = self._resume_state
        while True:
            sequence = self.plan.epoch(epoch).sequence
            if first >= len(sequence):  # resumed after an epoch's last batch
                epoch, first, state = epoch + 1, 0, None
                continue
            stream = RankStream(self.plan, epoch, self.rank, self.buffer_size, self.timeout_s, self.skipped, state)
            try:
                for batch_index in range(first, len(sequence)):
                    batch = stream.take(sequence[batch_index], self.plan.batch_size)
                    with self._lock:
                        self._snapshots[(epoch, batch_index)] = {**stream.state(), "batch": batch_index + 1}
                    yield [(sample, epoch, batch_index) for sample in batch]
            finally:
                stream.close()
            epoch, first, state = epoch + 1, 0, None

    def state_after(self, position: tuple[int, int]) -> dict:
        """The stream's state after the batch at ``position`` (read ahead by the loader); forgets earlier ones."""
        with self._lock:
            for earlier in [p for p in self._snapshots if p < tuple(position)]:
                del self._snapshots[earlier]
            return self._snapshots.pop(tuple(position))

    def take_skipped(self) -> list[tuple[str, str]]:
        """The bad samples and shards met since the last call (the streams keep appending to the same list)."""
        count = len(self.skipped)
        taken = self.skipped[:count]
        del self.skipped[:count]
        return taken
