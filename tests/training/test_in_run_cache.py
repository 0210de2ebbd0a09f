"""The in-run latent cache and encoding ahead, in-process on real mp4 clips: the same encoded batches with and without
the cache (memory, disk spill, reuse after a restart, entries not kept), no decoding of cached clips, errors of the
encoding thread raised in the training thread."""

import pytest
import torch

import sat_video.data.clips as clips_module
from sat_video.data.clips import ClipSpec, VideoDataset, collate
from sat_video.data.latent_cache import TENSORS
from sat_video.data.run_cache import RunLatentCache
from sat_video.data.sampler import ClipBatchSampler
from sat_video.data.sources import discover
from sat_video.model.build import build_frozen_stages
from sat_video.training.batch_encoding import BatchEncoder, EncodeAhead
from tests.conftest import tiny_config
from tests.numerics import assert_close_rel

CPU = torch.device("cpu")
BATCH = 2  # 4 clips: 2 batches per epoch


@pytest.fixture(scope="module")
def setup(train_assets):
    cfg = tiny_config(  # I2V: the first frame is kept too
        "cogvideox_5b_i2v", f"data.sources=[{train_assets / 'data'}]", f"model.text_encoder.path={train_assets / 't5'}",
        "model.first_stage.path=null", "model.first_stage.architecture.block_out_channels=[8,8,16,16]",
        "model.first_stage.architecture.layers_per_block=1", "model.first_stage.architecture.norm_num_groups=4",
        "data.skip_frames=0", "model.dit.num_frames=9",
    )
    dataset = VideoDataset(discover([train_assets / "data"]), ClipSpec.from_config(cfg.data, cfg.model.dit))
    return build_frozen_stages(cfg.model), dataset


@pytest.fixture
def decodes(monkeypatch):
    """Clips decoded from their files."""
    count = [0]
    load = clips_module.load_clip

    def counting(*args, **kwargs):
        count[0] += 1
        return load(*args, **kwargs)

    monkeypatch.setattr(clips_module, "load_clip", counting)
    return count


def encoded(setup, cache, *, epochs=2, depth=0, start=(0, 0), workers=0):
    stages, dataset = setup
    sampler = ClipBatchSampler(dataset.kinds, BATCH, 0, 1, seed=0, start=start)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=cache.planned(sampler) if cache else sampler, collate_fn=collate,
                                         num_workers=workers)
    ahead = EncodeAhead(iter(loader), BatchEncoder(stages, dataset, cache, CPU, torch.float32, True), depth, CPU)
    batches = [next(ahead).batch for _ in range(epochs * len(dataset) // BATCH)]
    ahead.close()
    return batches


def assert_same(batches, reference):
    """Equal up to the VAE's float rounding, which depends on what else is in the batch being encoded."""
    assert len(batches) == len(reference)
    for got, want in zip(batches, reference):
        assert (got.position, got.paths, got.captions) == (want.position, want.paths, want.captions)
        for name in TENSORS:
            assert_close_rel(getattr(got, name), getattr(want, name), what=name)


@pytest.fixture(scope="module")
def reference(setup):
    return encoded(setup, None)


def entry_bytes(batch) -> int:
    return sum(getattr(batch, name)[0].nbytes for name in TENSORS)


def test_cached_epochs_decode_nothing_spill_to_disk_and_a_restart_reuses_the_disk(setup, reference, decodes, tmp_path):
    folder = tmp_path / "cache"
    cache = RunLatentCache(folder, memory_bytes=entry_bytes(reference[0]), disk_bytes=2**30)  # one entry in memory
    assert_same(encoded(setup, cache), reference)
    assert decodes[0] == 4  # the first epoch only
    assert cache.take_counts().hit_rate == 0.5  # 4 encoded, then 4 served
    assert len(list(folder.glob("*.safetensors"))) == 3 and len(cache._memory) == 1

    decodes[0] = 0  # a restarted run: memory is gone, the disk is reused, from the second epoch on
    restarted = RunLatentCache(folder, memory_bytes=entry_bytes(reference[0]), disk_bytes=2**30)
    assert_same(encoded(setup, restarted, epochs=1, start=(1, 0)), reference[2:])
    assert decodes[0] == 1
    counts = restarted.take_counts()
    assert (counts.disk_hits, counts.encoded) == (3, 1)


def test_encoding_ahead_in_a_thread_gives_the_same_batches(setup, reference, tmp_path):
    assert_same(encoded(setup, RunLatentCache(tmp_path, 2**30, 2**30), depth=2), reference)


def test_clips_whose_entries_were_not_kept_are_decoded_in_the_step(setup, reference, decodes, tmp_path):
    """A worker plans batches ahead of their encoding: it skips clips whose entries then find both budgets full."""
    size = entry_bytes(reference[0])
    cache = RunLatentCache(tmp_path, memory_bytes=0, disk_bytes=size + size // 2)  # room for one entry
    assert_same(encoded(setup, cache, workers=1), reference)
    counts = cache.take_counts()
    assert counts.late > 0 and counts.dropped >= 3 and counts.disk_hits >= 1
    assert decodes[0] == counts.late  # in the training process; the worker decoded the rest


def test_an_error_while_encoding_ahead_is_raised_by_the_step_that_needs_the_batch():
    def broken(batch):
        raise ValueError(f"cannot encode {batch}")

    ahead = EncodeAhead(iter(["batch 0"]), broken, 1, CPU)
    with pytest.raises(ValueError, match="cannot encode batch 0"):
        next(ahead)
    ahead.close()
    finite = EncodeAhead(iter(["a"]), str.upper, 1, CPU)
    assert next(finite).batch == "A"
    with pytest.raises(StopIteration):
        next(finite)
    finite.close()
