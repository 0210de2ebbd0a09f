"""The batches a run trains on, period by period: sources, buckets, the latent caches, the loader and the encoding ahead
of the step, and the switch to the next period's data (:mod:`sat_video.training.progressive`)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from sat_video.common.errors import DataError
from sat_video.common.files import atomic_write
from sat_video.data.buckets import Bucket, assign_buckets, bucket_table, parse_buckets
from sat_video.data.clips import ClipSpec, VideoDataset, collate, source_shape
from sat_video.data.latent_cache import CachedBatch, LatentCache, cache_settings, collate_cached
from sat_video.data.run_cache import GIB, RunLatentCache, run_cache_settings, settings_digest
from sat_video.data.sampler import ClipBatchSampler
from sat_video.data.shard_dataset import ShardDataset
from sat_video.data.shard_index import KindRule, load_shard_infos
from sat_video.data.shard_reader import expand_shards
from sat_video.data.shard_stream import ShardBatchSampler, ShardPlan
from sat_video.data.sources import discover
from sat_video.diffusion.sampling import module_dtype
from sat_video.model.stages import FrozenStages
from sat_video.training.batch_encoding import BatchEncoder, EncodeAhead
from sat_video.training.checkpoint import LoopState
from sat_video.training.distributed import DistributedEnv, gather_objects
from sat_video.training.progressive import TrainingPeriod, period_of
from sat_video.training.run_folder import RunFolder
from sat_video.training.sequence_parallel import ParallelLayout
from sat_video.training.step_profile import StepProfile

logger = logging.getLogger("sat_video.train")


class DataPipeline:
    """The current period's data set, from ``state.data_position`` on.

    Shares the run's :class:`~sat_video.training.checkpoint.LoopState`: it advances ``data_position``, sets ``period``
    when it switches and adds to ``skipped_files``. Building a period's data is collective with ``data.buckets`` (the
    ranks share the header reads). ``profile`` gets the ``data_wait`` and ``encode`` time of each batch. With
    ``data.shards`` each rank streams its own shards (:mod:`sat_video.data.shard_stream`) and ``state.data_stream`` keeps
    where its stream is.
    """

    def __init__(self, cfg: DictConfig, env: DistributedEnv, layout: ParallelLayout, run_folder: RunFolder, state: LoopState,
                 profile: StepProfile, periods: list[TrainingPeriod]):
        self.cfg, self.env, self.layout, self.run_folder = cfg, env, layout, run_folder
        self.state, self.profile, self.periods = state, profile, periods
        self.cached = bool(cfg.data.latent_cache)
        self.run_cache: RunLatentCache | None = None
        self.bucket: str | None = None
        """Of the last batch."""
        self._encode_with: tuple[FrozenStages, bool] | None = None
        self._batches: EncodeAhead | None = None
        self.shard_plan: ShardPlan | None = None
        self._shard_batches: ShardBatchSampler | None = None
        self._build(periods[state.period])

    @property
    def micro_batch_size(self) -> int:
        return self.period.cfg.train.micro_batch_size

    def _build(self, period: TrainingPeriod) -> None:
        """The data set, clip settings and sampler kinds of ``period``."""
        cfg = period.cfg
        self.period = period
        self.clip_spec = ClipSpec.from_config(cfg.data, cfg.model.dit)
        self.shard_plan = None
        if self.cached:
            self.dataset = LatentCache(cfg.data.latent_cache)
            self.dataset.check_compatible(cfg.model, cfg.data)
            self.kinds, self.collate = self.dataset.kinds, collate_cached
            self.state.note_skipped(self.dataset.skipped)
            return
        if cfg.data.shards:
            self._build_shards(cfg)
            return
        refs = discover(list(cfg.data.sources))
        buckets = self._assign_buckets(refs, cfg) if cfg.data.buckets else None
        if buckets is not None:
            refs = [ref for ref, _ in buckets]
            if not refs:
                reasons = "; ".join(f"{path}: {reason}" for path, reason in self.state.skipped_files[:3])
                raise DataError(f"no clip fits data.buckets, e.g. {reasons}")
        self.dataset = VideoDataset(refs, self.clip_spec, None if buckets is None else [b for _, b in buckets], cfg.train.seed)
        self.dataset.first_usable()
        self.kinds, self.collate = self.dataset.kinds, collate
        self.run_cache = self._run_cache(cfg)

    def _build_shards(self, cfg: DictConfig) -> None:
        """A period on shards: their plan from the index alone (nothing probed), and ``buckets.json`` as counts."""
        buckets = parse_buckets(cfg.data.buckets, cfg.model.dit.patch_size) if cfg.data.buckets else None
        rule = KindRule(self.clip_spec, buckets, cfg.data.max_upscale)
        infos = load_shard_infos(expand_shards(list(cfg.data.shards)), cfg.data.shard_timeout_s)
        self.shard_plan = ShardPlan(infos, rule, cfg.train.micro_batch_size, self.layout.data_size, cfg.train.seed)
        self.dataset = ShardDataset(self.clip_spec, rule.buckets, cfg.train.seed)
        self.kinds, self.collate = None, collate
        self.run_cache = self._run_cache(cfg)
        totals = self.shard_plan.totals()
        unusable = totals.pop(None, 0)
        if self.env.is_main:
            logger.info("%d shard(s), %d sample(s) by the index (%d of no kind at this config)", len(infos),
                        sum(totals.values()) + unusable, unusable)
            if buckets is not None:
                table = {b.name: totals.get(b.name, 0) for b in sorted(buckets)}
                name = "buckets.json" if len(self.periods) == 1 else f"buckets-stage{self.period.index}.json"
                atomic_write(self.run_folder.path / name, lambda tmp: tmp.write_text(json.dumps(table, indent=1)))
                logger.info("clips per bucket:\n%s", bucket_table(table))

    def _run_cache(self, cfg: DictConfig) -> RunLatentCache | None:
        """The in-run latent cache of a period's data, when it is on and exact."""
        data = cfg.data
        if not data.cache_latents:
            return None
        if data.random_start:
            if self.env.is_main:
                logger.info("in-run latent cache off: data.random_start cuts a different clip from each video every epoch")
            return None
        settings = run_cache_settings(cache_settings(cfg.model, data), list(data.sources), list(data.shards))
        root = Path(data.cache_dir) if data.cache_dir else self.run_folder.path / "run_cache"
        cache = RunLatentCache(root / settings_digest(settings), int(data.cache_memory_gb * GIB), int(data.cache_disk_gb * GIB),
                               self.layout.data_size)
        if self.env.is_main:
            logger.info("in-run latent cache: up to %g GiB in memory per rank, then up to %g GiB in %s",
                        data.cache_memory_gb, data.cache_disk_gb, cache.folder)
        return cache

    def _assign_buckets(self, refs: list, cfg: DictConfig) -> list:
        """Each clip's bucket, from headers only; the ranks share the files. Writes ``buckets.json`` and logs the table;
        clips that fit no bucket join the skipped files."""
        env = self.env
        buckets = parse_buckets(cfg.data.buckets, cfg.model.dit.patch_size)
        mine = list(range(env.rank, len(refs), env.world_size))
        assigned, skipped = assign_buckets([refs[i] for i in mine], buckets, lambda ref: source_shape(ref, self.clip_spec),
                                           cfg.data.max_upscale, self.clip_spec.min_frames)
        bucket_of = {str(ref.path): bucket for ref, bucket in assigned}
        merged_buckets, merged_skipped = {}, set()
        for part_buckets, part_skipped in gather_objects((bucket_of, skipped)):
            merged_buckets.update(part_buckets)
            merged_skipped.update(map(tuple, part_skipped))
        self.state.note_skipped(sorted(merged_skipped))
        result = [(ref, merged_buckets[str(ref.path)]) for ref in refs if str(ref.path) in merged_buckets]
        table = {b.name: [str(ref.path) for ref, rb in result if rb == b] for b in sorted(buckets)}
        if env.is_main:
            name = "buckets.json" if len(self.periods) == 1 else f"buckets-stage{self.period.index}.json"
            atomic_write(self.run_folder.path / name, lambda tmp: tmp.write_text(json.dumps(table, indent=1)))
            logger.info("clips per bucket (%d fit none):\n%s", len(merged_skipped), bucket_table(table))
        return result

    def open(self, frozen_stages: FrozenStages | None, image_condition: bool = False) -> None:
        """Start loading from ``state.data_position``, encoding with ``frozen_stages`` (``image_condition``: I2V, which also
        needs each clip's first frame) ``data.prefetch`` batches ahead; ``None``: the decoded clips as they are (a VAE
        trains on pixels)."""
        self._encode_with = frozen_stages, image_condition
        self._open_loader()

    def _sampler(self, data_rank: int, data_size: int) -> ClipBatchSampler | ShardBatchSampler:
        if self.shard_plan is not None:
            data = self.period.cfg.data
            return ShardBatchSampler(self.shard_plan, data_rank, data.shuffle_buffer, data.shard_timeout_s,
                                     start=self.state.data_position, state=self.state.data_stream)
        weights = self.period.cfg.data.bucket_weights
        return ClipBatchSampler(
            self.kinds,
            self.micro_batch_size,
            data_rank,
            data_size,
            self.cfg.train.seed,
            start=self.state.data_position,
            weights={Bucket.from_name(name): float(w) for name, w in weights.items()} if weights else None,
            drawn=self.state.data_drawn,
        )

    def continue_epoch(self, saved_data_size: int) -> None:
        """After a resume written by ``saved_data_size`` data-parallel ranks (:mod:`~sat_video.training.elastic_resume`):
        the samples its epoch has drawn on all of them, so that this run's ranks are dealt the rest of the epoch."""
        if self.shard_plan is not None:
            raise DataError("train.resume_layout=elastic cannot continue a data.shards stream on another number of "
                            "data-parallel ranks: each rank's position is in its own shards; resume on the same layout")
        epoch, position = self.state.data_position
        drawn = set(self.state.data_drawn)
        for rank in range(saved_data_size):
            sampler = self._sampler(rank, saved_data_size)
            drawn.update(index for batch in sampler.epoch_batches(epoch, sampler.drawn)[:position] for index in batch)
        self.state.data_position, self.state.data_drawn = (epoch, 0), sorted(drawn)
        if self.env.is_main:
            logger.info("epoch %d continues on %d data-parallel rank(s) without its %d sample(s) drawn before", epoch,
                        self.layout.data_size, len(drawn))

    def _open_loader(self) -> None:
        self.close()
        sampler = self._sampler(self.layout.data_rank, self.layout.data_size)
        self._shard_batches = sampler if isinstance(sampler, ShardBatchSampler) else None
        if self.run_cache is not None and self._shard_batches is not None:  # keyed by sample key; bytes stay in workers
            sampler = self.run_cache.planned(sampler, key=lambda item: item[0].key, pending=False)
        elif self.run_cache is not None:
            sampler = self.run_cache.planned(sampler)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.cfg.data.num_workers,
            collate_fn=self.collate,
            pin_memory=self.env.device.type == "cuda",
            persistent_workers=self.cfg.data.num_workers > 0,
        )
        if self.cached:
            encode = lambda batch: batch.to(self.env.device)  # noqa: E731 - already encoded
        elif self._encode_with[0] is None:
            encode = lambda batch: batch  # noqa: E731 - pixels, moved by the step
        else:
            frozen_stages, image_condition = self._encode_with
            encode = BatchEncoder(frozen_stages, self.dataset, self.run_cache, self.env.device,
                                  module_dtype(frozen_stages.first_stage), image_condition)
        self._batches = EncodeAhead(iter(loader), encode, self.cfg.data.prefetch, self.env.device)

    def enter_period_of(self, iteration: int) -> None:
        """Switch to the period that trains 1-based ``iteration`` at its first iteration: its data from the start."""
        if iteration <= self.period.until:
            return
        period = period_of(self.periods, iteration)
        self.state.period, self.state.data_position, self.state.data_drawn = period.index, (0, 0), []
        self.state.data_stream = {}
        self._build(period)
        if self.env.is_main:
            logger.info("stage %d from iteration %d: %s", period.index, period.start + 1,
                        ", ".join(f"{k}={v}" for k, v in self.cfg.train.stages[period.index].set.items()) or "run config")
        self._open_loader()

    def next_batch(self) -> CachedBatch:
        """The next encoded batch; ``state.data_position`` moves past it."""
        waited = time.perf_counter()
        encoded = next(self._batches)
        self.profile.add("data_wait", time.perf_counter() - waited)
        self.profile.add("encode", encoded.encode_s)
        batch = encoded.batch
        if batch.position[0] != self.state.data_position[0]:
            self.state.data_drawn = []  # a continued epoch is over
        self.state.data_position = (batch.position[0], batch.position[1] + 1)
        self.bucket = batch.bucket
        self.state.note_skipped(batch.skipped)
        if self._shard_batches is not None:
            self.state.data_stream = self._shard_batches.state_after(batch.position)
            self.state.note_skipped(self._shard_batches.take_skipped())
        return batch

    def record_fields(self) -> dict:
        """The data's fields of a metrics record: epoch, the in-run cache since the last record, the last bucket."""
        record = {"epoch": self.state.data_position[0]}
        if self.run_cache is not None:
            counts = self.run_cache.take_counts()
            record["cache_hit_rate"] = counts.hit_rate
            record["cache_memory_gb"] = self.run_cache.memory_used / GIB
            if counts.late or counts.dropped:
                logger.warning("in-run latent cache: %d clip(s) decoded late in the step, %d not kept (budgets full: "
                               "data.cache_memory_gb, data.cache_disk_gb)", counts.late, counts.dropped)
        if self.bucket is not None:
            record["bucket"] = self.bucket
        return record

    def paused(self) -> contextlib.AbstractContextManager:
        """No encoding ahead meanwhile (validation wants the frozen stages and the device to itself)."""
        return self._batches.paused() if self._batches is not None else contextlib.nullcontext()

    def close(self) -> None:
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def report(self) -> None:
        """At the end of the run (collective): the in-run cache's use, and every rank's skipped files in
        ``skipped_files.txt``."""
        if self.run_cache is not None and self.env.is_main:
            logger.info("in-run latent cache at the end: %s", self.run_cache.describe())
        merged = sorted({item for items in gather_objects(self.state.skipped_files) for item in items})
        if not self.env.is_main:
            return
        report = self.run_folder.path / "skipped_files.txt"
        if merged:
            lines = [f"{path}\t{reason}" for path, reason in merged]
            atomic_write(report, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
            logger.warning("skipped %d unusable file(s) (list in %s):\n  %s", len(merged), report, "\n  ".join(lines))
        else:
            logger.info("no unusable files met")
