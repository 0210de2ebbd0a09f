"""Training on clips of several aspect ratios and lengths with data.buckets: torchrun with two processes and ZeRO-2,
the bucket of every step in the metrics, buckets.json, the clip that fits none named, an exact resume mid-epoch, and
the latent cache drawing what training from video draws."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sat_video.formats.sat_checkpoint import read_state_dict
from tests.conftest import BUCKET_CLIPS, BUCKETS, ROOT

pytestmark = pytest.mark.slow

CONFIGS = [str(ROOT / "configs" / name) for name in ("cogvideox_5b.yaml", "tiny.yaml", "tiny_train.yaml")]


def train(assets, clips, save, *overrides):
    sources = ",".join(sorted(str(p) for p in clips.iterdir() if p.name != "images"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tools" / "train_video.py"), "--base", *CONFIGS, f"data.sources=[{sources}]",
               f"model.text_encoder.path={assets / 't5'}", f"train.save={save}", "train.tensorboard=false",
               "train.train_iters=6", "train.save_interval=3", "train.micro_batch_size=1",
               f"data.buckets={json.dumps(BUCKETS[:4])}".replace(" ", ""), *overrides]
    proc = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def same_weights(a, b):
    wa, wb = read_state_dict(a), read_state_dict(b)
    return wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=1e-6, atol=1e-7) for k in wa)


def test_bucketed_training_with_two_processes_resumes_exactly_and_trains_the_same_from_the_cache(
        train_assets, bucket_clips, tmp_path):
    straight = train(train_assets, bucket_clips, tmp_path / "straight")
    buckets = json.loads((tmp_path / "straight" / "buckets.json").read_text())
    assert {name: len(files) for name, files in buckets.items()} == {"9x48x64": 2, "9x64x112": 2, "9x112x64": 2, "17x64x112": 2}
    for name, files in buckets.items():
        assert all(BUCKET_CLIPS[file.split("/")[-3]][1] == name for file in files)
    skipped = (tmp_path / "straight" / "skipped_files.txt").read_text().splitlines()
    assert len(skipped) == 2 and all("/too_short/" in line and "fits no bucket" in line for line in skipped)
    assert [r["step"] for r in straight] == list(range(1, 7)) and all(r["bucket"] in buckets for r in straight)
    assert len({r["bucket"] for r in straight}) >= 2  # 4 buckets of one batch each per epoch: several are drawn

    # Killed after checkpoint 3 and resumed in the middle of the first epoch: the same steps and weights.
    resumed = train(train_assets, bucket_clips, tmp_path / "resumed", f"train.resume={tmp_path / 'straight' / '3'}")
    assert [(r["step"], r["bucket"]) for r in resumed] == [(r["step"], r["bucket"]) for r in straight[3:]]
    assert all(abs(a["loss"] - b["loss"]) <= 1e-6 for a, b in zip(resumed, straight[3:]))
    assert same_weights(tmp_path / "resumed" / "6", tmp_path / "straight" / "6")

    # Encoded once at the bucket sizes, the cache trains as the videos do.
    from sat_video import load_config
    from tools.precompute_latents import encode

    sources = ",".join(sorted(str(p) for p in bucket_clips.iterdir() if p.name != "images"))
    cfg = load_config(CONFIGS, [f"data.sources=[{sources}]", f"model.text_encoder.path={train_assets / 't5'}",
                                f"data.buckets={json.dumps(BUCKETS[:4])}".replace(" ", "")])
    environment = dict(os.environ)
    encode(cfg, tmp_path / "cache", 4, False)
    os.environ.clear()  # encode joined a one-process group here (RANK, MASTER_PORT, ...): the run below must not
    os.environ.update(environment)
    cached = train(train_assets, bucket_clips, tmp_path / "cached", f"data.latent_cache={tmp_path / 'cache'}")
    assert [r["bucket"] for r in cached] == [r["bucket"] for r in straight]
    assert all(abs(a["loss"] - b["loss"]) <= 1e-5 for a, b in zip(cached, straight))


def test_a_staged_run_crosses_its_boundary_and_resumes_in_the_second_stage_exactly(train_assets, bucket_clips, tmp_path):
    """Low resolution and short clips of two folders, then every folder at more sizes with a new LR and batch."""
    stages = {"train": {"train_iters": 6, "save_interval": 2, "stages": [
        {"until": 3, "set": {"data.sources": [str(bucket_clips / "wide_short"), str(bucket_clips / "four_three")],
                             "data.buckets": [[9, 48, 64], [9, 64, 112]]}},
        {"until": 6, "set": {"train.optimizer.lr": 5e-4, "train.micro_batch_size": 2}}]}}
    layer = tmp_path / "stages.yaml"
    layer.write_text(json.dumps(stages))  # JSON is YAML

    def run(save, *overrides):
        sources = ",".join(sorted(str(p) for p in bucket_clips.iterdir() if p.name != "images"))
        command = [sys.executable, str(ROOT / "tools" / "train_video.py"), "--base", *CONFIGS, str(layer),
                   f"data.sources=[{sources}]", f"model.text_encoder.path={train_assets / 't5'}", f"train.save={save}",
                   "train.tensorboard=false", "train.micro_batch_size=1",
                   f"data.buckets={json.dumps(BUCKETS[:4])}".replace(" ", ""), *overrides]
        proc = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc.stderr, [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]

    validation = ["train.validation.interval=6", "train.validation.prompts=[a red circle]", "train.validation.steps=2",
                  "train.validation.sizes=[[9,48,64],[5,64,112]]"]
    log, straight = run(tmp_path / "straight", *validation)
    assert "stage 1 from iteration 4" in log
    for size in ("9x48x64", "5x64x112"):  # validation at every asked size, without changing what training draws
        assert (tmp_path / "straight" / "samples" / "6" / size / "000_a_red_circle.mp4").is_file()
    assert {r["bucket"] for r in straight[:3]} <= {"9x48x64", "9x64x112"}  # stage 0: its two folders, its two sizes
    assert [r["lr"] for r in straight] == pytest.approx([5e-4, 1e-3, 1e-3, 2.5e-4, 5e-4, 5e-4])  # warm-up again
    assert json.loads((tmp_path / "straight" / "buckets-stage0.json").read_text()).keys() == {"9x48x64", "9x64x112"}
    _, resumed = run(tmp_path / "resumed", f"train.resume={tmp_path / 'straight' / '4'}")
    assert [(r["step"], r["bucket"]) for r in resumed] == [(r["step"], r["bucket"]) for r in straight[4:]]
    assert all(abs(a["loss"] - b["loss"]) <= 1e-6 for a, b in zip(resumed, straight[4:]))
    assert same_weights(tmp_path / "resumed" / "6", tmp_path / "straight" / "6")
