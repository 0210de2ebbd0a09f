"""The latent cache: tools/precompute_latents.py writes it (one process or torchrun), training reads it and draws
exactly what training from the videos draws, and mismatched or broken caches are refused by name."""

import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from sat_video.common.errors import CacheError
from sat_video.data.clips import ClipSpec, VideoDataset, collate
from sat_video.data.latent_cache import LatentCache, collate_cached
from sat_video.data.sampler import ClipBatchSampler
from sat_video.data.sources import discover
from sat_video.diffusion.conditioning import TrainingInputBuilder
from sat_video.model.build import build_frozen_stages
from sat_video.model.config import DiTConfig
from sat_video.training.metrics import read_metrics
from tests.conftest import ROOT, tiny_config
from tests.numerics import assert_close_rel

BASE = [str(ROOT / "configs" / name) for name in ("cogvideox_2b.yaml", "tiny.yaml", "tiny_train.yaml")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def data_args(assets, data=None):
    return [f"data.sources=[{data or assets / 'data'}]", f"model.text_encoder.path={assets / 't5'}"]


def precompute(assets, out, *overrides, nproc=1, base=BASE, data=None):
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    command = [
        *launcher,
        str(ROOT / "tools" / "precompute_latents.py"),
        "--base",
        *base,
        *data_args(assets, data),
        "--out",
        str(out),
        *overrides,
    ]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def train(assets, save, *overrides):
    command = [
        sys.executable,
        str(ROOT / "tools" / "train_video.py"),
        "--base",
        *BASE,
        *data_args(assets),
        f"train.save={save}",
        "train.report_to=[none]",
        *overrides,
    ]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def losses(save):
    return [record["loss"] for record in read_metrics(save)]


@pytest.mark.slow
def test_training_from_the_cache_draws_what_training_from_video_draws(train_assets, tmp_path):
    # The tiny VAE samples its posterior: the cache stores mean and std, and each step draws as encoding would.
    cache = tmp_path / "cache"
    ok(precompute(train_assets, cache, "--samples-per-shard", "3"))
    manifest = json.loads((cache / "manifest.json").read_text())
    assert len(manifest["samples"]) == 4 and manifest["skipped"] == []
    assert sorted(p.name for p in cache.glob("*.safetensors")) == ["shard-000-00000.safetensors", "shard-000-00001.safetensors"]
    assert set(manifest["samples"][0]["tensors"]) == {"latent_mean", "latent_std", "text"}
    assert not list(tmp_path.glob(".cache.partial-*"))

    common = ["train.train_iters=6", "train.save_interval=6", "model.text_encoder.path=/nonexistent/t5"]
    ok(train(train_assets, tmp_path / "video", "train.train_iters=6", "train.save_interval=6"))
    # T5 and the video files are not touched when training from the cache (the T5 path above does not exist).
    ok(train(train_assets, tmp_path / "cached", *common, f"data.latent_cache={cache}", "data.sources=[/nonexistent]"))
    from_video, from_cache = losses(tmp_path / "video"), losses(tmp_path / "cached")
    assert len(from_cache) == 6
    assert max(abs(a - b) for a, b in zip(from_video, from_cache)) < 1e-5, (from_video, from_cache)

    # A config the cache was not made for is refused, naming the setting and both values.
    proc = train(train_assets, tmp_path / "other", *common, f"data.latent_cache={cache}", "data.height=32", "data.width=32")
    assert proc.returncode == 2
    assert "data.height: cache 64, config 32" in proc.stderr
    # An existing cache is never replaced without --overwrite.
    proc = precompute(train_assets, cache)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


@pytest.mark.slow
def test_two_processes_split_the_files_and_bad_files_are_listed(train_assets, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(train_assets / "data", data)
    (data / "videos" / "broken.mp4").write_bytes(b"not a video")
    (data / "labels" / "broken.txt").write_text("a broken clip")
    cache = tmp_path / "cache"
    ok(precompute(train_assets, cache, nproc=2, data=data))
    manifest = json.loads((cache / "manifest.json").read_text())
    assert [s["path"] for s in manifest["samples"]] == sorted(
        str(p) for p in (data / "videos").glob("*.mp4") if p.name != "broken.mp4"
    )
    assert [path for path, _ in manifest["skipped"]] == [str(data / "videos" / "broken.mp4")]
    assert {s["shard"][:9] for s in manifest["samples"]} == {"shard-000", "shard-001"}
    assert len(LatentCache(cache)) == 4 and LatentCache(cache).skipped[0][0].endswith("broken.mp4")


def _frozen(cfg, t5):
    dit_config = DiTConfig.from_config(cfg)
    return TrainingInputBuilder(
        dit_config, cfg.model.diffusion, build_frozen_stages(cfg.model), scale_factor=cfg.model.first_stage.scale_factor
    )


def test_i2v_inputs_from_the_cache_equal_those_from_the_clips(train_assets, tmp_path):
    """In-process: precompute for 5B-I2V, then compare prepare() and prepare_cached() draw for draw."""
    from tools.precompute_latents import encode

    cfg = tiny_config(
        "cogvideox_5b_i2v",
        *data_args(train_assets),
        "model.first_stage.path=null",
        "model.first_stage.architecture.block_out_channels=[8,8,16,16]",
        "model.first_stage.architecture.layers_per_block=1",
        "model.first_stage.architecture.norm_num_groups=4",
        "model.first_stage.scale_factor=0.7",
        "data.skip_frames=0",
        "data.num_workers=0",
        "model.dit.num_frames=9",
        "deepspeed.precision=fp32",
    )
    assert encode(cfg, tmp_path / "cache", samples_per_shard=8, overwrite=False) == 0
    cache = LatentCache(tmp_path / "cache")
    cache.check_compatible(cfg.model, cfg.data)
    assert "first_frame" in cache.samples[0]["tensors"]

    frozen = _frozen(cfg, train_assets / "t5")
    refs = discover([train_assets / "data"])
    batch_items = next(iter(ClipBatchSampler(cache.kinds, 2, 0, 1, seed=0)))
    raw = collate([VideoDataset(refs, ClipSpec.from_config(cfg.data, cfg.model.dit))[item] for item in batch_items])
    cached = collate_cached([cache[item] for item in batch_items])
    assert raw.paths == cached.paths
    a = frozen.prepare(raw.video, raw.captions, torch.Generator().manual_seed(3))
    b = frozen.prepare_cached(cached, torch.Generator().manual_seed(3))
    # encoded alone when cached, in this batch now: the VAE's sums run in another order
    assert_close_rel(b.latents, a.latents, what="latents")
    assert_close_rel(b.text, a.text, what="text")
    assert_close_rel(b.image_latents, a.image_latents, what="image latents")
    assert b.latents.abs().max() > 0.1 and b.image_latents[:, 0].abs().max() > 0.01
    # latents encoded whole are not those of a tiled encode: a run with data.vae_tiling refuses this cache
    with pytest.raises(CacheError, match="data.vae_tiling: cache None, config True"):
        cache.check_compatible(cfg.model, OmegaConf.merge(cfg.data, {"vae_tiling": True}))
    # nor can a run whose clips change every epoch use it (precompute_latents refuses through the same settings)
    with pytest.raises(CacheError, match="data.random_start cuts a different clip from each video every epoch"):
        cache.check_compatible(cfg.model, OmegaConf.merge(cfg.data, {"random_start": True}))


def test_with_buckets_the_cache_holds_each_clip_at_its_bucket_and_draws_what_the_clips_draw(train_assets, bucket_clips,
                                                                                             tmp_path):
    """In-process: precompute with data.buckets, then the same buckets per sample and the same training inputs."""
    from sat_video.data.buckets import assign_buckets, parse_buckets
    from sat_video.data.clips import source_shape
    from tools.precompute_latents import encode

    sources = ",".join(sorted(str(p) for p in bucket_clips.iterdir() if p.name != "images"))
    cfg = tiny_config("cogvideox_5b", f"data.sources=[{sources}]", f"model.text_encoder.path={train_assets / 't5'}",
                      "data.buckets=[[9,64,112],[17,64,112],[9,48,64],[9,112,64]]", "data.skip_frames=0",
                      "data.num_workers=0", "model.first_stage.path=null", "deepspeed.precision=fp32",
                      "model.first_stage.architecture.block_out_channels=[8,8,16,16]",
                      "model.first_stage.architecture.layers_per_block=1",
                      "model.first_stage.architecture.norm_num_groups=4")
    assert encode(cfg, tmp_path / "cache", samples_per_shard=4, overwrite=False) == 0
    cache = LatentCache(tmp_path / "cache")
    cache.check_compatible(cfg.model, cfg.data)
    assert len(cache.skipped) == 2 and all("fits no bucket" in reason for _, reason in cache.skipped)
    spec = ClipSpec.from_config(cfg.data, cfg.model.dit)
    assigned, _ = assign_buckets(discover(list(cfg.data.sources)), parse_buckets(cfg.data.buckets, 2),
                                 lambda ref: source_shape(ref, spec), 1.0)
    clips = VideoDataset([ref for ref, _ in assigned], spec, [bucket for _, bucket in assigned])
    assert cache.kinds == clips.kinds and [s["path"] for s in cache.samples] == [str(ref.path) for ref, _ in assigned]
    for entry, (_, bucket) in zip(cache.samples, assigned):  # latents [C, F, h, w] at the bucket's size
        assert entry["latent_shape"][1:] == [(bucket.frames - 1) // 4 + 1, bucket.height // 8, bucket.width // 8]

    frozen = _frozen(cfg, train_assets / "t5")
    for batch_items in itertools.islice(ClipBatchSampler(cache.kinds, 2, 0, 1, seed=0), 4):  # an epoch: one per bucket
        raw = collate([clips[item] for item in batch_items])
        cached = collate_cached([cache[item] for item in batch_items])
        assert raw.paths == cached.paths and raw.bucket == cached.bucket
        a = frozen.prepare(raw.video, raw.captions, torch.Generator().manual_seed(3))
        b = frozen.prepare_cached(cached, torch.Generator().manual_seed(3))
        assert_close_rel(b.latents, a.latents, what="latents")
        assert_close_rel(b.text, a.text, what="text")


def test_a_missing_or_broken_cache_is_refused_by_name(tmp_path):
    with pytest.raises(CacheError, match="manifest.json not found"):
        LatentCache(tmp_path / "nothing")
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="is not a latent-cache manifest"):
        LatentCache(folder)
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "settings": {},
                "samples": [
                    {
                        "path": "a.mp4",
                        "caption": "c",
                        "is_image": False,
                        "shard": "shard-000-00000.safetensors",
                        "key": 0,
                        "tensors": ["latent_mean", "text"],
                        "latent_shape": [16, 1, 1, 1],
                    }
                ],
            }
        )
    )
    with pytest.raises(CacheError, match="shard files listed in manifest.json are missing: shard-000-00000"):
        LatentCache(folder)
