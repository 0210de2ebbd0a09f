"""Training on clips of several aspect ratios and lengths with data.buckets, in two stages: torchrun with two processes
and ZeRO-2, the bucket of every step in the metrics, buckets.json, the clip that fits none named, validation at several
sizes, and an exact resume in the second stage (after crossing the boundary)."""

import json
import os
import subprocess
import sys

import pytest

from sat_video.formats.sat_checkpoint import read_state_dict
from sat_video.training.metrics import read_metrics
from tests.conftest import BUCKET_CLIPS, BUCKETS, ROOT
from tests.numerics import FLOAT32_RTOL, assert_close_rel

pytestmark = pytest.mark.slow

CONFIGS = [str(ROOT / "configs" / name) for name in ("cogvideox_5b.yaml", "tiny.yaml", "tiny_train.yaml")]


def assert_same_weights(a, b):
    wa, wb = read_state_dict(a), read_state_dict(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert_close_rel(wa[key], wb[key], what=key)


def test_bucketed_staged_training_with_two_processes_resumes_exactly_in_the_second_stage(train_assets, bucket_clips, tmp_path):
    # Stage 0: two folders at two sizes; stage 1: every folder at the four sizes, a new LR (warm-up again) and batch.
    stages = {"train": {"train_iters": 6, "save_interval": 2, "stages": [
        {"until": 3, "set": {"data.sources": [str(bucket_clips / "wide_short"), str(bucket_clips / "four_three")],
                             "data.buckets": [[9, 48, 64], [9, 64, 112]]}},
        {"until": 6, "set": {"train.optimizer.lr": 5e-4, "train.micro_batch_size": 2}}]}}
    layer = tmp_path / "stages.yaml"
    layer.write_text(json.dumps(stages))  # JSON is YAML

    def run(save, *overrides):
        sources = ",".join(sorted(str(p) for p in bucket_clips.iterdir() if p.name != "images"))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   str(ROOT / "tools" / "train_video.py"), "--base", *CONFIGS, str(layer), f"data.sources=[{sources}]",
                   f"model.text_encoder.path={train_assets / 't5'}", f"train.save={save}", "train.report_to=[none]",
                   "train.micro_batch_size=1", f"data.buckets={json.dumps(BUCKETS[:4])}".replace(" ", ""), *overrides]
        proc = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc.stderr, read_metrics(save)

    validation = ["train.validation.interval=6", "train.validation.prompts=[a red circle]", "train.validation.steps=2",
                  "train.validation.sizes=[[9,48,64],[5,64,112]]"]
    log, straight = run(tmp_path / "straight", *validation)
    assert "stage 1 from iteration 4" in log
    first = json.loads((tmp_path / "straight" / "buckets-stage0.json").read_text())
    second = json.loads((tmp_path / "straight" / "buckets-stage1.json").read_text())
    assert {name: len(files) for name, files in first.items()} == {"9x48x64": 2, "9x64x112": 2}
    assert {name: len(files) for name, files in second.items()} == {"9x48x64": 2, "9x64x112": 2, "9x112x64": 2,
                                                                   "17x64x112": 2}
    for name, files in second.items():
        assert all(BUCKET_CLIPS[file.split("/")[-3]][1] == name for file in files)
    skipped = (tmp_path / "straight" / "skipped_files.txt").read_text().splitlines()
    assert len(skipped) == 2 and all("/too_short/" in line and "fits no bucket" in line for line in skipped)
    assert [r["step"] for r in straight] == list(range(1, 7))
    assert {r["bucket"] for r in straight[:3]} <= set(first) and {r["bucket"] for r in straight[3:]} <= set(second)
    assert [r["lr"] for r in straight] == pytest.approx([5e-4, 1e-3, 1e-3, 2.5e-4, 5e-4, 5e-4])
    for size in ("9x48x64", "5x64x112"):  # validation at every asked size, without changing what training draws
        assert (tmp_path / "straight" / "samples" / "6" / size / "000_a_red_circle.mp4").is_file()

    # Killed after checkpoint 4, in the second stage: the same buckets, losses and weights.
    _, resumed = run(tmp_path / "resumed", f"train.resume={tmp_path / 'straight' / '4'}")
    assert [(r["step"], r["bucket"]) for r in resumed] == [(r["step"], r["bucket"]) for r in straight[4:]]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight[4:]], rel=FLOAT32_RTOL)
    assert_same_weights(tmp_path / "resumed" / "6", tmp_path / "straight" / "6")
