"""Training from WebDataset shards: two ranks on shards draw per step what two ranks on the folders draw (same buckets,
same losses), and a run killed mid-epoch resumes exactly (mid-shard, shuffle buffer held, into the next epoch)."""

import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter

import pytest
import torch

from sat_video import load_config
from sat_video.data.buckets import assign_buckets, parse_buckets
from sat_video.data.clips import ClipSpec, source_shape
from sat_video.data.sampler import ClipBatchSampler
from sat_video.data.shard_index import ShardInfo
from sat_video.data.shard_stream import ShardPlan
from sat_video.data.shard_writer import ShardSettings, make_shards
from sat_video.data.sources import discover
from sat_video.formats.sat_checkpoint import read_state_dict
from tests.conftest import BUCKETS, ROOT
from tests.numerics import FLOAT32_RTOL, assert_close_rel
from tests.training.runs import BASE, command, launch, metrics, ok, run_keys, train_here

pytestmark = pytest.mark.slow

FOLDERS = ["four_three", "tall", "wide_long", "wide_short"]  # two clips each, one bucket each


def shard_keys(*patterns, buffer=0):
    return ["data.sources=[]", f"data.shards=[{','.join(repr(str(p)) for p in patterns)}]", f"data.shuffle_buffer={buffer}"]


def test_two_ranks_on_shards_draw_what_two_ranks_on_folders_draw(train_assets, bucket_clips, tmp_path):
    """8 clips, 4 buckets, 2 ranks, batches of 1: an epoch is 4 steps, one per bucket. Each rank's shard holds the clips
    the folder sampler deals that rank; a seed where both plans order the buckets alike gives the same steps."""
    common = ["train.train_iters=4", "train.micro_batch_size=1", f"data.buckets={json.dumps(BUCKETS[:4])}".replace(" ", "")]
    sources = [str(bucket_clips / name) for name in FOLDERS]
    cfg = load_config(BASE, run_keys(train_assets, tmp_path, *common, data=",".join(sources)))
    refs = discover(sources)
    spec = ClipSpec.from_config(cfg.data, cfg.model.dit)
    assigned, _ = assign_buckets(refs, parse_buckets(cfg.data.buckets, 2), lambda ref: source_shape(ref, spec), 1.0)
    kinds = [bucket for _, bucket in assigned]
    names = sorted({bucket.name for bucket in kinds})

    class EachKindOnce:  # both ranks' shards hold one clip of each bucket
        def counts(self, info):
            return Counter(names)

    for seed in range(1000):
        folder = [ClipBatchSampler(kinds, 1, rank, 2, seed).epoch_batches(0) for rank in range(2)]
        plan = ShardPlan([ShardInfo(str(i), 4, ()) for i in range(2)], EachKindOnce(), 1, 2, seed).epoch(0)
        if [kinds[batch[0]].name for batch in folder[0]] == plan.sequence:
            break
    shards = []
    for rank in range(2):  # the shard the plan deals rank r holds the clips the folder sampler deals it
        folder_r = tmp_path / f"rank{rank}"
        for (index,) in folder[rank]:
            path = refs[index].path
            for part, suffix in (("videos", path.suffix), ("labels", ".txt")):
                (folder_r / part).mkdir(parents=True, exist_ok=True)
                name = f"{path.parent.parent.name}_{path.stem}{suffix}"
                shutil.copy(path.parent.parent / part / f"{path.stem}{suffix}", folder_r / part / name)
        make_shards([str(folder_r)], tmp_path / f"shards{rank}", ShardSettings(samples_per_shard=4))
        shards.append(tmp_path / f"shards{rank}" / "000000.tar")
    listed = [shards[plan.rank_shards.index([position])] for position in range(2)]

    on_folders = tmp_path / "folders"
    ok(launch(train_assets, on_folders, *common, f"train.seed={seed}", nproc=2, data=",".join(sources)))
    on_shards = tmp_path / "shards"
    ok(launch(train_assets, on_shards, *common, f"train.seed={seed}", *shard_keys(*listed), nproc=2))
    a, b = metrics(on_folders), metrics(on_shards)
    assert [r["bucket"] for r in b] == [r["bucket"] for r in a] == plan.sequence
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=FLOAT32_RTOL)
    assert json.loads((on_shards / "buckets.json").read_text()) == {name: 2 for name in names}


def kill_after_first_checkpoint(assets, save, *overrides):
    """``tools/train_video.py`` in a process of its own, SIGKILLed (with its loader workers) once its first checkpoint is
    committed; returns ``save``."""
    proc = subprocess.Popen(command(assets, save, *overrides), cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (save / "latest").is_file():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:] if proc.poll() else "timeout"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (save / "40").exists()
    return save


def test_a_run_killed_mid_epoch_resumes_exactly_mid_shard_and_into_the_next_epoch(train_assets, bucket_clips, tmp_path):
    """6 clips of 3 buckets in 3 shards of 2, one rank, batches of 1: an epoch is 6 steps; a buffer of 3 mixes shards.
    Killed after checkpoint 4, resumed to step 8 (epoch 1): the losses and weights of the run that was not killed."""
    out = tmp_path / "shards"
    make_shards([str(bucket_clips / name) for name in ("four_three", "tall", "wide_short")], out,
                ShardSettings(samples_per_shard=2))
    common = ["train.save_interval=4", "train.micro_batch_size=1", "train.lr_schedule.decay_iters=8",
              f"data.buckets={json.dumps([BUCKETS[0], *BUCKETS[2:4]])}".replace(" ", ""),
              *shard_keys(f"{out}/{{000000..000002}}.tar", buffer=3)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed run's process (OMP_NUM_THREADS=1): the same float rounding
    try:
        straight = tmp_path / "straight"
        train_here(train_assets, straight, "train.train_iters=8", *common)
        resumed = tmp_path / "resumed"
        killed = kill_after_first_checkpoint(train_assets, tmp_path / "killed", "train.train_iters=40", *common)
        train_here(train_assets, resumed, "train.train_iters=8", f"train.resume={killed / '4'}", *common)
    finally:
        torch.set_num_threads(threads)
    a, b = metrics(straight), metrics(resumed)
    assert [(r["step"], r["epoch"]) for r in b] == [(5, 0), (6, 0), (7, 1), (8, 1)]
    assert a[-1]["cache_hit_rate"] == 1.0  # the second epoch from the in-run cache, keyed by shard and key
    assert [r["bucket"] for r in b] == [r["bucket"] for r in a[4:]]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a[4:]], rel=FLOAT32_RTOL)
    wa, wb = read_state_dict(straight / "8"), read_state_dict(resumed / "8")
    for key in wa:
        assert_close_rel(wb[key], wa[key], what=key)
