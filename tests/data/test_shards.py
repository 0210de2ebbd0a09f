"""WebDataset shards: writing them (bad files named, an interrupted write finished without rewriting), reading them back
through local paths and pipe: commands, damaged input (a shard cut mid-file, a command that never answers), the stream's
resumable state, and what a config cannot combine with shards."""

import json
import logging
import os
import shutil
import tarfile

import pytest

from sat_video.common.errors import ConfigError, DataError
from sat_video.data.buckets import Bucket
from sat_video.data.clips import ClipSpec
from sat_video.data.shard_index import KindRule, ShardInfo, load_shard_infos
from sat_video.data.shard_reader import expand_shards
from sat_video.data.shard_stream import RankStream, ShardBatchSampler, ShardPlan
from sat_video.data.shard_writer import ShardSettings, make_shards
from sat_video.fixtures.synthetic import make_moving_shapes
from tests.conftest import tiny_config, write_hostile_videos
from tools.make_shards import main as make_shards_tool

SPEC = ClipSpec(num_frames=9, height=32, width=32, fps=8, skip_frames=0)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Six good 16-frame 64x64 clips (SFT layout) and a folder of bad files, each with a label."""
    root = tmp_path_factory.mktemp("shard_clips")
    good = make_moving_shapes(root / "good", num_videos=6, num_frames=16, height=64, width=64, fps=8, seed=0)
    bad = root / "bad"
    reasons = write_hostile_videos(bad / "videos", huge_size=(96, 96))  # over --max-source-pixels below
    (bad / "videos" / "empty.mp4").write_bytes(b"")
    (bad / "videos" / "text.mp4").write_text("not a video")
    shutil.copy(good[0][0], bad / "videos" / "unlabelled.mp4")
    (bad / "labels").mkdir()
    for name in [*reasons, "empty.mp4", "text.mp4"]:
        (bad / "labels" / name).with_suffix(".txt").write_text("a caption")
    reasons.update({"huge.mp4": "exceeds data.max_source_pixels", "empty.mp4": "empty file", "text.mp4": "not a readable video",
                    "unlabelled.mp4": "caption file missing"})
    return root, reasons


def test_shards_hold_each_usable_file_with_its_metadata_and_name_every_bad_file(clips, tmp_path, capsys):
    root, reasons = clips
    out = tmp_path / "shards"
    assert make_shards_tool([str(root / "bad"), str(root / "good"), "--out", str(out), "--samples-per-shard", "4",
                             "--workers", "2", "--max-source-pixels", str(64 * 64)]) == 0
    assert "6 sample(s) in 3 shard(s)" in capsys.readouterr().out  # 12 files cut 4 a shard: the first has only bad ones
    skipped = dict(line.split("\t") for line in (out / "skipped_files.txt").read_text().splitlines())
    assert {os.path.basename(path) for path in skipped} == set(reasons)
    for path, reason in skipped.items():
        assert reasons[os.path.basename(path)] in reason, (path, reason)
    index = json.loads((out / "index.json").read_text())
    assert (index["samples"], index["skipped"]) == (6, 6)
    assert [(s["name"], s["samples"]) for s in index["shards"]] == [("000000.tar", 0), ("000001.tar", 2), ("000002.tar", 4)]
    assert index["shapes"] == [[0, 64, 64, 16, 8.0, 6]]
    with tarfile.open(out / "000002.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile(names[0]).read())
    assert names[:2] == ["000000008.json", "000000008.mp4"] and len(names) == 8
    assert "/good/videos/00002_" in meta["source"] and meta["caption"].startswith("a ")
    assert (meta["width"], meta["height"], meta["frames"], meta["fps"]) == (64, 64, 16, 8.0) and meta["duration"] == 2.0


def test_an_interrupted_write_is_finished_without_rewriting_whole_shards_and_another_output_is_refused(clips, tmp_path,
                                                                                                          capsys):
    root, _ = clips
    out = tmp_path / "shards"
    make_shards([str(root / "good")], out, ShardSettings(samples_per_shard=2))
    kept = {name: (out / name).stat() for name in ("000000.tar", "000002.tar")}
    # killed while writing 000001.tar: only its temporary file was there (the part is written just before the rename)
    (out / "000001.tar").rename(out / ".000001.tar.x1y2.tar")
    (out / ".parts" / "000001.tar.json").unlink()
    (out / "index.json").unlink()
    index = make_shards([str(root / "good")], out, ShardSettings(samples_per_shard=2))
    assert [s["samples"] for s in index["shards"]] == [2, 2, 2] and (out / "000001.tar").is_file()
    assert not list(out.glob(".000001.tar.*"))
    for name, stat in kept.items():
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)

    assert make_shards_tool([str(root / "good"), "--out", str(out), "--samples-per-shard", "3"]) == 2
    assert "holds shards of other sources or settings (settings: then" in capsys.readouterr().err
    (tmp_path / "other" / "notes.txt").parent.mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert make_shards_tool([str(root / "good"), "--out", str(tmp_path / "other")]) == 2
    assert "holds files that tools/make_shards.py did not write" in capsys.readouterr().err


@pytest.fixture(scope="module")
def shards(clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("read") / "shards"
    make_shards([str(clips[0] / "good")], out, ShardSettings(samples_per_shard=3))
    return out


def _stream(infos, **kwargs) -> tuple[RankStream, list]:
    plan = ShardPlan(infos, KindRule(SPEC, None, 1.0), batch_size=1, world_size=1, seed=0)
    skipped: list = []
    return RankStream(plan, 0, 0, buffer_size=1, timeout_s=kwargs.get("timeout_s", 30.0), skipped=skipped), skipped


def _drain(stream: RankStream) -> list[str]:
    names = []
    while (sample := stream._shuffled()) is not None:
        names.append(sample.name.rsplit(":", 1)[1])
    return names


def test_pipe_commands_read_what_local_paths_read_index_included(shards):
    local = load_shard_infos(expand_shards([f"{shards}/{{000000..000001}}.tar"]), 10.0)
    piped = load_shard_infos(expand_shards([f"pipe:cat {shards}/{{000000..000001}}.tar"]), 10.0)
    assert [info.samples for info in piped] == [3, 3] and [i.shapes for i in piped] == [i.shapes for i in local]
    # the plan deals shards in an order of its own; each stream reads the same samples either way
    assert sorted(_drain(_stream(piped)[0])) == sorted(_drain(_stream(local)[0])) == [f"{i:09d}" for i in range(6)]


def test_a_shard_cut_mid_file_and_a_command_that_never_answers_end_with_warnings_naming_them(shards, tmp_path, caplog):
    info = load_shard_infos([str(shards / "000000.tar")], 10.0)[0]
    cut = tmp_path / "000000.tar"
    data = (shards / "000000.tar").read_bytes()
    cut.write_bytes(data[:len(data) * 2 // 3])  # inside the third sample's video
    stuck = f"pipe:sleep 30; cat {shards / '000000.tar'}"
    with caplog.at_level(logging.WARNING, logger="sat_video.data"):
        stream, skipped = _stream([ShardInfo(str(cut), info.samples, info.shapes)])
        assert _drain(stream) == ["000000000", "000000001"]
        stream, stuck_skipped = _stream([ShardInfo(stuck, info.samples, info.shapes)], timeout_s=0.5)
        assert _drain(stream) == []
    assert skipped == [(str(cut), "truncated or corrupt tar (ReadError: unexpected end of data); the rest of the shard "
                                  "is skipped this epoch")]
    assert stuck_skipped == [(stuck, "no data for 0.5 s (data.shard_timeout_s); the command was killed; the rest of the "
                                     "shard is skipped this epoch")]
    assert f"shard {cut}: truncated or corrupt tar" in caplog.text and f"shard {stuck}: no data for 0.5 s" in caplog.text
    # a shard cut exactly between samples reads as a shorter tar: the index's count tells
    with tarfile.open(shards / "000000.tar") as tar:
        second = tar.getmembers()[4].offset
    cut.write_bytes(data[:second] + bytes(1024))
    stream, skipped = _stream([ShardInfo(str(cut), info.samples, info.shapes)])
    assert _drain(stream) == ["000000000", "000000001"]
    assert skipped == [(str(cut), "ended after 2 of the 3 samples its index lists (truncated?)")]


def test_the_sampler_resumes_from_its_state_mid_shard_and_in_the_next_epoch(shards):
    infos = load_shard_infos(expand_shards([f"{shards}/{{000000..000001}}.tar"]), 10.0)
    rule = KindRule(SPEC, [Bucket(9, 32, 32)], 1.0)
    plan = ShardPlan(infos, rule, batch_size=1, world_size=1, seed=3)

    def batches(sampler, count):
        return [[(sample.name, epoch, index) for sample, epoch, index in batch]
                for batch, _ in zip(sampler, range(count))]

    straight = batches(ShardBatchSampler(plan, 0, buffer_size=4, timeout_s=10.0), 9)
    assert [batch[0][1] for batch in straight] == [0] * 6 + [1] * 3
    assert sorted(name for batch in straight[:6] for name, _, _ in batch) == sorted({n for b in straight for n, _, _ in b})
    for stop in (2, 6):  # inside the first epoch with samples in the buffer, and after its last batch
        first = ShardBatchSampler(plan, 0, buffer_size=4, timeout_s=10.0)
        batches(first, stop)
        state = first.state_after((0, stop - 1))
        resumed = ShardBatchSampler(plan, 0, buffer_size=4, timeout_s=10.0, start=(0, stop), state=state)
        assert batches(resumed, 9 - stop) == straight[stop:]
    with pytest.raises(DataError, match="the checkpoint holds no shard stream state"):
        ShardBatchSampler(plan, 0, buffer_size=4, timeout_s=10.0, start=(0, 2), state={})
    with pytest.raises(DataError, match=r"2 shard\(s\) for 3 data-parallel ranks"):
        ShardPlan(infos, rule, batch_size=1, world_size=3, seed=3)


@pytest.mark.parametrize("overrides, message", [
    (["data.sources=[a]"], "data.shards and data.sources cannot be mixed"),
    (["data.latent_cache=cache"], "data.shards and data.latent_cache cannot be combined"),
    (["data.buckets=[[5,64,64]]", "data.bucket_weights={5x64x64: 1}"], "data.bucket_weights cannot be used with data.shards"),
    (["data.shards=['s3://bucket/000.tar']"], "only local paths and pipe: commands are read"),
])
def test_what_shards_cannot_be_combined_with_is_refused_when_the_config_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("cogvideox_2b", "data.shards=['/data/{000..001}.tar']", *overrides)
