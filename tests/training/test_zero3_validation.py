"""Validation under ZeRO-3: two processes sample with the engine's partitioned DiT (every rank takes part in each
forward), the main rank writes the videos and logs the per-stage memory table, and training's losses are exactly
those of the same run without validation."""

import re

import pytest

from tests.numerics import FLOAT32_RTOL
from tests.training.runs import launch, metrics, ok

pytestmark = pytest.mark.slow

COMMON = ["deepspeed.zero_stage=3", "train.train_iters=4", "train.save_interval=4"]
VALIDATION = ["train.validation.interval=2", "train.validation.prompts=[a red square]", "train.validation.steps=2"]


def test_zero3_validation_samples_logs_memory_and_leaves_training_unchanged(train_assets, tmp_path):
    with_validation, without = tmp_path / "validated", tmp_path / "plain"
    proc = ok(launch(train_assets, with_validation, *COMMON, *VALIDATION, nproc=2))
    # ZeRO-3's engine outlives shutdown() (its hooks hold it): the process ends without interpreter finalization
    assert "outlived shutdown(): ending the process without interpreter finalization" in proc.stderr
    ok(launch(train_assets, without, *COMMON, nproc=2))

    a, b = metrics(with_validation), metrics(without)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=FLOAT32_RTOL)

    assert sorted(p.name for p in (with_validation / "samples").iterdir()) == ["2", "4"]
    for iteration in ("2", "4"):
        assert len(list((with_validation / "samples" / iteration).glob("*.mp4"))) == 1, iteration
    assert not (without / "samples").exists()

    # "validation at iteration 2 took X s; samples in <folder>" then the table: header, one line per stage
    match = re.search(r"validation at iteration 2 took [\d.]+ s; samples in \S+\n(peak memory per stage.*:)\n"
                      r"((?:  \S.*\n?)+)", proc.stderr)
    assert match, proc.stderr[-4000:]
    stages = [line.strip() for line in match.group(2).splitlines()]
    for stage in ("T5", "DiT steps", "VAE decode"):
        assert any(line.startswith(stage) for line in stages), (stage, match.group(0))
